"""Which implementation an op runs: "native" (C++ on CPU, CUDA on GPU), "triton", or "torch".

The default ("auto") takes the native kernel when it was built for the tensor's device, else the
torch reference. DDPM_FAST_BACKEND=torch|native|triton|auto overrides it for a whole process (tests
and benchmarks use it to force each path); `use_backend(...)` does the same inside a block.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .. import _native

BACKENDS = ("auto", "torch", "native", "triton")
_override: list[str] = []


def requested() -> str:
    name = _override[-1] if _override else os.environ.get("DDPM_FAST_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"DDPM_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def native_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return _native.available()
    if device.type == "cuda":
        return _native.has_cuda()
    return False


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose(device: torch.device, triton_impl: bool = True, cuda_prefers: str = "native",
           cpu_prefers: str = "native") -> str:
    """The backend for an op on `device`; an explicit request that cannot run is an error.
    `cuda_prefers` / `cpu_prefers` name the op's faster implementation as measured
    (benchmarks/kernels.py)."""
    name = requested()
    if name == "auto":
        if device.type == "cpu" and cpu_prefers == "torch":
            return "torch"
        if device.type == "cuda" and cuda_prefers == "triton" and triton_impl and \
                triton_available(device):
            return "triton"
        return "native" if native_available(device) else "torch"
    if name == "native" and not native_available(device):
        raise RuntimeError(f"backend 'native' requested but ddpm_fast._C has no {device.type} "
                           f"kernels ({_native.build_info()})")
    if name == "triton" and not (triton_impl and triton_available(device)):
        raise RuntimeError(f"backend 'triton' requested but unavailable on {device.type} "
                           "(needs triton, and TRITON_INTERPRET=1 on CPU)")
    return name
