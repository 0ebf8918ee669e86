"""Noise schedules and every coefficient derived from them.

All quantities are derived in float64 from β and cast once ("float64" numerics). The exception is
"diffusers" numerics, which repeat diffusers' float32 arithmetic step for step (β in float32, ᾱ by a
float32 cumprod, coefficients formed as DDPMScheduler.step forms them), so that reference mode gives
diffusers' images to the last bits; see DESIGN.md for why this matters after 1000 steps.

The sampler reads one row of a per-step table (``step_table``), so a whole sampling run needs no host
arithmetic. Row layout (float32, matching csrc/common.h), `out` the model output:

    x0     = (D·x − A·out) / B        (then optionally clipped to [−R, R])
    x_prev = C0·x0 + C1·x + C2·out + SIGMA·z
    T      = the diffusion timestep t of this row (Philox step word)

Learned variances (variance_type "learned" / "learned_range": the U-Net predicts 2·C channels, the
second half v its variance) give σ per element instead: SIGMA is then 1 where the step adds
noise (0 at the last step) and the step multiplies it by √v ("learned") or by
exp(½(f·LMAX + (1−f)·LMIN)), f = (v+1)/2 ("learned_range", LMIN = log β̃_t clamped at 1e-20,
LMAX = log β_t), as DDPMScheduler.step / _get_variance do (ops/ddpm_step.py's torch step; the
fused kernels never see these tables).

The prediction type picks (D, A, B): ε-prediction (1, √(1−ᾱ), √ᾱ), v-prediction (√ᾱ, √(1−ᾱ), 1),
sample-prediction (0, −1, 1); each repeats DDPMScheduler.step's float32 expression exactly (D·x with
D = 1 and a division by 1 are exact). R is the scheduler's clip_sample_range.

Scheduler settings: ``check_scheduler_config`` takes a diffusers scheduler_config.json dict and
returns every DDPMScheduler setting, or raises ValueError naming the first key or value that is
not honoured: nothing is ignored silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

A, B, C0, C1, C2, SIGMA, T_COL, D, R, LMIN, LMAX = range(11)
COEF_COLS = 12            # 11 used; rows of 48 bytes
FIXED_VARIANCES = ("fixed_small", "fixed_large", "fixed_small_log")
LEARNED_VARIANCES = ("learned", "learned_range")     # σ from the model's second half
VARIANCE_TYPES = FIXED_VARIANCES + LEARNED_VARIANCES
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
NUMERICS = ("float64", "diffusers")
SPACINGS = ("leading", "trailing", "linspace")

# Every argument of diffusers' DDPMScheduler (0.42) with its default.
DDPM_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "variance_type": "fixed_small",
    "clip_sample": True, "prediction_type": "epsilon", "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
# Why a setting value is refused (diffusers' behaviour with it, or what it would need).
_REFUSED_VALUES = {
    ("variance_type", "fixed_large_log"):
        "diffusers' DDPMScheduler takes the square root of log β_t (negative), so every image "
        "it samples is NaN",
}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_scheduler_config(config: dict) -> dict:
    """Every DDPMScheduler setting of a diffusers scheduler config (defaults filled in), or a
    ValueError naming the first key or value ddpm_fast does not honour exactly.

    Passed like diffusers passes them: private keys ("_class_name", "_diffusers_version", …) and
    keys listed in "_use_default_values" (diffusers then uses the default). Refused: any
    scheduler class other than DDPMScheduler (schedulers.read_config takes DDIMScheduler too),
    keys that are not DDPMScheduler settings (diffusers would ignore them with a warning), and
    values this package cannot reproduce. Whether the U-Net's output fits variance_type
    (learned variances need 2 × in_channels) is sampling.check_model_output's."""
    if not isinstance(config, dict):
        raise ValueError(f"scheduler config must be a dict, got {type(config).__name__}")
    cls = config.get("_class_name", "DDPMScheduler")
    if cls != "DDPMScheduler":
        why = ("its settings are read by ddpm_fast.schedulers.read_config / ddim_settings "
               "(folders, pipelines and pipe.scheduler take DDIMScheduler configs)"
               if cls == "DDIMScheduler" else
               "ddpm_fast samples with DDPMScheduler or DDIMScheduler settings")
        raise ValueError(f"scheduler _class_name {cls!r} is not a DDPMScheduler config: {why}")
    used_defaults = config.get("_use_default_values", [])
    given = {k: v for k, v in config.items()
             if not k.startswith("_") and k not in used_defaults}
    unknown = sorted(k for k in given if k not in DDPM_SCHEDULER_DEFAULTS)
    if unknown:
        raise ValueError(f"scheduler setting {unknown[0]!r} is not a DDPMScheduler setting and "
                         "is not honoured" + (f" (also: {', '.join(unknown[1:])})"
                                              if len(unknown) > 1 else ""))
    cfg = {**DDPM_SCHEDULER_DEFAULTS, **given}

    def bad(key, why):
        raise ValueError(f"scheduler setting {key}={cfg[key]!r} is not supported: {why}")

    for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
        if not isinstance(cfg[key], bool):
            bad(key, "must be true or false")
    for key in ("beta_start", "beta_end", "clip_sample_range", "dynamic_thresholding_ratio",
                "sample_max_value"):
        if not _is_number(cfg[key]):
            bad(key, "must be a finite number")
    for key in ("num_train_timesteps", "steps_offset"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int):
            bad(key, "must be an integer")
    if cfg["num_train_timesteps"] < 1:
        bad("num_train_timesteps", "must be at least 1")
    if cfg["trained_betas"] is not None:
        if not isinstance(cfg["trained_betas"], (list, tuple)) or \
                not all(_is_number(b) for b in cfg["trained_betas"]):
            bad("trained_betas", "must be a list of numbers")
        if len(cfg["trained_betas"]) != cfg["num_train_timesteps"]:
            # diffusers takes the betas from the list and the timesteps from num_train_timesteps
            raise ValueError(f"scheduler setting trained_betas has {len(cfg['trained_betas'])} "
                             f"values but num_train_timesteps is {cfg['num_train_timesteps']}")
    for key, allowed in (("beta_schedule", BETA_SCHEDULES), ("timestep_spacing", SPACINGS),
                         ("prediction_type", PREDICTION_TYPES), ("variance_type", VARIANCE_TYPES)):
        if (key, cfg[key]) in _REFUSED_VALUES:
            bad(key, _REFUSED_VALUES[key, cfg[key]])
        if cfg[key] not in allowed:
            bad(key, f"supported: {', '.join(allowed)}")
    if cfg["clip_sample"] and not cfg["thresholding"] and not cfg["clip_sample_range"] > 0:
        bad("clip_sample_range", "must be positive")
    if cfg["thresholding"]:
        if not 0 <= cfg["dynamic_thresholding_ratio"] <= 1:
            bad("dynamic_thresholding_ratio", "must lie in [0, 1]")
        if not cfg["sample_max_value"] > 0:
            bad("sample_max_value", "must be positive")
    return cfg


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
                 ) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999
                 ) -> torch.Tensor:
    """Nichol & Dhariwal (2021): ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β_t = 1 − ᾱ(t+1)/ᾱ(t)."""
    def abar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return _alpha_bar_betas(num_timesteps, abar, max_beta)


def laplace_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' "laplace" schedule (betas_for_alpha_bar, alpha_transform_type="laplace")."""
    def abar(t: float) -> float:
        lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
        snr = math.exp(lmb)
        return math.sqrt(snr / (1 + snr))

    return _alpha_bar_betas(num_timesteps, abar, max_beta)


def _alpha_bar_betas(n: int, abar, max_beta: float) -> torch.Tensor:
    # in Python floats (float64), as diffusers' betas_for_alpha_bar before its float32 cast
    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1 (ᾱ_T = 0), in the dtype of `betas` with diffusers' op order
    (so float32 betas give DDPMScheduler's own). β_T becomes 1."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0 = alphas_bar_sqrt[0].clone()
    aT = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= aT
    alphas_bar_sqrt *= a0 / (a0 - aT)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class Schedule:
    """A discrete diffusion schedule: β_1..β_T (stored 0-based) and how to derive coefficients."""

    betas: torch.Tensor                     # float64 [T], or float32 for "diffusers" numerics
    numerics: str = "float64"
    timestep_spacing: str = "leading"       # how a shorter run picks its timesteps (diffusers)
    steps_offset: int = 0
    prediction_type: str = "epsilon"        # what the model predicts: ε, v or x0 ("sample")
    clip_range: float = 1.0                 # x̂0 is clipped to [−clip_range, clip_range]
    threshold: Optional[tuple] = None       # dynamic thresholding (ratio, max value) or None
    # the DDPMScheduler settings the betas came from (beta_schedule, …), for scheduler_config()
    beta_settings: Optional[dict] = field(default=None, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, "
                             f"got {self.timestep_spacing!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a positive number, got {self.clip_range!r}")
        b = self.betas
        # β_T = 1 (ᾱ_T = 0, zero terminal SNR) is allowed at the last step only
        if b.ndim != 1 or len(b) == 0 or not bool(((b[:-1] > 0) & (b[:-1] < 1)).all()) or \
                not 0 < float(b[-1]) <= 1:
            raise ValueError("betas must be a non-empty 1-D tensor with 0 < β < 1 (β = 1 is "
                             "allowed at the last step: zero terminal SNR)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def linear(cls, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, numerics="float64", **kw):
        if numerics == "diffusers":
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32)
        else:
            betas = linear_betas(num_timesteps, beta_start, beta_end)
        kw.setdefault("beta_settings", {"beta_schedule": "linear", "num_train_timesteps":
                                        num_timesteps, "beta_start": beta_start,
                                        "beta_end": beta_end})
        return cls(betas, numerics, **kw)

    @classmethod
    def cosine(cls, num_timesteps=1000, numerics="float64", **kw):
        betas = cosine_betas(num_timesteps)
        kw.setdefault("beta_settings", {"beta_schedule": "squaredcos_cap_v2",
                                        "num_train_timesteps": num_timesteps})
        return cls(betas.float() if numerics == "diffusers" else betas, numerics, **kw)

    def scheduler_config(self) -> dict:
        """A DDPMScheduler config (scheduler_config.json) that rebuilds this schedule with
        from_scheduler_config: the settings its betas came from (a schedule built from bare betas
        writes them as trained_betas), its spacing, offset, prediction type, clip range and
        thresholding; variance_type and clip_sample as ddpm_fast's defaults."""
        config = {"_class_name": "DDPMScheduler", **DDPM_SCHEDULER_DEFAULTS,
                  "variance_type": "fixed_small", "clip_sample": True}
        config.update(self.beta_settings if self.beta_settings is not None else
                      {"num_train_timesteps": len(self.betas),
                       "trained_betas": self.betas.double().tolist()})
        config.update(timestep_spacing=self.timestep_spacing, steps_offset=self.steps_offset,
                      prediction_type=self.prediction_type, clip_sample_range=self.clip_range,
                      thresholding=self.threshold is not None)
        if self.threshold is not None:
            config.update(dynamic_thresholding_ratio=self.threshold[0],
                          sample_max_value=self.threshold[1])
        return config

    @classmethod
    def from_scheduler_config(cls, config: dict, numerics: str = "diffusers") -> "Schedule":
        """From a diffusers DDPMScheduler scheduler_config.json; every setting is honoured or
        refused (check_scheduler_config). "diffusers" numerics form the betas with
        DDPMScheduler.__init__'s float32 ops."""
        c = check_scheduler_config(config)
        n, start, end = c["num_train_timesteps"], c["beta_start"], c["beta_end"]
        f32 = numerics == "diffusers"
        dtype = torch.float32 if f32 else torch.float64
        kind = c["beta_schedule"]
        if c["trained_betas"] is not None:
            betas = torch.tensor(c["trained_betas"], dtype=dtype)
        elif kind == "linear":
            betas = torch.linspace(start, end, n, dtype=dtype)
        elif kind == "scaled_linear":
            betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=dtype) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = cosine_betas(n).to(dtype)
        elif kind == "laplace":
            betas = laplace_betas(n).to(dtype)
        else:  # sigmoid (GeoDiff)
            betas = torch.sigmoid(torch.linspace(-6, 6, n, dtype=dtype)) * (end - start) + start
        if c["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        threshold = ((float(c["dynamic_thresholding_ratio"]), float(c["sample_max_value"]))
                     if c["thresholding"] else None)
        beta_settings = {k: c[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                           "beta_schedule", "trained_betas",
                                           "rescale_betas_zero_snr")}
        return cls(betas, numerics, timestep_spacing=c["timestep_spacing"],
                   steps_offset=c["steps_offset"], prediction_type=c["prediction_type"],
                   beta_settings=beta_settings,
                   # the range only matters with clip_sample (a call may turn clipping on)
                   clip_range=float(c["clip_sample_range"]) if c["clip_sample_range"] > 0 else 1.0,
                   threshold=threshold)

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
        """DDPM ancestral-step coefficients, one float32 row per timestep (layout: module doc;
        a learned variance fills SIGMA, LMIN and LMAX as it says)."""
        if variance not in VARIANCE_TYPES:
            raise ValueError(f"variance must be one of {VARIANCE_TYPES}, got {variance!r}")
        ts = self._check_timesteps(timesteps)
        prev = ts[1:] + [-1]
        if self.numerics == "diffusers":
            rows = self._diffusers_rows(ts, prev, variance)
        else:
            rows = self._float64_rows(ts, prev, variance)
        return rows.to(device)

    def ddim_table(self, timesteps: Sequence[int], eta: float = 0.0, device="cpu", *,
                   set_alpha_to_one: bool = True,
                   use_clipped_model_output: bool = False) -> torch.Tensor:
        """DDIM (Song et al. 2021) coefficients as diffusers' DDIMScheduler.step forms them for a
        DDIMScheduler.from_config of this DDPM config (the same steps_offset and spacing):
        x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε̂ + σ z with
        σ = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)). The previous timestep: for a run made by
        timesteps(n) (n = len(timesteps)) diffusers' rule t_prev = t − T // n (under
        "linspace"/"trailing" spacing not always the run's next timestep); for any other
        decreasing subset the run's next timestep (the DDIM subset rule). Below t = 0 ᾱ_prev is
        1 (set_alpha_to_one, default) or ᾱ[0]. ε̂ is the model's noise estimate (for v- and
        sample-prediction a combination of x and the output, folded into C1 and C2; from the
        unclipped output, as diffusers, unless use_clipped_model_output: then from the clipped
        x̂0). "diffusers" numerics repeat its float32 operations (ε-prediction without
        use_clipped_model_output: bit for bit), "float64" forms them in float64.
        schedulers.ddim_table (DDIMScheduler settings) calls this."""
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        ts = self._check_timesteps(timesteps)
        if ts == self.timesteps(len(ts)):       # diffusers' rule for its own runs
            ratio = self.num_timesteps // len(ts)
            prev = [t - ratio for t in ts]
        else:                                   # any other subset: the run's next timestep
            prev = ts[1:] + [-1]
        f32 = self.numerics == "diffusers"
        dtype = torch.float32 if f32 else torch.float64
        abar = torch.cumprod(1.0 - self.betas.float(), dim=0) if f32 else self._f64("alphas_cumprod")
        final = torch.tensor(1.0, dtype=dtype) if set_alpha_to_one else abar[0]
        a_t = abar[ts]
        a_prev = torch.stack([abar[p] if p >= 0 else final for p in prev])
        beta_prod_t = 1 - a_t
        beta_prod_prev = 1 - a_prev
        # the order of DDIMScheduler._get_variance and step
        var = (beta_prod_prev / beta_prod_t) * (1 - a_t / a_prev)
        sigma = eta * var.clamp(min=0) ** 0.5
        c_eps = (1 - a_prev - sigma ** 2).clamp(min=0) ** 0.5
        rows = torch.zeros(len(ts), COEF_COLS, dtype=dtype)
        self._x0_columns(rows, a_t ** 0.5, beta_prod_t ** 0.5)
        rows[:, C0] = a_prev ** 0.5
        if use_clipped_model_output:
            # ε̂ from the clipped x̂0: ε̂ = (x − √ᾱ_t x̂0) / √(1−ᾱ_t), folded into C0 and C1
            rows[:, C0] = a_prev ** 0.5 - c_eps * a_t ** 0.5 / beta_prod_t ** 0.5
            rows[:, C1] = c_eps / beta_prod_t ** 0.5
        elif self.prediction_type == "epsilon":              # ε̂ = the output
            rows[:, C2] = c_eps
        elif self.prediction_type == "v_prediction":         # ε̂ = √ᾱ·v + √(1−ᾱ)·x
            rows[:, C1] = c_eps * beta_prod_t ** 0.5
            rows[:, C2] = c_eps * a_t ** 0.5
        else:                                                # sample: ε̂ = (x − √ᾱ·out) / √(1−ᾱ)
            rows[:, C1] = c_eps / beta_prod_t ** 0.5
            rows[:, C2] = -(c_eps * a_t ** 0.5 / beta_prod_t ** 0.5)
        rows[:, SIGMA] = sigma
        rows[:, T_COL] = torch.tensor(ts, dtype=dtype)
        return rows.float().to(device)

    def _x0_columns(self, rows, sqrt_abar, sqrt_one_minus_abar) -> None:
        """D, A, B (x̂0 = (D·x − A·out) / B) for the prediction type, and the clip range R."""
        one = torch.ones_like(sqrt_abar)
        if self.prediction_type == "epsilon":
            d, a, b = one, sqrt_one_minus_abar, sqrt_abar
        elif self.prediction_type == "v_prediction":
            d, a, b = sqrt_abar, sqrt_one_minus_abar, one
        else:  # sample: x̂0 is the output (0·x + 1·out) / 1
            d, a, b = torch.zeros_like(one), -one, one
        rows[:, D], rows[:, A], rows[:, B] = d, a, b
        rows[:, R] = self.clip_range

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
        self._x0_columns(rows, a_t.sqrt(), (1 - a_t).sqrt())
        rows[:, C0] = a_prev.sqrt() * beta / (1 - a_t)
        rows[:, C1] = alpha.sqrt() * (1 - a_prev) / (1 - a_t)
        small = (beta * (1 - a_prev) / (1 - a_t)).clamp(min=1e-20)
        if variance in LEARNED_VARIANCES:
            self._learned_columns(rows, ts, small.log(), beta.log())
        else:  # fixed_small and fixed_small_log: the same σ in exact arithmetic
            var = beta if variance == "fixed_large" else small
            rows[:, SIGMA] = var.sqrt() * (torch.tensor(ts) > 0)   # no noise at the last step
        rows[:, T_COL] = torch.tensor(ts, dtype=torch.float64)
        return rows.float()

    @staticmethod
    def _learned_columns(rows, ts, log_small, log_beta) -> None:
        """A learned variance's columns: SIGMA flags the steps that add noise (σ itself comes
        from the model), LMIN/LMAX bound learned_range's log variance (module doc)."""
        rows[:, SIGMA] = (torch.tensor(ts) > 0).to(rows.dtype)
        rows[:, LMIN], rows[:, LMAX] = log_small, log_beta

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
        self._x0_columns(rows, a_t ** 0.5, beta_prod_t ** 0.5)
        rows[:, C0] = (a_prev ** 0.5 * cur_beta) / beta_prod_t
        rows[:, C1] = cur_alpha ** 0.5 * beta_prod_prev / beta_prod_t
        var_beta = 1 - a_t / a_prev
        small = torch.clamp((1 - a_prev) / (1 - a_t) * var_beta, min=1e-20)
        if variance in LEARNED_VARIANCES:           # _get_variance's min_log and max_log
            self._learned_columns(rows, ts, torch.log(small), torch.log(var_beta))
        else:
            if variance == "fixed_small":
                std = small ** 0.5
            elif variance == "fixed_small_log":      # _get_variance returns the std itself
                std = torch.exp(0.5 * torch.log(small))
            else:
                std = var_beta ** 0.5
            rows[:, SIGMA] = std * (torch.tensor(ts) > 0)
        rows[:, T_COL] = torch.tensor(ts, dtype=torch.float32)
        return rows
