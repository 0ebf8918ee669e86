"""GroupNorm with fp32 statistics, an optional per-(N, C) add before the norm and SiLU after.

    y = silu?( (x + add − μ_g) / √(σ²_g + eps) · weight + bias )

This is the ResBlock's `norm2(h + time_proj)` → SiLU, and every other GroupNorm → SiLU of the
U-Net, in one pass. Input NCHW or channels_last in fp32/bf16/fp16; the output has the input's
dtype and memory format. Statistics are fp32 (C++: double) and two-pass/Chan-merged, never
E[x²] − E[x]², so fp16 inputs with |x| ≈ 300 keep their precision.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _native
from . import backend


def _memory_format(x: torch.Tensor):
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def group_norm_reference(x, weight, bias, groups: int, eps: float, silu: bool, add=None):
    h = x.float()
    if add is not None:
        h = h + add.float()[:, :, None, None]
    y = F.group_norm(h, groups, weight.float(), bias.float(), eps)
    if silu:
        y = F.silu(y)
    fmt = _memory_format(x) or torch.contiguous_format
    return y.to(x.dtype).contiguous(memory_format=fmt)


def _check(x, weight, bias, groups, add):
    torch._check(x.dim() == 4, lambda: f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    torch._check(x.dtype in _native.DTYPE_CODES, lambda: f"x dtype {x.dtype} not supported")
    torch._check(groups > 0 and x.shape[1] % groups == 0,
                 lambda: f"channels {x.shape[1]} must be a multiple of groups {groups}")
    torch._check(weight.shape == (x.shape[1],) and bias.shape == (x.shape[1],),
                 lambda: f"weight and bias must be [{x.shape[1]}]")
    if add is not None:
        torch._check(add.shape == x.shape[:2], lambda: f"add must be [{x.shape[0]}, {x.shape[1]}]")
    # a kernel takes raw pointers: a tensor on another device must not reach it
    for name, t in (("weight", weight), ("bias", bias), ("add", add)):
        if t is not None:
            torch._check(t.device == x.device,
                         lambda: f"group_norm: {name} is on {t.device}, x on {x.device}")


def _run_native(out, x, w, b, groups, eps, silu, add, channels_last):
    """The C++ kernel (CPU only: on GPUs the Triton kernel won every measured shape)."""
    _native._C.group_norm_cpu(x.data_ptr(), list(x.stride()), out.data_ptr(),
                              list(out.stride()), w.data_ptr(), b.data_ptr(), _native.addr(add),
                              _native.DTYPE_CODES[x.dtype], list(x.shape), groups, eps, silu)


def _run_triton(out, x, w, b, groups, eps, silu, add, channels_last):
    from ..kernels.triton.group_norm import group_norm as kernel

    kernel(out, x, w, b, groups, eps, silu, add, channels_last)


KERNELS = {"native": _run_native, "triton": _run_triton}


def _group_norm_impl(x, weight, bias, groups, eps, silu, add):
    _check(x, weight, bias, groups, add)
    which = backend.select("group_norm", x.device)      # the kernel table, with its evidence
    if which == "torch":
        return group_norm_reference(x, weight, bias, groups, eps, silu, add)
    fmt = _memory_format(x)
    if fmt is None:                       # arbitrary strides: one copy, then the fast path
        x, fmt = x.contiguous(), torch.contiguous_format
    out = torch.empty_like(x, memory_format=fmt)
    w, b = weight.float().contiguous(), bias.float().contiguous()
    add = None if add is None else add.float().contiguous()
    with _native.on_device(x):
        KERNELS[which](out, x, w, b, groups, eps, silu, add, fmt == torch.channels_last)
    return out


@torch.library.custom_op("ddpm_fast::group_norm", mutates_args=())
def group_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                  eps: float, silu: bool, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _group_norm_impl(x, weight, bias, groups, eps, silu, add)


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
               eps: float, silu: bool, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op `ddpm_fast::group_norm`. Plain eager calls skip the custom-op dispatcher (about
    12 us a call on the 2-core CPU, 51 calls per U-Net step); under torch.compile, fake or
    functional tensors, or with autograd recording, the registered op runs (it has no backward,
    so autograd gets its clear error instead of silently missing gradients)."""
    if (torch.compiler.is_compiling() or type(x) is not torch.Tensor
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or bias.requires_grad))):
        return group_norm_op(x, weight, bias, groups, eps, silu, add)
    return _group_norm_impl(x, weight, bias, groups, eps, silu, add)


@group_norm_op.register_fake
def _(x, weight, bias, groups, eps, silu, add=None):
    _check(x, weight, bias, groups, add)
    fmt = _memory_format(x) or torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt)
