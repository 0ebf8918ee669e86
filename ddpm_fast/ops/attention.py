"""Single-head attention o = softmax(q kᵀ · scale) v, the U-Net's spatial self-attention
(head_dim = C up to 512, L = H·W up to 1024). q, k, v: [B, L, D], any strides, fp32/bf16/fp16;
the output is contiguous [B, L, D] in the input dtype.

Backends: torch (`F.scaled_dot_product_attention`, the default until the Triton kernel is
measured faster on a GPU) and triton (flash-style, fp32 online softmax; kernels/triton/attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _native
from . import backend


def attention_reference(q, k, v, scale: float) -> torch.Tensor:
    """The definition, in fp32: softmax over keys of the scaled scores, times v."""
    s = torch.einsum("bld,bmd->blm", q.float(), k.float()) * scale
    return torch.einsum("blm,bmd->bld", torch.softmax(s, dim=-1), v.float()).to(q.dtype)


def _check(q, k, v):
    torch._check(q.dim() == 3, lambda: f"q must be [B, L, D], got shape {tuple(q.shape)}")
    torch._check(q.shape == k.shape == v.shape,
                 lambda: f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    torch._check(q.device == k.device == v.device,
                 lambda: f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    torch._check(q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.bfloat16,
                                                               torch.float16),
                 lambda: f"q, k, v must share one of fp32/bf16/fp16, got {q.dtype}, {k.dtype}, {v.dtype}")


@torch.library.custom_op("ddpm_fast::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    _check(q, k, v)
    which = backend.select("attention", q.device)
    if which == "triton":
        from ..kernels.triton.attention import attention as kernel

        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        with _native.on_device(q):
            kernel(out, q, k, v, scale)
        return out
    # torch, or "native" (there is no C++/CUDA attention: torch's SDPA is that backend)
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                          scale=scale)[:, 0].contiguous()


@attention.register_fake
def _(q, k, v, scale):
    _check(q, k, v)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
