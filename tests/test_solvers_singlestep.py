"""ddpm_fast.solvers.singlestep against diffusers' DPMSolverSinglestepScheduler.

As tests/test_solvers_dpm.py (the same denoiser): diffusers' canonical loop and reference_sample
from the same seed give the same timesteps, step orders and generator state after; every step,
taken by solver_step from diffusers' own state (x, the group's start sample, model output,
noise), is within STEP_RTOL of diffusers' step relative to the size of its terms; the final x is
within ATOL = 1e-5, or, for the families whose float32 run is ill-conditioned, ours is within 2×
diffusers' own distance from the float64 run of the same plan.
"""
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverSinglestepScheduler  # noqa: E402

from conftest import redraw_step_noise  # noqa: E402
from ddpm_fast.solvers import reference_sample, singlestep_plan  # noqa: E402
from ddpm_fast.solvers import singlestep as ss  # noqa: E402
from ddpm_fast.solvers import table as tab  # noqa: E402
from ddpm_fast.solvers.table import initial_state, solver_step  # noqa: E402
from test_solvers_dpm import Denoiser  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("single_torch_thread")]

ATOL = 1e-5
STEP_RTOL = 1e-5
SHAPE = (2, 3, 8, 8)


def _scheduler(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # algorithm_type dpmsolver is deprecated there
        return DPMSolverSinglestepScheduler.from_config(config)


def diffusers_loop(config, n, model, plan=None, seed=0):
    """diffusers' canonical loop → (x, generator state, timesteps, orders, worst step error);
    with a plan, each step is also taken by solver_step from diffusers' own state."""
    scheduler = _scheduler(config)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * scheduler.init_noise_sigma
    scheduler.set_timesteps(n)
    worst, state = 0.0, initial_state(x)
    for k, t in enumerate(scheduler.timesteps):
        out = model(scheduler.scale_model_input(x, t), t)
        before = g.get_state()
        x_next = scheduler.step(out, t, x, generator=g).prev_sample
        if plan is not None:
            z = redraw_step_noise(g, before, SHAPE, plan.stochastic)
            row = plan.table[k]
            start = x if row[tab.KX] == 1 else state[0]      # the group's start sample
            assert torch.equal(start, scheduler.sample)
            m1, m2 = state[1], state[2]
            ours = solver_step(plan, row, x, out, state, z)
            terms = [row[tab.A] * start, row[tab.B0] * state[1], row[tab.B1] * m1,
                     row[tab.B2] * m2] + ([row[tab.S] * z] if z is not None else [])
            size = sum(v.double().abs() for v in terms).max().item()
            worst = max(worst, (ours - x_next).abs().max().item() / max(size, 1.0))
        x = x_next
    return x, g.get_state(), scheduler.timesteps.tolist(), scheduler.order_list, worst


def ill_conditioned(config) -> bool:
    """Families whose float32 runs sit ≥ ATOL from exact arithmetic: the noise-prediction
    solver (α_t/α_s ≈ 2 a step multiplies x, ε̂ differences by σ_t(e^h − 1)/h), and
    sde-dpmsolver++'s third-order heun step, whose D2 weight tends to −½·α_t, not 0, as h → 0
    (diffusers' convention: a large weight on a difference of noisy outputs), and cosine
    betas' karras levels (COSINE_KARRAS)."""
    if COSINE_KARRAS.items() <= config.items():
        return True
    return config.get("algorithm_type") == "dpmsolver" or (
        config.get("algorithm_type") == "sde-dpmsolver++" and
        config.get("solver_order") == 3 and config.get("solver_type") == "heun")


# cosine betas' karras levels start at σ/α ≈ 2e4, with λ steps of 1e-3 between the first
# levels: diffusers' float32 r0 = h_0/h loses digits there (steps within 1e-4 of their terms;
# the final sample within the float64 yardstick)
COSINE_KARRAS = {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}


def check(config, n, model=None, seed=0, step_rtol=STEP_RTOL):
    model = model or Denoiser(config)
    plan = singlestep_plan(config, n)
    want, want_state, want_ts, want_orders, worst = diffusers_loop(config, n, model, plan, seed)
    g = torch.Generator().manual_seed(seed)
    got = reference_sample(model, plan, SHAPE, g)
    assert plan.timesteps == want_ts and plan.orders == want_orders
    assert torch.equal(g.get_state(), want_state)
    assert torch.isfinite(want).all()
    assert worst <= step_rtol, f"{config} n={n}: a step is off by {worst:.3g}"
    err = (got - want).abs().max().item()
    if err <= ATOL:
        return
    assert ill_conditioned(config), f"{config} n={n}: max |Δ| = {err:.3g}"
    exact = reference_sample(model, plan, SHAPE, torch.Generator().manual_seed(seed),
                             dtype=torch.float64)
    theirs, ours = (want.double() - exact).abs().max(), (got.double() - exact).abs().max()
    assert ours <= 2 * theirs, f"{config} n={n}: ours {ours:.3g}, diffusers' {theirs:.3g}"


def zero_ok(algorithm):
    return {} if algorithm in ("dpmsolver++", "sde-dpmsolver++") else \
        {"final_sigmas_type": "sigma_min"}


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("algorithm", ss.ALGORITHM_TYPES)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_orders_algorithms_solver_types(order, algorithm, solver_type):
    config = dict(solver_order=order, algorithm_type=algorithm, solver_type=solver_type,
                  **zero_ok(algorithm))
    for n in (7, 9, 12):                 # each remainder of 3 and of 2
        check(config, n, seed=n)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("order", [2, 3])
def test_final_sigmas_and_lower_order_final(final, lower_order_final, order):
    config = dict(final_sigmas_type=final, lower_order_final=lower_order_final,
                  solver_order=order)
    for n in (6, 7, 8):                  # multiples of the order keep lower_order_final off
        check(config, n)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_karras_sigmas(algorithm):
    for n, st in ((8, "midpoint"), (13, "heun")):
        check({"use_karras_sigmas": True, "solver_order": 3, "algorithm_type": algorithm,
               "solver_type": st}, n)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
@pytest.mark.parametrize("algorithm", ss.ALGORITHM_TYPES)
def test_prediction_types(prediction, algorithm):
    check({"prediction_type": prediction, "solver_order": 3, "algorithm_type": algorithm,
           **zero_ok(algorithm)}, 9)


def test_thresholding_betas_clipping_and_learned_variance():
    config = dict(thresholding=True, solver_order=3, dynamic_thresholding_ratio=0.9,
                  sample_max_value=1.7)
    check(config, 8)
    model = Denoiser(config)               # the thresholding acts: without it x differs
    assert not torch.allclose(diffusers_loop(config, 8, model)[0],
                              diffusers_loop({**config, "thresholding": False}, 8, model)[0])
    # cosine betas with the usual clip; karras timesteps are rounded here (the multistep
    # scheduler truncates them: 998 twice at 4 steps), and at 6 steps and more the first one
    # repeats, which diffusers cannot run (refused)
    check({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
           "solver_order": 3}, 10)
    assert singlestep_plan(COSINE_KARRAS, 4).timesteps == [999, 998, 983, 0]
    check(COSINE_KARRAS, 5, step_rtol=1e-4)
    with pytest.raises(ValueError, match="first timestep 999 repeats"):
        singlestep_plan(COSINE_KARRAS, 6)
    check({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 10)
    config = {"variance_type": "learned_range", "solver_order": 2}
    check(config, 8, model=Denoiser(config, out_channels=6))


def test_ddpm_config_swap_ignores_what_diffusers_ignores():
    # DPMSolverSinglestepScheduler.from_config(a DDPM pipeline's config): timestep_spacing,
    # steps_offset and clip_sample come along as hidden keys the class ignores
    ddpm = {k: v for k, v in diffusers.DDPMScheduler(timestep_spacing="trailing",
                                                     steps_offset=1).config.items()
            if not k.startswith("_")}
    config = {k: v for k, v in _scheduler(ddpm).config.items() if not k.startswith("_")}
    assert config["timestep_spacing"] == "trailing"
    assert "timestep_spacing" not in ss.singlestep_settings(config)
    check(config, 10)


def test_table_layout_and_group_start():
    plan = singlestep_plan({"solver_order": 3, "final_sigmas_type": "sigma_min",
                            "lower_order_final": False}, 6)
    t = plan.table
    assert plan.orders == [1, 2, 3, 1, 2, 3] == t[:, tab.ORDER].int().tolist()
    # a group's first step starts from x, the others from its start sample (x_last)
    assert t[:, tab.KX].tolist() == [1, 0, 0, 1, 0, 0]
    assert t[:, tab.KL].tolist() == [0, 1, 1, 0, 1, 1] and plan.corrector
    assert bool((t[:, tab.K0:tab.K3 + 1] == 0).all())
    # order 2 from the start σ_s1: D0 = m1, D1 = (m − m1)/r0; B0 + B1 is D0's weight α_t(1 − σ_t/σ_s1)
    s1, s_t = plan.sigmas[3], plan.sigmas[5]
    a_t = 1 / (1 + s_t * s_t) ** 0.5
    assert abs(float(t[4, tab.B0] + t[4, tab.B1]) - a_t * (1 - s_t / s1)) < 1e-6
    assert t[4, tab.B2] == 0 and t[3, tab.B1] == 0


def test_steps_orders_follow_get_order_list():
    for order in (1, 2, 3):
        for lof in (True, False):
            for final in ("zero", "sigma_min"):
                for n in range(1, 14):
                    config = dict(solver_order=order, lower_order_final=lof,
                                  final_sigmas_type=final)
                    sched = _scheduler(config)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        sched.set_timesteps(n)
                    cfg = ss.singlestep_settings(config)
                    assert ss.step_orders(cfg, n) == sched.order_list, (config, n)
                    assert ss.lower_order_final(cfg, n) == sched.config.lower_order_final


def test_our_scheduler_switches_lower_order_final_as_diffusers():
    from ddpm_fast.schedulers import DPMSolverSinglestepScheduler as Ours

    ours = Ours(solver_order=2, final_sigmas_type="sigma_min")
    ours.set_timesteps(8)
    assert not ours.config["lower_order_final"]
    ours.set_timesteps(7)                  # odd: diffusers switches it on for good
    assert ours.config["lower_order_final"]


REFUSED = [
    ({"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
    ({"thresholding": True, "algorithm_type": "dpmsolver",
      "final_sigmas_type": "sigma_min"}, "thresholding"),
    ({"algorithm_type": "dpmsolver"}, "final_sigmas_type"),
    ({"solver_order": 4}, "solver_order"),
    ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"use_lu_lambdas": True}, "use_lu_lambdas"),       # a multistep setting
    ({"euler_at_final": True}, "euler_at_final"),
]


@pytest.mark.parametrize("config, named", REFUSED)
def test_refused_by_name(config, named):
    with pytest.raises(ValueError, match=named):
        singlestep_plan(config, 10)
