"""ddpm_fast.solvers.unipc against diffusers' UniPCMultistepScheduler.

Each case runs diffusers' canonical loop and reference_sample from the same seed:
    x = randn(shape, generator=g) · init_noise_sigma; set_timesteps(n)
    for t in timesteps: out = model(scale_model_input(x, t), t); x = step(out, t, x)
and asserts: the same timesteps; the same generator state afterwards (UniPC draws nothing after
x_T); every step, taken by solver_step from diffusers' own state (x, model output, last_sample
and the history of converted outputs), within STEP_RTOL of diffusers' step relative to the size
of its terms; the final x within ATOL = 1e-5.
The model is a fixed random nonlinear denoiser of (x, t) for the grid (cheap), a tiny random
UNet2DModel inside the same preconditioning for one case.
"""
import math
import types
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import UniPCMultistepScheduler  # noqa: E402

from ddpm_fast.solvers import table as tab  # noqa: E402
from ddpm_fast.solvers import unipc  # noqa: E402
from ddpm_fast.solvers.table import reference_sample, solver_step  # noqa: E402
from ddpm_fast.solvers.unipc import unipc_plan, unipc_settings  # noqa: E402

# diffusers 0.42's set_timesteps calls np.array on a tensor (NumPy 2's copy= deprecation)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ATOL = 1e-5                         # on the final sample (float32 steps, float64 coefficients)
STEP_RTOL = 1e-5                    # one step from diffusers' own state, relative to its terms
SHAPE = (2, 3, 8, 8)                # two images: thresholding's quantile is per image
RESULTS = {}                        # family → (worst |Δ| of a run, worst step error)


@pytest.fixture(autouse=True, scope="module")
def one_thread(single_torch_thread):
    yield
    # the worst case of each family, for the record (shown with pytest -s)
    for family, (err, step) in sorted(RESULTS.items()):
        print(f"{family:42s} run max |Δ| {err:.2g}   worst step {step:.2g}")


def scheduler_for(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return UniPCMultistepScheduler.from_config(config)


class Denoiser(torch.nn.Module):
    """tests/test_solvers_dpm.py's Denoiser (a small copy: that one reads ᾱ from a
    DPMSolverMultistepScheduler of the config): a fixed random nonlinear denoiser of (x, t) whose
    data prediction is EDM-preconditioned at the noise level l = σ_t/α_t (σ_d = 0.5),
        x̂0 = c_skip·x/α_t + c_out·F(c_in·x/α_t, t),
    F = 3·tanh(W·x + b·sin(f·t)) (x̂0 beyond ±1, so thresholding acts) or a given network's
    output, given back in the config's parameterisation (ε, v or x0): every sample stays of
    order 1, as with a trained model, so an absolute tolerance means what it says."""

    def __init__(self, config=None, channels=3, net=None):
        super().__init__()
        config = config or {}
        g = torch.Generator().manual_seed(1234)
        self.w = torch.randn(channels, channels, generator=g) * 0.6
        self.b = torch.randn(channels, 1, 1, generator=g)
        self.f = torch.rand(channels, 1, 1, generator=g) * 6
        self.net = net
        abar = scheduler_for(config).alphas_cumprod.double()
        self.a, self.s = abar.sqrt(), (1 - abar).sqrt()
        self.kind = config.get("prediction_type", "epsilon")

    def forward(self, x, t):
        dt = x.dtype                            # float64 for a yardstick run
        a, s = self.a[t].to(dt), self.s[t].to(dt)
        level, sd = s / a, 0.5
        norm2 = level ** 2 + sd ** 2
        x_in = x / a / norm2 ** 0.5                             # c_in·x_l
        if self.net is not None:
            f = self.net(x_in, t).sample
        else:
            f = 3 * torch.tanh(torch.einsum("oc,bchw->bohw", self.w.to(dt), x_in) +
                               self.b.to(dt) * torch.sin(self.f.to(dt) * t / 1000 + 1))
        x0 = sd ** 2 / norm2 * x / a + level * sd / norm2 ** 0.5 * f
        out = {"sample": x0, "epsilon": (x - a * x0) / s, "v_prediction": (a * x - x0) / s}
        out = out[self.kind]
        # diffusers' U-Nets give an object with .sample
        return types.SimpleNamespace(sample=out) if self.net is not None else out


def step_size(row, x, out, x_last, history, corrected):
    """Σ|coefficient·operand| of a step, the conversion m = P·x + Q·out and the corrector carried
    through their weights: the scale its float32 rounding is relative to (at a cosine schedule's
    first level 1/α ≈ 2·10⁴, so m's rounding alone is ~10⁻³ in diffusers' float32 too)."""
    m1, m2, m3 = (h.abs() for h in history)
    m = (row[tab.P] * x).abs() + (row[tab.Q] * out).abs()
    size = row[tab.KX].abs() * x.abs()
    if corrected:
        size = size + (row[tab.KL] * x_last).abs() + row[tab.K0].abs() * m + \
            row[tab.K1].abs() * m1 + row[tab.K2].abs() * m2 + row[tab.K3].abs() * m3
    size = row[tab.A].abs() * size + row[tab.B0].abs() * m + row[tab.B1].abs() * m1 + \
        row[tab.B2].abs() * m2
    return size.double().max().item()


def diffusers_loop(config, n, model, shape=SHAPE, seed=0, plan=None):
    """diffusers' canonical loop → (x, generator state, timesteps, worst step error). With a
    plan, each step is also taken by solver_step from diffusers' own state (teacher forcing: x,
    the model output, last_sample and the converted outputs it holds), and the worst |Δ| of a
    step relative to the size of its terms is returned."""
    scheduler = scheduler_for(config)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    scheduler.set_timesteps(n)
    worst = 0.0
    for k, t in enumerate(scheduler.timesteps):
        out = model(scheduler.scale_model_input(x, t), t)
        out = out if isinstance(out, torch.Tensor) else out.sample
        if plan is not None:          # diffusers' state before its step
            zeros = torch.zeros(shape)
            last = scheduler.last_sample if scheduler.last_sample is not None else zeros
            hist = [o if o is not None else zeros for o in scheduler.model_outputs[::-1]]
            hist = (hist + [zeros] * 3)[:3]
        x_next = scheduler.step(out, t, x).prev_sample
        if plan is not None:
            row = plan.table[k]
            state = [last.clone()] + [h.clone() for h in hist]
            ours = solver_step(plan, row, x, out, state)
            size = step_size(row, x, out, last, hist, plan.corrector)
            worst = max(worst, (ours - x_next).abs().max().item() / max(size, 1.0))
        x = x_next
    return x, g.get_state(), scheduler.timesteps.tolist(), worst


def check(config, n, family, model=None, shape=SHAPE, seed=0, tol=ATOL):
    """Our run against diffusers' canonical loop: the same timesteps, generator state after,
    every step within STEP_RTOL from diffusers' own state, the final x within `tol`."""
    model = model or Denoiser(config)
    plan = unipc_plan(config, n)
    want, want_state, want_ts, worst_step = diffusers_loop(config, n, model, shape, seed, plan)
    g = torch.Generator().manual_seed(seed)
    got = reference_sample(model, plan, shape, g)
    assert plan.timesteps == want_ts
    assert torch.equal(g.get_state(), want_state)
    assert torch.isfinite(want).all()
    assert worst_step <= STEP_RTOL, f"{config} n={n}: a step is off by {worst_step:.3g}"
    err = (got - want).abs().max().item()
    assert err <= tol, f"{config} n={n}: max |Δ| = {err:.3g} (tolerance {tol:.3g})"
    e0, w0 = RESULTS.get(family, (0.0, 0.0))
    RESULTS[family] = (max(e0, err), max(w0, worst_step))
    return err


# ---------------------------------------------------------------- the grid
# Families whose final sample is ill-conditioned in float32, so that diffusers' own float32 run
# is ~ATOL or more from exact arithmetic (and ours as close: test_ill_conditioned_families…).
# The noise-prediction form (predict_x0=False) multiplies x by α_t/α_s > 1 every step (up to
# ≈ 4000 from a zero-SNR start); a third-order last step onto sigma_min (lower_order_final=False)
# weighs the history by up to ±25, and third-order UniPC over few karras steps amplifies the
# rounding of its early steps. Every step of these still matches diffusers' within STEP_RTOL.
EPS_ATOL = 1e-3                     # predict_x0=False; measured ≤ 4e-4
ILL_ATOL = 2e-4                     # order 3 as above; measured ≤ 8e-5


def tol_for(config, n):
    if not config.get("predict_x0", True):
        return EPS_ATOL
    if config.get("solver_order", 2) == 3 and (
            not config.get("lower_order_final", True) or
            (config.get("use_karras_sigmas") and n <= 10)):
        return ILL_ATOL
    return ATOL


def zero_ok(config):
    """final_sigmas_type 'sigma_min' where diffusers' 'zero' gives NaN (bh1, predict_x0=False:
    refused, test_refused_settings_name_themselves)."""
    if config.get("solver_type") == "bh1" or not config.get("predict_x0", True):
        return {**config, "final_sigmas_type": "sigma_min"}
    return config


CORE = [(order, st, x0) for order in (1, 2, 3) for st in unipc.SOLVER_TYPES
        for x0 in (True, False)]


@pytest.mark.parametrize("order, solver_type, predict_x0", CORE)
def test_orders_solver_types_predict_x0(order, solver_type, predict_x0):
    config = zero_ok(dict(solver_order=order, solver_type=solver_type, predict_x0=predict_x0))
    for n in (7, 10, 13, 25):
        check(config, n, f"order {order} {solver_type} predict_x0={predict_x0}", seed=n,
              tol=tol_for(config, n))


@pytest.mark.parametrize("final, solver_type, predict_x0", [
    ("zero", "bh2", True), ("sigma_min", "bh2", True), ("sigma_min", "bh1", True),
    ("sigma_min", "bh2", False)])     # (bh1 and predict_x0=False onto zero: refused)
def test_karras_sigmas(final, solver_type, predict_x0):
    config = dict(use_karras_sigmas=True, final_sigmas_type=final, solver_type=solver_type,
                  predict_x0=predict_x0, solver_order=3)
    for n in (8, 16):
        check(config, n, f"karras {final} {solver_type} predict_x0={predict_x0}",
              tol=tol_for(config, n))


def test_karras_sigma_min_and_max():
    # UniPC's own sigma_min / sigma_max bound the karras ramp (a 'sigma_min' run ends there)
    config = dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=50.0, solver_order=3,
                  final_sigmas_type="sigma_min")
    plan = unipc_plan(config, 8)
    assert math.isclose(plan.sigmas[0], 50.0, rel_tol=1e-6)
    assert plan.sigmas[-1] == plan.sigmas[-2] and math.isclose(plan.sigmas[-1], 0.05,
                                                                 rel_tol=1e-6)
    for n in (8, 12):
        check(config, n, "karras sigma_min / sigma_max", tol=tol_for(config, n))
    check({**config, "final_sigmas_type": "zero", "sigma_min": None}, 9,
          "karras sigma_min / sigma_max", tol=tol_for(config, 9))


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_prediction_types(prediction, predict_x0):
    config = zero_ok(dict(prediction_type=prediction, predict_x0=predict_x0, solver_order=3))
    for n in (9, 15):
        check(config, n, f"{prediction} predict_x0={predict_x0}", tol=tol_for(config, n))


@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_lower_order_final(lower_order_final, final):
    orders = (1, 2, 3) if final == "sigma_min" or lower_order_final else (1,)
    for order in orders:
        config = dict(lower_order_final=lower_order_final, final_sigmas_type=final,
                      solver_order=order)
        plan = unipc_plan(config, 6)
        # UniPC lowers the order of the last steps whatever the number of steps
        want = [min(order, k + 1, 6 - k if lower_order_final else order) for k in range(6)]
        assert plan.orders == want
        for n in (4, 8, 20):
            check(config, n, f"lower_order_final={lower_order_final} {final}",
                  tol=tol_for(config, n))


@pytest.mark.parametrize("disabled", [[0], [2], [1, 3, 4]])
def test_disable_corrector(disabled):
    config = dict(disable_corrector=disabled, solver_order=3)
    plan = unipc_plan(config, 9)
    t = plan.table
    for k in range(9):
        has = k > 0 and k - 1 not in disabled
        assert (t[k, tab.KX] == 0) == has and (t[k, tab.K0] != 0) == has
    check(config, 9, "disable_corrector")
    check(zero_ok({**config, "predict_x0": False}), 12, "disable_corrector predict_x0=False",
          tol=EPS_ATOL)


def test_thresholding():
    config = dict(thresholding=True, solver_order=3, dynamic_thresholding_ratio=0.9,
                  sample_max_value=1.7)
    plan = unipc_plan(config, 8)
    assert plan.threshold == (0.9, 1.7) and bool((plan.table[:, tab.THRESH] == 1).all())
    check(config, 8, "thresholding")
    check({**config, "prediction_type": "sample", "solver_type": "bh1",
           "final_sigmas_type": "sigma_min"}, 12, "thresholding")
    # the thresholding is active: without it the sample differs
    model = Denoiser(config)
    assert not torch.allclose(diffusers_loop(config, 8, model)[0],
                              diffusers_loop({**config, "thresholding": False}, 8, model)[0])


@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("leading", 0), ("trailing", 0),
                                             ("linspace", 0), ("trailing", 1)])
def test_timestep_spacing(spacing, offset):
    config = dict(timestep_spacing=spacing, steps_offset=offset, solver_order=3)
    for n in (7, 11):
        check(config, n, "timestep_spacing")


def test_rescale_betas_zero_snr():
    # diffusers sets ᾱ_{T−1} = 2⁻²⁴ (not 0): the first σ/α of a trailing run is ≈ 4096, finite
    for kw in ({"prediction_type": "v_prediction"}, {"prediction_type": "epsilon"},
               {"prediction_type": "v_prediction", "solver_order": 3}):
        config = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", **kw}
        plan = unipc_plan(config, 10)
        assert plan.timesteps[0] == 999 and 4000 < plan.sigmas[0] < 4200
        check(config, 10, "rescale_betas_zero_snr")


def test_beta_schedules_and_aliases():
    check({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 10,
          "betas")
    betas = np.linspace(1e-4, 0.03, 500).tolist()
    check({"trained_betas": betas, "num_train_timesteps": 500, "solver_order": 3}, 10, "betas")
    # (from t = 999 the cosine schedule is ill-conditioned: test_ill_conditioned_families…)
    check({"beta_schedule": "squaredcos_cap_v2", "solver_order": 3,
           "timestep_spacing": "leading"}, 10, "betas")
    # diffusers maps DPM-Solver's solver types onto bh2
    for alias in ("midpoint", "heun", "logrho"):
        assert unipc_settings({"solver_type": alias})["solver_type"] == "bh2"
    check({"solver_type": "midpoint"}, 8, "aliases")


def test_ddpm_config_swap():
    # UniPCMultistepScheduler.from_config(a DDPM pipeline's scheduler_config.json): the spacing
    # comes along, DDPM's variance_type, clip_sample and clip_sample_range stay in the config
    # as "hidden" keys that UniPC ignores
    ddpm = {k: v for k, v in diffusers.DDPMScheduler().config.items() if not k.startswith("_")}
    ddpm["_class_name"] = "DDPMScheduler"
    swapped = scheduler_for(ddpm)
    config = {k: v for k, v in swapped.config.items() if not k.startswith("_")}
    assert config["variance_type"] == "fixed_small" and config["timestep_spacing"] == "leading"
    settings = unipc_settings(config)
    assert "clip_sample" not in settings and "variance_type" not in settings
    check(config, 10, "ddpm config swap")
    with pytest.raises(ValueError, match="skip_prk_steps"):   # other classes' keys: refused
        unipc_settings({**config, "skip_prk_steps": True})
    with pytest.raises(ValueError, match="variance_type"):    # a learned variance: refused
        unipc_settings({**config, "variance_type": "learned_range"})


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        norm_num_groups=4).eval()


@torch.no_grad()
def test_real_unet():
    # F of the preconditioned denoiser is a random tiny UNet2DModel (sample_size 8)
    config = {"solver_order": 3, "use_karras_sigmas": True, "disable_corrector": [1]}
    check(config, 10, "tiny UNet2DModel", model=Denoiser(config, net=tiny_unet()),
          tol=tol_for(config, 10))


@pytest.mark.parametrize("config, n", [
    (dict(solver_order=3, predict_x0=False, final_sigmas_type="sigma_min"), 10),
    (dict(use_karras_sigmas=True, predict_x0=False, final_sigmas_type="sigma_min",
          solver_order=3), 8),
    # a zero-SNR start in the noise-prediction form: α_t/α_s ≈ 4000 at the first step
    (dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", predict_x0=False,
          prediction_type="v_prediction", final_sigmas_type="sigma_min"), 8),
    # the cosine schedule from t = 999: 1/α ≈ 2·10⁴ in the first x̂0
    (dict(beta_schedule="squaredcos_cap_v2", solver_order=3), 10),
    (dict(use_karras_sigmas=True, solver_order=3), 8),
    (dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_order=3), 8),
])
def test_ill_conditioned_families_are_float32_limited(config, n):
    """Where ours and diffusers differ by more than ATOL, both float32 runs are that far from
    the same run in float64: ours within 2× diffusers' distance (STYLE.md's rule for a lower
    precision), so the gap is float32 rounding, not a coefficient (every step of these matches
    diffusers' within STEP_RTOL: check)."""
    model = Denoiser(config)
    plan = unipc_plan(config, n)
    want = diffusers_loop(config, n, model)[0].double()
    got = reference_sample(model, plan, SHAPE, torch.Generator().manual_seed(0)).double()
    exact = reference_sample(model, plan, SHAPE, torch.Generator().manual_seed(0),
                             dtype=torch.float64)
    theirs, ours = (want - exact).abs().max(), (got - exact).abs().max()
    assert (got - want).abs().max() > ATOL / 10       # a family that needs the yardstick
    assert ours <= 2 * theirs


def test_table_layout():
    plan = unipc_plan({"solver_order": 3, "final_sigmas_type": "sigma_min",
                       "lower_order_final": False}, 6)
    t, t64 = plan.table, plan.table64
    assert t.dtype == torch.float32 and t.shape == (6, tab.COLS) and plan.corrector
    assert plan.orders == [1, 2, 3, 3, 3, 3] == t[:, tab.ORDER].int().tolist()
    assert t[:, tab.T].long().tolist() == plan.timesteps
    assert t[:, tab.WORD].tolist() == [1001.0 + k for k in range(6)]           # Philox words
    assert bool((t[:, tab.C_IN] == 1).all()) and bool((t[:, tab.S] == 0).all())
    assert not plan.stochastic and plan.init_noise_sigma == 1.0
    # no corrector at step 0; then KX = 0: UniC restarts from x_last (the corrected x_{k−1})
    assert t[0, tab.KX] == 1 and bool((t[0, tab.KL:tab.K3 + 1] == 0).all())
    assert bool((t[1:, tab.KX] == 0).all())
    # the corrector has step k − 1's order: it reads m_k and `order` earlier outputs
    assert t[1, tab.K2] == 0 and t[2, tab.K3] == 0 and bool((t[3:, tab.K3] != 0).all())
    # the predictor reads order − 1 earlier outputs
    assert t[0, tab.B1] == 0 and t[1, tab.B2] == 0 and bool((t[2:, tab.B2] != 0).all())
    lv = plan.sigmas

    def ddim(k):            # first order (DDIM, Lu et al. 2022b) from level k to k + 1, x̂0
        a_t = 1 / math.sqrt(1 + lv[k + 1] ** 2)
        a_s = 1 / math.sqrt(1 + lv[k] ** 2)
        h = math.log(lv[k]) - math.log(lv[k + 1])
        return lv[k + 1] * a_t / (lv[k] * a_s), -a_t * math.expm1(-h)

    for k in range(6):
        a, b = ddim(k)
        assert math.isclose(t64[k, tab.A], a, rel_tol=1e-12)
        # the D differences sum to zero: the weights on m add up to DDIM's
        assert math.isclose(t64[k, tab.B0:tab.B2 + 1].sum(), b, rel_tol=1e-12)
        if k:
            a, b = ddim(k - 1)
            assert math.isclose(t64[k, tab.KL], a, rel_tol=1e-12)
            assert math.isclose(t64[k, tab.K0:tab.K3 + 1].sum(), b, rel_tol=1e-12)
    assert math.isclose(t64[0, tab.B0], ddim(0)[1], rel_tol=1e-12)
    # the order-1 corrector (ρ = ½, bh2) is the trapezoidal rule on m_{k−1}, m_k
    assert math.isclose(t64[1, tab.K0], ddim(0)[1] / 2, rel_tol=1e-12)
    assert math.isclose(t64[1, tab.K1], ddim(0)[1] / 2, rel_tol=1e-12)


def test_phi_functions():
    # z·φ_{j+1}(z) = φ_j(z) − 1/j!: series and recursion agree where both are accurate
    for j in (1, 2, 3):
        for z in (-0.999, -1.001, 0.999, 1.001, -3.0, 2.5):
            direct = math.expm1(z) / z
            for i in range(1, j):
                direct = (direct - 1 / math.factorial(i)) / z
            direct -= 1 / math.factorial(j)
            assert math.isclose(unipc._hh_phi(j, z), direct, rel_tol=1e-12)
        assert unipc._hh_phi(j, -math.inf) == -1 / math.factorial(j)     # the σ = 0 limit
        assert math.isclose(unipc._hh_phi(j, 1e-4), 1e-4 / math.factorial(j + 1), rel_tol=1e-4)


# ---------------------------------------------------------------- refusals
REFUSED = [
    ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ({"use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas"),
    ({"flow_shift": 3.0}, "flow_shift"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"shift_terminal": 0.5}, "shift_terminal"),
    ({"solver_p": "DPMSolverMultistepScheduler"}, "solver_p"),
    ({"time_shift_type": "linear"}, "time_shift_type"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"prediction_type": "x0"}, "prediction_type"),
    ({"solver_order": 4}, "solver_order"),
    ({"solver_order": 0}, "solver_order"),
    ({"solver_order": True}, "solver_order"),
    ({"solver_type": "rk4"}, "solver_type"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"variance_type": "learned"}, "variance_type"),
    ({"thresholding": True, "predict_x0": False, "final_sigmas_type": "sigma_min"},
     "thresholding"),
    ({"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    ({"thresholding": True, "sample_max_value": 0}, "sample_max_value"),
    ({"predict_x0": False}, "predict_x0"),
    ({"solver_type": "bh1"}, "solver_type"),
    ({"lower_order_final": False}, "lower_order_final"),
    ({"lower_order_final": False, "solver_order": 3}, "lower_order_final"),
    ({"disable_corrector": [0.5]}, "disable_corrector"),
    ({"disable_corrector": 0}, "disable_corrector"),
    ({"sigma_min": 0.1}, "sigma_min"),
    ({"sigma_max": 80.0}, "sigma_max"),
    ({"sigma_min": -1.0, "use_karras_sigmas": True}, "sigma_min"),
    ({"predict_x0": "yes"}, "predict_x0"),
    ({"lower_order_final": "yes"}, "lower_order_final"),
    ({"steps_offset": 1.5}, "steps_offset"),
    ({"num_train_timesteps": 1}, "num_train_timesteps"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"algorithm_type": "dpmsolver++"}, "algorithm_type"),
]


@pytest.mark.parametrize("config, name", REFUSED, ids=[n for _, n in REFUSED])
def test_refused_settings_name_themselves(config, name):
    with pytest.raises(ValueError, match=name):
        unipc_settings(config)
    with pytest.raises(ValueError, match=name):
        unipc_plan(config, 10)


def test_private_and_default_keys_carry_no_settings():
    config = {"_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.42.1",
              "use_beta_sigmas": True, "_use_default_values": ["use_beta_sigmas"],
              "clip_sample": True, "set_alpha_to_one": False, "variance_type": "fixed_large"}
    assert unipc_settings(config) == unipc.UNIPC_SCHEDULER_DEFAULTS
    assert unipc_settings(scheduler_for({}).config) == unipc.UNIPC_SCHEDULER_DEFAULTS
    # every argument of diffusers' class is known here, with diffusers' default
    import inspect
    params = inspect.signature(UniPCMultistepScheduler.__init__).parameters
    assert {k: p.default for k, p in params.items() if k != "self"} == \
        unipc.UNIPC_SCHEDULER_DEFAULTS


@pytest.mark.parametrize("config, n, reason", [
    # cosine betas: karras timesteps round to 999 twice
    ({"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 7, "AssertionError"),
    ({"timestep_spacing": "leading", "steps_offset": 1}, 999, "outside its training range"),
    ({}, 1000, "divide by zero"),             # linspace rounding repeats a noise level
    ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_order": 3,
      "lower_order_final": False}, 10, "karras levels end at σ_min"),
    ({}, 0, "num_inference_steps"),
])
def test_plans_diffusers_cannot_run_are_refused(config, n, reason):
    with pytest.raises(ValueError, match=reason):
        unipc_plan(config, n)


def test_diffusers_fails_where_refused():
    """The reasons given are diffusers' own behaviour (kept honest against new versions)."""
    small = (1, 3, 2, 2)

    def final(config, n=7, model=None):
        return diffusers_loop(config, n, model or Denoiser(config), shape=small)[0]

    # NaN onto σ = 0: bh1, the noise-prediction form, a last step of order ≥ 2
    for config in ({"solver_type": "bh1"}, {"predict_x0": False},
                   {"lower_order_final": False}, {"use_karras_sigmas": True, "solver_order": 3,
                                                  "final_sigmas_type": "sigma_min",
                                                  "lower_order_final": False}):
        assert not torch.isfinite(final(config)).all()
    with pytest.raises(RuntimeError):          # singular solve: torch's LinAlgError
        final({"lower_order_final": False, "solver_order": 3})
    # the same runs onto sigma_min are finite (the alternative the refusals name)
    for config in ({"solver_type": "bh1"}, {"predict_x0": False}, {"lower_order_final": False}):
        assert torch.isfinite(final({**config, "final_sigmas_type": "sigma_min"})).all()
    with pytest.raises(ValueError):
        scheduler_for({"shift_terminal": 0.5})
    with pytest.raises(IndexError):
        final({"solver_order": 0})
    with pytest.raises(AssertionError):
        final({"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True})
    # settings diffusers ignores: thresholding with predict_x0=False, sigma_min without karras
    base = {"predict_x0": False, "final_sigmas_type": "sigma_min"}
    assert torch.equal(final({**base, "thresholding": True}), final(base))
    assert torch.equal(final({"sigma_min": 0.1, "sigma_max": 80.0}), final({}))
    # a learned-variance model's 2·C channels: diffusers fails
    model = Denoiser()
    with pytest.raises(RuntimeError):
        final({}, model=lambda x, t: torch.cat([model(x, t)] * 2, 1))
    # orders above 3 diffusers runs: refused for the table's three history buffers only
    assert torch.isfinite(final({"solver_order": 4}, n=8)).all()
