"""Noise schedules and every coefficient derived from them.

All quantities are derived in float64 from β and cast once ("float64" numerics). The exception is
"diffusers" numerics, which repeat diffusers' float32 arithmetic step for step (β in float32, ᾱ by a
float32 cumprod, coefficients formed as DDPMScheduler.step forms them), so that reference mode gives
diffusers' images to the last bits; see DESIGN.md for why this matters after 1000 steps.

The sampler reads one row of a per-step table (``step_table``), so a whole sampling run needs no host
arithmetic. Row layout (float32, matching csrc/common.h):

    x0     = (x − A·ε) / B            (then optionally clipped to [−1, 1])
    x_prev = C0·x0 + C1·x + C2·ε + SIGMA·z
    T      = the diffusion timestep t of this row (Philox step word)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

A, B, C0, C1, C2, SIGMA, T_COL = range(7)
COEF_COLS = 8
VARIANCE_TYPES = ("fixed_small", "fixed_large")
NUMERICS = ("float64", "diffusers")
SPACINGS = ("leading", "trailing", "linspace")


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
                 ) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999
                 ) -> torch.Tensor:
    """Nichol & Dhariwal (2021): ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β_t = 1 − ᾱ(t+1)/ᾱ(t)."""
    def abar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
                         for i in range(num_timesteps)], dtype=torch.float64)


@dataclass(frozen=True)
class Schedule:
    """A discrete diffusion schedule: β_1..β_T (stored 0-based) and how to derive coefficients."""

    betas: torch.Tensor                     # float64 [T], or float32 for "diffusers" numerics
    numerics: str = "float64"
    timestep_spacing: str = "leading"       # how a shorter run picks its timesteps (diffusers)
    steps_offset: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, "
                             f"got {self.timestep_spacing!r}")
        b = self.betas
        if b.ndim != 1 or len(b) == 0 or not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must be a non-empty 1-D tensor with 0 < β < 1")

    # ------------------------------------------------------------------ construction
    @classmethod
    def linear(cls, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, numerics="float64", **kw):
        if numerics == "diffusers":
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32)
        else:
            betas = linear_betas(num_timesteps, beta_start, beta_end)
        return cls(betas, numerics, **kw)

    @classmethod
    def cosine(cls, num_timesteps=1000, numerics="float64", **kw):
        betas = cosine_betas(num_timesteps)
        return cls(betas.float() if numerics == "diffusers" else betas, numerics, **kw)

    @classmethod
    def from_scheduler_config(cls, config: dict, numerics: str = "diffusers") -> "Schedule":
        """From a diffusers scheduler_config.json (DDPMScheduler / DDIMScheduler)."""
        n = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "linear")
        kw = dict(timestep_spacing=config.get("timestep_spacing", "leading"),
                  steps_offset=int(config.get("steps_offset", 0)))
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
            return cls(betas.float() if numerics == "diffusers" else betas, numerics, **kw)
        if kind == "linear":
            return cls.linear(n, config.get("beta_start", 1e-4), config.get("beta_end", 0.02),
                              numerics, **kw)
        if kind == "squaredcos_cap_v2":
            return cls.cosine(n, numerics, **kw)
        raise ValueError(f"unsupported beta_schedule {kind!r} (supported: linear, squaredcos_cap_v2)")

    # ------------------------------------------------------------------ float64 quantities
    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def _f64(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            b = self.betas.double()
            alphas = 1 - b
            abar = torch.cumprod(alphas, 0)
            abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
            post_var = b * (1 - abar_prev) / (1 - abar)
            self._cache.update({
                "alphas": alphas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
                "sqrt_alphas_cumprod": abar.sqrt(),
                "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
                "posterior_variance": post_var,
                # β̃_1 = 0, so the log uses β̃_2 at t = 1 (as in Ho et al.'s code)
                "posterior_log_variance_clipped": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
                "posterior_mean_coef1": b * abar_prev.sqrt() / (1 - abar),
                "posterior_mean_coef2": (1 - abar_prev) * alphas.sqrt() / (1 - abar),
            })
        return self._cache[name]

    def __getattr__(self, name):
        if name in ("alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "posterior_variance",
                    "posterior_log_variance_clipped", "posterior_mean_coef1",
                    "posterior_mean_coef2"):
            return self._f64(name)
        raise AttributeError(name)

    def on(self, device, name: str, dtype=torch.float32) -> torch.Tensor:
        """A float64 quantity as a cached tensor on `device` (cast once)."""
        key = (name, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._f64(name).to(device=device, dtype=dtype)
        return self._cache[key]

    # ------------------------------------------------------------------ timesteps
    def timesteps(self, num_inference_steps: int | None = None) -> list[int]:
        """Descending timesteps of a run, chosen like diffusers' set_timesteps."""
        n_train = self.num_timesteps
        n = n_train if num_inference_steps is None else int(num_inference_steps)
        if not 1 <= n <= n_train:
            raise ValueError(f"num_inference_steps must be in [1, {n_train}], got {n}")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, n_train - 1, n).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            ratio = n_train // n
            ts = (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(n_train, 0, -n_train / n)).astype(np.int64) - 1
        return [int(t) for t in ts]

    # ------------------------------------------------------------------ per-step tables
    def step_table(self, timesteps: Sequence[int], variance: str = "fixed_small",
                   device="cpu") -> torch.Tensor:
        """DDPM ancestral-step coefficients, one float32 row per timestep (layout: module doc)."""
        if variance not in VARIANCE_TYPES:
            raise ValueError(f"variance must be one of {VARIANCE_TYPES}, got {variance!r}")
        ts = self._check_timesteps(timesteps)
        prev = ts[1:] + [-1]
        if self.numerics == "diffusers":
            rows = self._diffusers_rows(ts, prev, variance)
        else:
            rows = self._float64_rows(ts, prev, variance)
        return rows.to(device)

    def ddim_table(self, timesteps: Sequence[int], eta: float = 0.0, device="cpu") -> torch.Tensor:
        """DDIM (Song et al. 2021) coefficients in float64: x_prev = √ᾱ_prev·x0 + √(1−ᾱ_prev−σ²)·ε + σ z."""
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        ts = self._check_timesteps(timesteps)
        prev = ts[1:] + [-1]
        abar = self._f64("alphas_cumprod")
        a_t = abar[ts]
        a_prev = torch.stack([abar[p] if p >= 0 else torch.tensor(1.0, dtype=torch.float64)
                              for p in prev])
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        sigma = eta * var.clamp(min=0).sqrt()
        rows = torch.zeros(len(ts), COEF_COLS, dtype=torch.float64)
        rows[:, A] = (1 - a_t).sqrt()
        rows[:, B] = a_t.sqrt()
        rows[:, C0] = a_prev.sqrt()
        rows[:, C2] = (1 - a_prev - sigma ** 2).clamp(min=0).sqrt()
        rows[:, SIGMA] = sigma
        rows[:, T_COL] = torch.tensor(ts, dtype=torch.float64)
        return rows.float().to(device)

    def _check_timesteps(self, timesteps) -> list[int]:
        ts = [int(t) for t in timesteps]
        if not ts:
            raise ValueError("timesteps must not be empty")
        if any(not 0 <= t < self.num_timesteps for t in ts):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps})")
        if any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError("timesteps must be strictly decreasing")
        return ts

    def _float64_rows(self, ts, prev, variance) -> torch.Tensor:
        abar = self._f64("alphas_cumprod")
        one = torch.tensor(1.0, dtype=torch.float64)
        a_t = abar[ts]
        a_prev = torch.stack([abar[p] if p >= 0 else one for p in prev])
        alpha = a_t / a_prev                  # α over the (possibly skipped) interval
        beta = 1 - alpha
        rows = torch.zeros(len(ts), COEF_COLS, dtype=torch.float64)
        rows[:, A] = (1 - a_t).sqrt()
        rows[:, B] = a_t.sqrt()
        rows[:, C0] = a_prev.sqrt() * beta / (1 - a_t)
        rows[:, C1] = alpha.sqrt() * (1 - a_prev) / (1 - a_t)
        var = (beta * (1 - a_prev) / (1 - a_t)).clamp(min=1e-20) if variance == "fixed_small" else beta
        rows[:, SIGMA] = var.sqrt() * (torch.tensor(ts) > 0)   # no noise at the last step
        rows[:, T_COL] = torch.tensor(ts, dtype=torch.float64)
        return rows.float()

    def _diffusers_rows(self, ts, prev, variance) -> torch.Tensor:
        # Elementwise float32 ops in the order of DDPMScheduler.step / _get_variance: each op
        # rounds exactly as diffusers' 0-d float32 tensor arithmetic does.
        abar = torch.cumprod(1.0 - self.betas.float(), dim=0)
        one = torch.tensor(1.0)
        a_t = abar[ts]
        a_prev = torch.stack([abar[p] if p >= 0 else one for p in prev])
        beta_prod_t = 1 - a_t
        beta_prod_prev = 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        rows = torch.zeros(len(ts), COEF_COLS, dtype=torch.float32)
        rows[:, A] = beta_prod_t ** 0.5
        rows[:, B] = a_t ** 0.5
        rows[:, C0] = (a_prev ** 0.5 * cur_beta) / beta_prod_t
        rows[:, C1] = cur_alpha ** 0.5 * beta_prod_prev / beta_prod_t
        var_beta = 1 - a_t / a_prev
        if variance == "fixed_small":
            var = torch.clamp((1 - a_prev) / (1 - a_t) * var_beta, min=1e-20)
        else:
            var = var_beta
        rows[:, SIGMA] = (var ** 0.5) * (torch.tensor(ts) > 0)
        rows[:, T_COL] = torch.tensor(ts, dtype=torch.float32)
        return rows
