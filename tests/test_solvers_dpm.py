"""ddpm_fast.solvers.dpmsolver against diffusers' DPMSolverMultistepScheduler.

Each case runs diffusers' canonical loop and reference_sample from the same seed:
    x = randn(shape, generator=g) · init_noise_sigma; set_timesteps(n)
    for t in timesteps: out = model(scale_model_input(x, t), t); x = step(out, t, x, generator=g)
and asserts: the same timesteps; the same generator state afterwards; every step, taken by
solver_step from diffusers' own state (x, model output, noise), within STEP_RTOL of diffusers'
step relative to the size of its terms; the final x within ATOL = 1e-5 (a few ill-conditioned
families, named at tol_for, within a tolerance justified by test_ill_conditioned_families…).
The model is a fixed random nonlinear denoiser of (x, t) for most of the grid (cheap), a tiny
random UNet2DModel inside the same preconditioning for two cases.
"""
import math
import types
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from conftest import redraw_step_noise  # noqa: E402
from ddpm_fast.solvers import dpmsolver as dpm  # noqa: E402
from ddpm_fast.solvers import dpm_plan, dpm_settings, reference_sample  # noqa: E402
from ddpm_fast.solvers import table as tab  # noqa: E402
from ddpm_fast.solvers.table import initial_state, solver_step  # noqa: E402

# diffusers 0.42's set_timesteps calls np.array on a tensor (NumPy 2's copy= deprecation)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ATOL = 1e-5                         # on the final sample (float32 steps, float64 coefficients)
SHAPE = (2, 3, 8, 8)                # two images: thresholding's quantile is per image


@pytest.fixture(autouse=True, scope="module")
def one_thread(single_torch_thread):
    yield
    # the worst case of each family, for the record (shown with pytest -s)
    for family, (err, step) in sorted(RESULTS.items()):
        print(f"{family:42s} run max |Δ| {err:.2g}   worst step {step:.2g}")


class Denoiser(torch.nn.Module):
    """A fixed random nonlinear denoiser of (x, t) shaped like a trained one, so that every
    sample stays of order 1 and a run is as well conditioned as a real model's (an absolute
    tolerance then means what it says). Its data prediction is EDM-preconditioned (Karras et
    al. 2022) at the config's noise level l = σ_t/α_t, with x_l = x/α_t and σ_d = 0.5:
        x̂0 = c_skip·x_l + c_out·F(c_in·x_l, t),  c_skip = σ_d²/(l²+σ_d²),
        c_out = l·σ_d/√(l²+σ_d²),  c_in = 1/√(l²+σ_d²),
    F = 3·tanh(W·x + b·sin(f·t)) (x̂0 beyond ±1, so thresholding acts), or a given network's
    output; given back in the config's parameterisation (ε, v or x0) with its ᾱ_t.
    out_channels = 2·C appends a fake variance, as a learned-variance U-Net does."""

    def __init__(self, config=None, channels=3, out_channels=None, net=None):
        super().__init__()
        config = config or {}
        g = torch.Generator().manual_seed(1234)
        self.w = torch.randn(channels, channels, generator=g) * 0.6
        self.b = torch.randn(channels, 1, 1, generator=g)
        self.f = torch.rand(channels, 1, 1, generator=g) * 6
        self.net = net
        self.extra = (out_channels or channels) - channels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            abar = DPMSolverMultistepScheduler.from_config(config).alphas_cumprod.double()
        self.a, self.s = abar.sqrt(), (1 - abar).sqrt()
        self.kind = config.get("prediction_type", "epsilon")

    def forward(self, x, t):
        dt = x.dtype                            # float64 for a yardstick run
        a, s = self.a[t].to(dt), self.s[t].to(dt)
        level, sd = s / a, 0.5
        x_in = x / a / (level ** 2 + sd ** 2) ** 0.5           # c_in·x_l
        if self.net is not None:
            f = self.net(x_in, t).sample
        else:
            f = 3 * torch.tanh(torch.einsum("oc,bchw->bohw", self.w.to(dt), x_in) +
                               self.b.to(dt) * torch.sin(self.f.to(dt) * t / 1000 + 1))
        norm2 = level ** 2 + sd ** 2
        x0 = sd ** 2 / norm2 * x / a + level * sd / norm2 ** 0.5 * f
        out = {"sample": x0, "epsilon": (x - a * x0) / s, "v_prediction": (a * x - x0) / s}
        out = out[self.kind]
        out = torch.cat([out, out[:, :self.extra] * 0.1], 1) if self.extra else out
        # diffusers' U-Nets give an object with .sample
        return types.SimpleNamespace(sample=out) if self.net is not None else out


def diffusers_loop(config, n, model, shape=SHAPE, seed=0, plan=None):
    """diffusers' canonical loop → (x, generator state, timesteps, worst step error). With a
    plan, each step is also taken by solver_step from diffusers' own x, model output and noise
    (teacher forcing: no error carried between steps), and the worst |Δ| of a step relative to
    the size of its terms (Σ|coefficient·operand|) is returned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # dpmsolver / sde-dpmsolver are deprecated there
        scheduler = DPMSolverMultistepScheduler.from_config(config)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    scheduler.set_timesteps(n)
    worst, state = 0.0, initial_state(torch.zeros(shape))
    for k, t in enumerate(scheduler.timesteps):
        out = model(scheduler.scale_model_input(x, t), t)
        out = out if isinstance(out, torch.Tensor) else out.sample
        before = g.get_state()
        x_next = scheduler.step(out, t, x, generator=g).prev_sample
        if plan is not None:
            z = redraw_step_noise(g, before, shape, plan.stochastic)
            row = plan.table[k]
            m1, m2 = state[1], state[2]
            ours = solver_step(plan, row, x, out, state, z)
            m = state[1]
            terms = [row[tab.A] * x, row[tab.B0] * m, row[tab.B1] * m1, row[tab.B2] * m2]
            size = sum(v.double().abs() for v in terms + ([row[tab.S] * z] if z is not None
                                                          else [])).max().item()
            worst = max(worst, (ours - x_next).abs().max().item() / max(size, 1.0))
        x = x_next
    return x, g.get_state(), scheduler.timesteps.tolist(), worst


STEP_RTOL = 1e-5        # one step from diffusers' own state, relative to its terms' size
RESULTS = {}            # family → (worst |Δ| of a run, worst step error)


def check(config, n, family, model=None, shape=SHAPE, seed=0):
    """Our run against diffusers' canonical loop: the same timesteps, generator state after,
    every step within STEP_RTOL from diffusers' own state, the final x within `tol`."""
    model = model or Denoiser(config)
    plan = dpm_plan(config, n)
    want, want_state, want_ts, worst_step = diffusers_loop(config, n, model, shape, seed, plan)
    g = torch.Generator().manual_seed(seed)
    got = reference_sample(model, plan, shape, g)
    assert plan.timesteps == want_ts
    assert torch.equal(g.get_state(), want_state)
    assert torch.isfinite(want).all()
    assert worst_step <= STEP_RTOL, f"{config} n={n}: a step is off by {worst_step:.3g}"
    err = (got - want).abs().max().item()
    tol = tol_for(config, n)
    if tol is None:
        tol = SDE_DPMSOLVER_RTOL * max(1.0, want.abs().max().item())
    assert err <= tol, f"{config} n={n}: max |Δ| = {err:.3g} (tolerance {tol:.3g})"
    e0, w0 = RESULTS.get(family, (0.0, 0.0))
    RESULTS[family] = (max(e0, err), max(w0, worst_step))
    return err


def zero_ok(algorithm):
    # the noise-prediction solvers need final_sigmas_type="sigma_min" (diffusers raises)
    return {} if algorithm in dpm.DATA_PREDICTION else {"final_sigmas_type": "sigma_min"}


# ---------------------------------------------------------------- the grid
# Families whose final sample is ill-conditioned in float32, so that diffusers' own float32 run
# is ~ATOL or more from exact arithmetic (and ours as close: test_ill_conditioned_families…):
# sde-dpmsolver's noise grows |x| (×2–3 a step at ~10 steps: relative tolerance), the
# noise-prediction ODE solver with karras sigmas multiplies x by α_t/α_s ≈ 2 a step, and a
# third-order last step onto sigma_min weighs the history by up to ±8. Every step of these
# still matches diffusers' within STEP_RTOL.
SDE_DPMSOLVER_RTOL = 1e-4               # × max(1, max |x|); measured ≤ 2e-5
ILL_ATOL = 2e-4                         # measured ≤ 4e-5


def tol_for(config, n):
    if config.get("algorithm_type") == "sde-dpmsolver":
        return None
    if config.get("algorithm_type") == "dpmsolver" and config.get("use_karras_sigmas"):
        return ILL_ATOL
    if config.get("final_sigmas_type") == "sigma_min" and \
            not config.get("lower_order_final", True) and config.get("solver_order", 2) == 3:
        return ILL_ATOL
    return ATOL


CORE = [(order, alg, st) for order in (1, 2, 3) for alg in dpm.ALGORITHM_TYPES
        for st in dpm.SOLVER_TYPES if not (alg == "sde-dpmsolver" and order == 3)]


@pytest.mark.parametrize("order, algorithm, solver_type", CORE)
def test_orders_algorithms_solver_types(order, algorithm, solver_type):
    config = dict(solver_order=order, algorithm_type=algorithm, solver_type=solver_type,
                  **zero_ok(algorithm))
    for n in (7, 10, 13, 25):                  # < 15 (lower-order final steps) and ≥ 15
        check(config, n, f"order {order} {algorithm}", seed=n)


@pytest.mark.parametrize("algorithm", dpm.ALGORITHM_TYPES)
@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_lu_lambdas"])
def test_karras_and_lu_sigmas(algorithm, sigmas):
    order = 2 if algorithm == "sde-dpmsolver" else 3
    # ≥ 15 steps with sigma_min (the noise-prediction solvers) repeat σ_min: refused (below)
    long_run = 16 if algorithm in dpm.DATA_PREDICTION else 12
    for n, st in ((10, "midpoint"), (long_run, "heun")):
        check({sigmas: True, "solver_order": order, "algorithm_type": algorithm,
               "solver_type": st, **zero_ok(algorithm)}, n, f"{sigmas} {algorithm}")


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_final_sigmas_and_lower_order_final(algorithm, final, lower_order_final):
    config = dict(algorithm_type=algorithm, final_sigmas_type=final, solver_order=3,
                  lower_order_final=lower_order_final)
    for n in (4, 7, 11):
        check(config, n, f"final {final} lower_order_final={lower_order_final}")


@pytest.mark.parametrize("algorithm", dpm.ALGORITHM_TYPES)
def test_euler_at_final(algorithm):
    check({"algorithm_type": algorithm, "euler_at_final": True, "final_sigmas_type": "sigma_min",
           "solver_order": 2}, 17, "euler_at_final")


@pytest.mark.parametrize("algorithm", dpm.ALGORITHM_TYPES)
@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_prediction_types(algorithm, prediction):
    order = 2 if algorithm == "sde-dpmsolver" else 3
    check({"algorithm_type": algorithm, "prediction_type": prediction, "solver_order": order,
           **zero_ok(algorithm)}, 9, f"{prediction} {algorithm}")


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_thresholding(algorithm, prediction):
    config = dict(algorithm_type=algorithm, thresholding=True, solver_order=3,
                  dynamic_thresholding_ratio=0.9, sample_max_value=1.7,
                  prediction_type=prediction)
    plan = dpm_plan(config, 8)
    assert plan.threshold == (0.9, 1.7) and bool((plan.table[:, tab.THRESH] == 1).all())
    check(config, 8, "thresholding")
    # the thresholding is active: without it the sample differs
    model = Denoiser(config)
    assert not torch.allclose(diffusers_loop(config, 8, model)[0],
                              diffusers_loop({**config, "thresholding": False}, 8, model)[0])


@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("trailing", 0), ("linspace", 0),
                                             ("leading", 0)])
def test_timestep_spacing(spacing, offset):
    for algorithm in ("dpmsolver++", "sde-dpmsolver++"):
        check({"timestep_spacing": spacing, "steps_offset": offset, "algorithm_type": algorithm,
               "solver_order": 3}, 11, "timestep_spacing")


def test_rescale_betas_zero_snr():
    # diffusers sets ᾱ_{T−1} = 2⁻²⁴ (not 0): the first σ/α of a trailing run is ≈ 4096, finite
    for kw in ({"prediction_type": "v_prediction"},
               {"prediction_type": "v_prediction", "algorithm_type": "sde-dpmsolver++"},
               {"prediction_type": "epsilon"}):
        config = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", **kw}
        plan = dpm_plan(config, 10)
        assert plan.timesteps[0] == 999 and 4000 < plan.sigmas[0] < 4200
        check(config, 10, "rescale_betas_zero_snr")


def test_lambda_min_clipped():
    # the cosine schedule's usual clip, and a linear one that also shortens a trailing run
    check({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
           "solver_order": 3}, 12, "lambda_min_clipped")
    config = {"lambda_min_clipped": -2.0, "timestep_spacing": "trailing", "solver_order": 3}
    plan = dpm_plan(config, 10)
    assert len(plan.timesteps) < 10            # diffusers keeps the step T / n, starts lower
    check(config, 10, "lambda_min_clipped")


def test_beta_schedules_and_aliases():
    check({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 10,
          "betas")
    betas = np.linspace(1e-4, 0.03, 500).tolist()
    check({"trained_betas": betas, "num_train_timesteps": 500, "solver_order": 3}, 10, "betas")
    check({"beta_schedule": "squaredcos_cap_v2", "use_lu_lambdas": True,
           "final_sigmas_type": "sigma_min"}, 10, "betas")
    # diffusers maps DEIS / UniPC config values onto its own
    assert dpm_settings({"algorithm_type": "deis", "final_sigmas_type": "sigma_min",
                         "solver_type": "bh2"})["algorithm_type"] == "dpmsolver++"
    check({"algorithm_type": "deis", "final_sigmas_type": "sigma_min", "solver_type": "bh2"}, 8,
          "aliases")


def test_learned_variance_keeps_the_first_channels():
    config = {"variance_type": "learned_range", "solver_order": 3}
    check(config, 8, "learned variance", model=Denoiser(config, out_channels=6))
    with pytest.raises(ValueError, match="first 3 channels"):
        reference_sample(Denoiser(config, 1, 2), dpm_plan(config, 8), (1, 1, 4, 4),
                         torch.Generator().manual_seed(0))


def test_ddpm_config_swap():
    # DPMSolverMultistepScheduler.from_config(a DDPM pipeline's scheduler_config.json):
    # variance_type "fixed_small" and the spacing come along, DDPM's clip_sample and
    # clip_sample_range stay in the config as "hidden" keys that DPM-Solver ignores
    ddpm = {k: v for k, v in diffusers.DDPMScheduler().config.items() if not k.startswith("_")}
    ddpm["_class_name"] = "DDPMScheduler"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swapped = DPMSolverMultistepScheduler.from_config(ddpm)
    config = {k: v for k, v in swapped.config.items() if not k.startswith("_")}
    assert config["variance_type"] == "fixed_small" and config["timestep_spacing"] == "leading"
    assert "clip_sample" in config and "clip_sample" not in dpm_settings(config)
    check(config, 10, "ddpm config swap")
    with pytest.raises(ValueError, match="skip_prk_steps"):   # other classes' keys: refused
        dpm_settings({**config, "skip_prk_steps": True})


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        norm_num_groups=4).eval()


@torch.no_grad()
def test_real_unet():
    for config, n in (({"solver_order": 2}, 10),
                      ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                        "use_karras_sigmas": True, "solver_type": "heun"}, 7)):
        # F of the preconditioned denoiser is a random tiny UNet2DModel (sample_size 8)
        check(config, n, "tiny UNet2DModel", model=Denoiser(config, net=tiny_unet()))


@pytest.mark.parametrize("config, n", [
    ({"algorithm_type": "dpmsolver", "use_karras_sigmas": True, "solver_order": 3,
      "final_sigmas_type": "sigma_min"}, 10),
    ({"algorithm_type": "sde-dpmsolver", "use_karras_sigmas": True,
      "final_sigmas_type": "sigma_min"}, 10),
    ({"final_sigmas_type": "sigma_min", "lower_order_final": False, "solver_order": 3}, 7),
])
def test_ill_conditioned_families_are_float32_limited(config, n):
    """Where ours and diffusers differ by more than ATOL, both float32 runs are that far from
    the same run in float64: ours within 2× diffusers' distance (STYLE.md's rule for a lower
    precision), so the gap is float32 rounding, not a coefficient."""
    model = Denoiser(config)
    plan = dpm_plan(config, n)
    want = diffusers_loop(config, n, model)[0].double()
    got = reference_sample(model, plan, SHAPE, torch.Generator().manual_seed(0)).double()
    exact = reference_sample(model, plan, SHAPE, torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    theirs, ours = (want - exact).abs().max(), (got - exact).abs().max()
    assert (got - want).abs().max() > ATOL / 10       # a family that needs the yardstick
    assert ours <= 2 * theirs


def test_table_layout():
    plan = dpm_plan({"solver_order": 3, "final_sigmas_type": "sigma_min",
                     "lower_order_final": False}, 6)
    t = plan.table
    assert t.dtype == torch.float32 and t.shape == (6, tab.COLS)
    assert plan.orders == [1, 2, 3, 3, 3, 3] == t[:, tab.ORDER].int().tolist()
    assert t[:, tab.T].long().tolist() == plan.timesteps
    assert bool((t[:, tab.C_IN] == 1).all()) and bool((t[:, tab.KX] == 1).all())
    assert bool((t[:, tab.KL:tab.K3 + 1] == 0).all()) and not plan.corrector   # no corrector
    assert t[:, tab.WORD].tolist() == [1001.0 + k for k in range(6)]           # Philox words
    # the history columns are empty where the order does not reach them
    assert t[0, tab.B1] == 0 and t[0, tab.B2] == 0 and t[1, tab.B2] == 0
    assert bool((t[2:, tab.B2] != 0).all()) and bool((t[:, tab.S] == 0).all())
    # first order (DDIM, Lu et al. 2022b): x' = (σ_t/σ_s)·x + α_t(1 − e^{−h})·x̂0
    s0, s1 = plan.sigmas[0], plan.sigmas[1]
    a1 = 1 / math.sqrt(1 + s1 * s1)
    a0 = 1 / math.sqrt(1 + s0 * s0)
    assert math.isclose(t[0, tab.A], (s1 * a1) / (s0 * a0), rel_tol=1e-6)
    assert math.isclose(t[0, tab.B0], a1 * (1 - s1 / s0), rel_tol=1e-6)
    # order 2 expands D0 = m_k, D1 = (m_k − m_{k−1})/r0: its weights sum to D0's weight
    s2 = plan.sigmas[2]
    a2 = 1 / math.sqrt(1 + s2 * s2)
    assert math.isclose(t[1, tab.B0] + t[1, tab.B1], a2 * (1 - s2 / s1), rel_tol=1e-5)


# ---------------------------------------------------------------- refusals
REFUSED = [
    ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ({"use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas"),
    ({"flow_shift": 3.0}, "flow_shift"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"time_shift_type": "linear"}, "time_shift_type"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"solver_order": 4}, "solver_order"),
    ({"solver_order": True}, "solver_order"),
    ({"algorithm_type": "unipc"}, "algorithm_type"),
    ({"solver_type": "rk4"}, "solver_type"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"beta_schedule": "laplace"}, "beta_schedule"),
    ({"variance_type": "fixed_large_log"}, "variance_type"),
    ({"variance_type": "learned", "prediction_type": "v_prediction"}, "variance_type"),
    ({"thresholding": True, "algorithm_type": "dpmsolver",
      "final_sigmas_type": "sigma_min"}, "thresholding"),
    ({"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    ({"thresholding": True, "sample_max_value": 0}, "sample_max_value"),
    ({"algorithm_type": "dpmsolver"}, "final_sigmas_type"),
    ({"algorithm_type": "sde-dpmsolver"}, "final_sigmas_type"),
    ({"algorithm_type": "deis"}, "algorithm_type"),
    ({"algorithm_type": "sde-dpmsolver", "solver_order": 3,
      "final_sigmas_type": "sigma_min"}, "solver_order"),
    ({"use_karras_sigmas": True, "use_lu_lambdas": True}, "use_lu_lambdas"),
    ({"lambda_min_clipped": float("nan")}, "lambda_min_clipped"),
    ({"lower_order_final": "yes"}, "lower_order_final"),
    ({"steps_offset": 1.5}, "steps_offset"),
    ({"num_train_timesteps": 1}, "num_train_timesteps"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"sigma_min": 0.1}, "sigma_min"),
]


@pytest.mark.parametrize("config, name", REFUSED, ids=[n for _, n in REFUSED])
def test_refused_settings_name_themselves(config, name):
    with pytest.raises(ValueError, match=name):
        dpm_settings(config)
    with pytest.raises(ValueError, match=name):
        dpm_plan(config, 10)


def test_private_and_default_keys_carry_no_settings():
    config = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.42.1",
              "use_beta_sigmas": True, "_use_default_values": ["use_beta_sigmas"]}
    assert dpm_settings(config) == dpm.DPM_SCHEDULER_DEFAULTS


@pytest.mark.parametrize("config, n, reason", [
    # cosine betas: karras timesteps are truncated (not rounded), so the first one repeats
    ({"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 7, "IndexError"),
    ({"timestep_spacing": "leading", "steps_offset": 1}, 999, "outside its training range"),
    ({}, 1000, "divide by zero"),             # linspace rounding repeats a noise level
    ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_type": "heun"}, 16,
     "karras / lu levels end at σ_min"),
    ({"use_lu_lambdas": True, "final_sigmas_type": "sigma_min", "solver_order": 3,
      "algorithm_type": "dpmsolver"}, 20, "karras / lu levels end at σ_min"),
])
def test_plans_diffusers_cannot_run_are_refused(config, n, reason):
    with pytest.raises(ValueError, match=reason):
        dpm_plan(config, n)


def test_diffusers_fails_where_refused():
    """The reasons given are diffusers' own behaviour (kept honest against new versions)."""
    with pytest.raises(ValueError):
        DPMSolverMultistepScheduler(algorithm_type="deis")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError):
            DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
        sde3 = dict(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")
        with pytest.raises(UnboundLocalError):
            diffusers_loop(sde3, 7, Denoiser())
    with pytest.raises(IndexError):
        diffusers_loop({"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 7,
                       Denoiser())
    for config, n in (({}, 1000), ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min",
                                    "solver_type": "heun"}, 16)):
        assert not torch.isfinite(diffusers_loop(config, n, Denoiser(config),
                                                 shape=(1, 3, 2, 2))[0]).all()
