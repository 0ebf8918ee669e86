"""The few-step solvers' fused step (ddpm_fast/solvers/table.py), in place on fixed buffers:

    m    = P·x + Q·out
    x_c  = KX·x + KL·x_last + K0·m + K1·m1 + K2·m2 + K3·m3      (corrector=True only)
    x    ← A·x_c + B0·m + B1·m1 + B2·m2 + S·z                   (z: stochastic=True only)
    x_last ← x_c (corrector), m3 ← m2, m2 ← m1, m1 ← m

with the coefficients read from row `step` of the table on the device (a CUDA graph replays
any step) and z the Philox normals keyed by `key` = (seed, first image index) at the row's
WORD, as ddpm_step draws them. x and the buffers are float32 NCHW contiguous; `out` (the model
output) may be fp32/bf16/fp16 in any layout and have more channels than x (a learned variance:
the first C are read). Dynamic thresholding of m is not fused: the fast runner takes the torch
ops for it (FastRunner._solver_step).
"""
from __future__ import annotations

import torch

from .. import _native
from . import backend
from .philox import _philox_normal_op as philox_normal_op


def solver_step_reference(x, x_last, m1, m2, m3, out, coef, step, key, corrector: bool,
                          stochastic: bool) -> None:
    """The step in torch ops (the definition; the kernels round as it does on the CPU)."""
    from ..solvers import table as col

    row = coef.index_select(0, step.reshape(1).to(coef.device)).reshape(-1)
    out = out[:, :x.shape[1]].float()
    m = row[col.P] * x + row[col.Q] * out
    x_c = x
    if corrector:
        x_c = (row[col.KX] * x + row[col.KL] * x_last + row[col.K0] * m + row[col.K1] * m1
               + row[col.K2] * m2 + row[col.K3] * m3)
    new = row[col.A] * x_c + row[col.B0] * m + row[col.B1] * m1 + row[col.B2] * m2
    if stochastic:
        word = row[col.WORD].to(torch.int64).reshape(1)
        z = philox_normal_op(key, word, x.shape[0], x[0].numel()).view_as(x)
        new = new + row[col.S] * z
    if corrector:
        x_last.copy_(x_c)
    m3.copy_(m2)
    m2.copy_(m1)
    m1.copy_(m)
    x.copy_(new)


def _check(x, x_last, m1, m2, m3, out, coef, step, key):
    from ..solvers import COLS

    torch._check(x.dim() == 4, lambda: f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    for name, t in (("x", x), ("x_last", x_last), ("m1", m1), ("m2", m2), ("m3", m3)):
        torch._check(t.shape == x.shape and t.dtype == torch.float32 and t.is_contiguous()
                     and t.device == x.device,
                     lambda: f"solver_step: {name} must be float32, contiguous and shaped like x"
                             f" on x's device")
    torch._check(out.dim() == 4 and out.shape[0] == x.shape[0] and out.shape[1] >= x.shape[1]
                 and out.shape[2:] == x.shape[2:],
                 lambda: f"model output {tuple(out.shape)} does not cover x {tuple(x.shape)}")
    torch._check(out.dtype in _native.DTYPE_CODES, lambda: f"out dtype {out.dtype} unsupported")
    torch._check(coef.dim() == 2 and coef.shape[1] == COLS and coef.dtype == torch.float32,
                 lambda: f"coef must be float32 [steps, {COLS}] (a solver plan's table)")
    torch._check(step.dtype == torch.int64 and step.numel() == 1, lambda: "step must be int64 [1]")
    torch._check(key.dtype == torch.int64 and key.numel() == 2, lambda: "key must be int64 [2]")
    for name, t in (("out", out), ("coef", coef), ("step", step), ("key", key)):
        torch._check(t.device == x.device,
                     lambda: f"solver_step: {name} is on {t.device}, x on {x.device}")


def _run_native(x, x_last, m1, m2, m3, out, coef, step, key, corrector, stochastic):
    coef = coef.contiguous()
    args = ([t.data_ptr() for t in (x, x_last, m1, m2, m3)], out.data_ptr(),
            _native.DTYPE_CODES[out.dtype], list(out.stride()), coef.data_ptr(), coef.shape[0],
            step.data_ptr(), key.data_ptr(), list(x.shape), corrector, stochastic)
    if x.device.type == "cuda":
        with _native.on_device(x):
            _native._C.solver_step_cuda(*args, _native.stream_of(x))
    else:
        _native._C.solver_step_cpu(*args)


def _run_triton(x, x_last, m1, m2, m3, out, coef, step, key, corrector, stochastic):
    from ..kernels.triton import sampler

    with _native.on_device(x):
        sampler.solver_step((x, x_last, m1, m2, m3), out, coef.contiguous(), step, key,
                            corrector, stochastic)


KERNELS = {"native": _run_native, "triton": _run_triton}


@torch.library.custom_op("ddpm_fast::solver_step_", mutates_args=("x", "x_last", "m1", "m2",
                                                                   "m3"))
def solver_step_(x: torch.Tensor, x_last: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor,
                 m3: torch.Tensor, out: torch.Tensor, coef: torch.Tensor, step: torch.Tensor,
                 key: torch.Tensor, corrector: bool, stochastic: bool) -> None:
    """One solver step in place (module doc)."""
    _check(x, x_last, m1, m2, m3, out, coef, step, key)
    which = backend.select("solver_step", x.device)
    if which == "native" and not hasattr(_native._C, "solver_step_cpu"):
        which = "torch"                  # a module built before this op: rebuild for the kernel
    if which == "torch":
        solver_step_reference(x, x_last, m1, m2, m3, out, coef, step, key, corrector,
                              stochastic)
    else:
        KERNELS[which](x, x_last, m1, m2, m3, out, coef, step, key, corrector, stochastic)


@solver_step_.register_fake
def _(x, x_last, m1, m2, m3, out, coef, step, key, corrector, stochastic):
    _check(x, x_last, m1, m2, m3, out, coef, step, key)
