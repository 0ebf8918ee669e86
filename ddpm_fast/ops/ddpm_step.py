"""The fused sampler step: x̂0 from the model output, optional clip, the posterior mean, plus σ·z.

    x0     = (D·x − A·ε) / B             clipped to [−R, R] when clip
    x_prev = C0·x0 + C1·x + C2·ε + SIGMA·z

with (A, B, C0, C1, C2, SIGMA, T, D, R) read from row `step` of a coefficient table (schedule.py),
so the same op serves DDPM (C2 = 0) and DDIM, ε-, v- and x0-predicting models (ε here is the model
output, whatever it predicts), and a CUDA graph replays it for any step.
z is the given noise tensor, or Philox normals keyed by `key` = (seed, first image index) at
Philox step T when noise is None. x and the result are float32; ε may be fp32/bf16/fp16 in any
memory layout (the U-Net's channels_last output is read in place).

ddpm_step_general is the same step in torch ops for what the kernels do not fuse: dynamic
thresholding and learned variances (fast mode's separate path for those settings).
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from .. import _native
from ..schedule import (A, B, C0, C1, C2, COEF_COLS, D, LEARNED_VARIANCES, LMAX, LMIN, R,
                        SIGMA, T_COL)
from . import backend
from .philox import _philox_normal_op as philox_normal_op
from .philox import philox_normal_reference


def predict_x0(x, eps, row, clip: bool) -> torch.Tensor:
    """x̂0 = (D·x − A·ε) / B from one table row, clipped to [−R, R] when clip."""
    x0 = (row[D] * x - row[A] * eps.float()) / row[B]
    return torch.clamp(x0, -row[R], row[R]) if clip else x0


def threshold_sample(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022) exactly as DDPMScheduler._threshold_sample:
    per image s = clamp(quantile(|x0|, ratio), 1, max_value); x0 clamped to [−s, s], over s.
    Each image's s comes from its own pixels only, so an image's result never depends on the
    batch it is in."""
    b = x0.shape[0]
    flat = x0.reshape(b, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def split_output(out: torch.Tensor, channels: int, variance: Optional[str]):
    """(model output, predicted variance or None): a learned variance's U-Net gives 2·C
    channels, the second half its variance (DDPMScheduler.step's torch.split)."""
    if variance not in LEARNED_VARIANCES:
        return out, None
    torch._check(out.shape[1] == 2 * channels, lambda: (
        f"variance_type={variance!r} needs a model output of {2 * channels} channels (2 × the "
        f"image's {channels}: the second half is the variance), got {out.shape[1]}"))
    return torch.split(out, channels, dim=1)


def step_x0(x, out, row, clip: bool, threshold: Optional[tuple] = None,
            variance: Optional[str] = None) -> torch.Tensor:
    """A step's x̂0: from the output's first C channels, then thresholded (threshold = (ratio,
    max value), which replaces clipping as in diffusers) or clipped when clip."""
    eps, _ = split_output(out, x.shape[1], variance)
    if threshold is not None:
        return threshold_sample(predict_x0(x, eps, row, False), *threshold)
    return predict_x0(x, eps, row, clip)


def ddpm_step_general(x, out, coef, step, key, noise, clip: bool,
                      threshold: Optional[tuple] = None, variance: Optional[str] = None
                      ) -> torch.Tensor:
    """The step in torch ops, for what the fused kernels do not do: dynamic thresholding of x̂0
    (a per-image quantile) and learned variances (σ per element from the output's second half,
    schedule.py's module doc). Its arithmetic is DDPMScheduler.step's, in its order, so with a
    "diffusers" table and external noise it gives diffusers' samples bit for bit; and it never
    syncs with the host (the row, the Philox step word and the noise scale stay on the device),
    so fast mode's CUDA graph captures it. noise None: Philox normals keyed by `key` at the
    row's step word T, as the kernels draw them."""
    row = coef.index_select(0, step.reshape(1).to(coef.device)).reshape(-1)
    eps, predicted = split_output(out, x.shape[1], variance)
    x0 = step_x0(x, eps, row, clip, threshold)
    mean = row[C0] * x0 + row[C1] * x + row[C2] * eps.float()   # C2 = 0 (exact) but in DDIM
    if noise is None:
        word = row[T_COL].to(torch.int64).reshape(1)
        noise = philox_normal_op(key, word, x.shape[0], x[0].numel()).view_as(x)
    if predicted is None:                       # a fixed variance: the row's σ
        return mean + row[SIGMA] * noise
    predicted = predicted.float()
    if variance == "learned":                   # _get_variance returns the output itself
        scaled = predicted ** 0.5 * noise
    else:                                       # learned_range: between log β̃_t and log β_t
        frac = (predicted + 1) / 2
        scaled = torch.exp(0.5 * (frac * row[LMAX] + (1 - frac) * row[LMIN])) * noise
    # SIGMA flags the steps that add noise: none at the last (where √v may be NaN)
    return mean + torch.where(row[SIGMA] != 0, scaled, torch.zeros_like(scaled))


def ddpm_step_reference(x, eps, coef, step, key, noise, clip: bool) -> torch.Tensor:
    """Torch reference. Its arithmetic order matches diffusers' DDPMScheduler.step, so with
    "diffusers" tables and external noise it reproduces diffusers' samples bit for bit."""
    row = coef.index_select(0, step.reshape(1).to(coef.device)).reshape(-1)
    return _step_from_x0(x, predict_x0(x, eps, row, clip), eps, row, key, noise)


def _step_from_x0(x, x0, eps, row, key, noise) -> torch.Tensor:
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
    # the kernels dereference every one of these on x's device
    for name, t in (("eps", eps), ("coef", coef), ("step", step), ("key", key), ("noise", noise)):
        if t is not None:
            torch._check(t.device == x.device,
                         lambda: f"ddpm_step: {name} is on {t.device}, x on {x.device}")


def _run_triton(out, x, eps, coef, step, key, noise, clip):
    from ..kernels.triton import sampler

    noise = None if noise is None else noise.contiguous()
    with _native.on_device(x):
        sampler.ddpm_step(out, x.contiguous(), eps, coef.contiguous(), step, key, noise, clip)


@functools.lru_cache(maxsize=None)
def native_table_width() -> int:
    """The table width the built ddpm_fast._C was compiled for (8 before the D/R columns; 0 for
    a build whose step kernels do not yet take the table's row count)."""
    info = _native.build_info()
    if not _native.available() or not info.get("step_row_bound"):
        return 0
    return int(info.get("coef_cols", 8))


def _choose(device) -> str:
    """The kernel table's choice (backend.select), except that a native module built for another
    table layout (a checkout updated without rebuilding) is never run: an explicit request for
    it is an error, "auto" takes the next implementation that runs here, with a warning."""
    which = backend.select("ddpm_step", device)
    if which == "native" and native_table_width() != COEF_COLS:
        msg = (f"ddpm_fast._C was built for another step-table layout "
               f"({native_table_width() or 'no row bound'}; this package writes {COEF_COLS} "
               f"columns): rebuild it (pip install -e .)")
        if backend.requested() == "native":
            raise RuntimeError(msg)
        which = next(impl for impl in backend.fallbacks("ddpm_step", device)
                     if impl != "native" and backend.runs(impl, device, "ddpm_step"))
        warnings.warn(f"{msg}; using the {which} sampler step")
    return which


def _run_native(out, x, eps, coef, step, key, noise, clip):
    x = x.contiguous()
    coef = coef.contiguous()
    noise = None if noise is None else noise.contiguous()
    args = (x.data_ptr(), eps.data_ptr(), _native.DTYPE_CODES[eps.dtype], list(eps.stride()),
            _native.addr(noise), out.data_ptr(), coef.data_ptr(), coef.shape[0], step.data_ptr(),
            key.data_ptr(), list(x.shape), clip)
    if x.device.type == "cuda":
        with _native.on_device(x):
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
    which = _choose(x.device)
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
    which = _choose(x.device)
    if which == "torch":
        return ddpm_step_reference(x, eps, coef, step, key, noise, clip).contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    KERNELS[which](out, x, eps, coef, step, key, noise, clip)
    return out


@ddpm_step.register_fake
def _(x, eps, coef, step, key, noise, clip):
    _check(x, eps, coef, step, key, noise)
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)
