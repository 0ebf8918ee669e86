"""Triton kernels: Philox-4x32-10 normals and the fused sampler step.

The same definitions as csrc/common.h (counter (element // 4, step, seed >> 32, 0), key
(seed & 0xffffffff, image), Box–Muller in float64 rounded to float32), so the outputs are bit-equal
to the torch, C++ and CUDA versions. Each program handles BLOCK groups of four elements of one
image: one Philox call gives the four normals of a group. Runs on CUDA, and on CPU tensors under
TRITON_INTERPRET=1 (how CI tests it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import schedule

# Globals read inside @triton.jit must be tl.constexpr instances (annotations are not enough)
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    for _ in tl.static_range(10):
        p0, p2 = c0, c2
        c0 = tl.umulhi(p2, _PHILOX_M1) ^ c1 ^ k0
        c2 = tl.umulhi(p0, _PHILOX_M0) ^ c3 ^ k1
        c1 = tl.mul(p2, _PHILOX_M1, sanitize_overflow=False)
        c3 = tl.mul(p0, _PHILOX_M0, sanitize_overflow=False)
        k0 = tl.add(k0, _PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _uniform_open01(v):
    # top 24 bits + 1/2, times 2^-24: exact in float64, never 0 or 1
    return ((v >> 8).to(tl.float64) + 0.5) * 5.9604644775390625e-08


@triton.jit
def _box_muller(a, b):
    r = tl.sqrt(-2.0 * tl.log(_uniform_open01(a)))
    theta = 6.283185307179586 * _uniform_open01(b)
    return (r * tl.cos(theta)).to(tl.float32), (r * tl.sin(theta)).to(tl.float32)


@triton.jit
def _normals4(seed_lo, seed_hi, image, step, group):
    """The four normals of Philox group `group` (uint32 block) of one image."""
    zero = tl.zeros_like(group)
    v0, v1, v2, v3 = _philox4x32_10(group, zero + step, zero + seed_hi, zero,
                                    zero + seed_lo, zero + image)
    z0, z1 = _box_muller(v0, v1)
    z2, z3 = _box_muller(v2, v3)
    return z0, z1, z2, z3


@triton.jit
def _key_words(key_ptr, n):
    seed = tl.load(key_ptr).to(tl.uint64)
    image = (tl.load(key_ptr + 1) + n).to(tl.uint32)
    return (seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32), image


@triton.jit
def _philox_normal_kernel(
    out_ptr,        # float32 [N, per_image]
    key_ptr,        # int64 [2]: seed, index of image 0
    step_ptr,       # int64 [1]: Philox step word
    per_image,      # elements per image
    BLOCK: tl.constexpr,   # groups of four per program
):
    n = tl.program_id(1)
    group = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seed_lo, seed_hi, image = _key_words(key_ptr, n)
    step = tl.load(step_ptr).to(tl.uint32)
    z0, z1, z2, z3 = _normals4(seed_lo, seed_hi, image, step, group.to(tl.uint32))
    base = out_ptr + n.to(tl.int64) * per_image
    e = group.to(tl.int64) * 4
    tl.store(base + e, z0, mask=e < per_image)
    tl.store(base + e + 1, z1, mask=e + 1 < per_image)
    tl.store(base + e + 2, z2, mask=e + 2 < per_image)
    tl.store(base + e + 3, z3, mask=e + 3 < per_image)


@triton.jit
def _update(x_ptr, eps_ptr, noise_ptr, out_ptr, n, e, chw, hw, w,
            s_n, s_c, s_h, s_w, z, a, b, c0, c1, c2, sigma, d, r, poison,
            HAS_NOISE: tl.constexpr, CLIP: tl.constexpr):
    mask = e < chw
    idx = n.to(tl.int64) * chw + e
    ch = e // hw
    p = e % hw
    eps_off = n.to(tl.int64) * s_n + ch * s_c + (p // w) * s_h + (p % w) * s_w
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    eps = tl.load(eps_ptr + eps_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        z = tl.load(noise_ptr + idx, mask=mask, other=0.0)
    x0 = (d * x - a * eps) / b
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -r), r)
    mean = c0 * x0 + c1 * x + c2 * eps
    tl.store(out_ptr + idx, mean + sigma * z + poison, mask=mask)


@triton.jit
def _ddpm_step_kernel(
    x_ptr,          # float32 [N, C, H, W] contiguous
    eps_ptr,        # fp32/bf16/fp16 [N, C, H, W], strides s_n..s_w (elements)
    noise_ptr,      # float32 [N, C, H, W] contiguous (read when HAS_NOISE)
    out_ptr,        # float32 [N, C, H, W] contiguous; may alias x
    coef_ptr,       # float32 [steps, COEF_COLS]: A, B, C0, C1, C2, SIGMA, T, D, R, pad
    step_ptr,       # int64 [1]: the row of coef to use
    key_ptr,        # int64 [2]: seed, index of image 0 (Philox when not HAS_NOISE)
    rows,           # rows of coef: a step index outside [0, rows) writes NaN
    chw, hw, w,
    s_n, s_c, s_h, s_w,
    HAS_NOISE: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
    COEF_COLS: tl.constexpr,
):
    n = tl.program_id(1)
    group = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(step_ptr)
    inside = (s >= 0) & (s < rows)
    row = coef_ptr + tl.where(inside, s, 0) * COEF_COLS     # never read past the table
    poison = tl.where(inside, 0.0, float("nan"))
    # scalars as fp32 (Inductor may hand scalar arguments over as fp64; these are loads anyway)
    a = tl.load(row + 0)
    b = tl.load(row + 1)
    c0 = tl.load(row + 2)
    c1 = tl.load(row + 3)
    c2 = tl.load(row + 4)
    sigma = tl.load(row + 5)
    step = tl.load(row + 6).to(tl.uint32)
    d = tl.load(row + 7)
    r = tl.load(row + 8)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    z0, z1, z2, z3 = zero, zero, zero, zero
    if not HAS_NOISE:
        # σ = 0 rows (the last DDPM step) multiply the noise by zero; drawing it anyway keeps
        # the kernel branch-free and costs nothing next to the U-Net
        seed_lo, seed_hi, image = _key_words(key_ptr, n)
        z0, z1, z2, z3 = _normals4(seed_lo, seed_hi, image, step, group.to(tl.uint32))
    e = group.to(tl.int64) * 4
    _update(x_ptr, eps_ptr, noise_ptr, out_ptr, n, e, chw, hw, w, s_n, s_c, s_h, s_w, z0,
            a, b, c0, c1, c2, sigma, d, r, poison, HAS_NOISE, CLIP)
    _update(x_ptr, eps_ptr, noise_ptr, out_ptr, n, e + 1, chw, hw, w, s_n, s_c, s_h, s_w, z1,
            a, b, c0, c1, c2, sigma, d, r, poison, HAS_NOISE, CLIP)
    _update(x_ptr, eps_ptr, noise_ptr, out_ptr, n, e + 2, chw, hw, w, s_n, s_c, s_h, s_w, z2,
            a, b, c0, c1, c2, sigma, d, r, poison, HAS_NOISE, CLIP)
    _update(x_ptr, eps_ptr, noise_ptr, out_ptr, n, e + 3, chw, hw, w, s_n, s_c, s_h, s_w, z3,
            a, b, c0, c1, c2, sigma, d, r, poison, HAS_NOISE, CLIP)


BLOCK = 256


def philox_normal(out: torch.Tensor, key: torch.Tensor, step: torch.Tensor) -> None:
    """Fill out [N, per_image] (float32, contiguous) with Philox normals."""
    n, per_image = out.shape
    grid = (triton.cdiv(triton.cdiv(per_image, 4), BLOCK), n)
    _philox_normal_kernel[grid](out, key, step, per_image, BLOCK=BLOCK)


def ddpm_step(out, x, eps, coef, step, key, noise, clip: bool) -> None:
    n, c, h, w = x.shape
    chw = c * h * w
    grid = (triton.cdiv(triton.cdiv(chw, 4), BLOCK), n)
    _ddpm_step_kernel[grid](x, eps, x if noise is None else noise, out, coef, step, key,
                            coef.shape[0], chw, h * w, w, *eps.stride(),
                            HAS_NOISE=noise is not None, CLIP=clip, BLOCK=BLOCK,
                            COEF_COLS=schedule.COEF_COLS)


@triton.jit
def _solver_update(x_ptr, last_ptr, m1_ptr, m2_ptr, m3_ptr, out_ptr, n, e, chw, hw, w,
                   s_n, s_c, s_h, s_w, z, p, q, kx, kl, k0, k1, k2, k3, a, b0, b1, b2, s,
                   poison, CORRECTOR: tl.constexpr, STOCHASTIC: tl.constexpr):
    mask = e < chw
    idx = n.to(tl.int64) * chw + e
    ch = e // hw
    pix = e % hw
    out_off = n.to(tl.int64) * s_n + ch * s_c + (pix // w) * s_h + (pix % w) * s_w
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    m1 = tl.load(m1_ptr + idx, mask=mask, other=0.0)
    m2 = tl.load(m2_ptr + idx, mask=mask, other=0.0)
    out = tl.load(out_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
    m = p * x + q * out
    xc = x
    if CORRECTOR:
        last = tl.load(last_ptr + idx, mask=mask, other=0.0)
        m3 = tl.load(m3_ptr + idx, mask=mask, other=0.0)
        xc = kx * x + kl * last + k0 * m + k1 * m1 + k2 * m2 + k3 * m3
        tl.store(last_ptr + idx, xc, mask=mask)
    nxt = a * xc + b0 * m + b1 * m1 + b2 * m2
    if STOCHASTIC:
        nxt = nxt + s * z
    tl.store(m3_ptr + idx, m2, mask=mask)
    tl.store(m2_ptr + idx, m1, mask=mask)
    tl.store(m1_ptr + idx, m, mask=mask)
    tl.store(x_ptr + idx, nxt + poison, mask=mask)


@triton.jit
def _solver_step_kernel(
    x_ptr, last_ptr, m1_ptr, m2_ptr, m3_ptr,   # float32 [N, C, H, W] contiguous, in place
    out_ptr,        # fp32/bf16/fp16 model output, its first C channels, strides s_n..s_w
    coef_ptr,       # float32 [steps, SOLVER_COLS] (ddpm_fast/solvers/table.py)
    step_ptr,       # int64 [1]: the row of coef to use
    key_ptr,        # int64 [2]: seed, index of image 0 (Philox when STOCHASTIC)
    rows, chw, hw, w, s_n, s_c, s_h, s_w,
    CORRECTOR: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
    SOLVER_COLS: tl.constexpr,
):
    n = tl.program_id(1)
    group = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    st = tl.load(step_ptr)
    inside = (st >= 0) & (st < rows)
    row = coef_ptr + tl.where(inside, st, 0) * SOLVER_COLS     # never read past the table
    poison = tl.where(inside, 0.0, float("nan"))
    p, q = tl.load(row + 1), tl.load(row + 2)
    kx, kl, k0 = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
    k1, k2, k3 = tl.load(row + 6), tl.load(row + 7), tl.load(row + 8)
    a, b0, b1, b2 = tl.load(row + 9), tl.load(row + 10), tl.load(row + 11), tl.load(row + 12)
    s = tl.load(row + 13)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    z0, z1, z2, z3 = zero, zero, zero, zero
    if STOCHASTIC:
        seed_lo, seed_hi, image = _key_words(key_ptr, n)
        word = tl.load(row + 15).to(tl.uint32)
        z0, z1, z2, z3 = _normals4(seed_lo, seed_hi, image, word, group.to(tl.uint32))
    e = group.to(tl.int64) * 4
    _solver_update(x_ptr, last_ptr, m1_ptr, m2_ptr, m3_ptr, out_ptr, n, e, chw, hw, w,
                   s_n, s_c, s_h, s_w, z0, p, q, kx, kl, k0, k1, k2, k3, a, b0, b1, b2, s,
                   poison, CORRECTOR, STOCHASTIC)
    _solver_update(x_ptr, last_ptr, m1_ptr, m2_ptr, m3_ptr, out_ptr, n, e + 1, chw, hw, w,
                   s_n, s_c, s_h, s_w, z1, p, q, kx, kl, k0, k1, k2, k3, a, b0, b1, b2, s,
                   poison, CORRECTOR, STOCHASTIC)
    _solver_update(x_ptr, last_ptr, m1_ptr, m2_ptr, m3_ptr, out_ptr, n, e + 2, chw, hw, w,
                   s_n, s_c, s_h, s_w, z2, p, q, kx, kl, k0, k1, k2, k3, a, b0, b1, b2, s,
                   poison, CORRECTOR, STOCHASTIC)
    _solver_update(x_ptr, last_ptr, m1_ptr, m2_ptr, m3_ptr, out_ptr, n, e + 3, chw, hw, w,
                   s_n, s_c, s_h, s_w, z3, p, q, kx, kl, k0, k1, k2, k3, a, b0, b1, b2, s,
                   poison, CORRECTOR, STOCHASTIC)


def solver_step(state, out, coef, step, key, corrector: bool, stochastic: bool) -> None:
    """One few-step solver step in place on state = (x, x_last, m1, m2, m3)."""
    from ...solvers import COLS

    x = state[0]
    n, c, h, w = x.shape
    chw = c * h * w
    grid = (triton.cdiv(triton.cdiv(chw, 4), BLOCK), n)
    _solver_step_kernel[grid](*state, out, coef, step, key, coef.shape[0], chw, h * w, w,
                              *out.stride(), CORRECTOR=corrector, STOCHASTIC=stochastic,
                              BLOCK=BLOCK, SOLVER_COLS=COLS)
