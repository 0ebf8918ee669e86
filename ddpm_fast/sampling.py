"""Reference samplers: DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) and DDIM.

These loops are the readable definition; ddpm_fast/fast.py runs the same math with graphs and
mixed precision. With a torch.Generator, noise is drawn like diffusers' DDPMPipeline (x_T first,
then one draw per step after the model call, none at t = 0), so the same generator gives the same
images. With `seed` instead, noise is Philox keyed by (seed, image index): image i is the same for
any batch size and any split of the work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .ops.ddpm_step import ddpm_step, ddpm_step_general, step_x0
from .ops.philox import key_tensor, philox_normal
from .schedule import LEARNED_VARIANCES, Schedule

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# How often the loops look for NaN/Inf: one host sync per this many steps, and at the end.
WATCH_EVERY = 50


# When a generator's noise is drawn (sample_loop's `draws`).
NOISE_DRAWS = ("positive_t", "every_step", "never")


def ddim_draws(eta: float) -> str:
    """DDIMScheduler.step draws noise at every step when η > 0, even where σ = 0."""
    return "every_step" if eta > 0 else "never"


class NonFiniteError(RuntimeError):
    """Sampling produced NaN or Inf; the message names the step and the images."""


def check_finite(x: torch.Tensor, step: int, t: int, first_image: int = 0) -> None:
    """Raise NonFiniteError if any image of x holds NaN/Inf (one host sync)."""
    bad = ~torch.isfinite(x).flatten(1).all(1)
    if bool(bad.any()):
        images = (bad.nonzero().flatten() + first_image).tolist()
        shown = ", ".join(map(str, images[:8])) + (f" (+{len(images) - 8} more)" if len(images) > 8
                                                    else "")
        raise NonFiniteError(f"sampling diverged: NaN/Inf by step {step} (t = {t}) in images "
                             f"{shown}; nothing was written for this batch")


@dataclass
class SampleOutput:
    images: torch.Tensor                      # x_0 in [-1, 1] (unclamped model space), float32
    intermediates: list = field(default_factory=list)  # (timestep, x_t, x̂_0) every k-th step


def randn_like_diffusers(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """torch.randn as diffusers' randn_tensor draws it: on the generator's device, then moved;
    a list of generators draws one image from each."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn_like_diffusers((1, *shape[1:]), g, device, dtype)
                          for g in generator]).to(device)
    gen_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


class NoiseSource:
    """Where z comes from: a torch generator (diffusers-compatible) or Philox (seed, index)."""

    def __init__(self, shape, device, generator=None, seed: Optional[int] = None,
                 first_image: int = 0, num_train_timesteps: int = 1000):
        self.shape, self.device, self.generator = tuple(shape), torch.device(device), generator
        self.seed, self.first_image = seed, first_image
        self.initial_step = num_train_timesteps  # Philox step word of x_T: no timestep uses it
        self.key = key_tensor(seed, first_image, self.device) if seed is not None else \
            torch.zeros(2, dtype=torch.int64, device=self.device)

    @property
    def philox(self) -> bool:
        return self.seed is not None

    def initial(self) -> torch.Tensor:
        if self.philox:
            return philox_normal(self.shape, self.seed, self.initial_step, self.first_image,
                                 self.device)
        return randn_like_diffusers(self.shape, self.generator, self.device)

    def step_noise(self) -> Optional[torch.Tensor]:
        """External noise for a step, or None to let the step op draw Philox noise itself."""
        return None if self.philox else randn_like_diffusers(self.shape, self.generator, self.device)


def check_model_output(variance: str, in_channels: int, out_channels: int) -> None:
    """A U-Net predicts its variance (2 × in_channels outputs) exactly when the variance type is
    learned: a ValueError says why otherwise, before any work (diffusers' DDPMScheduler fails
    mid-run there: a shape error, or None ** 0.5)."""
    learned = variance in LEARNED_VARIANCES
    if learned and out_channels != 2 * in_channels:
        raise ValueError(f"variance_type={variance!r} needs a U-Net that predicts its variance: "
                         f"out_channels = 2 × in_channels = {2 * in_channels} (the second half "
                         f"is the variance), but this one has out_channels={out_channels}")
    if not learned and out_channels != in_channels:
        why = (" (a learned variance in the second half: set the scheduler's variance_type to "
               "'learned_range' or 'learned')" if out_channels == 2 * in_channels else "")
        raise ValueError(f"this U-Net has out_channels={out_channels} for in_channels="
                         f"{in_channels}{why}; variance_type={variance!r} uses a model output "
                         "shaped like the image")


@torch.no_grad()
def sample_loop(model: Model, table: torch.Tensor, timesteps: Sequence[int], noise: NoiseSource,
                *, clip: bool = True, x_T: Optional[torch.Tensor] = None,
                intermediates_every: int = 0, progress=None,
                threshold: Optional[tuple] = None, variance: Optional[str] = None,
                draws: str = "positive_t") -> SampleOutput:
    """Run the steps of `table` (one row per timestep) from x_T down to x_0. `threshold` =
    (ratio, max value) applies dynamic thresholding to x̂0 instead of clipping; `variance`
    "learned"/"learned_range" (a table built for it) takes σ from the model's second half
    (both in torch ops: ddpm_step_general). A generator's noise is drawn where the diffusers
    scheduler draws it, whatever σ is, so that the generator stays in step: `draws`
    "positive_t" at every t > 0 (DDPMScheduler.step), "every_step" (DDIMScheduler.step with
    η > 0) or "never" (η = 0)."""
    if draws not in NOISE_DRAWS:
        raise ValueError(f"draws must be one of {NOISE_DRAWS}, got {draws!r}")
    device = noise.device
    table = table.to(device)
    x = noise.initial() if x_T is None else x_T.to(device=device, dtype=torch.float32)
    out = SampleOutput(images=x)
    steps = torch.arange(len(timesteps), dtype=torch.int64, device=device)
    learned = variance if variance in LEARNED_VARIANCES else None
    fused = threshold is None and learned is None
    for i, t in enumerate(timesteps):
        t_tensor = torch.tensor(t, dtype=torch.int64, device=device)
        eps = model(x, t_tensor)
        # diffusers draws the step's noise after the model call
        z = noise.step_noise() if draws == "every_step" or (draws == "positive_t" and t > 0) \
            else None
        if intermediates_every and (i % intermediates_every == 0 or i == len(timesteps) - 1):
            x0 = step_x0(x, eps, table[i], clip, threshold, learned)
            out.intermediates.append((t, x.cpu(), x0.cpu()))
        if fused:
            x = ddpm_step(x, eps, table, steps[i:i + 1], noise.key, z, clip)
        else:
            x = ddpm_step_general(x, eps, table, steps[i:i + 1], noise.key, z, clip, threshold,
                                  learned)
        if (i + 1) % WATCH_EVERY == 0 or i == len(timesteps) - 1:
            check_finite(x, i, t, noise.first_image)
        if progress is not None:
            progress(1)
    out.images = x
    return out


def ddpm_sample(model: Model, schedule: Schedule, shape, *, generator=None, seed=None,
                first_image: int = 0, num_inference_steps: Optional[int] = None,
                variance: str = "fixed_small", clip: bool = True, device="cpu",
                x_T=None, intermediates_every: int = 0, progress=None) -> SampleOutput:
    """DDPM ancestral sampling with σ² = β̃_t ("fixed_small"), β_t ("fixed_large") or the
    model's own ("learned", "learned_range": a U-Net with 2 × the image's channels)."""
    timesteps = schedule.timesteps(num_inference_steps)
    table = schedule.step_table(timesteps, variance, device)
    noise = NoiseSource(shape, device, generator, seed, first_image, schedule.num_timesteps)
    return sample_loop(model, table, timesteps, noise, clip=clip, x_T=x_T,
                       intermediates_every=intermediates_every, progress=progress,
                       threshold=schedule.threshold, variance=variance)


def ddim_sample(model: Model, schedule: Schedule, shape, *, num_inference_steps: int = 50,
                eta: float = 0.0, generator=None, seed=None, first_image: int = 0,
                clip: bool = True, device="cpu", x_T=None, intermediates_every: int = 0,
                progress=None) -> SampleOutput:
    """DDIM (Song et al. 2021) over `num_inference_steps` of the schedule's timesteps; η = 1 is
    DDPM-like stochastic, η = 0 deterministic. With a generator and "diffusers" numerics this is
    diffusers' DDIMPipeline with DDIMScheduler.from_config(the DDPM config) (schedule.ddim_table;
    noise drawn after each model call, at every step when η > 0, as its step draws it)."""
    timesteps = schedule.timesteps(num_inference_steps)
    table = schedule.ddim_table(timesteps, eta, device)
    noise = NoiseSource(shape, device, generator, seed, first_image, schedule.num_timesteps)
    return sample_loop(model, table, timesteps, noise, clip=clip, x_T=x_T,
                       intermediates_every=intermediates_every, progress=progress,
                       threshold=schedule.threshold, draws=ddim_draws(eta))


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
             ) -> torch.Tensor:
    """Forward process: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, t [B] integer timesteps (x0's dtype)."""
    a = schedule.on(x0.device, "sqrt_alphas_cumprod", x0.dtype)[t].view(-1, 1, 1, 1)
    s = schedule.on(x0.device, "sqrt_one_minus_alphas_cumprod", x0.dtype)[t].view(-1, 1, 1, 1)
    return a * x0 + s * noise


def denoise_from(model: Model, schedule: Schedule, x_t: torch.Tensor, t: int, *, seed: int = 0,
                 first_image: int = 0, variance: str = "fixed_small", clip: bool = True
                 ) -> torch.Tensor:
    """Run the reverse process from a given x_t at timestep t down to x_0 (t = −1 returns x_t).
    The DDPM paper's "samples from different time steps" and interpolation figures use this."""
    if not -1 <= t < schedule.num_timesteps:
        raise ValueError(f"timestep {t} is outside [0, {schedule.num_timesteps})")
    if t < 0:
        return x_t
    timesteps = list(range(t, -1, -1))
    table = schedule.step_table(timesteps, variance, x_t.device)
    noise = NoiseSource(x_t.shape, x_t.device, seed=seed, first_image=first_image,
                        num_train_timesteps=schedule.num_timesteps)
    return sample_loop(model, table, timesteps, noise, clip=clip, x_T=x_t,
                       threshold=schedule.threshold).images


def slerp(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """Spherical interpolation per image between a and b ([B, ...])."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp(min=1e-12)
    omega = torch.arccos(cos.clamp(-1, 1)).view(-1, *([1] * (a.dim() - 1)))
    so = torch.sin(omega)
    lin = (1 - lam) * a + lam * b
    sph = (torch.sin((1 - lam) * omega) * a + torch.sin(lam * omega) * b) / so.clamp(min=1e-12)
    return torch.where(so.abs() < 1e-6, lin, sph)
