"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"),
multistep ρAB-DEIS in log ρ, as diffusers' DEISMultistepScheduler runs it, as rows of the
solvers' common table (solvers/table.py).

With ρ = σ_t/α_t (the noise level σ/α of dpmsolver.py) the probability-flow ODE of a VP model is
d(x/α)/dρ = ε̂ (its noise prediction). DEIS integrates it exactly over [ρ_k, ρ_{k+1}] with ε̂
replaced by the polynomial in log ρ through the last `order` predictions (Adams–Bashforth in
log ρ), so a step is

    m  = ε̂_k = P·x + Q·out                        (convert_model_output: noise prediction)
    x' = (α'/α_k)·x + α'·Σ_j c_j·m_{k−j}           A = α'/α_k, B_j = α'·c_j  (no corrector)
    c_j = ∫_{ρ_k}^{ρ'} ℓ_j(log ρ) dρ                ℓ_j: the Lagrange basis polynomial in log ρ
                                                   through log ρ_k, …, log ρ_{k−order+1}

(order 1: c_0 = ρ' − ρ_k, DDIM; diffusers' ind_fn are these integrals' antiderivatives, formed
in float32; here in float64, exactly, by ∫ L^p e^L dL = e^L Σ_i (−1)^i p!/(p−i)! L^{p−i}). ε̂
from the model's output at α = 1/√(1+ρ²), σ = ρα:
    ε-prediction: ε̂ = out;  v-prediction: ε̂ = σ·x + α·out;  sample: ε̂ = (x − α·out)/σ.
C_IN = 1, init_noise_sigma = 1, ORDER the step's order: warm-up (order k needs k − 1 earlier
outputs) and, with lower_order_final below 15 steps, first order at the last step and at most
second order one step before (dpmsolver.step_orders: diffusers' rule is the same).

Noise levels and timesteps repeat diffusers' float32 / numpy arithmetic of set_timesteps
(dpmsolver's spacing helpers: DEIS spaces as DPM-Solver does without lambda_min_clipped): the
levels σ/α of the integer timesteps, then σ_min (the first training level); with Karras sigmas
(ρ = 7 between the training ends, timesteps rounded from _sigma_to_t) the last Karras level
repeats, so diffusers' last step stays at σ_min (its coefficients are 0: x' = x) and so does
this plan's.

Refused (deis_settings): exponential / beta / flow sigmas, dynamic shifting, flow prediction,
and thresholding: diffusers thresholds x̂0 and then works in ε̂ = (x − α·x̂0)/σ, and the table
thresholds m itself (m = threshold(P·x + Q·out)), so a thresholded ε̂ needs a second affine map
after the threshold (m = R·x + U·threshold(P·x + Q·out)), which the row layout lacks.
"""
from __future__ import annotations

import math

import numpy as np

from .dpmsolver import (_sigma_to_t, _spaced_timesteps, _train_levels, convert_coefficients,
                        step_orders)
from .euler import (DEIS_SCHEDULER_DEFAULTS, bad, check_booleans, check_common, check_keys,
                    check_steps, karras_sigmas)
from .table import A, B0, B1, B2, ORDER, P, Q, T, Plan, make_plan, new_rows


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers maps these values (of DPM-Solver / UniPC configs) onto its own, in __init__
_ALGORITHM_ALIASES = {"dpmsolver": "deis", "dpmsolver++": "deis"}
_SOLVER_ALIASES = {"midpoint": "logrho", "heun": "logrho", "bh1": "logrho", "bh2": "logrho"}
# Settings that must keep their default, and why.
_REFUSED = {
    "use_exponential_sigmas": "exponential sigmas are not implemented by ddpm_fast",
    "use_beta_sigmas": "beta sigmas are not implemented by ddpm_fast",
    "use_flow_sigmas": "flow-matching sigmas are not implemented by ddpm_fast (DDPM models "
                       "are variance preserving)",
    "flow_shift": "it shifts flow-matching sigmas only, which ddpm_fast does not implement",
    "use_dynamic_shifting": "dynamic shifting is for flow-matching models",
    "thresholding": "diffusers thresholds x̂0 and then steps with ε̂ = (x − α·x̂0)/σ; the "
                    "solvers' table thresholds the converted output itself and has no affine "
                    "map after the threshold to form that ε̂ (not implemented)",
}


def deis_settings(config: dict) -> dict:
    """Every DEISMultistepScheduler setting of a diffusers config (defaults filled in), or a
    ValueError naming the first setting and value that is not honoured exactly (euler.check_keys
    for the keys that carry none). diffusers' aliases are applied as its __init__ applies them:
    algorithm_type "dpmsolver" / "dpmsolver++" → "deis", solver_type "midpoint" / "heun" /
    "bh1" / "bh2" → "logrho".

    EulerDiscreteScheduler's sigma_min / sigma_max, which a from_config swap keeps in the
    config, are read by diffusers' DEIS Karras sigmas (its _convert_to_karras looks them up on
    the config): with use_karras_sigmas they are refused by name, otherwise ignored as there."""
    cfg = check_keys(config, DEIS_SCHEDULER_DEFAULTS, "DEISMultistepScheduler")
    for key, why in _REFUSED.items():
        if cfg[key] != DEIS_SCHEDULER_DEFAULTS[key]:
            bad(cfg, key, why)
    if cfg["time_shift_type"] != "exponential":
        bad(cfg, "time_shift_type", "diffusers only defines 'exponential' (used with dynamic "
                                    "shifting only)")
    check_booleans(cfg, ("lower_order_final", "use_karras_sigmas"))
    if isinstance(cfg["solver_order"], bool) or cfg["solver_order"] not in (1, 2, 3):
        bad(cfg, "solver_order", "supported: 1, 2, 3 (diffusers runs higher orders as 3)")
    check_common(cfg, PREDICTION_TYPES)
    algorithm = cfg["algorithm_type"]
    if algorithm not in ("deis",) + tuple(_ALGORITHM_ALIASES):
        bad(cfg, "algorithm_type", "diffusers' DEISMultistepScheduler raises "
                                   "NotImplementedError for it; supported: 'deis' (and "
                                   "'dpmsolver', 'dpmsolver++', which diffusers maps to it)")
    cfg["algorithm_type"] = _ALGORITHM_ALIASES.get(algorithm, algorithm)
    if cfg["solver_type"] not in ("logrho",) + tuple(_SOLVER_ALIASES):
        bad(cfg, "solver_type", "diffusers' DEISMultistepScheduler raises NotImplementedError "
                                "for it; supported: 'logrho' (and 'midpoint', 'heun', 'bh1', "
                                "'bh2', which diffusers maps to it)")
    cfg["solver_type"] = _SOLVER_ALIASES.get(cfg["solver_type"], cfg["solver_type"])
    if cfg["use_karras_sigmas"]:
        for key in ("sigma_min", "sigma_max"):
            if config.get(key) is not None and key not in config.get("_use_default_values", []):
                raise ValueError(f"scheduler setting {key}={config[key]!r} is not supported: an "
                                 "EulerDiscreteScheduler setting that diffusers' "
                                 "DEISMultistepScheduler reads for its Karras sigmas when a "
                                 "from_config swap keeps it; ddpm_fast's DEIS does not (drop it)")
    return cfg


# ---------------------------------------------------------------------------- noise levels
def deis_levels(cfg: dict, n: int) -> tuple[list[int], np.ndarray]:
    """(timesteps, σ/α levels) of set_timesteps(n): the integer timesteps the U-Net sees and the
    n + 1 float32 levels the steps run between. Mirrors DEISMultistepScheduler.set_timesteps
    (with _convert_to_karras and _sigma_to_t)."""
    beta_cfg = {**cfg, "rescale_betas_zero_snr": False, "lambda_min_clipped": -math.inf}
    _, train_sigmas, lam = _train_levels(beta_cfg)
    log_sigmas = np.log(train_sigmas)                    # float32, as diffusers' numpy log
    timesteps = _spaced_timesteps(beta_cfg, n, lam)
    if cfg["use_karras_sigmas"]:
        sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), n)
        timesteps = _sigma_to_t(sigmas, log_sigmas).round()
        sigmas = np.concatenate([sigmas, sigmas[-1:]]).astype(np.float32)
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        sigmas = np.concatenate([sigmas, [train_sigmas[0]]]).astype(np.float32)
    return [int(t) for t in timesteps], sigmas           # int64 cast: truncation


def _lagrange_integrals(nodes: list, rho_from: float, rho_to: float) -> list:
    """∫_{rho_from}^{rho_to} ℓ_j(log ρ) dρ for the Lagrange basis ℓ_j through log(nodes), in
    float64: ℓ_j(L) = Σ_p a_p L^p, ρ = e^L, ∫ L^p e^L dL = e^L Σ_i (−1)^i p!/(p−i)! L^{p−i}."""
    logs = [math.log(r) for r in nodes]

    def antiderivative(coefs, rho):
        L = math.log(rho)
        total = 0.0
        for p, a in enumerate(coefs):
            total += a * sum((-1) ** i * math.factorial(p) / math.factorial(p - i) * L ** (p - i)
                             for i in range(p + 1))
        return rho * total

    out = []
    for j, lj in enumerate(logs):
        poly = np.polynomial.Polynomial([1.0])
        for i, li in enumerate(logs):
            if i != j:
                poly = poly * np.polynomial.Polynomial([-li, 1.0]) / (lj - li)
        out.append(antiderivative(poly.coef, rho_to) - antiderivative(poly.coef, rho_from))
    return out


def deis_coefficients(order: int, levels: list) -> tuple[float, list]:
    """(A, [B0, B1, B2]) of one step x' = A·x + Σ_j B_j·m_{k−j} from level levels[1] (σ/α of
    this step) to levels[0] (the next), levels[2:] the earlier steps' levels (newest first).
    Mirrors deis_first_order_update and multistep_deis_second/third_order_update: A = α'/α_k,
    B_j = α'·∫ ℓ_j(log ρ) dρ over the step (module docstring)."""
    rho_to, rho_from = levels[0], levels[1]
    alpha_to = 1.0 / math.sqrt(1.0 + rho_to * rho_to)
    alpha_from = 1.0 / math.sqrt(1.0 + rho_from * rho_from)
    c = _lagrange_integrals(levels[1:1 + order], rho_from, rho_to)
    b = [alpha_to * cj for cj in c] + [0.0] * (3 - order)
    return alpha_to / alpha_from, b


# ---------------------------------------------------------------------------- the plan
def deis_plan(settings: dict, num_inference_steps: int) -> Plan:
    """The plan (solvers/table.py) of DEISMultistepScheduler(**settings).set_timesteps(
    num_inference_steps) and the steps of its canonical loop; a ValueError (before any work)
    where diffusers fails or divides by zero (repeated noise levels)."""
    cfg = deis_settings(settings)
    check_steps(num_inference_steps)
    n = num_inference_steps
    timesteps, sigmas32 = deis_levels(cfg, n)
    n_train = cfg["num_train_timesteps"]
    if any(not 0 <= t < n_train for t in timesteps):
        raise ValueError(f"timesteps {timesteps} leave [0, {n_train}) (steps_offset="
                         f"{cfg['steps_offset']!r}, timestep_spacing="
                         f"{cfg['timestep_spacing']!r}): diffusers clamps σ there but feeds "
                         "the U-Net the timestep outside its training range")
    if timesteps.count(timesteps[0]) > 1:
        raise ValueError(f"the first timestep {timesteps[0]} repeats in {timesteps} "
                         f"({n} steps): diffusers then starts at its second occurrence and "
                         "runs past its last noise level (IndexError)")
    levels = [float(s) for s in sigmas32]
    if not all(math.isfinite(s) and s > 0 for s in levels):
        raise ValueError(f"noise levels {levels} are not all positive and finite: "
                         "diffusers' steps give NaN")
    steps = len(timesteps)
    orders = step_orders({"solver_order": cfg["solver_order"], "euler_at_final": False,
                          "lower_order_final": cfg["lower_order_final"],
                          "final_sigmas_type": "sigma_min"}, steps)
    rows = new_rows(steps)
    nc = {"algorithm_type": "dpmsolver", "prediction_type": cfg["prediction_type"]}
    for k, order in enumerate(orders):
        nodes = levels[k::-1][:order]                    # this step's level, then earlier ones
        if len(set(nodes)) < order:
            raise ValueError(f"step {k} (t = {timesteps[k]}, order {order}) of {n} extrapolates "
                             f"through repeated noise levels {nodes}: diffusers' multistep "
                             "update divides by log ρ − log ρ = 0 (NaN)")
        rows[k, P], rows[k, Q] = convert_coefficients(nc, levels[k])     # ε̂
        rows[k, A], (rows[k, B0], rows[k, B1], rows[k, B2]) = deis_coefficients(
            order, [levels[k + 1]] + nodes)
        rows[k, T], rows[k, ORDER] = timesteps[k], order
    return make_plan(rows, timesteps, n_train, init_noise_sigma=1.0, stochastic=False,
                     sigmas=levels, orders=orders, scheduler="DEISMultistepScheduler",
                     settings=cfg)
