"""The DDPM paper's figures as image tables: samples along the reverse process (progressive),
real images encoded to x_t and denoised back (from_t), and interpolation in x_t (interpolate).

Each function returns a uint8 table [rows, columns, H, W, C]; `grid` lays one out as a single
image. They run the reference loop (sampling.py, float32 torch ops) with the pipeline's U-Net
whatever its mode: they need intermediate states and start points that the fast runner does not
expose, and a figure is a few images. Noise is Philox keyed by `seed`, as everywhere else.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import images as io
from .sampling import ddpm_sample, denoise_from, q_sample, slerp


def grid(table: np.ndarray, scale: int = 1) -> np.ndarray:
    """A uint8 table [rows, columns, H, W, C] as one image, its columns side by side."""
    rows, cols = table.shape[:2]
    return io.make_grid(table.reshape(rows * cols, *table.shape[2:]), ncols=cols, scale=scale)


def _table(columns: Sequence[torch.Tensor]) -> np.ndarray:
    """Model-space columns, each [rows, C, H, W] → uint8 [rows, columns, H, W, C]."""
    x = torch.stack(list(columns), dim=1)              # [rows, columns, C, H, W]
    images = io.to_uint8(x.flatten(0, 1))             # [rows · columns, H, W, C]
    return images.reshape(*x.shape[:2], *images.shape[1:])


def check_timesteps(pipe, ts: Sequence[int]) -> None:
    """ValueError unless every t is one of the model's timesteps."""
    n = pipe.schedule.num_timesteps
    bad = [t for t in ts if not 0 <= t < n]
    if bad:
        raise ValueError(f"timesteps {bad} lie outside [0, {n})")


@torch.no_grad()
def progressive(pipe, num_images: int, every: int, seed: int = 0) -> np.ndarray:
    """Sample `num_images` images, recording the state every `every` steps: one row per image,
    the predicted x̂0 over time in the first half of the columns, x_t over time in the second."""
    c = pipe.unet.config
    res = ddpm_sample(pipe.unet, pipe.schedule, (num_images, c.in_channels, c.sample_size,
                                                 c.sample_size), seed=seed,
                      variance=pipe.variance, clip=pipe.clip, device=pipe.device,
                      intermediates_every=every)
    return _table([x0 for _, _, x0 in res.intermediates] + [xt for _, xt, _ in res.intermediates])


@torch.no_grad()
def from_t(pipe, x0: torch.Tensor, ts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Real images x0 (model space) encoded to x_t by q(x_t | x0) and denoised back, for each t:
    one row per image, the original first, then one column per t."""
    check_timesteps(pipe, ts)
    g = torch.Generator(device=x0.device).manual_seed(seed)
    cols = [x0]
    for t in ts:
        noise = torch.randn(x0.shape, generator=g, device=x0.device)
        x_t = q_sample(pipe.schedule, x0, torch.full((x0.shape[0],), t, device=x0.device), noise)
        cols.append(denoise_from(pipe.unet, pipe.schedule, x_t, t, seed=seed,
                                 variance=pipe.variance, clip=pipe.clip))
    return _table(cols)


@torch.no_grad()
def interpolate(pipe, pair: torch.Tensor, t: int, frames: int, seed: int = 0) -> np.ndarray:
    """Two real images (model space, [2, C, H, W]) encoded to x_t, mixed at `frames` values of
    λ from 0 to 1 and denoised: row 0 linear, row 1 spherical (slerp) interpolation, each
    between the two originals (frames + 2 columns)."""
    if frames < 2:
        raise ValueError(f"interpolation needs at least 2 frames (λ = 0 and 1), got {frames}")
    check_timesteps(pipe, [t])
    g = torch.Generator(device=pair.device).manual_seed(seed)
    noise = torch.randn(pair.shape, generator=g, device=pair.device)
    x_t = q_sample(pipe.schedule, pair, torch.full((2,), t, device=pair.device), noise)
    lams = [i / (frames - 1) for i in range(frames)]
    rows = []
    for mix in (lambda a, b, lam: (1 - lam) * a + lam * b, slerp):        # linear, spherical
        # the same reverse-process noise for every λ (image index 0), as in the DDPM paper
        rows.append([pair[0]] + [denoise_from(pipe.unet, pipe.schedule,
                                              mix(x_t[:1], x_t[1:], lam), t, seed=seed,
                                              variance=pipe.variance, clip=pipe.clip)[0]
                                 for lam in lams] + [pair[1]])
    return _table([torch.stack([r[i] for r in rows]) for i in range(frames + 2)])
