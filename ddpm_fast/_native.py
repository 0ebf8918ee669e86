"""The native module ddpm_fast._C and the glue that turns tensors into its integer arguments."""
from __future__ import annotations

import contextlib

import torch

try:
    from . import _C
except ImportError as e:  # a source checkout without a build: torch paths still work
    _C = None
    _IMPORT_ERROR = str(e)
else:
    _IMPORT_ERROR = None

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available() -> bool:
    return _C is not None


def has_cuda() -> bool:
    return _C is not None and hasattr(_C, "ddpm_step_cuda")


def build_info() -> dict:
    if _C is None:
        return {"native": False, "error": _IMPORT_ERROR}
    return {"native": True, **_C.build_info()}


def addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def on_device(t: torch.Tensor):
    """Launches inside run on t's GPU: Triton and the CUDA runtime launch on the *current*
    device, which outside torchrun need not be the tensor's (`--device cuda:1`). The CUDA
    runtime of our module picks up the context torch makes current. No-op on the CPU."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
