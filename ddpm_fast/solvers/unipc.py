"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), multistep, B(h) variants, as diffusers' UniPCMultistepScheduler runs it, as
rows of the solvers' common table (solvers/table.py):

    m_k  = P·x + Q·out                                   (convert_model_output; THRESH = 1: then
                                                          dynamic thresholding, nonlinear)
    x_c  = KL·x_last + K0·m_k + K1·m_{k−1} + K2·m_{k−2} + K3·m_{k−3}
                                                         (UniC: multistep_uni_c_bh_update; KX = 0)
    x'   = A·x_c + B0·m_k + B1·m_{k−1} + B2·m_{k−2}      (UniP: multistep_uni_p_bh_update; S = 0)

m is the data prediction x̂0 (predict_x0, the default) or the noise prediction ε̂. x_last is the
previous step's corrected sample (diffusers' last_sample): UniC corrects the step from level
k−1 to level k again, now that m_k is known, starting from the sample that step started from, so
the corrected sample does not read the predicted x (KX = 0) except through m_k. A step without a
corrector (step 0, and step k when k − 1 is in disable_corrector) has KX = 1, KL = K* = 0.
ORDER is the predictor's order; the corrector of step k has the order of step k − 1's predictor.

The formulas (Zhao et al. 2023, Algorithms 2 and 3, B(h) form), with λ = −log(σ/α) (VP:
α = 1/√(1+l²), σ_t = l·α at noise level l = σ/α), h = λ_t − λ_s, hh = −h for x̂0 (data
prediction) and +h for ε̂, and φ_1(z) = (e^z − 1)/z, φ_{j+1}(z) = (φ_j(z) − 1/j!)/z:

    x̂0:  x_t = (σ_t/σ_s)·x_s − α_t(e^{hh} − 1)·m_s − α_t·B(h)·Σ_i ρ_i·D_i
    ε̂:   x_t = (α_t/α_s)·x_s − σ_t(e^{hh} − 1)·m_s − σ_t·B(h)·Σ_i ρ_i·D_i

with D_i = (m_{s_i} − m_s)/r_i the differences to the earlier outputs, r_i = (λ_{s_i} − λ_s)/h,
and B(h) = hh (bh1) or e^{hh} − 1 (bh2). The ρ solve R·ρ = b, R_{ji} = r_i^{j−1} (r_p = 1 for the
corrector's D_p = m_t − m_s), b_j = j!·hh·φ_{j+1}(hh)/B(h): the predictor of order p solves the
(p−1)×(p−1) system (R without its last row and column: it has no D_p), the corrector of order
p the full p×p one.
diffusers (and the paper's code) replace the order-2 predictor's ρ by ½ and the order-1
corrector's by ½; so does this. The ρ and all coefficients are evaluated in float64 (φ by its
series for |hh| < 1) and expanded into per-buffer weights, at diffusers' own float32 noise levels
(set_timesteps: spacing, karras sigmas, final sigma), whose timestep selection repeats diffusers'
float32 / numpy arithmetic. tests/test_solvers_unipc.py: every step within 1e-5 of the size of
its terms, the final sample within 1e-5 (a few ill-conditioned families, the noise-prediction
form above all: within diffusers' own distance from float64 arithmetic).

Settings: unipc_settings takes a UniPCMultistepScheduler config and returns every setting or a
ValueError naming the one not honoured (diffusers' own failures and NaN runs included: see
_REFUSED and the combination checks); unipc_plan also refuses the runs diffusers cannot make (a
repeated first timestep, timesteps outside the training range, repeated noise levels).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..schedule import DDPM_SCHEDULER_DEFAULTS
from . import dpmsolver as _dpm
from .table import (A, B0, B1, B2, K0, K1, K2, K3, KL, KX, ORDER, P, Q, T, THRESH, Plan,
                    make_plan, new_rows)

SOLVER_TYPES = ("bh1", "bh2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = _dpm.BETA_SCHEDULES
SPACINGS = _dpm.SPACINGS
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# the table holds three earlier converted outputs (m1, m2, m3): a corrector of order p reads
# p of them (K1–K3), a predictor of order p reads p − 1 (B1, B2)
MAX_ORDER = 3

# Every argument of diffusers' UniPCMultistepScheduler (0.42) with its default.
UNIPC_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "solver_order": 2,
    "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0, "predict_x0": True, "solver_type": "bh2",
    "lower_order_final": True, "disable_corrector": [], "solver_p": None,
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "use_flow_sigmas": False, "flow_shift": 1.0, "timestep_spacing": "linspace",
    "steps_offset": 0, "final_sigmas_type": "zero", "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False, "time_shift_type": "exponential", "sigma_min": None,
    "sigma_max": None, "shift_terminal": None,
}
# Settings that must keep their default, and why (what they would need).
_REFUSED = {
    "use_exponential_sigmas": "exponential sigmas are not implemented by ddpm_fast",
    "use_beta_sigmas": "beta sigmas are not implemented by ddpm_fast",
    "use_flow_sigmas": "flow-matching sigmas are not implemented by ddpm_fast (DDPM models "
                       "are variance preserving)",
    "flow_shift": "it shifts flow-matching sigmas only, which ddpm_fast does not implement",
    "use_dynamic_shifting": "dynamic shifting is for flow-matching models",
    "shift_terminal": "it stretches flow-matching sigmas only (diffusers raises for it without "
                      "use_flow_sigmas)",
    "solver_p": "it replaces UniPC's predictor by another scheduler object's step, which is "
                "not a table of coefficients",
}
# DDPMScheduler / DDIMScheduler settings that UniPC does not take: diffusers keeps them in the
# config of a scheduler made by from_config of theirs ("hidden" keys) and ignores them, so they
# carry no setting here either (the swap a DDPM pipeline's user makes). variance_type's learned
# values are the exception (refused in unipc_settings).
OTHER_SCHEDULER_KEYS = frozenset(
    set(DDPM_SCHEDULER_DEFAULTS) | {"set_alpha_to_one"}) - set(UNIPC_SCHEDULER_DEFAULTS)
# diffusers maps DPM-Solver's solver types onto bh2 (UniPCMultistepScheduler.__init__)
_SOLVER_ALIASES = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def unipc_settings(config: dict) -> dict:
    """Every UniPCMultistepScheduler setting of a diffusers config (defaults filled in), or a
    ValueError naming the first setting and value that is not honoured exactly.

    Private keys ("_class_name", …) and the keys listed in "_use_default_values" carry no
    settings (diffusers then uses the defaults), nor do DDPMScheduler / DDIMScheduler settings
    that UniPC does not take (clip_sample, clip_sample_range, set_alpha_to_one, variance_type
    "fixed_…": diffusers keeps them in a from_config'd scheduler's config and ignores them).
    Other keys that are not UniPCMultistepScheduler arguments are refused by name. diffusers'
    alias is applied the same way (solver_type "midpoint" / "heun" / "logrho" → "bh2")."""
    if not isinstance(config, dict):
        raise ValueError(f"scheduler config must be a dict, got {type(config).__name__}")
    used_defaults = config.get("_use_default_values", [])
    given = {k: v for k, v in config.items() if not k.startswith("_") and
             k not in used_defaults}
    variance = given.pop("variance_type", None)
    if variance in _dpm.LEARNED_VARIANCES:
        raise ValueError(f"scheduler setting variance_type={variance!r} is not supported: "
                         "UniPCMultistepScheduler uses the whole model output as the prediction "
                         "(a learned-variance model's 2·C output channels make diffusers fail)")
    given = {k: v for k, v in given.items() if k not in OTHER_SCHEDULER_KEYS}
    unknown = sorted(k for k in given if k not in UNIPC_SCHEDULER_DEFAULTS)
    if unknown:
        raise ValueError(f"scheduler setting {unknown[0]!r} is not a UniPCMultistepScheduler "
                         "setting and is not honoured" +
                         (f" (also: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))
    cfg = {**UNIPC_SCHEDULER_DEFAULTS, **given}

    def bad(key, why):
        raise ValueError(f"scheduler setting {key}={cfg[key]!r} is not supported: {why}")

    def one_of(key, allowed):
        if cfg[key] not in allowed:
            bad(key, "supported: " + ", ".join(map(repr, allowed)))

    # refused features first: their names are the answer whatever else the config holds
    for key, why in _REFUSED.items():
        if cfg[key] != UNIPC_SCHEDULER_DEFAULTS[key]:
            bad(key, why)
    if cfg["time_shift_type"] != "exponential":
        bad("time_shift_type", "diffusers only defines 'exponential' (used with dynamic "
                               "shifting only)")
    for key in ("thresholding", "predict_x0", "lower_order_final", "use_karras_sigmas",
                "rescale_betas_zero_snr"):
        if not isinstance(cfg[key], bool):
            bad(key, "must be true or false")
    if not _is_int(cfg["solver_order"]) or cfg["solver_order"] < 1:
        bad("solver_order", "supported: 1, 2, 3 (diffusers fails for orders below 1)")
    if cfg["solver_order"] > MAX_ORDER:
        bad("solver_order", "supported: 1, 2, 3 (diffusers runs any positive order, but the "
                            "solvers' table holds three earlier outputs: UniPC of order p "
                            "reads p of them)")
    if cfg["prediction_type"] == "flow_prediction":
        bad("prediction_type", "flow-matching models are not DDPM models; supported: " +
            ", ".join(PREDICTION_TYPES))
    one_of("prediction_type", PREDICTION_TYPES)
    cfg["solver_type"] = _SOLVER_ALIASES.get(cfg["solver_type"], cfg["solver_type"])
    one_of("solver_type", SOLVER_TYPES)
    one_of("final_sigmas_type", FINAL_SIGMAS_TYPES)
    one_of("timestep_spacing", SPACINGS)
    if cfg["trained_betas"] is None:
        one_of("beta_schedule", BETA_SCHEDULES)
    for key in ("num_train_timesteps", "steps_offset"):
        if not _is_int(cfg[key]):
            bad(key, "must be an integer")
    if cfg["num_train_timesteps"] < 2:
        bad("num_train_timesteps", "must be at least 2")
    dc = cfg["disable_corrector"]
    if not isinstance(dc, (list, tuple)) or not all(_is_int(i) for i in dc):
        bad("disable_corrector", "must be a list of step indices (integers)")
    cfg["disable_corrector"] = list(dc)
    for key in ("sigma_min", "sigma_max"):
        if cfg[key] is None:
            continue
        if not _is_number(cfg[key]) or not math.isfinite(cfg[key]) or not cfg[key] > 0:
            bad(key, "must be a positive number (or None: the training schedule's)")
        if not cfg["use_karras_sigmas"]:
            bad(key, "diffusers uses it for karras sigmas only and ignores it here (set "
                     "use_karras_sigmas, or leave it None)")
    if cfg["thresholding"]:
        if not cfg["predict_x0"]:
            bad("thresholding", "diffusers thresholds the data prediction only and ignores "
                                "thresholding with predict_x0=False")
        for key in ("dynamic_thresholding_ratio", "sample_max_value"):
            if not _is_number(cfg[key]) or not math.isfinite(cfg[key]):
                bad(key, "must be a finite number")
        if not 0 <= cfg["dynamic_thresholding_ratio"] <= 1:
            bad("dynamic_thresholding_ratio", "must lie in [0, 1]")
        if not cfg["sample_max_value"] > 0:
            bad("sample_max_value", "must be positive")
    # combinations whose last step onto σ = 0 (λ = ∞) diffusers computes as NaN
    if cfg["final_sigmas_type"] == "zero":
        if not cfg["predict_x0"]:
            bad("predict_x0", "with final_sigmas_type='zero' diffusers' last step is NaN "
                              "(σ_t·(e^h − 1) = 0·∞ at λ_t = ∞); use final_sigmas_type="
                              "'sigma_min'")
        if cfg["solver_type"] == "bh1":
            bad("solver_type", "with final_sigmas_type='zero' diffusers' last step is NaN "
                               "(B(h) = −h = −∞ times a zero correction); use 'bh2' or "
                               "final_sigmas_type='sigma_min'")
        if not cfg["lower_order_final"] and cfg["solver_order"] >= 2:
            bad("lower_order_final", "with final_sigmas_type='zero' and solver_order ≥ 2 "
                                     "diffusers' last step has order ≥ 2 and divides by "
                                     "r = λ/∞ = 0 (inf / NaN, or a singular solve at order 3)")
    _dpm._betas(cfg)               # the beta settings, checked as DDPMScheduler's
    return cfg


# ---------------------------------------------------------------------------- noise levels
def noise_levels(cfg: dict, num_inference_steps: int) -> tuple[list[int], np.ndarray]:
    """(timesteps, σ_0..σ_n) of set_timesteps(num_inference_steps): the integer timesteps the
    U-Net sees and the n+1 float32 noise levels (σ/α) the steps run between, the last one 0
    (final_sigmas_type "zero") or the lowest level ("sigma_min": the first training level, or
    the karras ramp's end). Mirrors UniPCMultistepScheduler.set_timesteps (with
    _convert_to_karras and _sigma_to_t); it differs from DPM-Solver's (dpmsolver.noise_levels)
    in: no lambda_min_clipped, karras timesteps always rounded (also cosine betas), the karras
    ramp between sigma_min / sigma_max when set, and a karras run's final "sigma_min" level the
    ramp's last one. With karras sigmas diffusers ignores the spacing and steps_offset, and so
    does this."""
    n = num_inference_steps
    _, train_sigmas, lam = _dpm._train_levels(cfg)
    log_sigmas = np.log(train_sigmas)                    # float32, as diffusers' numpy log
    timesteps = _dpm._spaced_timesteps({**cfg, "lambda_min_clipped": -math.inf}, n, lam)
    if cfg["use_karras_sigmas"]:
        # Karras et al. 2022, eq. (5), ρ = 7, between sigma_max and sigma_min
        s_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(train_sigmas[0])
        s_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(train_sigmas[-1])
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        timesteps = _dpm._sigma_to_t(sigmas, log_sigmas).round()
        last = float(sigmas[-1])
    else:
        sigmas = None
        last = float(train_sigmas[0])
    timesteps = [int(t) for t in timesteps]              # int64 cast: truncation
    n_train = cfg["num_train_timesteps"]
    if any(not 0 <= t < n_train for t in timesteps):
        raise ValueError(f"timesteps {timesteps} leave [0, {n_train}) (steps_offset="
                         f"{cfg['steps_offset']!r}, timestep_spacing="
                         f"{cfg['timestep_spacing']!r}): diffusers clamps σ there but feeds "
                         "the U-Net the timestep outside its training range")
    if timesteps.count(timesteps[0]) > 1:
        raise ValueError(f"the first timestep {timesteps[0]} repeats in {timesteps} "
                         f"({n} steps): diffusers then starts at its second occurrence and "
                         "runs past its last noise level (AssertionError)")
    if sigmas is None:                                   # np.interp at integer timesteps
        sigmas = train_sigmas[timesteps].astype(np.float64)
    if cfg["final_sigmas_type"] == "zero":
        last = 0.0
    return timesteps, np.concatenate([sigmas, [last]]).astype(np.float32)


def step_orders(cfg: dict, n: int) -> list[int]:
    """The predictor's order at each of n steps (mirrors UniPCMultistepScheduler.step's
    this_order): multistep warm-up (order p needs p − 1 earlier outputs) and, with
    lower_order_final, at most n − k at step k (whatever n: unlike DPM-Solver's, not only
    below 15 steps)."""
    p = cfg["solver_order"]
    return [min(p, k + 1, n - k if cfg["lower_order_final"] else p) for k in range(n)]


# ---------------------------------------------------------------------------- coefficients
def _hh_phi(j: int, z: float) -> float:
    """z·φ_{j+1}(z) = φ_j(z) − 1/j! (j ≥ 1), φ_1(z) = (e^z − 1)/z, φ_{j+1}(z) = (φ_j(z) −
    1/j!)/z: the series Σ_{i≥1} z^i/(i+j)! for |z| < 1 (no cancellation), else the recursion
    from φ_1 (also at z = −∞, where it is −1/j!). z = 0 gives 0 (diffusers' 0/0 NaN shows up
    where this is divided by B(h) = 0)."""
    if abs(z) < 1:
        z = float(z)
        return math.fsum(z ** i / math.factorial(i + j) for i in range(1, 30))
    z = float(z)
    phi = float(np.expm1(z)) / z if math.isfinite(z) else (0.0 if z < 0 else math.nan)
    for i in range(1, j):
        phi = (phi - 1 / math.factorial(i)) / z
    return phi - 1 / math.factorial(j)


def _uni_bh(cfg: dict, levels: Sequence[float], order: int, corrector: bool):
    """The B(h) update of one UniP / UniC step as weights: (weight on the start sample,
    [weights on m_s, m_{s_1}, m_{s_2}, …], weight on m_t (corrector only)).

    levels = [target level, start level s, earlier levels s_1, s_2 … (newest first)], at
    least order − 1 earlier ones. The predictor (multistep_uni_p_bh_update) of order p reads
    m_s and p − 1 earlier outputs; the corrector (multistep_uni_c_bh_update) of order p reads
    m_s, p − 1 earlier outputs and the target's m_t (its D_p = m_t − m_s, r_p = 1)."""
    # numpy float64 scalars: IEEE inf / NaN (not ZeroDivisionError) where diffusers has them
    a_t, s_t, l_t = map(np.float64, _dpm._alpha_sigma(levels[0]))
    a_s, s_s, l_s = map(np.float64, _dpm._alpha_sigma(levels[1]))
    h = l_t - l_s
    x0 = cfg["predict_x0"]
    hh = -h if x0 else h
    phi1 = np.expm1(hh)                            # h·φ_1(h) = e^{hh} − 1
    b_h = hh if cfg["solver_type"] == "bh1" else phi1
    coef_x, c = (s_t / s_s, a_t) if x0 else (a_t / a_s, s_t)
    r = [(_dpm._alpha_sigma(lv)[2] - l_s) / h for lv in levels[2:2 + order - 1]]
    n_rho = order if corrector else order - 1
    # ρ: the paper's / diffusers' ½ for the order-2 predictor and the order-1 corrector
    if n_rho == 0:
        rho = []
    elif n_rho == 1:                      # predictor of order 2, corrector of order 1
        rho = [0.5]
    else:
        rks = r + [1.0]
        mat = np.array([[rk ** j for rk in rks[:n_rho]] for j in range(n_rho)])
        b = np.array([math.factorial(j) * np.float64(_hh_phi(j, hh)) / b_h
                      for j in range(1, n_rho + 1)])
        try:
            rho = list(np.linalg.solve(mat, b))
        except np.linalg.LinAlgError:
            raise ValueError(f"repeated noise levels {list(levels)} make diffusers' UniPC "
                             "solve a singular system (LinAlgError)") from None
    # x_t = coef_x·x_s − c·(e^{hh} − 1)·m_s − c·B(h)·(Σ_i ρ_i·(m_{s_i} − m_s)/r_i
    #                                                  [+ ρ_p·(m_t − m_s)])
    w = [-c * phi1] + [0.0] * (order - 1)
    for i in range(order - 1):
        w[1 + i] = -c * b_h * rho[i] / r[i]
        w[0] += c * b_h * rho[i] / r[i]
    w_t = 0.0
    if corrector:
        w_t = -c * b_h * rho[-1]
        w[0] -= w_t
    return coef_x, w, w_t


def uni_coefficients(cfg: dict, levels: Sequence[float], order: int, corrector: bool):
    """_uni_bh with IEEE inf / NaN where diffusers' float32 gives them (checked by the plan)."""
    with np.errstate(all="ignore"):
        coef_x, w, w_t = _uni_bh(cfg, levels, order, corrector)
    return float(coef_x), [float(v) for v in w], float(w_t)


def convert_coefficients(cfg: dict, level: float) -> tuple[float, float]:
    """(P, Q) with m = P·x + Q·out at noise level `level` (convert_model_output): x̂0 with
    predict_x0, else ε̂; the same conversions as DPM-Solver++ / DPM-Solver's."""
    algorithm = "dpmsolver++" if cfg["predict_x0"] else "dpmsolver"
    return _dpm.convert_coefficients({"algorithm_type": algorithm,
                                      "prediction_type": cfg["prediction_type"]}, level)


# ---------------------------------------------------------------------------- the plan
def unipc_plan(settings: dict, num_inference_steps: int) -> Plan:
    """The plan (solvers/table.py) of UniPCMultistepScheduler(**settings).set_timesteps(
    num_inference_steps) and the steps of its canonical loop; a ValueError (before any work)
    where diffusers fails or divides by zero (repeated noise levels)."""
    cfg = unipc_settings(settings)
    if not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got "
                         f"{num_inference_steps!r}")
    timesteps, sigmas32 = noise_levels(cfg, num_inference_steps)
    levels = [float(s) for s in sigmas32]
    if not all(math.isfinite(s) and s > 0 for s in levels[:-1]):
        raise ValueError(f"noise levels {levels} are not all positive and finite: "
                         "diffusers' steps give NaN")
    n = len(timesteps)
    orders = step_orders(cfg, n)
    rows = new_rows(n)
    for k, order in enumerate(orders):
        rows[k, P], rows[k, Q] = convert_coefficients(cfg, levels[k])
        if k > 0 and k - 1 not in cfg["disable_corrector"]:
            # UniC of step k − 1's order: from level k − 1 to level k again, now with m_k
            coef_x, w, w_t = uni_coefficients(cfg, [levels[k]] + levels[k - 1::-1][:orders[k - 1]],
                                              orders[k - 1], corrector=True)
            rows[k, KX], rows[k, KL], rows[k, K0] = 0.0, coef_x, w_t
            for col, wi in zip((K1, K2, K3), w):      # m_{k−1}, m_{k−2}, m_{k−3}
                rows[k, col] = wi
        coef_x, w, _ = uni_coefficients(cfg, [levels[k + 1]] + levels[k::-1][:order], order,
                                        corrector=False)
        rows[k, A] = coef_x
        for col, wi in zip((B0, B1, B2), w):          # m_k, m_{k−1}, m_{k−2}
            rows[k, col] = wi
        rows[k, T], rows[k, ORDER] = timesteps[k], order
        if not bool(torch.isfinite(rows[k]).all()):
            why = ""
            if cfg["use_karras_sigmas"] and cfg["final_sigmas_type"] == "sigma_min":
                why = (": karras levels end at σ_min, and final_sigmas_type='sigma_min' repeats "
                       "it (use 'zero', or lower_order_final)")
            raise ValueError(f"step {k} (t = {timesteps[k]}, order {order}) of "
                             f"{num_inference_steps} has non-finite coefficients: repeated "
                             f"noise levels ({levels[max(k - 3, 0):k + 2]}) make diffusers' "
                             f"UniPC update divide by zero (NaN){why}")
    if cfg["thresholding"]:
        rows[:, THRESH] = 1.0
    threshold = ((float(cfg["dynamic_thresholding_ratio"]), float(cfg["sample_max_value"]))
                 if cfg["thresholding"] else None)
    return make_plan(rows, timesteps, cfg["num_train_timesteps"], init_noise_sigma=1.0,
                     stochastic=False, threshold=threshold, sigmas=levels, orders=orders,
                     scheduler="UniPCMultistepScheduler", settings=cfg)
