import os

import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. The flag must be set before
# any kernel module is imported (ddpm_fast imports them lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ddpm_fast.unet import PRESETS, UNetConfig

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
