"""ddpm_fast.solvers.euler and .deis against diffusers' EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler and DEISMultistepScheduler.

Each case runs diffusers' canonical loop and reference_sample from the same seed:
    set_timesteps(n); x = randn(shape, generator=g) · init_noise_sigma
    for t in timesteps: out = model(scale_model_input(x, t), t); x = step(out, t, x[, generator=g])
(the generator passed where step takes one: both Euler schedulers) and asserts: the same
timesteps, noise levels and init_noise_sigma; the same generator state afterwards; every step,
taken by solver_step from diffusers' own state (x, model output, noise), within STEP_RTOL of
diffusers' step relative to the size of its terms (DEIS: beyond diffusers' own float32 error,
and within EXACT_RTOL of its formula evaluated in float64), and the model input within 1e-6;
the final x within ATOL = 1e-5 (ill-conditioned families within a float64 yardstick: cosine
betas, DEIS's third order; see ILL_ATOL, DEIS3_ATOL).

The model is a fixed random nonlinear denoiser of (x, t) (cheap; fractional and continuous
timesteps decoded to their noise level), a tiny random UNet2DModel inside the same
preconditioning for one case per scheduler.
"""
import inspect
import math
import types
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DEISMultistepScheduler, EulerAncestralDiscreteScheduler,  # noqa: E402
                       EulerDiscreteScheduler, HeunDiscreteScheduler)

from conftest import redraw_step_noise  # noqa: E402
from ddpm_fast.solvers import deis  # noqa: E402
from ddpm_fast.solvers import euler as eu  # noqa: E402
from ddpm_fast.solvers import heun  # noqa: E402
from ddpm_fast.solvers import reference_sample  # noqa: E402
from ddpm_fast.solvers import table as tab  # noqa: E402
from ddpm_fast.solvers.table import initial_state, solver_step  # noqa: E402

# diffusers 0.42 calls np.array / np.log on tensors (NumPy 2's copy= and __array_wrap__
# deprecations; DEIS's steps warn ~20 times each)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

ATOL = 1e-5                         # on the final sample (float32 steps, float64 coefficients)
STEP_RTOL = 1e-5                    # one step from diffusers' own state, relative to its terms
SHAPE = (2, 3, 8, 8)
RESULTS = {}                        # label → worst |Δ| of a run, step errors (diffusers_loop)


@pytest.fixture(autouse=True, scope="module")
def one_thread(single_torch_thread):
    yield
    for family, (err, step, exact, own) in sorted(RESULTS.items()):   # shown with pytest -s
        print(f"{family:40s} run max |Δ| {err:.2g}   worst step {step:.2g}" +
              (f" (float64 formula {exact:.2g}, diffusers' own {own:.2g})" if exact else ""))


FAMILIES = {
    "euler": types.SimpleNamespace(cls=EulerDiscreteScheduler, plan=eu.euler_plan,
                                   settings=eu.euler_settings,
                                   defaults=eu.EULER_SCHEDULER_DEFAULTS),
    "ancestral": types.SimpleNamespace(cls=EulerAncestralDiscreteScheduler,
                                       plan=eu.euler_ancestral_plan,
                                       settings=eu.euler_ancestral_settings,
                                       defaults=eu.EULER_ANCESTRAL_SCHEDULER_DEFAULTS),
    "deis": types.SimpleNamespace(cls=DEISMultistepScheduler, plan=deis.deis_plan,
                                  settings=deis.deis_settings,
                                  defaults=deis.DEIS_SCHEDULER_DEFAULTS),
    "heun": types.SimpleNamespace(cls=HeunDiscreteScheduler, plan=heun.heun_plan,
                                  settings=heun.heun_settings,
                                  defaults=heun.HEUN_SCHEDULER_DEFAULTS),
}


def scheduler_of(family, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FAMILIES[family].cls.from_config(config)


class Denoiser(torch.nn.Module):
    """A fixed random nonlinear denoiser of (x, t) shaped like a trained one (as
    test_solvers_dpm's, which indexes integer timesteps only): it decodes the noise level
    l = σ/α of its timestep (log σ interpolated between the training timesteps around a
    fractional t, as _sigma_to_t inverts it; l = e^{4t} for continuous timesteps) and predicts
    x̂0 EDM-preconditioned (Karras et al. 2022) at l, from the VP sample x (σ_d = 0.5):
        x̂0 = c_skip·x_l + c_out·F(c_in·x_l, t),  x_l = x·√(1+l²),  c_skip = σ_d²/(l²+σ_d²),
        c_out = l·σ_d/√(l²+σ_d²),  c_in = 1/√(l²+σ_d²),
    F = 3·tanh(W·x + b·sin(f·t)) or a given network's output, given back in the config's
    parameterisation (ε, v or x0) at l."""

    def __init__(self, family, config=None, channels=3, net=None):
        super().__init__()
        config = config or {}
        g = torch.Generator().manual_seed(1234)
        self.w = torch.randn(channels, channels, generator=g) * 0.6
        self.b = torch.randn(channels, 1, 1, generator=g)
        self.f = torch.rand(channels, 1, 1, generator=g) * 6
        self.net = net
        abar = scheduler_of(family, config).alphas_cumprod.double()
        self.log_levels = (0.5 * torch.log((1 - abar) / abar)).numpy()
        self.continuous = (config.get("timestep_type") == "continuous" and
                           config.get("prediction_type") == "v_prediction")
        self.kind = config.get("prediction_type", "epsilon")

    def level(self, t: float) -> float:
        if self.continuous:
            return math.exp(4 * t)
        return math.exp(np.interp(t, np.arange(len(self.log_levels)), self.log_levels))

    def forward(self, x, t):
        dt = x.dtype                            # float64 for a yardstick run
        tf = float(t)
        level, sd = self.level(tf), 0.5
        a = 1 / math.sqrt(1 + level ** 2)
        s = level * a
        norm2 = level ** 2 + sd ** 2
        x_in = x / a / norm2 ** 0.5                             # c_in·x_l
        if self.net is not None:
            f = self.net(x_in.float(), t).sample.to(dt)
        else:
            f = 3 * torch.tanh(torch.einsum("oc,bchw->bohw", self.w.to(dt), x_in) +
                               self.b.to(dt) * torch.sin(self.f.to(dt) * tf / 1000 + 1))
        x0 = sd ** 2 / norm2 * x / a + level * sd / norm2 ** 0.5 * f
        out = {"sample": x0, "original_sample": x0, "epsilon": (x - a * x0) / s,
               "v_prediction": (a * x - x0) / s}[self.kind]
        return types.SimpleNamespace(sample=out) if self.net is not None else out


def diffusers_loop(family, config, n, model, shape=SHAPE, seed=0, plan=None):
    """diffusers' canonical loop → (x, generator state, scheduler, step errors). With a plan,
    each step is also taken by solver_step from diffusers' own x, model output and noise
    (teacher forcing: no error carried between steps), the model input is checked, and the
    step errors are the worst |Δ| of a step relative to the size of its terms (Σ|coefficient ·
    operand| over x, out, m1, m2, z, m = P·x + Q·out counted through its own terms; plus |x|,
    which diffusers' Euler steps add to): "step" against diffusers' step; for DEIS also "exact"
    against diffusers' step formed in float64 (its levels as float64 tensors: every coefficient
    of its formula then float64, from the same float32 levels) and "own", diffusers' float32
    step's distance from that, and "excess" the worst of a step's distance from diffusers' beyond
    its own (the step error for Euler)."""
    scheduler = scheduler_of(family, config)
    g = torch.Generator().manual_seed(seed)
    # set_timesteps before init_noise_sigma, as diffusers' pipelines order them
    # (StableDiffusionPipeline: retrieve_timesteps, then prepare_latents): Euler's depends on
    # the run's levels ("leading": √(σ(t_0)² + 1), not the training σ_max)
    scheduler.set_timesteps(n)
    x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    exact = None
    if plan is not None and family == "deis":       # the Euler steps cast x to float32
        exact = scheduler_of(family, config)
        exact.set_timesteps(n)
        exact.sigmas = exact.sigmas.double()
    errors = dict(step=0.0, exact=0.0, own=0.0, excess=0.0)
    state = initial_state(torch.zeros(shape))
    for k, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        out = model(x_in, t)
        out = out if isinstance(out, torch.Tensor) else out.sample
        before = g.get_state()
        kw = {"generator": g} if takes_generator else {}
        x_next = scheduler.step(out, t, x, **kw).prev_sample
        if plan is not None:
            row = plan.table[k]
            assert (row[tab.C_IN] * x - x_in).abs().max() <= 1e-6 * x_in.abs().max()
            z = redraw_step_noise(g, before, shape, plan.stochastic)
            m1, m2 = state[1], state[2]
            ours = solver_step(plan, row, x, out, state, z)
            # m's own terms count (m = x − σ·out at σ ≫ 1 cancels: x̂0 of a VE sample), and x
            # itself: diffusers' Euler steps add to it (x + (σ' − σ)·d cancels where σ' ≪ σ)
            terms = [x, row[tab.A] * x, row[tab.B0] * row[tab.P] * x,
                     row[tab.B0] * row[tab.Q] * out, row[tab.B1] * m1, row[tab.B2] * m2]
            terms += [row[tab.S] * z] if z is not None else []
            size = max(sum(v.double().abs() for v in terms).max().item(), 1.0)

            def rel(a, b):
                return (a.double() - b.double()).abs().max().item() / size

            own = 0.0
            if exact is not None:
                x64 = exact.step(out.double(), t, x.double()).prev_sample
                own = rel(x_next, x64)
                errors["exact"] = max(errors["exact"], rel(ours, x64))
                errors["own"] = max(errors["own"], own)
            errors["step"] = max(errors["step"], rel(ours, x_next))
            errors["excess"] = max(errors["excess"], rel(ours, x_next) - own)
        x = x_next
    return x, g.get_state(), scheduler, errors


# Families whose final sample is ill-conditioned in float32, so that diffusers' own float32 run
# is ~ATOL or more from exact arithmetic (and ours as close or closer: test_ill_conditioned…):
# cosine betas, where diffusers clips β_999 at 0.999 and the first level is σ/α ≈ 2·10⁴: the
# Euler schedulers' x_T = σ·z is float32-exact to ~10⁻³ only, and DEIS's first step scales x
# and ε̂ by α'/α ≈ 3500 and subtracts. Every step still matches diffusers' within its tolerance.
ILL_ATOL = 5e-3                         # measured ≤ 2.3e-3 (DEIS), 1e-3 (Euler)
# DEIS's second and third order: diffusers forms its coefficients (ind_fn) as differences of
# antiderivatives ρ·(log ρ)²… of size ≫ the difference, in float32, so its own steps are up to
# ~1e-5 of their terms from its formula in float64 (1e-4 at 50 karras steps), and a run of
# third-order steps drifts ~1e-4 from exact arithmetic (ours: ~1e-6;
# test_deis_third_order…). Ours is checked against that formula in float64 at every step
# within EXACT_RTOL, and against diffusers' float32 step within STEP_RTOL beyond its own error.
DEIS3_ATOL = 3e-4                       # measured ≤ 8.5e-5
EXACT_RTOL = 1e-6                       # measured ≤ 9e-8


def tol_for(family, config):
    if config.get("beta_schedule") == "squaredcos_cap_v2":
        return ILL_ATOL
    if family == "deis" and config.get("solver_order") == 3:
        return DEIS3_ATOL
    return ATOL


def check(family, config, n, label, model=None, shape=SHAPE, seed=0, tol=None):
    """Our run against diffusers' canonical loop: the same timesteps, levels, initial noise
    scale and generator state after; every step within STEP_RTOL from diffusers' own state;
    the final x within tol."""
    model = model or Denoiser(family, config)
    plan = FAMILIES[family].plan(config, n)
    want, want_state, scheduler, errors = diffusers_loop(family, config, n, model, shape, seed,
                                                         plan)
    g = torch.Generator().manual_seed(seed)
    got = reference_sample(model, plan, shape, g)
    assert plan.timesteps == scheduler.timesteps.tolist()
    assert plan.sigmas == scheduler.sigmas.tolist()
    assert plan.init_noise_sigma == float(scheduler.init_noise_sigma)
    assert torch.equal(g.get_state(), want_state)
    assert torch.isfinite(want).all()
    worst_step = errors["step"]
    assert errors["excess"] <= STEP_RTOL, f"{config} n={n}: a step is off by {worst_step:.3g}"
    assert errors["exact"] <= EXACT_RTOL, f"{config} n={n}: a step is off diffusers' formula " \
                                         f"by {errors['exact']:.3g}"
    err = (got - want).abs().max().item()
    tol = tol_for(family, config) if tol is None else tol
    assert err <= tol, f"{config} n={n}: max |Δ| = {err:.3g} (tolerance {tol:.3g})"
    e0, w0, x0, o0 = RESULTS.get(f"{family}: {label}", (0.0,) * 4)
    RESULTS[f"{family}: {label}"] = (max(e0, err), max(w0, worst_step),
                                     max(x0, errors["exact"]), max(o0, errors["own"]))
    return err


STEPS = (7, 10, 13, 25)
SPACINGS = [("linspace", 0), ("leading", 1), ("trailing", 0), ("leading", 0)]


# ---------------------------------------------------------------- Euler and Euler ancestral
@pytest.mark.parametrize("family, prediction", [
    ("euler", "epsilon"), ("euler", "v_prediction"), ("euler", "sample"),
    ("ancestral", "epsilon"), ("ancestral", "v_prediction"),   # "sample": diffusers raises
])
@pytest.mark.parametrize("spacing, offset", SPACINGS)
def test_euler_spacings_and_predictions(family, prediction, spacing, offset):
    config = dict(timestep_spacing=spacing, steps_offset=offset, prediction_type=prediction)
    for n in STEPS:
        check(family, config, n, f"{spacing} {prediction}", seed=n)


@pytest.mark.parametrize("interpolation", ["linear", "log_linear"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_euler_karras_sigmas(interpolation, final):
    # Karras levels run between the spaced levels' ends: each spacing (cycled over the steps)
    for i, n in enumerate(STEPS):
        spacing, offset = SPACINGS[i]
        check("euler", dict(use_karras_sigmas=True, interpolation_type=interpolation,
                            final_sigmas_type=final, timestep_spacing=spacing, steps_offset=offset,
                            prediction_type="v_prediction" if n == 13 else "epsilon"), n,
              f"karras {final}", seed=n)
    # the config's ends (σ_max above the training range: the first timesteps clamp to 999 and
    # repeat, which diffusers cannot run — refused in test_plans_diffusers_cannot_run…)
    check("euler", dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=60.0), 12,
          "karras sigma_min/max")


def test_euler_final_sigmas_and_log_linear():
    # diffusers' Euler step takes "original_sample" as another name of "sample"
    check("euler", {"prediction_type": "original_sample"}, 7, "linspace sample")
    for n in STEPS:
        check("euler", {"final_sigmas_type": "sigma_min"}, n, "final sigma_min")
        # n + 2 levels for n timesteps: the run ends at σ_min, as diffusers'
        plan = eu.euler_plan({"interpolation_type": "log_linear"}, n)
        assert len(plan.sigmas) == n + 2 and len(plan.timesteps) == n
        check("euler", {"interpolation_type": "log_linear", "timestep_spacing": "trailing"}, n,
              "log_linear")


def test_euler_continuous_timesteps():
    for kw in ({}, {"use_karras_sigmas": True}, {"interpolation_type": "log_linear"},
               {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}):
        config = dict(timestep_type="continuous", prediction_type="v_prediction", **kw)
        for n in (7, 13):
            plan = eu.euler_plan(config, n)
            assert plan.timesteps[-1] < 0           # 0.25·log σ: fractional, below zero
            assert plan.table[:, tab.T].tolist() == plan.timesteps
            check("euler", config, n, "continuous timesteps")


@pytest.mark.parametrize("family", ["euler", "ancestral"])
def test_euler_rescale_betas_zero_snr(family):
    # diffusers sets ᾱ_{T−1} = 2⁻²⁴: the first level of a trailing run is 4096, finite
    for prediction in ("v_prediction", "epsilon"):
        config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                      prediction_type=prediction)
        for n in (7, 10, 25):
            plan = FAMILIES[family].plan(config, n)
            assert plan.timesteps[0] == 999 and plan.init_noise_sigma == 4096.0
            check(family, config, n, "zero SNR trailing")
    check(family, dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"), 10,
          "zero SNR linspace")


@pytest.mark.parametrize("family", ["euler", "ancestral"])
def test_euler_beta_schedules(family):
    check(family, {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                   "beta_end": 0.012}, 10, "betas")
    check(family, {"beta_schedule": "squaredcos_cap_v2"}, 10, "cosine betas")
    betas = np.linspace(1e-4, 0.03, 500).tolist()
    check(family, {"trained_betas": betas, "num_train_timesteps": 500,
                   "timestep_spacing": "leading", "steps_offset": 1}, 10, "betas")


ZERO_SNR_V = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
              "prediction_type": "v_prediction"}


@pytest.mark.parametrize("family, config, n", [
    ("euler", {"beta_schedule": "squaredcos_cap_v2"}, 10),
    ("ancestral", {"beta_schedule": "squaredcos_cap_v2"}, 10),
    # 2–3 steps from σ = 4096: diffusers' x + (σ' − σ)·d cancels to ~σ'·z (ATOL is 1e-5 from 4
    # steps on; the grid runs 7, 10, 25)
    ("euler", ZERO_SNR_V, 3),
    ("ancestral", ZERO_SNR_V, 2),
    ("deis", {"beta_schedule": "squaredcos_cap_v2", "solver_order": 3}, 10),
])
def test_ill_conditioned_families_are_float32_limited(family, config, n):
    """Where ours and diffusers differ by more than ATOL, both float32 runs are that far from
    the same run in float64: ours within 2× diffusers' distance (STYLE.md's rule for a lower
    precision), so the gap is float32 rounding, not a coefficient."""
    model = Denoiser(family, config)
    plan = FAMILIES[family].plan(config, n)
    want = diffusers_loop(family, config, n, model)[0].double()
    got = reference_sample(model, plan, SHAPE, torch.Generator().manual_seed(0)).double()
    exact = reference_sample(model, plan, SHAPE, torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    theirs, ours = (want - exact).abs().max(), (got - exact).abs().max()
    assert (got - want).abs().max() > ATOL            # a family that needs the yardstick
    assert ours <= 2 * theirs


def test_euler_table_layout():
    plan = eu.euler_plan({"prediction_type": "v_prediction"}, 6)
    t, s = plan.table, plan.sigmas
    assert t.dtype == torch.float32 and t.shape == (6, tab.COLS) and not plan.stochastic
    assert plan.init_noise_sigma == max(s)                   # linspace: σ_max
    assert bool((t[:, tab.B1:tab.B2 + 1] == 0).all()) and bool((t[:, tab.S] == 0).all())
    assert not plan.corrector and plan.orders == [1] * 6
    for k in range(6):
        assert math.isclose(t[k, tab.C_IN], 1 / math.sqrt(1 + s[k] ** 2), rel_tol=1e-6)
        assert math.isclose(t[k, tab.A], s[k + 1] / s[k], rel_tol=1e-6)
        assert math.isclose(t[k, tab.A] + t[k, tab.B0], 1, rel_tol=1e-6)
        assert math.isclose(t[k, tab.P], 1 / (1 + s[k] ** 2), rel_tol=1e-6)
    assert plan.timesteps[1] == 799.2000122070312             # linspace: fractional, float32
    leading = eu.euler_plan({"timestep_spacing": "leading"}, 6)
    assert leading.init_noise_sigma == pytest.approx(math.sqrt(max(leading.sigmas) ** 2 + 1))
    # ancestral: σ_down² + σ_up² = σ'², σ_down = σ'²/σ
    plan = eu.euler_ancestral_plan({}, 6)
    t, s = plan.table, plan.sigmas
    assert plan.stochastic and t[-1, tab.S] == 0 and t[-1, tab.A] == 0
    for k in range(5):
        down = t[k, tab.A] * s[k]
        assert math.isclose(down, s[k + 1] ** 2 / s[k], rel_tol=1e-6)
        assert math.isclose(down ** 2 + t[k, tab.S] ** 2, s[k + 1] ** 2, rel_tol=1e-5)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        norm_num_groups=4).eval()


@torch.no_grad()
def test_euler_real_unet():
    # fractional (karras) timesteps into a real U-Net's time embedding
    config = {"use_karras_sigmas": True, "timestep_spacing": "trailing"}
    check("euler", config, 8, "tiny UNet2DModel", model=Denoiser("euler", config, net=tiny_unet()))
    config = {"prediction_type": "v_prediction"}
    check("ancestral", config, 8, "tiny UNet2DModel",
          model=Denoiser("ancestral", config, net=tiny_unet()))


def test_ddpm_config_swap():
    # XScheduler.from_config(a DDPM pipeline's scheduler config): DDPM's spacing and
    # steps_offset come along, its clip_sample, variance_type, … stay as "hidden" keys that the
    # new class ignores, and so do they here
    ddpm = {k: v for k, v in diffusers.DDPMScheduler(steps_offset=1).config.items()
            if not k.startswith("_")}
    ddpm["_class_name"] = "DDPMScheduler"
    for family in FAMILIES:
        swapped = scheduler_of(family, ddpm)
        config = {k: v for k, v in swapped.config.items() if not k.startswith("_")}
        settings = FAMILIES[family].settings(config)
        assert "clip_sample" in config
        # Heun takes clip_sample (it clamps x̂0): DDPM's True carries over, as in diffusers
        assert settings["clip_sample"] if family == "heun" else "clip_sample" not in settings
        assert config["timestep_spacing"] == "leading"
        check(family, config, 10, "ddpm config swap")
        with pytest.raises(ValueError, match="skip_prk_steps"):   # other classes: refused
            FAMILIES[family].settings({**config, "skip_prk_steps": True})


def live(config):
    """A live scheduler's settings (schedulers.live_config drops _use_default_values)."""
    return {k: v for k, v in config.items() if k != "_use_default_values"}


def test_swap_chain_keys_carry_no_settings():
    # DDPM → DPM-Solver → Euler ancestral: DPM-Solver's and DDPM's keys ride along as hidden
    # keys, which diffusers ignores (use_karras_sigmas included: the ancestral class has none)
    ddpm = {**live(diffusers.DDPMScheduler().config), "_class_name": "DDPMScheduler"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dpm = diffusers.DPMSolverMultistepScheduler.from_config(ddpm, use_karras_sigmas=True,
                                                                solver_order=3)
        anc = EulerAncestralDiscreteScheduler.from_config(live(dpm.config))
    config = {k: v for k, v in anc.config.items() if not k.startswith("_")}
    assert config["use_karras_sigmas"] is True and config["solver_order"] == 3
    assert config["clip_sample"] is True
    assert eu.euler_ancestral_settings(config) == {
        **eu.EULER_ANCESTRAL_SCHEDULER_DEFAULTS, "timestep_spacing": "leading"}
    check("ancestral", config, 9, "swap chain")


def test_defaults_are_diffusers_arguments():
    """Every __init__ argument with diffusers' default, and every key that carries no setting a
    key diffusers' from_config drops for that class (a compatible class's)."""
    for family in FAMILIES.values():
        params = inspect.signature(family.cls.__init__).parameters
        assert {k: p.default for k, p in params.items() if k != "self"} == family.defaults
        compatible = set()
        for c in family.cls._get_compatibles():
            compatible |= set(inspect.signature(c.__init__).parameters) - {"self"}
        assert eu.SWAP_KEYS - set(family.defaults) <= compatible


# ---------------------------------------------------------------- DEIS
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_deis_orders(order, lower_order_final):
    config = dict(solver_order=order, lower_order_final=lower_order_final)
    for n in STEPS:                 # < 15 (lower-order final steps) and ≥ 15
        check("deis", config, n, f"order {order} lower_order_final={lower_order_final}", seed=n)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_deis_karras_and_predictions(prediction):
    for karras in (False, True):
        for n, order in ((9, 3), (16, 2)):
            check("deis", dict(use_karras_sigmas=karras, prediction_type=prediction,
                               solver_order=order), n, f"karras={karras} {prediction}")
    # karras levels end by repeating σ_min: the last step's coefficients are 0 (x' = x)
    plan = deis.deis_plan({"use_karras_sigmas": True}, 9)
    assert plan.sigmas[-1] == plan.sigmas[-2] and plan.table[-1, tab.A] == 1
    assert bool((plan.table[-1, tab.B0:tab.B2 + 1] == 0).all())


def test_deis_long_third_order_run():
    # diffusers' own float32 steps are ~1e-4 of their terms off its formula here, and its run
    # ~7e-4 off exact arithmetic (ours ~1e-6: test_deis_third_order_is_float32_limited)
    check("deis", {"solver_order": 3, "use_karras_sigmas": True}, 50, "order 3 karras 50 steps",
          tol=2e-3)


@pytest.mark.parametrize("spacing, offset", SPACINGS)
def test_deis_spacings(spacing, offset):
    for order in (2, 3):
        check("deis", {"timestep_spacing": spacing, "steps_offset": offset,
                       "solver_order": order}, 11, f"{spacing}")


def test_deis_betas_and_aliases():
    check("deis", {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                   "beta_end": 0.012}, 10, "betas")
    check("deis", {"beta_schedule": "squaredcos_cap_v2", "solver_order": 3}, 10,
          "cosine betas")
    betas = np.linspace(1e-4, 0.03, 500).tolist()
    check("deis", {"trained_betas": betas, "num_train_timesteps": 500}, 10, "betas")
    # diffusers maps DPM-Solver / UniPC values onto its own (and records them in its config)
    config = {"algorithm_type": "dpmsolver++", "solver_type": "bh2"}
    settings = deis.deis_settings(config)
    assert (settings["algorithm_type"], settings["solver_type"]) == ("deis", "logrho")
    assert {k: scheduler_of("deis", config).config[k] for k in ("algorithm_type",
                                                                "solver_type")} == \
        {"algorithm_type": "deis", "solver_type": "logrho"}
    check("deis", config, 8, "aliases")


def test_deis_table_layout():
    plan = deis.deis_plan({"solver_order": 3, "lower_order_final": False}, 6)
    t, rho = plan.table, plan.sigmas
    assert t.dtype == torch.float32 and t.shape == (6, tab.COLS) and not plan.stochastic
    assert plan.orders == [1, 2, 3, 3, 3, 3] == t[:, tab.ORDER].int().tolist()
    assert t[:, tab.T].long().tolist() == plan.timesteps and plan.init_noise_sigma == 1.0
    assert bool((t[:, tab.C_IN] == 1).all()) and not plan.corrector
    assert bool((t[:, tab.P] == 0).all()) and bool((t[:, tab.Q] == 1).all())   # ε̂ = out
    assert t[0, tab.B1] == 0 and t[0, tab.B2] == 0 and t[1, tab.B2] == 0
    assert bool((t[2:, tab.B2] != 0).all())

    def alpha(r):
        return 1 / math.sqrt(1 + r * r)

    # order 1 is DDIM: x' = (α'/α)·x + α'·(ρ' − ρ)·ε̂; the Lagrange weights of any order sum
    # to the same ∫ dρ = ρ' − ρ
    for k in range(6):
        assert math.isclose(t[k, tab.A], alpha(rho[k + 1]) / alpha(rho[k]), rel_tol=1e-6)
        total = float(t[k, tab.B0] + t[k, tab.B1] + t[k, tab.B2])
        assert math.isclose(total, alpha(rho[k + 1]) * (rho[k + 1] - rho[k]), rel_tol=1e-5)
    # second order, by hand: linear in L = log ρ through (L_k, ε̂_k), (L_{k−1}, ε̂_{k−1})
    r0, r1, r = rho[1], rho[0], rho[2]
    L0, L1 = math.log(r0), math.log(r1)
    c1 = (r * (math.log(r) - 1 - L1) - r0 * (L0 - 1 - L1)) / (L0 - L1)
    assert math.isclose(t[1, tab.B0], alpha(r) * c1, rel_tol=1e-6)


@torch.no_grad()
def test_deis_real_unet():
    config = {"solver_order": 3, "prediction_type": "v_prediction"}
    check("deis", config, 8, "tiny UNet2DModel", model=Denoiser("deis", config, net=tiny_unet()))


@pytest.mark.parametrize("config, n", [
    ({"solver_order": 3}, 25),
    ({"solver_order": 3, "use_karras_sigmas": True, "lower_order_final": False}, 10),
    ({"solver_order": 3, "use_karras_sigmas": True}, 50),
])
def test_deis_third_order_is_float32_limited(config, n):
    """Where ours and diffusers' DEIS differ by more than ATOL, diffusers' float32 run is that
    far from the same run in float64 and ours is far closer (its coefficients are formed in
    float64): ours within 2× diffusers' distance (STYLE.md's rule for a lower precision)."""
    model = Denoiser("deis", config)
    plan = deis.deis_plan(config, n)
    want = diffusers_loop("deis", config, n, model)[0].double()
    got = reference_sample(model, plan, SHAPE, torch.Generator().manual_seed(0)).double()
    exact = reference_sample(model, plan, SHAPE, torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    theirs, ours = (want - exact).abs().max(), (got - exact).abs().max()
    assert (got - want).abs().max() > ATOL           # a family that needs the yardstick
    assert ours <= 2 * theirs and ours <= ATOL


# ---------------------------------------------------------------- Heun
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing, offset", SPACINGS)
def test_heun_spacings_and_predictions(prediction, spacing, offset):
    config = dict(timestep_spacing=spacing, steps_offset=offset, prediction_type=prediction)
    for n in (1, 7, 10, 13):
        check("heun", config, n, f"{spacing} {prediction}", seed=n)


def test_heun_karras_betas_and_clip():
    for n in (7, 10, 25):
        check("heun", {"use_karras_sigmas": True}, n, "karras", seed=n)
    check("heun", {"beta_schedule": "scaled_linear"}, 10, "betas")
    check("heun", {"beta_start": 0.0001, "beta_end": 0.02}, 10, "DDPM betas")
    # clip_sample clamps x̂0 in both calls (a DDPM pipeline's config brings clip_sample=True)
    config = {"clip_sample": True, "clip_sample_range": 1.5, "beta_start": 0.0001,
              "beta_end": 0.02}
    assert heun.heun_plan(config, 10).threshold == (1.5,)
    check("heun", config, 10, "clip_sample")
    model = Denoiser("heun", config)
    assert not torch.allclose(diffusers_loop("heun", config, 10, model)[0],
                              diffusers_loop("heun", {**config, "clip_sample": False}, 10,
                                             model)[0])


def test_heun_table_layout():
    """2n − 1 calls: an Euler row (KX = 1) at each level, then the correction from x_last (the
    Euler step's start) and m1 (its x̂0) with the mean of the two slopes; the last level pair
    ends with the Euler step onto σ = 0."""
    plan = heun.heun_plan({}, 4)
    t, s = plan.table, plan.sigmas
    assert t.shape == (7, tab.COLS) and plan.corrector and not plan.stochastic
    assert plan.orders == [1, 2, 1, 2, 1, 2, 1] == t[:, tab.ORDER].int().tolist()
    assert plan.timesteps[1] == plan.timesteps[2] and plan.timesteps[3] == plan.timesteps[4]
    assert t[0::2, tab.KX].tolist() == [1.0] * 4 and bool((t[0::2, tab.KL] == 0).all())
    sigma, sigma_next = s[0], s[1]
    dt = sigma_next - sigma
    want = {tab.KX: dt / (2 * sigma_next), tab.KL: 1 + dt / (2 * sigma),
            tab.K0: -dt / (2 * sigma_next), tab.K1: -dt / (2 * sigma), tab.A: 1.0}
    for col, value in want.items():
        assert float(t[1, col]) == pytest.approx(value, rel=1e-6)
    assert float(t[6, tab.A]) == 0.0 and float(t[6, tab.B0]) == 1.0     # onto σ = 0: x̂0


def test_heun_real_unet():
    config = {"beta_start": 0.0001, "beta_end": 0.02}
    check("heun", config, 6, "tiny UNet2DModel", model=Denoiser("heun", config, net=tiny_unet()))


# ---------------------------------------------------------------- refusals
REFUSED = [
    ("heun", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("heun", {"beta_schedule": "exp"}, "beta_schedule"),
    ("heun", {"clip_sample": True, "clip_sample_range": 0}, "clip_sample_range"),
    ("heun", {"use_karras_sigmas": True, "sigma_max": 60.0}, "sigma_max"),   # Euler's, read
    ("heun", {"prediction_type": "original_sample"}, "prediction_type"),
    ("heun", {"variance_type": "learned_range"}, "variance_type"),
    ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("euler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("euler", {"use_beta_sigmas": True, "use_karras_sigmas": True}, "use_beta_sigmas"),
    ("euler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("euler", {"prediction_type": "x0"}, "prediction_type"),
    ("euler", {"interpolation_type": "cubic"}, "interpolation_type"),
    ("euler", {"timestep_type": "karras"}, "timestep_type"),
    ("euler", {"timestep_type": "continuous"}, "timestep_type"),     # ignored without v-pred
    ("euler", {"final_sigmas_type": "one"}, "final_sigmas_type"),
    ("euler", {"interpolation_type": "log_linear", "final_sigmas_type": "sigma_min"},
     "final_sigmas_type"),                                           # ignored: never reached
    ("euler", {"sigma_min": 0.1}, "sigma_min"),                      # ignored without karras
    ("euler", {"sigma_max": 10.0}, "sigma_max"),
    ("euler", {"use_karras_sigmas": True, "sigma_min": 0.0}, "sigma_min"),
    ("euler", {"use_karras_sigmas": True, "sigma_min": 2.0, "sigma_max": 1.0}, "sigma_max"),
    ("euler", {"use_karras_sigmas": True, "sigma_max": float("nan")}, "sigma_max"),
    ("euler", {"use_karras_sigmas": "yes"}, "use_karras_sigmas"),
    ("euler", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ("euler", {"beta_schedule": "sigmoid"}, "beta_schedule"),
    ("euler", {"steps_offset": 1.5}, "steps_offset"),
    ("euler", {"num_train_timesteps": 1}, "num_train_timesteps"),
    ("euler", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ("euler", {"use_dynamic_shifting": False, "shift": 3.0}, "shift"),   # Flow-matching Euler
    ("euler", {"s_churn": 1.0}, "s_churn"),                          # a step argument
    ("euler", {"variance_type": "learned_range"}, "variance_type"),  # DDPM's, but unusable
    ("ancestral", {"prediction_type": "sample"}, "prediction_type"),
    ("ancestral", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("ancestral", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ("ancestral", {"beta_schedule": "laplace"}, "beta_schedule"),
    ("ancestral", {"rescale_betas_zero_snr": 1}, "rescale_betas_zero_snr"),
    ("ancestral", {"eta": 0.5}, "eta"),
    ("ancestral", {"variance_type": "learned"}, "variance_type"),
    ("deis", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("deis", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("deis", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("deis", {"flow_shift": 3.0}, "flow_shift"),
    ("deis", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ("deis", {"time_shift_type": "linear"}, "time_shift_type"),
    ("deis", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("deis", {"thresholding": True}, "thresholding"),               # the table cannot (doc)
    ("deis", {"solver_order": 4}, "solver_order"),                  # diffusers: runs it as 3
    ("deis", {"solver_order": 0}, "solver_order"),
    ("deis", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("deis", {"solver_type": "rk4"}, "solver_type"),
    ("deis", {"lower_order_final": None}, "lower_order_final"),
    ("deis", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ("deis", {"beta_schedule": "sigmoid"}, "beta_schedule"),
    ("deis", {"use_karras_sigmas": True, "sigma_min": 0.5}, "sigma_min"),   # Euler's, read
    ("deis", {"lambda_min": 0.5}, "lambda_min"),
    ("deis", {"variance_type": "learned_range"}, "variance_type"),
]


@pytest.mark.parametrize("family, config, name", REFUSED,
                         ids=[f"{f}-{n}" for f, _, n in REFUSED])
def test_refused_settings_name_themselves(family, config, name):
    with pytest.raises(ValueError, match=name):
        FAMILIES[family].settings(config)
    with pytest.raises(ValueError, match=name):
        FAMILIES[family].plan(config, 10)


def test_private_and_default_keys_carry_no_settings():
    # Euler's sigma_min without Karras sigmas: diffusers' DEIS ignores it, and so does ours
    assert deis.deis_settings({"sigma_min": 0.5}) == deis.DEIS_SCHEDULER_DEFAULTS
    for family in FAMILIES.values():
        config = {"_class_name": family.cls.__name__, "_diffusers_version": "0.42.1",
                  "timestep_spacing": "karras", "_use_default_values": ["timestep_spacing"]}
        assert family.settings(config) == family.defaults


@pytest.mark.parametrize("family, config, n, reason", [
    # σ_max above the training range: the first karras timesteps clamp to 999 and repeat
    ("euler", {"use_karras_sigmas": True, "sigma_max": 1000.0}, 10, "repeats"),
    ("euler", {"timestep_spacing": "leading", "steps_offset": 1}, 1000, "training range"),
    ("ancestral", {"timestep_spacing": "leading", "steps_offset": 5}, 1000, "training range"),
    # zero SNR: ᾱ_998 < 2⁻²⁴ = ᾱ_999, so σ rises from t = 999 to 998
    ("ancestral", {"rescale_betas_zero_snr": True}, 999, "square root of a negative"),
    # β_0 = 0 gives σ_0 = 0, which the last step would divide by (diffusers: NaN)
    ("euler", {"trained_betas": [0.0] + [0.01] * 9, "num_train_timesteps": 10}, 10,
     "trained_betas"),
    # cosine betas: σ_max ≈ 2·10⁴, so several Karras levels round to t = 999
    ("deis", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 10, "repeats"),
    ("deis", {"timestep_spacing": "leading", "steps_offset": 1}, 999, "training range"),
    # linspace rounding repeats a timestep (101 points rounded onto 100 integers)
    ("deis", {"num_train_timesteps": 100}, 100, "repeated noise levels"),
])
def test_plans_diffusers_cannot_run_are_refused(family, config, n, reason):
    with pytest.raises(ValueError, match=reason):
        FAMILIES[family].plan(config, n)


def test_diffusers_fails_where_refused():
    """The reasons given are diffusers' own behaviour (kept honest against new versions)."""
    shape = (1, 3, 2, 2)
    with pytest.raises(NotImplementedError):
        diffusers_loop("ancestral", {"prediction_type": "sample"}, 5, Denoiser("ancestral"),
                       shape)
    with pytest.raises(IndexError):
        diffusers_loop("euler", {"use_karras_sigmas": True, "sigma_max": 1000.0}, 10,
                       Denoiser("euler"), shape)
    config = {"rescale_betas_zero_snr": True}
    assert not torch.isfinite(diffusers_loop("ancestral", config, 999, Denoiser("ancestral",
                                                                                 config),
                                             shape)[0]).all()
    config = {"trained_betas": [0.0] + [0.01] * 9, "num_train_timesteps": 10}
    with np.errstate(divide="ignore"):      # diffusers' log σ_0 = log 0
        x = diffusers_loop("euler", config, 10, lambda x, t: x, shape)[0]
    assert not torch.isfinite(x).all()
    with pytest.raises(RuntimeError):       # a learned-variance model's 2·C channels
        diffusers_loop("euler", {}, 3, lambda x, t: torch.cat([x, x], 1), shape)
    for config in ({"algorithm_type": "sde-dpmsolver++"}, {"solver_type": "rk4"}):
        with pytest.raises(NotImplementedError):
            scheduler_of("deis", config)
    with pytest.raises(IndexError):
        diffusers_loop("deis", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True},
                       10, lambda x, t: x, shape)
    assert not torch.isfinite(diffusers_loop("deis", {"num_train_timesteps": 100}, 100,
                                             lambda x, t: x, shape)[0]).all()
    # Euler's sigma_min, kept by a from_config swap, moves diffusers' DEIS Karras levels
    euler = EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=0.5)
    swapped = scheduler_of("deis", live(euler.config))
    swapped.set_timesteps(5)
    assert swapped.sigmas[-1] == 0.5
    # what refusing an ignored setting protects: diffusers runs the same images without it
    scheduler = scheduler_of("euler", {"timestep_type": "continuous"})
    scheduler.set_timesteps(5)
    assert scheduler.timesteps[0] == 999
