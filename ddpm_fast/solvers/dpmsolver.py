"""DPM-Solver and DPM-Solver++ (Lu et al. 2022a, 2022b), multistep, as diffusers'
DPMSolverMultistepScheduler runs them, as rows of the solvers' common table (solvers/table.py):

    m_k  = P·x + Q·out                                     (convert_model_output; THRESH = 1:
                                                            then dynamic thresholding, nonlinear)
    x'   = A·x + B0·m_k + B1·m_{k−1} + B2·m_{k−2} + S·z    (…first/second/third_order_update)

with no corrector (KX = 1) and C_IN = 1. B1 (B2) is 0 in a step that does not read m_{k−1}
(m_{k−2}). m is the data prediction x̂0 for dpmsolver++ / sde-dpmsolver++ and the noise
prediction ε̂ for dpmsolver / sde-dpmsolver. S is 0 except for the SDE variants, which draw z
at every step (also where S = 0). ORDER is the order of the step (1–3), THRESH 1 on every row
when thresholding is on (Plan.threshold holds its ratio and maximum).

The coefficients come from the solvers' formulas in float64, evaluated at diffusers' own float32
noise levels σ_k = √((1−ᾱ)/ᾱ) (set_timesteps: spacing, karras / lu sigmas, final sigma,
lambda_min_clipped), with α = 1/√(1+σ²), σ_t = σ·α, λ = log α − log σ_t = −log σ,
h = λ_{k+1} − λ_k. The timestep and sigma selection repeats diffusers' float32 / numpy
arithmetic (a rounding there picks a different integer timestep); the coefficients themselves
differ from diffusers' float32 ones only by rounding. tests/test_solvers_dpm.py: every step
within 1e-5 of the size of its terms, the final sample within 1e-5 (a few ill-conditioned
families: within diffusers' own distance from float64 arithmetic).

Settings: dpm_settings takes a DPMSolverMultistepScheduler config and returns every setting or
a ValueError naming the one not honoured (diffusers' own failures included: see _REFUSED and
the combination checks there); dpm_plan also refuses the runs diffusers cannot make (a repeated
first timestep, timesteps outside the training range, repeated noise levels: IndexError, NaN).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..schedule import DDPM_SCHEDULER_DEFAULTS, FIXED_VARIANCES, Schedule
from .table import A, B0, B1, B2, ORDER, P, Q, S, T, THRESH, Plan, make_plan, new_rows

ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
DATA_PREDICTION = ("dpmsolver++", "sde-dpmsolver++")         # m is x̂0
STOCHASTIC = ("sde-dpmsolver++", "sde-dpmsolver")             # one z per step
SOLVER_TYPES = ("midpoint", "heun")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
LEARNED_VARIANCES = ("learned", "learned_range")
# variance_type values DPM-Solver runs with: None, the learned ones (their first 3 output
# channels are the prediction) and DDPMScheduler's fixed ones, which
# DPMSolverMultistepScheduler.from_config of a DDPM pipeline's scheduler config carries over and
# diffusers ignores (as None)
VARIANCE_TYPES = (None,) + LEARNED_VARIANCES + FIXED_VARIANCES
# diffusers keeps the first 3 channels of a learned-variance output (model_output[:, :3])
LEARNED_KEEP_CHANNELS = 3

# Every argument of diffusers' DPMSolverMultistepScheduler (0.42) with its default.
DPM_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "solver_order": 2,
    "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
    "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
    "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
    "lambda_min_clipped": -math.inf, "variance_type": None, "timestep_spacing": "linspace",
    "steps_offset": 0, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}
# Settings that must keep their default, and why (what they would need).
_REFUSED = {
    "use_exponential_sigmas": "exponential sigmas are not implemented by ddpm_fast",
    "use_beta_sigmas": "beta sigmas are not implemented by ddpm_fast",
    "use_flow_sigmas": "flow-matching sigmas are not implemented by ddpm_fast (DDPM models "
                       "are variance preserving)",
    "flow_shift": "it shifts flow-matching sigmas only, which ddpm_fast does not implement",
    "use_dynamic_shifting": "dynamic shifting is for flow-matching models",
}
# DDPMScheduler / DDIMScheduler settings that a DPM-Solver class does not take: diffusers keeps
# them in the config of a scheduler made by from_config of theirs ("hidden" keys for compatible
# classes) and ignores them, so they carry no setting here either (the swap a DDPM pipeline's
# user makes)
DDPM_KEYS = frozenset(set(DDPM_SCHEDULER_DEFAULTS) | {"set_alpha_to_one"})
# diffusers maps these values of other schedulers' configs (DEIS, UniPC) onto its own
_ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
_SOLVER_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def dpm_settings(config: dict) -> dict:
    """Every DPMSolverMultistepScheduler setting of a diffusers config (defaults filled in), or
    a ValueError naming the first setting and value that is not honoured exactly.

    Private keys ("_class_name", …) and the keys listed in "_use_default_values" carry no
    settings (diffusers then uses the defaults), nor do DDPMScheduler / DDIMScheduler settings
    that DPM-Solver does not take (clip_sample, clip_sample_range, set_alpha_to_one: diffusers
    keeps them in a from_config'd scheduler's config and ignores them). Other keys that are not
    DPMSolverMultistepScheduler arguments are refused by name. The aliases diffusers applies are
    applied the same way (algorithm_type "deis" → "dpmsolver++", solver_type "logrho" / "bh1" /
    "bh2" → "midpoint")."""
    return check_settings(config, "DPMSolverMultistepScheduler", DPM_SCHEDULER_DEFAULTS,
                          ALGORITHM_TYPES)


def check_settings(config: dict, scheduler: str, defaults: dict, algorithms: tuple) -> dict:
    """dpm_settings for `scheduler`, whose arguments are `defaults` (DPMSolverMultistepScheduler's
    or a subset: the keys it lacks take their multistep defaults, which are neutral) and whose
    algorithm types are `algorithms` (solvers/singlestep.py checks DPMSolverSinglestepScheduler
    settings with it)."""
    if not isinstance(config, dict):
        raise ValueError(f"scheduler config must be a dict, got {type(config).__name__}")
    used_defaults = config.get("_use_default_values", [])
    given = {k: v for k, v in config.items() if not k.startswith("_") and
             k not in used_defaults and (k in defaults or k not in DDPM_KEYS)}
    unknown = sorted(k for k in given if k not in defaults)
    if unknown:
        raise ValueError(f"scheduler setting {unknown[0]!r} is not a {scheduler} "
                         "setting and is not honoured" +
                         (f" (also: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))
    cfg = {**DPM_SCHEDULER_DEFAULTS, **defaults, **given}

    def bad(key, why):
        raise ValueError(f"scheduler setting {key}={cfg[key]!r} is not supported: {why}")

    def one_of(key, allowed):
        if cfg[key] not in allowed:
            bad(key, "supported: " + ", ".join(map(repr, allowed)))

    # refused features first: their names are the answer whatever else the config holds
    for key, why in _REFUSED.items():
        if cfg[key] != DPM_SCHEDULER_DEFAULTS[key]:
            bad(key, why)
    if cfg["time_shift_type"] != "exponential":
        bad("time_shift_type", "diffusers only defines 'exponential' (used with dynamic "
                               "shifting only)")
    for key in ("thresholding", "lower_order_final", "euler_at_final", "use_karras_sigmas",
                "use_lu_lambdas", "rescale_betas_zero_snr"):
        if not isinstance(cfg[key], bool):
            bad(key, "must be true or false")
    if isinstance(cfg["solver_order"], bool) or cfg["solver_order"] not in (1, 2, 3):
        bad("solver_order", "supported: 1, 2, 3")
    if cfg["prediction_type"] == "flow_prediction":
        bad("prediction_type", "flow-matching models are not DDPM models; supported: " +
            ", ".join(PREDICTION_TYPES))
    one_of("prediction_type", PREDICTION_TYPES)
    algorithm = cfg["algorithm_type"]
    if algorithm in _ALGORITHM_ALIASES and cfg["final_sigmas_type"] == "zero":
        # diffusers checks final_sigmas_type against the alias before mapping it
        bad("algorithm_type", "diffusers raises for it with final_sigmas_type='zero' (it maps "
                              "'deis' to 'dpmsolver++' only after that check)")
    cfg["algorithm_type"] = _ALGORITHM_ALIASES.get(algorithm, algorithm)
    one_of("algorithm_type", algorithms)
    cfg["solver_type"] = _SOLVER_ALIASES.get(cfg["solver_type"], cfg["solver_type"])
    one_of("solver_type", SOLVER_TYPES)
    one_of("final_sigmas_type", FINAL_SIGMAS_TYPES)
    one_of("timestep_spacing", SPACINGS)
    one_of("variance_type", VARIANCE_TYPES)
    if cfg["trained_betas"] is None:
        one_of("beta_schedule", BETA_SCHEDULES)
    if not _is_number(cfg["lambda_min_clipped"]) or math.isnan(cfg["lambda_min_clipped"]):
        bad("lambda_min_clipped", "must be a number (-inf: no clipping)")
    for key in ("num_train_timesteps", "steps_offset"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int):
            bad(key, "must be an integer")
    if cfg["num_train_timesteps"] < 2:
        bad("num_train_timesteps", "must be at least 2")
    if cfg["thresholding"]:
        if cfg["algorithm_type"] not in DATA_PREDICTION:
            bad("thresholding", "dynamic thresholding is honoured with the data-prediction "
                                "solvers only (algorithm_type 'dpmsolver++' or "
                                f"'sde-dpmsolver++'), not {cfg['algorithm_type']!r}")
        for key in ("dynamic_thresholding_ratio", "sample_max_value"):
            if not _is_number(cfg[key]) or not math.isfinite(cfg[key]):
                bad(key, "must be a finite number")
        if not 0 <= cfg["dynamic_thresholding_ratio"] <= 1:
            bad("dynamic_thresholding_ratio", "must lie in [0, 1]")
        if not cfg["sample_max_value"] > 0:
            bad("sample_max_value", "must be positive")
    # combinations diffusers refuses, fails on, or runs with a setting silently ignored
    if cfg["algorithm_type"] not in DATA_PREDICTION and cfg["final_sigmas_type"] == "zero":
        bad("final_sigmas_type", f"diffusers raises for it with algorithm_type="
                                 f"{cfg['algorithm_type']!r} (the noise-prediction solvers "
                                 "need final_sigmas_type='sigma_min')")
    if cfg["algorithm_type"] == "sde-dpmsolver" and cfg["solver_order"] == 3:
        bad("solver_order", "diffusers' third-order update has no 'sde-dpmsolver' branch "
                            "(UnboundLocalError); supported with sde-dpmsolver: 1, 2")
    if cfg["use_karras_sigmas"] and cfg["use_lu_lambdas"]:
        bad("use_lu_lambdas", "diffusers ignores it when use_karras_sigmas is also set; "
                              "choose one")
    if cfg["variance_type"] in LEARNED_VARIANCES and cfg["prediction_type"] != "epsilon":
        bad("variance_type", "diffusers splits the variance off ε-predictions only (with "
                             f"prediction_type={cfg['prediction_type']!r} it would use the "
                             "whole output)")
    # the beta settings, checked as DDPMScheduler's (the same arguments and formulas)
    _betas(cfg)
    return {k: cfg[k] for k in defaults}


def _betas(cfg: dict) -> torch.Tensor:
    """diffusers' float32 betas (DPMSolverMultistepScheduler.__init__ forms them as
    DDPMScheduler.__init__ does: schedule.py's "diffusers" numerics)."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr")
    try:
        return Schedule.from_scheduler_config({k: cfg[k] for k in keys},
                                              numerics="diffusers").betas
    except ValueError as e:
        if "scheduler setting" in str(e):
            raise
        given = ("trained_betas" if cfg["trained_betas"] is not None else
                 f"beta_start={cfg['beta_start']!r}, beta_end={cfg['beta_end']!r}")
        raise ValueError(f"scheduler setting {given} is not supported: {e}") from None


# ---------------------------------------------------------------------------- noise levels
def _train_levels(cfg: dict):
    """(ᾱ, σ = √((1−ᾱ)/ᾱ), λ) over the training timesteps, in diffusers' float32 (its __init__).
    With rescale_betas_zero_snr diffusers sets ᾱ_{T−1} = 2⁻²⁴ instead of 0, so the first σ of a
    run that starts at T−1 is finite (≈ 4096), not ∞."""
    abar = torch.cumprod(1.0 - _betas(cfg), dim=0)
    if cfg["rescale_betas_zero_snr"]:
        abar[-1] = 2.0 ** -24
    lam = torch.log(torch.sqrt(abar)) - torch.log(torch.sqrt(1 - abar))
    sigmas = ((1 - abar) / abar) ** 0.5
    return abar, sigmas.numpy(), lam


def _spaced_timesteps(cfg: dict, n: int, lam: torch.Tensor) -> np.ndarray:
    """The timesteps of set_timesteps' timestep_spacing (Lin et al. 2023, Table 2), below the
    last timestep whose λ is at least lambda_min_clipped."""
    n_train = cfg["num_train_timesteps"]
    # timesteps whose λ (decreasing in t) lies below the clip are cut from the top
    last = n_train - int(torch.searchsorted(torch.flip(lam, [0]), cfg["lambda_min_clipped"]))
    if cfg["timestep_spacing"] == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if cfg["timestep_spacing"] == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + \
            cfg["steps_offset"]
    # trailing: the step is T / n even when the clip lowers the start (then fewer steps)
    return np.arange(last, 0, -n_train / n).round().astype(np.int64) - 1


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep of each σ: log σ interpolated linearly between the two training
    timesteps around it (clamped to the ends), as diffusers' _sigma_to_t."""
    out = np.empty(len(sigma))
    for i, s in enumerate(sigma):
        ls = np.log(np.maximum(s, 1e-10))
        below = np.nonzero(ls - log_sigmas >= 0)[0]      # training levels at or below σ
        lo = min(int(below.max()) if len(below) else 0, len(log_sigmas) - 2)
        # 1-element float32 arrays and a float64 scalar: the dtype promotion of diffusers'
        # expression under NumPy 1 (value-based) and 2 alike
        low, high = log_sigmas[lo:lo + 1], log_sigmas[lo + 1:lo + 2]
        w = np.clip((low - ls) / (low - high), 0, 1)
        out[i] = ((1 - w) * lo + w * (lo + 1))[0]
    return out


def noise_levels(cfg: dict, num_inference_steps: int, round_cosine: bool = False
                 ) -> tuple[list[int], np.ndarray]:
    """(timesteps, σ_0..σ_n) of set_timesteps(num_inference_steps): the integer timesteps the
    U-Net sees and the n+1 float32 noise levels (σ/α) the steps run between, the last one 0
    (final_sigmas_type "zero") or the first training level ("sigma_min"). Mirrors
    DPMSolverMultistepScheduler.set_timesteps (with _convert_to_karras, _convert_to_lu,
    _sigma_to_t); with karras or lu sigmas diffusers ignores the spacing, steps_offset and
    lambda_min_clipped, and so does this."""
    n = num_inference_steps
    abar, train_sigmas, lam = _train_levels(cfg)
    log_sigmas = np.log(train_sigmas)                    # float32, as diffusers' numpy log
    timesteps = _spaced_timesteps(cfg, n, lam)
    round_t = round_cosine or cfg["beta_schedule"] != "squaredcos_cap_v2"
    if cfg["use_karras_sigmas"]:
        # Karras et al. 2022, eq. (5), ρ = 7, between the training schedule's ends
        s_min, s_max, rho = float(train_sigmas[0]), float(train_sigmas[-1]), 7.0
        ramp = np.linspace(0, 1, n)
        sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        timesteps = _sigma_to_t(sigmas, log_sigmas)
    elif cfg["use_lu_lambdas"]:
        # uniform in λ = −log σ (Lu et al. 2022a, "logSNR" steps) between the ends
        l_min, l_max = float(log_sigmas[0]), float(log_sigmas[-1])
        sigmas = np.exp(l_max + np.linspace(0, 1, n) * (l_min - l_max))
        timesteps = _sigma_to_t(sigmas, log_sigmas)
    else:
        sigmas = None
    if sigmas is not None and round_t:
        timesteps = timesteps.round()
    timesteps = [int(t) for t in timesteps]              # int64 cast: truncation
    if not timesteps:
        raise ValueError(f"lambda_min_clipped={cfg['lambda_min_clipped']!r} leaves no timestep "
                         f"for {n} steps")
    n_train = cfg["num_train_timesteps"]
    if any(not 0 <= t < n_train for t in timesteps):
        raise ValueError(f"timesteps {timesteps} leave [0, {n_train}) (steps_offset="
                         f"{cfg['steps_offset']!r}, timestep_spacing="
                         f"{cfg['timestep_spacing']!r}, lambda_min_clipped="
                         f"{cfg['lambda_min_clipped']!r}): diffusers clamps σ there but feeds "
                         "the U-Net the timestep outside its training range")
    if timesteps.count(timesteps[0]) > 1:
        raise ValueError(f"the first timestep {timesteps[0]} repeats in {timesteps} "
                         f"({n} steps): diffusers then starts at its second occurrence and "
                         "runs past its last noise level (IndexError)")
    if sigmas is None:
        sigmas = train_sigmas[timesteps].astype(np.float64)
    last = float(train_sigmas[0]) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    return timesteps, np.concatenate([sigmas, [last]]).astype(np.float32)


def step_orders(cfg: dict, n: int) -> list[int]:
    """The order of each of n steps (mirrors DPMSolverMultistepScheduler.step's choice among
    the first/second/third order updates): multistep warm-up (order k needs k − 1
    earlier outputs), first order at the last step with euler_at_final, final_sigmas_type
    "zero" or lower_order_final below 15 steps, and at most second order one step before with
    lower_order_final below 15 steps."""
    orders = []
    short = cfg["lower_order_final"] and n < 15
    for k in range(n):
        final = k == n - 1 and (cfg["euler_at_final"] or short or
                                cfg["final_sigmas_type"] == "zero")
        second_last = k == n - 2 and short
        order = min(cfg["solver_order"], k + 1)
        if final:
            order = 1
        elif second_last:
            order = min(order, 2)
        orders.append(order)
    return orders


# ---------------------------------------------------------------------------- coefficients
def _alpha_sigma(level: float) -> tuple[float, float, float]:
    """(α, σ_t, λ) of a noise level σ/α (VP: α² + σ_t² = 1); λ = −log(σ/α), ∞ at σ = 0."""
    alpha = 1.0 / math.sqrt(1.0 + level * level)
    return alpha, level * alpha, (math.inf if level == 0 else -math.log(level))


def convert_coefficients(cfg: dict, level: float) -> tuple[float, float]:
    """(P, Q) with m = P·x + Q·out at noise level σ/α = `level`; mirrors convert_model_output.
    Data prediction x̂0 (dpmsolver++, sde-dpmsolver++) and noise prediction ε̂ (dpmsolver,
    sde-dpmsolver) of x = α·x0 + σ·ε, from what the model predicts:
      ε-prediction:  x̂0 = (x − σ·out)/α            ε̂ = out
      v-prediction:  x̂0 = α·x − σ·out               ε̂ = σ·x + α·out   (v = α·ε − σ·x0)
      sample:        x̂0 = out                       ε̂ = (x − α·out)/σ"""
    a, s, _ = _alpha_sigma(level)
    kind = cfg["prediction_type"]
    if cfg["algorithm_type"] in DATA_PREDICTION:
        return {"epsilon": (1 / a, -s / a), "v_prediction": (a, -s), "sample": (0.0, 1.0)}[kind]
    return {"epsilon": (0.0, 1.0), "v_prediction": (s, a), "sample": (1 / s, -a / s)}[kind]


def _expand(order: int, r0: float, r1: float, w: Sequence[float]) -> list[float]:
    """Weights on (m_k, m_{k−1}, m_{k−2}) of w0·D0 + w1·D1 + w2·D2 for the multistep
    differences of a step of this order (r_i = h_i / h, the earlier λ steps over this one):
      order 2:  D0 = m_k,  D1 = (m_k − m_{k−1})/r0
                → m_k: w0 + w1/r0,  m_{k−1}: −w1/r0
      order 3:  D1_0 = (m_k − m_{k−1})/r0,  D1_1 = (m_{k−1} − m_{k−2})/r1,
                D1 = D1_0 + r0/(r0+r1)·(D1_0 − D1_1),  D2 = (D1_0 − D1_1)/(r0+r1)
    (D1 ≈ h·m', D2 ≈ h²/2·m'' in λ), expanded as vectors over (m_k, m_{k−1}, m_{k−2})."""
    d0 = np.array([1.0, 0.0, 0.0])
    if order == 1:
        return list(w[0] * d0)
    d1_0 = np.array([1.0, -1.0, 0.0]) / r0
    if order == 2:
        return list(w[0] * d0 + w[1] * d1_0)
    d1_1 = np.array([0.0, 1.0, -1.0]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return list(w[0] * d0 + w[1] * d1 + w[2] * d2)


def update_coefficients(cfg: dict, order: int, levels: Sequence[float]
                        ) -> tuple[float, list[float], float]:
    """(A, [B0, B1, B2], S) of one step x' = A·x + ΣB_i·m_{k−i} + S·z from noise level
    levels[1] (σ/α of this step) to levels[0] (the next), levels[2:] the earlier steps' levels.

    With h = λ_t − λ_s and the converted output expanded in λ as m ≈ D0 + (u/h)·D1 + …, the
    exact solutions of the diffusion ODE / SDE over the step give (α, σ at the target t):
      dpmsolver++      (Lu et al. 2022b, eq. 9):  x' = (σ_t/σ_s)·x + α_t ∫₀ʰ e^{−(h−u)} x̂0 du
      sde-dpmsolver++  (2022b, §5):  x' = (σ_t/σ_s)e^{−h}·x + 2α_t ∫₀ʰ e^{−2(h−u)} x̂0 du
                                          + σ_t √(1 − e^{−2h}) z
      dpmsolver        (Lu et al. 2022a, eq. 3.4):  x' = (α_t/α_s)·x − σ_t ∫₀ʰ e^{h−u} ε̂ du
      sde-dpmsolver    x' = (α_t/α_s)·x − 2σ_t ∫₀ʰ e^{h−u} ε̂ du + σ_t √(e^{2h} − 1) z
    so D0's weight is the kernel's integral w0 and D1's (heun, and third order) the integral of
    kernel·u/h; "midpoint" weighs D1 by w0/2. D2's weight (third order) is the papers' and
    diffusers' −α_t·φ3 (φ3 = ((e^{−h} − 1 + h)/h² − ½)), half the kernel·(u/h)² integral; for
    sde-dpmsolver++ diffusers uses α_t·((1 − e^{−2h} − 2h)/(2h)² − ½), whose −½ does not vanish
    as h → 0 (+½ would be the same convention as the ODE's): both are kept, as diffusers runs
    them (multistep_dpm_solver_third_order_update).
    Mirrors dpm_solver_first_order_update and multistep_dpm_solver_second/third_order_update."""
    with np.errstate(all="ignore"):      # IEEE inf/NaN where diffusers' float32 gives them
        return _update_coefficients(cfg, order, levels)


def _update_coefficients(cfg, order, levels):
    _, _, l_s = _alpha_sigma(levels[1])
    coef_x, (w0, w1, w2), noise, h = step_weights(cfg, order, levels[0], levels[1])
    r0 = r1 = np.float64(np.nan)
    if order >= 2:
        r0 = (l_s - _alpha_sigma(levels[2])[2]) / h
    if order >= 3:
        r1 = (_alpha_sigma(levels[2])[2] - _alpha_sigma(levels[3])[2]) / h
    return float(coef_x), [float(b) for b in _expand(order, r0, r1, (w0, w1, w2))], float(noise)


def step_weights(cfg: dict, order: int, target: float, start: float):
    """(coefficient of x, (w0, w1, w2), noise scale, h) of a step of this order from noise level
    `start` to `target` (σ/α): the weights of D0, D1, D2 in update_coefficients' formulas, in
    float64 (IEEE inf/NaN where diffusers' float32 gives them: the caller suppresses warnings).
    Shared by the multistep and the singlestep solvers (their D's differ, not their weights)."""
    a_t, s_t, l_t = map(np.float64, _alpha_sigma(target))
    a_s, s_s, l_s = map(np.float64, _alpha_sigma(start))
    h = l_t - l_s
    algorithm, heun = cfg["algorithm_type"], cfg["solver_type"] == "heun"
    if algorithm == "dpmsolver++":
        phi1 = -np.expm1(-h)                          # 1 − e^{−h}: ∫ e^{−(h−u)} du
        w0 = a_t * phi1
        w1 = a_t * (1 - phi1 / h) if (heun or order == 3) else w0 / 2
        w2 = a_t * (0.5 - (h - phi1) / h ** 2) if order == 3 else 0.0
        coef_x = s_t / s_s
        noise = 0.0
    elif algorithm == "sde-dpmsolver++":
        psi1 = -np.expm1(-2 * h)                      # 1 − e^{−2h}: ∫ 2e^{−2(h−u)} du
        w0 = a_t * psi1
        w1 = a_t * (1 - psi1 / (2 * h)) if (heun or order == 3) else w0 / 2
        w2 = a_t * ((psi1 - 2 * h) / (2 * h) ** 2 - 0.5) if order == 3 else 0.0
        coef_x = s_t / s_s * np.exp(-h)
        noise = s_t * np.sqrt(psi1)
    elif algorithm == "dpmsolver":
        em1 = np.expm1(h)                             # e^h − 1: ∫ e^{h−u} du
        w0 = -s_t * em1
        w1 = -s_t * (em1 / h - 1) if (heun or order == 3) else w0 / 2
        w2 = -s_t * ((em1 - h) / h ** 2 - 0.5) if order == 3 else 0.0
        coef_x = a_t / a_s
        noise = 0.0
    else:  # sde-dpmsolver (orders 1, 2: dpm_settings refuses 3)
        em1 = np.expm1(h)
        w0 = -2 * s_t * em1
        w1 = -2 * s_t * (em1 / h - 1) if heun else w0 / 2
        w2 = 0.0
        coef_x = a_t / a_s
        noise = s_t * np.sqrt(np.expm1(2 * h))
    return coef_x, (w0, w1, w2), noise, h


# ---------------------------------------------------------------------------- the plan
def dpm_plan(settings: dict, num_inference_steps: int) -> Plan:
    """The plan (solvers/table.py) of DPMSolverMultistepScheduler(**settings).set_timesteps(
    num_inference_steps) and the steps of its canonical loop; a ValueError (before any work)
    where diffusers fails or divides by zero (repeated noise levels)."""
    cfg = dpm_settings(settings)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or \
            num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got "
                         f"{num_inference_steps!r}")
    timesteps, sigmas32 = noise_levels(cfg, num_inference_steps)
    levels = checked_levels(sigmas32)
    n = len(timesteps)
    orders = step_orders(cfg, n)
    rows = new_rows(n)
    for k, order in enumerate(orders):
        rows[k, P], rows[k, Q] = convert_coefficients(cfg, levels[k])
        # levels of the target, this step and the earlier ones (newest first)
        coef_x, b, noise = update_coefficients(cfg, order, [levels[k + 1]] +
                                               levels[k::-1][:order])
        rows[k, A], rows[k, S] = coef_x, noise
        rows[k, B0], rows[k, B1], rows[k, B2] = b
        rows[k, T], rows[k, ORDER] = timesteps[k], order
        if not bool(torch.isfinite(rows[k]).all()):
            why = ""
            if (cfg["use_karras_sigmas"] or cfg["use_lu_lambdas"]) and \
                    cfg["final_sigmas_type"] == "sigma_min":
                why = (": karras / lu levels end at σ_min, and final_sigmas_type='sigma_min' "
                       "repeats it (use 'zero', or fewer than 15 steps with lower_order_final)")
            raise ValueError(f"step {k} (t = {timesteps[k]}, order {order}) of "
                             f"{num_inference_steps} has non-finite coefficients: repeated "
                             f"noise levels ({levels[max(k - 2, 0):k + 2]}) make diffusers' "
                             f"multistep update divide by zero (NaN){why}")
    return finish_plan(cfg, rows, timesteps, levels, orders, "DPMSolverMultistepScheduler")


def checked_levels(sigmas32) -> list[float]:
    """The run's noise levels as floats; a ValueError where one a step starts from is not
    positive and finite (diffusers' steps give NaN there)."""
    levels = [float(s) for s in sigmas32]
    if not all(math.isfinite(s) and s > 0 for s in levels[:-1]):
        raise ValueError(f"noise levels {levels} are not all positive and finite: "
                         "diffusers' steps give NaN")
    return levels


def finish_plan(cfg: dict, rows: torch.Tensor, timesteps, levels, orders, scheduler: str,
                settings: dict | None = None) -> Plan:
    """The Plan of a DPM-Solver class's rows: thresholding (THRESH on every row), a learned
    variance's kept channels, SDE noise; `settings` as the run leaves them (default: cfg)."""
    if cfg["thresholding"]:
        rows[:, THRESH] = 1.0
    threshold = ((float(cfg["dynamic_thresholding_ratio"]), float(cfg["sample_max_value"]))
                 if cfg["thresholding"] else None)
    keep = LEARNED_KEEP_CHANNELS if cfg["variance_type"] in LEARNED_VARIANCES else None
    return make_plan(rows, timesteps, cfg["num_train_timesteps"], init_noise_sigma=1.0,
                     stochastic=cfg["algorithm_type"] in STOCHASTIC, threshold=threshold,
                     keep_channels=keep, sigmas=levels, orders=orders, scheduler=scheduler,
                     settings=cfg if settings is None else settings)
