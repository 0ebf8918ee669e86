"""Euler and Euler ancestral sampling (Karras et al. 2022, Algorithm 1 with S_churn = 0, and the
ancestral variant of their k-diffusion code) as diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler run them, as rows of the solvers' common table
(solvers/table.py).

Both step in the variance-exploding frame x = x_VP/α = x0 + σ·ε, σ = √((1−ᾱ)/ᾱ): the run starts
from randn · init_noise_sigma (diffusers' value: σ_max for "linspace" / "trailing" spacing,
√(σ_max² + 1) for "leading"), the U-Net sees x/√(σ² + 1) (the VP sample: C_IN, diffusers'
scale_model_input) and each step goes from σ to the next level σ':

    m  = x̂0 = P·x + Q·out                 (step's pred_original_sample; B1 = B2 = 0: no history)
         ε-prediction  x̂0 = x − σ·out                     P = 1,          Q = −σ
         v-prediction  x̂0 = x/(σ²+1) − σ/√(σ²+1)·out      P = 1/(σ²+1),   Q = −σ/√(σ²+1)
         sample        x̂0 = out                           P = 0,          Q = 1
    Euler:      x' = x + (σ' − σ)·(x − x̂0)/σ              A = σ'/σ,       B0 = 1 − σ'/σ
    ancestral:  σ_down = σ'²/σ, σ_up = σ'·√(1 − σ'²/σ²)   (σ_down² + σ_up² = σ'²)
                x' = x + (σ_down − σ)·(x − x̂0)/σ + σ_up·z  A = σ_down/σ,  B0 = 1 − σ_down/σ,
                                                           S = σ_up

The ancestral plan is stochastic: diffusers draws z after the model call at every step (also
the last, where σ_up = 0), with randn_tensor(model_output.shape, dtype=model_output.dtype,
device=model_output.device, generator): in the float32 reference run that is the sample's shape,
dtype and device, which is what table.reference_sample draws (a half-precision model output
would draw half-precision noise in diffusers: another stream).

EulerDiscreteScheduler.step also takes s_churn, s_tmin, s_tmax and s_noise (Karras' stochastic
churn). Pipelines, diffusers' canonical loop and ddpm_fast call step with their defaults
(s_churn = 0): then γ = 0, σ̂ = σ, and diffusers draws nothing (the generator passed to step is
left as it was), so an Euler plan is deterministic. They are step arguments, not settings: no
plan depends on them (a config key "s_churn" is refused as unknown, like any other).

diffusers' own DDPMPipeline neither scales x_T by init_noise_sigma nor calls
scale_model_input, so with these schedulers it does not run the canonical loop these plans
mirror (set_timesteps, x_T·init_noise_sigma, scale_model_input, step), which is what
StableDiffusion-style pipelines run.

Noise levels and timesteps repeat diffusers' float32 / numpy arithmetic of set_timesteps: the
spacing's float32 timesteps (fractional under "linspace"), σ interpolated at them (np.interp) or
"log_linear" (torch.linspace of log σ, float32), Karras' ρ = 7 levels between the spaced levels'
ends (or the config's sigma_min / sigma_max) with the fractional timesteps of _sigma_to_t
(shared with dpmsolver), the final level 0 or σ_min, then float32. timestep_type "continuous"
(with v_prediction, as diffusers) feeds the U-Net T = 0.25·log σ (float32). The coefficients are
formed in float64 from those float32 levels.

Settings: euler_settings / euler_ancestral_settings take a diffusers config and return every
setting (defaults filled in) or a ValueError naming the one not honoured; check_keys is the key
rule every family of this module and deis.py shares (private keys, `_use_default_values`, other
schedulers' keys a from_config swap brings along). tests/test_solvers_euler_deis.py compares
with diffusers' canonical loop step by step and on the final sample.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..schedule import DDPM_SCHEDULER_DEFAULTS
from .dpmsolver import (DPM_SCHEDULER_DEFAULTS, LEARNED_VARIANCES, _betas, _sigma_to_t,
                        _train_levels)
from .table import A, B0, C_IN, ORDER, P, Q, S, T, Plan, make_plan, new_rows
from .unipc import UNIPC_SCHEDULER_DEFAULTS

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
INTERPOLATION_TYPES = ("linear", "log_linear")
TIMESTEP_TYPES = ("discrete", "continuous")
KARRAS_RHO = 7.0

# Every argument of diffusers' EulerDiscreteScheduler (0.42) with its default.
EULER_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
    "interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
    "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0,
    "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
}
# Every argument of diffusers' EulerAncestralDiscreteScheduler (0.42) with its default.
EULER_ANCESTRAL_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
    "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
# Every argument of diffusers' DEISMultistepScheduler (0.42) with its default (deis.py uses it;
# here for the key rule, which needs every family's keys).
DEIS_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "solver_order": 2,
    "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0, "algorithm_type": "deis", "solver_type": "logrho",
    "lower_order_final": True, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
    "timestep_spacing": "linspace", "steps_offset": 0, "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}
# The keys a DDPM pipeline's scheduler config can bring into another scheduler's config by
# from_config swaps among the classes ddpm_fast runs: DDPMScheduler / DDIMScheduler (the
# pipeline's own) and the few-step families (DPM-Solver, UniPC, Euler, Euler ancestral, DEIS).
# diffusers drops every compatible class's key it does not take (ConfigMixin.extract_init_dict)
# and keeps it in the new config as a "hidden" key, so such a key carries no setting here
# either (two exceptions, refused by name: a learned variance_type, whose model the class
# cannot use, and Euler's / UniPC's sigma_min / sigma_max, which diffusers' DEIS reads).
SWAP_KEYS = frozenset(set(DDPM_SCHEDULER_DEFAULTS) | {"set_alpha_to_one"} |
                      set(DPM_SCHEDULER_DEFAULTS) | set(UNIPC_SCHEDULER_DEFAULTS) |
                      set(EULER_SCHEDULER_DEFAULTS) | set(EULER_ANCESTRAL_SCHEDULER_DEFAULTS) |
                      set(DEIS_SCHEDULER_DEFAULTS))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_keys(config: dict, defaults: dict, scheduler: str) -> dict:
    """The config's settings with `defaults` filled in, or a ValueError naming a key that is not
    a `scheduler` setting. Private keys ("_class_name", …) and the keys listed in
    "_use_default_values" carry no settings (diffusers then uses the defaults), nor do other
    schedulers' keys a from_config swap brings along (SWAP_KEYS: diffusers ignores them), except
    a learned variance_type: these classes use the whole model output as the prediction, and a
    learned-variance model's 2·C output channels make diffusers fail."""
    if not isinstance(config, dict):
        raise ValueError(f"scheduler config must be a dict, got {type(config).__name__}")
    used_defaults = config.get("_use_default_values", [])
    if "variance_type" not in defaults and "variance_type" not in used_defaults and \
            config.get("variance_type") in LEARNED_VARIANCES:
        raise ValueError(f"scheduler setting variance_type={config['variance_type']!r} is not "
                         f"supported: {scheduler} uses the whole model output as the "
                         "prediction (a learned-variance model's 2·C output channels make "
                         "diffusers fail)")
    given = {k: v for k, v in config.items() if not k.startswith("_") and
             k not in used_defaults and (k in defaults or k not in SWAP_KEYS)}
    unknown = sorted(k for k in given if k not in defaults)
    if unknown:
        raise ValueError(f"scheduler setting {unknown[0]!r} is not a {scheduler} setting and is "
                         "not honoured" +
                         (f" (also: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""))
    return {**defaults, **given}


def bad(cfg: dict, key: str, why: str):
    raise ValueError(f"scheduler setting {key}={cfg[key]!r} is not supported: {why}")


def one_of(cfg: dict, key: str, allowed):
    if cfg[key] not in allowed:
        bad(cfg, key, "supported: " + ", ".join(map(repr, allowed)))


def check_booleans(cfg: dict, keys):
    for key in keys:
        if not isinstance(cfg[key], bool):
            bad(cfg, key, "must be true or false")


def check_common(cfg: dict, prediction_types=PREDICTION_TYPES):
    """The settings every family here shares: prediction type (flow matching refused by name),
    spacing, integers, the beta schedule (formed as DDPMScheduler forms it: dpmsolver._betas)."""
    if cfg["prediction_type"] == "flow_prediction":
        bad(cfg, "prediction_type", "flow-matching models are not DDPM models; supported: " +
            ", ".join(map(repr, prediction_types)))
    one_of(cfg, "prediction_type", prediction_types)
    one_of(cfg, "timestep_spacing", SPACINGS)
    for key in ("num_train_timesteps", "steps_offset"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int):
            bad(cfg, key, "must be an integer")
    if cfg["num_train_timesteps"] < 2:
        bad(cfg, "num_train_timesteps", "must be at least 2")
    if cfg["trained_betas"] is None:
        one_of(cfg, "beta_schedule", BETA_SCHEDULES)
    _betas({"rescale_betas_zero_snr": False, **cfg})


def check_steps(num_inference_steps):
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or \
            num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got "
                         f"{num_inference_steps!r}")


# ---------------------------------------------------------------------------- settings
# Settings that must keep their default, and why.
_REFUSED = {
    "use_exponential_sigmas": "exponential sigmas are not implemented by ddpm_fast",
    "use_beta_sigmas": "beta sigmas are not implemented by ddpm_fast",
}


def euler_settings(config: dict) -> dict:
    """Every EulerDiscreteScheduler setting of a diffusers config (defaults filled in), or a
    ValueError naming the first setting and value that is not honoured exactly (check_keys for
    the keys that carry none). prediction_type "original_sample" is "sample" (diffusers' step
    takes both names)."""
    cfg = check_keys(config, EULER_SCHEDULER_DEFAULTS, "EulerDiscreteScheduler")
    for key, why in _REFUSED.items():
        if cfg[key] != EULER_SCHEDULER_DEFAULTS[key]:
            bad(cfg, key, why)
    check_booleans(cfg, ("use_karras_sigmas", "rescale_betas_zero_snr"))
    check_common(cfg, PREDICTION_TYPES + ("original_sample",))
    one_of(cfg, "interpolation_type", INTERPOLATION_TYPES)
    one_of(cfg, "timestep_type", TIMESTEP_TYPES)
    one_of(cfg, "final_sigmas_type", FINAL_SIGMAS_TYPES)
    for key in ("sigma_min", "sigma_max"):
        if cfg[key] is None:
            continue
        if not cfg["use_karras_sigmas"]:
            bad(cfg, key, "diffusers uses it for Karras sigmas only (use_karras_sigmas=True) "
                          "and ignores it otherwise")
        if not _is_number(cfg[key]) or not math.isfinite(cfg[key]) or not cfg[key] > 0:
            bad(cfg, key, "must be a positive number (a zero or negative level makes "
                          "diffusers' step divide by zero or take a NaN power)")
    if cfg["sigma_min"] is not None and cfg["sigma_max"] is not None and \
            not cfg["sigma_max"] > cfg["sigma_min"]:
        bad(cfg, "sigma_max", f"must exceed sigma_min={cfg['sigma_min']!r} (the noise levels "
                              "would not decrease)")
    if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] != "v_prediction":
        bad(cfg, "timestep_type", "diffusers feeds continuous timesteps (0.25·log σ) with "
                                  "prediction_type='v_prediction' only and ignores it otherwise")
    if cfg["interpolation_type"] == "log_linear" and not cfg["use_karras_sigmas"] and \
            cfg["timestep_type"] == "discrete" and cfg["final_sigmas_type"] != "zero":
        bad(cfg, "final_sigmas_type", "with interpolation_type='log_linear' diffusers' run ends "
                                      "at σ_min and never reaches the final sigma (it is "
                                      "ignored)")
    return cfg


def euler_ancestral_settings(config: dict) -> dict:
    """Every EulerAncestralDiscreteScheduler setting of a diffusers config (defaults filled in),
    or a ValueError naming the first setting and value that is not honoured exactly
    (check_keys for the keys that carry none)."""
    cfg = check_keys(config, EULER_ANCESTRAL_SCHEDULER_DEFAULTS,
                     "EulerAncestralDiscreteScheduler")
    check_booleans(cfg, ("rescale_betas_zero_snr",))
    if cfg["prediction_type"] == "sample":
        bad(cfg, "prediction_type", "diffusers' EulerAncestralDiscreteScheduler.step raises "
                                    "NotImplementedError for it; supported: 'epsilon', "
                                    "'v_prediction'")
    check_common(cfg, ("epsilon", "v_prediction"))
    return cfg


# ---------------------------------------------------------------------------- noise levels
def karras_sigmas(s_min: float, s_max: float, n: int) -> np.ndarray:
    """Karras et al. 2022, eq. (5), ρ = 7: n levels from s_max to s_min, uniform in σ^(1/ρ)
    (float64; diffusers' _convert_to_karras)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = s_min ** (1 / KARRAS_RHO), s_max ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def euler_spacing(cfg: dict, n: int) -> np.ndarray:
    """The float32 timesteps of the Euler schedulers' timestep_spacing (Lin et al. 2023,
    Table 2): "linspace" keeps fractional ones, "leading" adds steps_offset."""
    n_train = cfg["num_train_timesteps"]
    if cfg["timestep_spacing"] == "linspace":
        return np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
    if cfg["timestep_spacing"] == "leading":
        ratio = n_train // n
        t = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        return t + np.float32(cfg["steps_offset"])
    return np.arange(n_train, 0, -n_train / n).round().astype(np.float32) - np.float32(1)


def euler_levels(cfg: dict, n: int) -> tuple[list[float], np.ndarray]:
    """(timesteps, σ levels) of set_timesteps(n): the float32 timesteps the U-Net sees (step k
    runs from σ_k to σ_{k+1}) and the float32 levels. Mirrors EulerDiscreteScheduler
    .set_timesteps (EulerAncestralDiscreteScheduler's is its linear, non-Karras, final-zero,
    discrete case). With "log_linear" (and neither Karras nor continuous timesteps) there are
    n + 2 levels for n timesteps: the run ends at σ_min, as diffusers'."""
    _, train_sigmas, _ = _train_levels({"rescale_betas_zero_snr": False, **cfg})
    log_sigmas = np.log(train_sigmas)                    # float32, as diffusers' numpy log
    timesteps = euler_spacing(cfg, n)
    if cfg.get("interpolation_type", "linear") == "linear":
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    else:   # log_linear: n + 1 levels uniform in log σ, in float32 torch ops (as diffusers)
        sigmas = torch.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]),
                                n + 1).exp().numpy()
    if cfg.get("use_karras_sigmas", False):
        # between the spaced levels' ends unless the config gives them
        s_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else sigmas[-1].item()
        s_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else sigmas[0].item()
        sigmas = karras_sigmas(s_min, s_max, n)
        timesteps = _sigma_to_t(sigmas, log_sigmas)     # fractional, not rounded
    last = float(train_sigmas[0]) if cfg.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    if cfg.get("timestep_type", "discrete") == "continuous" and \
            cfg["prediction_type"] == "v_prediction":
        # 0.25·log σ of every level but the last, each a float32 scalar op as diffusers forms it
        return [float(0.25 * s.log()) for s in torch.from_numpy(sigmas[:-1])], sigmas
    return [float(t) for t in np.asarray(timesteps).astype(np.float32)], sigmas


def init_noise_sigma(cfg: dict, sigmas: np.ndarray) -> float:
    """diffusers' init_noise_sigma (float32 torch ops): the largest level for "linspace" and
    "trailing" spacing, √(σ_max² + 1) for "leading"."""
    top = torch.from_numpy(sigmas).max()
    if cfg["timestep_spacing"] in ("linspace", "trailing"):
        return float(top)
    return float((top ** 2 + 1) ** 0.5)


def _check_run(cfg: dict, n: int, timesteps: list, sigmas: np.ndarray):
    """The runs diffusers cannot make: a repeated first timestep (its index_for_timestep then
    starts at the second occurrence, skipping levels and running past the last: IndexError),
    discrete timesteps outside the training range, non-positive or non-finite levels to step
    from (the step divides by σ: NaN)."""
    if timesteps.count(timesteps[0]) > 1:
        raise ValueError(f"the first timestep {timesteps[0]} repeats in {timesteps} ({n} steps): "
                         "diffusers then starts at its second occurrence and runs past its "
                         "last noise level (IndexError)")
    n_train = cfg["num_train_timesteps"]
    continuous = cfg.get("timestep_type", "discrete") == "continuous"
    if not continuous and any(not 0 <= t <= n_train - 1 for t in timesteps):
        raise ValueError(f"timesteps {timesteps} leave [0, {n_train - 1}] (steps_offset="
                         f"{cfg['steps_offset']!r}, timestep_spacing="
                         f"{cfg['timestep_spacing']!r}): diffusers clamps σ there but feeds "
                         "the U-Net the timestep outside its training range")
    start = [float(s) for s in sigmas[:len(timesteps)]]
    if not all(math.isfinite(s) and s > 0 for s in start):
        raise ValueError(f"noise levels {start} are not all positive and finite: diffusers' "
                         "steps divide by them (NaN)")


def x0_coefficients(prediction_type: str, sigma: float) -> tuple[float, float]:
    """(P, Q) with x̂0 = P·x + Q·out in the VE frame x = x0 + σ·ε (x = x_VP·√(σ²+1)); mirrors
    the pred_original_sample of EulerDiscreteScheduler.step (and the ancestral one's):
      ε:  x_VP = α·x0 + σα·ε with α = 1/√(σ²+1)  →  x̂0 = x − σ·ε
      v = α·ε − σα·x0  →  x̂0 = α·x_VP − σα·v = x/(σ²+1) − σ/√(σ²+1)·v
      sample: x̂0 = out."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
    return 0.0, 1.0                                      # "sample" / "original_sample"


def _rows(cfg: dict, timesteps: list, sigmas: np.ndarray, ancestral: bool):
    levels = [float(s) for s in sigmas]
    rows = new_rows(len(timesteps))
    for k, t in enumerate(timesteps):
        s, s_next = levels[k], levels[k + 1]
        rows[k, C_IN] = 1.0 / math.sqrt(s * s + 1.0)     # scale_model_input
        rows[k, P], rows[k, Q] = x0_coefficients(cfg["prediction_type"], s)
        if ancestral:
            # ancestral step (k-diffusion's get_ancestral_step, η = 1): σ_down² + σ_up² = σ'²,
            # σ_up² = σ'²(σ² − σ'²)/σ²
            target = s_next * s_next / s                                   # σ_down
            rows[k, S] = s_next * math.sqrt((s - s_next) * (s + s_next)) / s   # σ_up
        else:
            target = s_next
        # x' = x + (target − σ)·(x − x̂0)/σ = (target/σ)·x + (1 − target/σ)·x̂0
        rows[k, A] = target / s
        rows[k, B0] = 1.0 - target / s
        rows[k, T], rows[k, ORDER] = t, 1
    return rows, levels


def euler_plan(settings: dict, num_inference_steps: int) -> Plan:
    """The plan (solvers/table.py) of EulerDiscreteScheduler(**settings).set_timesteps(
    num_inference_steps) and the steps of its canonical loop (step with its default s_churn = 0:
    deterministic); a ValueError (before any work) where diffusers fails or divides by zero."""
    cfg = euler_settings(settings)
    check_steps(num_inference_steps)
    timesteps, sigmas = euler_levels(cfg, num_inference_steps)
    _check_run(cfg, num_inference_steps, timesteps, sigmas)
    rows, levels = _rows(cfg, timesteps, sigmas, ancestral=False)
    return make_plan(rows, timesteps, cfg["num_train_timesteps"],
                     init_noise_sigma=init_noise_sigma(cfg, sigmas), stochastic=False,
                     sigmas=levels, orders=[1] * len(timesteps),
                     scheduler="EulerDiscreteScheduler", settings=cfg)


def euler_ancestral_plan(settings: dict, num_inference_steps: int) -> Plan:
    """The plan of EulerAncestralDiscreteScheduler(**settings).set_timesteps(num_inference_steps)
    and the steps of its canonical loop: one z per step, drawn after the model call."""
    cfg = euler_ancestral_settings(settings)
    check_steps(num_inference_steps)
    timesteps, sigmas = euler_levels(cfg, num_inference_steps)
    _check_run(cfg, num_inference_steps, timesteps, sigmas)
    rising = [k for k in range(len(timesteps)) if not sigmas[k + 1] <= sigmas[k]]
    if rising:
        k = rising[0]
        raise ValueError(f"the noise level rises at step {k} of {num_inference_steps} "
                         f"(σ {float(sigmas[k])} → {float(sigmas[k + 1])}, t = {timesteps[k]}): "
                         "diffusers' ancestral σ_up is then the square root of a negative "
                         "number (NaN)" + (" (with rescale_betas_zero_snr, ᾱ of the last "
                                           "training timesteps is below the 2⁻²⁴ diffusers "
                                           "gives the final one)"
                                           if cfg["rescale_betas_zero_snr"] else ""))
    rows, levels = _rows(cfg, timesteps, sigmas, ancestral=True)
    return make_plan(rows, timesteps, cfg["num_train_timesteps"],
                     init_noise_sigma=init_noise_sigma(cfg, sigmas), stochastic=True,
                     sigmas=levels, orders=[1] * len(timesteps),
                     scheduler="EulerAncestralDiscreteScheduler", settings=cfg)
