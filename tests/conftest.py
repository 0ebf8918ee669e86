import os

import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. The flag must be set before
# any kernel module is imported (ddpm_fast imports them lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ddpm_fast.unet import PRESETS, UNetConfig

def triton_backends() -> list:
    """["triton"] wherever the test extra installs Triton (Linux: pyproject's marker), so that a
    broken install fails the run here instead of silently dropping the Triton coverage."""
    import platform

    if platform.system() != "Linux":
        return []                       # the extra is Linux-only: nothing to test here
    import triton  # noqa: F401        (an ImportError here is a broken test environment)

    from ddpm_fast.ops.backend import triton_available

    if not triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        raise RuntimeError("triton imports but cannot run: TRITON_INTERPRET=1 must be set on CPU")
    return ["triton"]


TRITON = triton_backends()

# Tolerances per dtype, in one place (absolute, for values of order 1).
TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def diffusers_kwargs(cfg: UNetConfig) -> dict:
    d = cfg.to_dict()
    d.pop("_class_name")
    return d


@pytest.fixture
def tiny_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**diffusers_kwargs(PRESETS["tiny"])).eval()
