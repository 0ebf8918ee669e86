"""Single-head attention softmax(q kᵀ · scale) v for the U-Net's spatial self-attention, flash-style:
one pass over the keys with an online softmax in fp32, never materialising the L × L scores.

The U-Net's head_dim is the channel count (256 or 512), too wide to keep a [BLOCK_M, D] fp32
accumulator per program, so the output's D columns are split across programs (grid axis 2): each
program recomputes q kᵀ over all of D (in BLOCK_DK slices) and accumulates only its BLOCK_DV
columns of p v. q, k, v: [B, L, D] with any strides; fp32, bf16 or fp16 in, fp32 statistics.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1, how CI runs this on CPU) multiplies bf16 tiles as raw
# 16-bit integers in tl.dot (numpy has no bfloat16), so there the operands are widened to fp32.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attention_kernel(Q, K, V, O, L, D, scale,
                      sqb, sql, sqd, skb, skl, skd, svb, svl, svd, sob, sol, sod,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                      BLOCK_DV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)      # b · stride passes 2³¹ on big batches of 256-px maps
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    row_ok = rows < L
    col_ok = cols < D
    q_base = Q + b * sqb
    k_base = K + b * skb
    v_base = V + b * svb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, L, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < L
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_DK):
            dk = d0 + tl.arange(0, BLOCK_DK)
            dk_ok = dk < D
            q = tl.load(q_base + rows[:, None] * sql + dk[None, :] * sqd,
                        mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
            kt = tl.load(k_base + keys[None, :] * skl + dk[:, None] * skd,
                         mask=key_ok[None, :] & dk_ok[:, None], other=0.0)
            if UPCAST:
                q, kt = q.to(tl.float32), kt.to(tl.float32)
            if IEEE:
                s += tl.dot(q, kt, input_precision="ieee")
            else:
                s += tl.dot(q, kt)
        s = tl.where(key_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * svl + cols[None, :] * svd,
                    mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE or UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * sob + rows[:, None] * sol + cols[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def attention(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float) -> None:
    """out[b] = softmax(q[b] k[b]ᵀ · scale) v[b]; all [B, L, D], out preallocated."""
    b, length, d = q.shape
    block_m = 64 if length >= 64 else max(16, triton.next_power_of_2(length))
    block_n = block_m
    block_dk = min(64, max(16, triton.next_power_of_2(d)))
    block_dv = min(128, max(16, triton.next_power_of_2(d)))
    grid = (b, triton.cdiv(length, block_m), triton.cdiv(d, block_dv))
    _attention_kernel[grid](q, k, v, out, length, d, scale, *q.stride(), *k.stride(), *v.stride(),
                            *out.stride(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=block_dk,
                            BLOCK_DV=block_dv, IEEE=q.dtype == torch.float32,
                            UPCAST=q.dtype == torch.bfloat16 and INTERPRETED,
                            num_warps=4 if block_dv <= 64 else 8)
