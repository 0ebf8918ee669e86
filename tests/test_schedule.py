import math

import pytest
import torch

from ddpm_fast.schedule import A, B, C0, C1, C2, SIGMA, T_COL, Schedule


def test_linear_closed_forms():
    s = Schedule.linear()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar_T = torch.prod(1 - betas)
    assert s.alphas_cumprod[-1].item() == pytest.approx(abar_T.item(), rel=1e-12)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.035e-5, rel=1e-3)  # known value
    assert s.alphas_cumprod_prev[0] == 1.0
    # β̃_t = β_t (1-ᾱ_{t-1})/(1-ᾱ_t); β̃_1 = 0
    assert s.posterior_variance[0] == 0.0
    t = 500
    expect = betas[t] * (1 - s.alphas_cumprod[t - 1]) / (1 - s.alphas_cumprod[t])
    assert s.posterior_variance[t].item() == pytest.approx(expect.item(), rel=1e-12)


def test_cosine_schedule_shape():
    s = Schedule.cosine()
    assert s.betas.max() <= 0.999 and s.betas.min() > 0
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()


def test_float64_table_matches_posterior_coefficients():
    s = Schedule.linear()
    ts = s.timesteps()
    tab = s.step_table(ts, "fixed_small").double()
    i = 1000 - 1 - 500   # row of t = 500
    assert tab[i, T_COL] == 500
    assert tab[i, C0].item() == pytest.approx(s.posterior_mean_coef1[500].item(), rel=1e-6)
    assert tab[i, C1].item() == pytest.approx(s.posterior_mean_coef2[500].item(), rel=1e-6)
    assert tab[i, SIGMA].item() == pytest.approx(math.sqrt(s.posterior_variance[500]), rel=1e-6)
    assert tab[i, A].item() == pytest.approx(math.sqrt(1 - s.alphas_cumprod[500]), rel=1e-6)
    assert tab[-1, SIGMA] == 0      # no noise at t = 0
    assert (tab[:, C2] == 0).all()
    large = s.step_table(ts, "fixed_large").double()
    assert large[i, SIGMA].item() == pytest.approx(math.sqrt(s.betas[500]), rel=1e-6)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps", [1000, 50, 7])
def test_diffusers_numerics_match_scheduler(variance, steps):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(variance_type=variance)
    sched.set_timesteps(steps)
    s = Schedule.linear(numerics="diffusers")
    ts = s.timesteps(steps)
    assert ts == sched.timesteps.tolist()
    tab = s.step_table(ts, variance)
    for i in (0, len(ts) // 2, len(ts) - 1):
        t = ts[i]
        prev = sched.previous_timestep(t)
        abar, abar_prev = sched.alphas_cumprod[t], (sched.alphas_cumprod[prev] if prev >= 0 else sched.one)
        assert tab[i, A] == (1 - abar) ** 0.5
        assert tab[i, B] == abar ** 0.5
        assert tab[i, C0] == (abar_prev ** 0.5 * (1 - abar / abar_prev)) / (1 - abar)
        if t > 0:
            assert tab[i, SIGMA] == sched._get_variance(t) ** 0.5


def test_ddim_table_eta0_is_deterministic():
    s = Schedule.linear()
    tab = s.ddim_table(s.timesteps(50), eta=0.0)
    assert (tab[:, SIGMA] == 0).all() and (tab[:, C1] == 0).all()
    assert tab[-1, C0] == 1.0          # ᾱ_prev = 1 at the end: x_prev = x̂0


def test_ddim_table_previous_timestep_rule():
    s = Schedule.linear()
    abar = s.alphas_cumprod
    # any decreasing subset: ᾱ_prev is the run's next timestep (1 after the last)
    tab = s.ddim_table([999, 500, 0])
    want = torch.stack([abar[500], abar[0], torch.tensor(1.0, dtype=torch.float64)]) ** 0.5
    torch.testing.assert_close(tab[:, C0].double(), want, rtol=1e-6, atol=1e-7)
    # a run of timesteps(n): diffusers' rule t − T // n, even where it is not the next step
    s = Schedule.linear(timestep_spacing="linspace")
    ts = s.timesteps(3)                      # [999, 500, 0]: t − 333 is 666 for 999
    assert ts == [999, 500, 0]
    tab = s.ddim_table(ts)
    want = torch.stack([abar[t - 333] if t >= 333 else torch.tensor(1.0, dtype=torch.float64)
                        for t in ts]) ** 0.5
    torch.testing.assert_close(tab[:, C0].double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [dict(num_inference_steps=0), dict(num_inference_steps=1001)])
def test_bad_step_counts(bad):
    with pytest.raises(ValueError, match="num_inference_steps"):
        Schedule.linear().timesteps(**bad)


def test_bad_tables():
    s = Schedule.linear()
    with pytest.raises(ValueError, match="variance"):
        s.step_table([10, 5], "fixed_large_log")
    with pytest.raises(ValueError, match="decreasing"):
        s.step_table([5, 10])
    with pytest.raises(ValueError, match="eta"):
        s.ddim_table([10, 5], eta=2)
