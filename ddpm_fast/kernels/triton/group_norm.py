"""Triton GroupNorm(+add, +SiLU) with the reduction split across programs.

Each (image, group) is cut into chunks of CHUNK elements. Kernel 1 (grid: N·G × chunks) writes the
chunk's count, mean and M2 from a two-pass over values held in registers; kernel 2 (same grid)
merges the group's partials with Chan et al.'s formula, then normalises its chunk. So batch 1 with
32 groups still launches chunks × 32 programs, and statistics are fp32 and never E[x²] − E[x]².
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 1024


@triton.jit
def _load_chunk(x_ptr, add_ptr, n, g, chunk, C, W, cpg, hw, count,
                sx_n, sx_c, sx_h, sx_w,
                HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr, CHUNK: tl.constexpr):
    i = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = i < count
    if CHANNELS_LAST:        # pixel-major inside the group: neighbours share a pixel
        p = i // cpg
        ch = g * cpg + i % cpg
    else:                    # channel-major: contiguous in NCHW
        ch = g * cpg + i // hw
        p = i % hw
    off = n.to(tl.int64) * sx_n + ch * sx_c + (p // W) * sx_h + (p % W) * sx_w
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        v += tl.load(add_ptr + n * C + ch, mask=mask, other=0.0)
    return v, mask, ch, p


@triton.jit
def _gn_partial_kernel(
    x_ptr,          # [N, C, H, W] fp32/bf16/fp16, strides sx_*
    add_ptr,        # [N, C] fp32 (read when HAS_ADD)
    part_ptr,       # [N·G, chunks, 3] fp32: count, mean, M2
    C, W, cpg, hw, count, groups, chunks,
    sx_n, sx_c, sx_h, sx_w,
    HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr, CHUNK: tl.constexpr,
):
    task = tl.program_id(0)         # N·G on grid-X (up to 2³¹ − 1; grid-Y stops at 65,535)
    chunk = tl.program_id(1)
    n = task // groups
    g = task % groups
    v, mask, ch, p = _load_chunk(x_ptr, add_ptr, n, g, chunk, C, W, cpg, hw, count,
                                 sx_n, sx_c, sx_h, sx_w, HAS_ADD, CHANNELS_LAST, CHUNK)
    cnt = tl.minimum(count - chunk * CHUNK, CHUNK).to(tl.float32)
    mean = tl.sum(v, axis=0) / cnt
    d = tl.where(mask, v - mean, 0.0)
    m2 = tl.sum(d * d, axis=0)
    base = part_ptr + (task * chunks + chunk) * 3
    tl.store(base, cnt)
    tl.store(base + 1, mean)
    tl.store(base + 2, m2)


@triton.jit
def _gn_apply_kernel(
    x_ptr, add_ptr, part_ptr,
    out_ptr,        # [N, C, H, W] same dtype as x, strides so_*
    w_ptr, b_ptr,   # [C] fp32
    C, W, cpg, hw, count, groups, chunks, eps,
    sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
    HAS_ADD: tl.constexpr, CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr,
    CHUNK: tl.constexpr, CHUNKS_P2: tl.constexpr,
):
    task = tl.program_id(0)         # N·G on grid-X (up to 2³¹ − 1; grid-Y stops at 65,535)
    chunk = tl.program_id(1)
    n = task // groups
    g = task % groups
    # merge partials: mean = Σ n_k m_k / N, M2 = Σ M2_k + Σ n_k (m_k − mean)²
    k = tl.arange(0, CHUNKS_P2)
    kmask = k < chunks
    base = part_ptr + (task * chunks + k) * 3
    cnt = tl.load(base, mask=kmask, other=0.0)
    mk = tl.load(base + 1, mask=kmask, other=0.0)
    m2k = tl.load(base + 2, mask=kmask, other=0.0)
    total = tl.sum(cnt, axis=0)
    mean = tl.sum(cnt * mk, axis=0) / total
    dm = mk - mean
    m2 = tl.sum(m2k + cnt * dm * dm, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    v, mask, ch, p = _load_chunk(x_ptr, add_ptr, n, g, chunk, C, W, cpg, hw, count,
                                 sx_n, sx_c, sx_h, sx_w, HAS_ADD, CHANNELS_LAST, CHUNK)
    w = tl.load(w_ptr + ch, mask=mask, other=1.0)
    b = tl.load(b_ptr + ch, mask=mask, other=0.0)
    r = (v - mean) * rstd * w + b
    if SILU:
        r = r / (1.0 + tl.exp(-r))
    off = n.to(tl.int64) * so_n + ch * so_c + (p // W) * so_h + (p % W) * so_w
    tl.store(out_ptr + off, r.to(out_ptr.dtype.element_ty), mask=mask)


def group_norm(out, x, weight, bias, groups: int, eps: float, silu: bool, add, channels_last: bool):
    n, c, h, w = x.shape
    cpg, hw = c // groups, h * w
    count = cpg * hw
    chunks = triton.cdiv(count, CHUNK)
    partials = torch.empty(n * groups, chunks, 3, dtype=torch.float32, device=x.device)
    grid = (n * groups, chunks)
    add_arg = add if add is not None else weight
    _gn_partial_kernel[grid](x, add_arg, partials, c, w, cpg, hw, count, groups, chunks,
                             *x.stride(), HAS_ADD=add is not None, CHANNELS_LAST=channels_last,
                             CHUNK=CHUNK)
    _gn_apply_kernel[grid](x, add_arg, partials, out, weight, bias, c, w, cpg, hw, count, groups,
                           chunks, eps, *x.stride(), *out.stride(), HAS_ADD=add is not None,
                           CHANNELS_LAST=channels_last, SILU=silu, CHUNK=CHUNK,
                           CHUNKS_P2=max(triton.next_power_of_2(chunks), 2))
