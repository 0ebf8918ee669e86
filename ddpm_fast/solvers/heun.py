"""Heun's second-order method (Karras et al. 2022, Algorithm 1 with S_churn = 0) as diffusers'
HeunDiscreteScheduler runs it, as rows of the solvers' common table (solvers/table.py).

It steps in the Euler schedulers' variance-exploding frame x = x0 + σ·ε (solvers/euler.py: the
same levels, input scale, x̂0 and init_noise_sigma). Each level pair σ → σ' takes two model
calls: an Euler step, then a correction at σ' from the same start x_s with the mean of the two
slopes d = (x − x̂0)/σ. diffusers' timesteps repeat each level after the first, t_0, t_1, t_1,
…, t_{n−1}, t_{n−1}: 2n − 1 calls for n levels, the last an Euler step onto σ = 0 (x̂0 itself).
In table rows, with dt = σ' − σ:

    first call at σ (KX = 1, so x_last ← x_s = x):
        m  = x̂0(x, σ)                      x' = (σ'/σ)·x + (1 − σ'/σ)·m     (A, B0)
    second call at σ' (x the Euler estimate; x_last = x_s, m1 = the first call's x̂0):
        m  = x̂0(x, σ')                     x' = x_s + dt/2·((x_s − m1)/σ + (x − m)/σ')
        as the corrector line: KX = dt/(2σ'), KL = 1 + dt/(2σ), K0 = −dt/(2σ'), K1 = −dt/(2σ),
        and A = 1 (x' = x_c)

clip_sample clamps x̂0 to ±clip_sample_range in both calls (Plan.threshold = (range,)).
Mirrors HeunDiscreteScheduler.set_timesteps (linear interpolation of σ, Karras levels with
fractional timesteps, final level 0) and .step (state_in_first_order, prev_derivative, dt).
diffusers' DDPMPipeline cannot run it (its step takes no generator); the canonical loop can.
"""
from __future__ import annotations

import math

from .euler import (_check_run, bad, check_booleans, check_common, check_keys, check_steps,
                    euler_levels, init_noise_sigma, x0_coefficients)
from .table import (A, B0, C_IN, K0, K1, KL, KX, ORDER, P, Q, T, THRESH, Plan, make_plan,
                    new_rows)

SCHEDULER = "HeunDiscreteScheduler"
# Every argument of diffusers' HeunDiscreteScheduler (0.42) with its default.
HEUN_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "clip_sample": False, "clip_sample_range": 1.0, "timestep_spacing": "linspace",
    "steps_offset": 0,
}
_REFUSED = {
    "use_exponential_sigmas": "exponential sigmas are not implemented by ddpm_fast",
    "use_beta_sigmas": "beta sigmas are not implemented by ddpm_fast",
}


def heun_settings(config: dict) -> dict:
    """Every HeunDiscreteScheduler setting of a diffusers config (defaults filled in), or a
    ValueError naming the first one not honoured exactly (euler.check_keys for the keys that
    carry none; beta_schedule "exp" is refused with the other schedules ddpm_fast lacks)."""
    cfg = check_keys(config, HEUN_SCHEDULER_DEFAULTS, SCHEDULER)
    used_defaults = config.get("_use_default_values", [])
    for key in ("sigma_min", "sigma_max"):       # hidden keys of an Euler config's swap
        if cfg["use_karras_sigmas"] and config.get(key) is not None and key not in used_defaults:
            raise ValueError(f"scheduler setting {key}={config[key]!r} is not supported: "
                             f"diffusers' {SCHEDULER} takes its Karras levels' end from it "
                             "(a key it keeps from another scheduler's config), which ddpm_fast "
                             "does not; drop it or sample with EulerDiscreteScheduler")
    for key, why in _REFUSED.items():
        if cfg[key] != HEUN_SCHEDULER_DEFAULTS[key]:
            bad(cfg, key, why)
    check_booleans(cfg, ("use_karras_sigmas", "clip_sample"))
    check_common(cfg)
    if cfg["clip_sample"]:
        r = cfg["clip_sample_range"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) \
                or not r > 0:
            bad(cfg, "clip_sample_range", "must be a positive number")
    return cfg


def heun_plan(settings: dict, num_inference_steps: int) -> Plan:
    """The plan of HeunDiscreteScheduler(**settings).set_timesteps(num_inference_steps) and
    its canonical loop (2n − 1 model calls); a ValueError (before any work) where diffusers
    fails or divides by zero."""
    cfg = heun_settings(settings)
    n = num_inference_steps
    check_steps(n)
    levels_cfg = {**cfg, "sigma_min": None, "sigma_max": None, "rescale_betas_zero_snr": False}
    timesteps, sigmas = euler_levels(levels_cfg, n)
    _check_run(levels_cfg, n, timesteps, sigmas)
    levels = [float(s) for s in sigmas]
    rows = new_rows(2 * n - 1)
    calls = []
    for k in range(n):
        s, s_next = levels[k], levels[k + 1]
        first = 2 * k
        rows[first, C_IN] = 1.0 / math.sqrt(s * s + 1.0)
        rows[first, P], rows[first, Q] = x0_coefficients(cfg["prediction_type"], s)
        rows[first, A], rows[first, B0] = s_next / s, 1.0 - s_next / s
        rows[first, T], rows[first, ORDER] = timesteps[k], 1
        calls.append(timesteps[k])
        if k == n - 1:                    # the last level pair ends with the Euler step
            break
        second, dt = first + 1, s_next - s
        rows[second, C_IN] = 1.0 / math.sqrt(s_next * s_next + 1.0)
        rows[second, P], rows[second, Q] = x0_coefficients(cfg["prediction_type"], s_next)
        rows[second, KX], rows[second, KL] = dt / (2 * s_next), 1.0 + dt / (2 * s)
        rows[second, K0], rows[second, K1] = -dt / (2 * s_next), -dt / (2 * s)
        rows[second, A] = 1.0
        rows[second, T], rows[second, ORDER] = timesteps[k + 1], 2
        calls.append(timesteps[k + 1])
    threshold = None
    if cfg["clip_sample"]:
        rows[:, THRESH] = 1.0
        threshold = (float(cfg["clip_sample_range"]),)
    # diffusers' sigmas: each level after the first twice (a level a call), then 0
    called = levels[:1] + [s for s in levels[1:-1] for _ in range(2)] + levels[-1:]
    return make_plan(rows, calls, cfg["num_train_timesteps"],
                     init_noise_sigma=init_noise_sigma(cfg, sigmas), stochastic=False,
                     threshold=threshold, sigmas=called,
                     orders=[int(o) for o in rows[:, ORDER].tolist()], scheduler=SCHEDULER,
                     settings=cfg)
