"""The fused sampler step: x̂0 from ε, optional clip, the posterior mean, plus σ·z.

    x0     = (x − A·ε) / B               clipped to [−1, 1] when clip
    x_prev = C0·x0 + C1·x + C2·ε + SIGMA·z

with (A, B, C0, C1, C2, SIGMA, T) read from row `step` of a coefficient table (schedule.py), so
the same op serves DDPM (C2 = 0) and DDIM (C1 = 0), and a CUDA graph replays it for any step.
z is the given noise tensor, or Philox normals keyed by `key` = (seed, first image index) at
Philox step T when noise is None. x and the result are float32; ε may be fp32/bf16/fp16 in any
memory layout (the U-Net's channels_last output is read in place).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _native
from ..schedule import A, B, C0, C1, C2, COEF_COLS, SIGMA, T_COL
from . import backend
from .philox import philox_normal_reference


def predict_x0(x, eps, row, clip: bool) -> torch.Tensor:
    """x̂0 = (x − A·ε) / B from one table row, clipped to [−1, 1] when clip."""
    x0 = (x - row[A] * eps.float()) / row[B]
    return x0.clamp(-1.0, 1.0) if clip else x0


def ddpm_step_reference(x, eps, coef, step, key, noise, clip: bool) -> torch.Tensor:
    """Torch reference. Its arithmetic order matches diffusers' DDPMScheduler.step, so with
    "diffusers" tables and external noise it reproduces diffusers' samples bit for bit."""
    row = coef.index_select(0, step.reshape(1).to(coef.device)).reshape(-1)
    x0 = predict_x0(x, eps, row, clip)
    mean = row[C0] * x0 + row[C1] * x
    if bool(row[C2] != 0):
        mean = mean + row[C2] * eps.float()
    if bool(row[SIGMA] == 0):
        return mean
    if noise is None:
        k = key.tolist()
        n = x.shape[0]
        noise = philox_normal_reference(int(k[0]), int(k[1]), n, x[0].numel(), int(row[T_COL]),
                                        x.device).view_as(x)
    return mean + row[SIGMA] * noise


def _check(x, eps, coef, step, key, noise):
    torch._check(x.dim() == 4, lambda: f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    torch._check(x.dtype == torch.float32, lambda: f"x must be float32, got {x.dtype}")
    torch._check(eps.shape == x.shape, lambda: f"eps shape {tuple(eps.shape)} != x shape {tuple(x.shape)}")
    torch._check(eps.dtype in _native.DTYPE_CODES, lambda: f"eps dtype {eps.dtype} not supported")
    torch._check(coef.dim() == 2 and coef.shape[1] == COEF_COLS and coef.dtype == torch.float32,
                 lambda: f"coef must be float32 [steps, {COEF_COLS}]")
    torch._check(step.dtype == torch.int64 and step.numel() == 1, lambda: "step must be int64 [1]")
    torch._check(key.dtype == torch.int64 and key.numel() == 2, lambda: "key must be int64 [2]")
    if noise is not None:
        torch._check(noise.shape == x.shape and noise.dtype == torch.float32,
                     lambda: "noise must be float32 and shaped like x")


def _run_triton(out, x, eps, coef, step, key, noise, clip):
    from ..kernels.triton import sampler

    noise = None if noise is None else noise.contiguous()
    sampler.ddpm_step(out, x.contiguous(), eps, coef.contiguous(), step, key, noise, clip)


def _run_native(out, x, eps, coef, step, key, noise, clip):
    x = x.contiguous()
    coef = coef.contiguous()
    noise = None if noise is None else noise.contiguous()
    args = (x.data_ptr(), eps.data_ptr(), _native.DTYPE_CODES[eps.dtype], list(eps.stride()),
            _native.addr(noise), out.data_ptr(), coef.data_ptr(), step.data_ptr(),
            key.data_ptr(), list(x.shape), clip)
    if x.device.type == "cuda":
        _native._C.ddpm_step_cuda(*args, _native.stream_of(x))
    else:
        _native._C.ddpm_step_cpu(*args)


KERNELS = {"native": _run_native, "triton": _run_triton}


@torch.library.custom_op("ddpm_fast::ddpm_step_out", mutates_args=("out",))
def ddpm_step_out(out: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor,
                  step: torch.Tensor, key: torch.Tensor, noise: Optional[torch.Tensor],
                  clip: bool) -> None:
    """Writes the step into `out` (float32, contiguous, may be x itself): for static buffers."""
    _check(x, eps, coef, step, key, noise)
    torch._check(out.is_contiguous() and out.shape == x.shape and out.dtype == torch.float32,
                 lambda: "out must be a contiguous float32 tensor shaped like x")
    which = backend.choose(x.device)
    if which == "torch":
        out.copy_(ddpm_step_reference(x, eps, coef, step, key, noise, clip))
    else:
        KERNELS[which](out, x, eps, coef, step, key, noise, clip)


@ddpm_step_out.register_fake
def _(out, x, eps, coef, step, key, noise, clip):
    _check(x, eps, coef, step, key, noise)


@torch.library.custom_op("ddpm_fast::ddpm_step", mutates_args=())
def ddpm_step(x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, step: torch.Tensor,
              key: torch.Tensor, noise: Optional[torch.Tensor], clip: bool) -> torch.Tensor:
    """x_{t-1} as a new float32 NCHW-contiguous tensor (see the module doc)."""
    _check(x, eps, coef, step, key, noise)
    which = backend.choose(x.device)
    if which == "torch":
        return ddpm_step_reference(x, eps, coef, step, key, noise, clip).contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    KERNELS[which](out, x, eps, coef, step, key, noise, clip)
    return out


@ddpm_step.register_fake
def _(x, eps, coef, step, key, noise, clip):
    _check(x, eps, coef, step, key, noise)
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)
