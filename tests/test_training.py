"""Training: the loss falls on the digits, EMA is the exponential average, resume is exact, and a
checkpoint write that dies half-way leaves the previous checkpoint loadable."""
import math

import numpy as np
import pytest
import torch

from ddpm_fast.training import DIGITS_CONFIG, TrainConfig, digits_dataset, ema_update, train
from ddpm_fast.unet import UNet2DModel, UNetConfig

pytest.importorskip("sklearn")

SMALL = UNetConfig(**{**DIGITS_CONFIG.__dict__, "block_out_channels": (16, 32, 32),
                      "norm_num_groups": 8, "dropout": 0.1})


def _quiet(*_):
    pass


def _model():
    torch.manual_seed(123)          # the same initial weights for every run of a test
    return UNet2DModel(SMALL)


def test_loss_decreases_on_digits():
    torch.manual_seed(0)
    cfg = TrainConfig(steps=150, batch_size=32, lr=1e-3, warmup=10, log_every=0,
                      checkpoint_every=10**9)
    _, losses = train(UNet2DModel(SMALL), digits_dataset(8), cfg, log=_quiet)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


AUTOCAST_RUN = dict(steps=40, batch_size=16, lr=1e-3, warmup=5, log_every=0,
                   checkpoint_every=10**9)


@pytest.fixture(scope="module")
def fp32_curve():
    """The fp32 loss curve both autocast cases compare with: the same run for each (same initial
    weights, data and seeds), so it is trained once."""
    _, losses = train(_model(), digits_dataset(8, "train")[:256], TrainConfig(**AUTOCAST_RUN),
                      log=_quiet)
    return losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_training_follows_fp32(precision, fp32_curve):
    data = digits_dataset(8, "train")[:256]
    ref = fp32_curve
    _, low = train(_model(), data, TrainConfig(precision=precision, **AUTOCAST_RUN), log=_quiet)
    assert all(map(math.isfinite, low))
    # same data and noise draws: the low-precision curve tracks the fp32 one
    assert abs(sum(low[-10:]) - sum(ref[-10:])) / sum(ref[-10:]) < 0.15, (ref[-10:], low[-10:])
    assert sum(low[-10:]) < 0.6 * sum(low[:10])


def test_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        train(_model(), digits_dataset(8)[:8], TrainConfig(steps=1, precision="fp8"), log=_quiet)


def test_ema_update_is_exponential_average():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())


def test_resume_is_exact(tmp_path):
    data = digits_dataset(8)[:256]
    cfg = dict(batch_size=8, lr=1e-3, warmup=2, log_every=0, checkpoint_every=3, seed=5)
    _, full = train(_model(), data, TrainConfig(steps=6, **cfg), log=_quiet)
    train(_model(), data, TrainConfig(steps=3, **cfg), out_dir=tmp_path, log=_quiet)
    ema, rest = train(_model(), data, TrainConfig(steps=6, **cfg), out_dir=tmp_path,
                      resume=True, log=_quiet)
    assert rest == full[3:]          # the same loss curve, bit for bit


def test_crash_mid_checkpoint_keeps_last_good(tmp_path, monkeypatch):
    data = digits_dataset(8)[:64]

    def cfg(steps):
        return TrainConfig(steps=steps, batch_size=4, log_every=0, checkpoint_every=2)

    train(_model(), data, cfg(2), out_dir=tmp_path, log=_quiet)
    assert (tmp_path / "latest").read_text() == "step-00000002"

    import ddpm_fast.training as training

    def dying_save(obj, f, *a, **k):   # the optimizer-state write dies half-way
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(training.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        train(_model(), data, cfg(4), out_dir=tmp_path, resume=True, log=_quiet)
    monkeypatch.undo()
    # `latest` still names the whole step-2 checkpoint; the half-written one is gone
    assert (tmp_path / "latest").read_text() == "step-00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002"]
    _, losses = train(_model(), data, cfg(3), out_dir=tmp_path, resume=True, log=_quiet)
    assert len(losses) == 1          # resumed at step 2, ran step 3


def test_resume_with_another_model_is_refused(tmp_path):
    data = digits_dataset(8)[:16]
    cfg = TrainConfig(steps=1, batch_size=4, log_every=0, checkpoint_every=1)
    train(_model(), data, cfg, out_dir=tmp_path, log=_quiet)
    other = UNet2DModel(UNetConfig(**{**SMALL.__dict__, "block_out_channels": (16, 32, 64)}))
    with pytest.raises(ValueError, match=r"U-Net differs from this run's \(block_out_channels\)"):
        train(other, data, TrainConfig(steps=2, batch_size=4, log_every=0), out_dir=tmp_path,
              resume=True, log=_quiet)


def test_bad_data_shape():
    with pytest.raises(ValueError, match="does not fit the model"):
        train(UNet2DModel(SMALL), torch.zeros(4, 3, 8, 8), TrainConfig(steps=1), log=_quiet)


def test_bits_per_dim_of_shipped_model_beats_untrained():
    from ddpm_fast.checkpoints import load_unet
    from ddpm_fast.cli import default_model_path
    from ddpm_fast.likelihood import bits_per_dim
    from ddpm_fast.schedule import Schedule

    x = digits_dataset(8, "test")[:32]                   # held out from the shipped model
    x = ((x + 1) * 127.5).round() / 127.5 - 1            # 8-bit data for the discretised decoder
    s = Schedule.linear()
    kw = dict(num_terms=48, generator=torch.Generator().manual_seed(0))
    trained = bits_per_dim(load_unet(default_model_path()), s, x, **kw)
    untrained = bits_per_dim(_model().eval(), s, x, **kw)
    t = trained["total"].mean().item()
    # measured: 4.57 bits/dim with all 999 terms on 64 held-out digits; 7.7 untrained
    assert torch.isfinite(trained["total"]).all() and 2.0 < t < 6.0
    assert t < untrained["total"].mean().item() - 1.0
    assert trained["prior"].max() < 1e-3            # L_T ≈ 0 for the linear schedule


def _original_discretized_ll(x, means, log_scales):
    """Ho et al.'s diffusion_utils_2.discretized_gaussian_log_likelihood, transcribed to numpy
    float64 element by element (its approx_standard_normal_cdf included)."""
    import math

    def approx_cdf(v):
        return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))

    out = np.empty_like(x)
    for i, (xi, m, ls) in enumerate(zip(x.flat, means.flat, log_scales.flat)):
        inv_stdv = math.exp(-ls)
        cdf_plus = approx_cdf(inv_stdv * (xi - m + 1. / 255.))
        cdf_min = approx_cdf(inv_stdv * (xi - m - 1. / 255.))
        if xi < -0.999:
            out.flat[i] = math.log(max(cdf_plus, 1e-12))
        elif xi > 0.999:
            out.flat[i] = math.log(max(1. - cdf_min, 1e-12))
        else:
            out.flat[i] = math.log(max(cdf_plus - cdf_min, 1e-12))
    return out


def test_decoder_uses_the_original_tanh_cdf_and_exact_is_an_option():
    import math

    from ddpm_fast.likelihood import (_discretized_gaussian_log_likelihood,
                                    approx_standard_normal_cdf, standard_normal_cdf)

    v = torch.linspace(-6, 6, 241, dtype=torch.float64)
    want = [0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3))) for a in v.tolist()]
    torch.testing.assert_close(approx_standard_normal_cdf(v), torch.tensor(want, dtype=torch.float64),
                               rtol=0, atol=1e-15)
    exact = [0.5 * (1 + math.erf(a / math.sqrt(2))) for a in v.tolist()]
    torch.testing.assert_close(standard_normal_cdf(v), torch.tensor(exact, dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert 1e-5 < (approx_standard_normal_cdf(v) - standard_normal_cdf(v)).abs().max() < 1e-3

    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (2, 1, 6, 6), generator=g).double() / 127.5 - 1)
    x[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])                # both edge bins
    mean = x + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    log_scale = torch.full_like(x, math.log(0.01))
    ours = _discretized_gaussian_log_likelihood(x, mean, log_scale)
    ref = _original_discretized_ll(x.numpy(), mean.numpy(), log_scale.numpy())
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12, atol=1e-12)
    erf = _discretized_gaussian_log_likelihood(x, mean, log_scale, exact_cdf=True)
    assert not torch.allclose(erf, ours, rtol=0, atol=1e-6)

    # the bits/dim keyword switches the decoder term only (same noise, same KL terms)
    from ddpm_fast.likelihood import bits_per_dim
    from ddpm_fast.schedule import Schedule

    torch.manual_seed(0)
    model, s = _model().eval(), Schedule.linear()
    x8 = digits_dataset(8, "test")[:4]
    x8 = ((x8 + 1) * 127.5).round() / 127.5 - 1
    a = bits_per_dim(model, s, x8, num_terms=3, generator=torch.Generator().manual_seed(0))
    b = bits_per_dim(model, s, x8, num_terms=3, generator=torch.Generator().manual_seed(0),
                     exact_cdf=True)
    assert torch.equal(a["kl"], b["kl"]) and not torch.equal(a["decoder"], b["decoder"])


def _ddp_worker(rank, world_size, init_file, out_dir, result_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        torch.set_num_threads(1)
        data = digits_dataset(8)[:128]
        cfg = TrainConfig(steps=3, batch_size=4, log_every=0, checkpoint_every=3)
        ema, losses = train(_model(), data, cfg, out_dir=out_dir, log=_quiet)
        flat = torch.cat([p.detach().flatten() for p in ema.parameters()])
        torch.save({"params": flat, "losses": losses}, f"{result_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_training(tmp_path):
    import torch.multiprocessing as mp

    out, res = tmp_path / "ckpt", tmp_path / "res"
    res.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out), str(res)), nprocs=2)
    r0 = torch.load(res / "rank0.pt", weights_only=True)
    r1 = torch.load(res / "rank1.pt", weights_only=True)
    assert torch.equal(r0["params"], r1["params"])       # gradients averaged: one model
    assert r0["losses"] != r1["losses"]                   # but different data on each rank
    assert (out / "latest").read_text() == "step-00000003"
    states = torch.load(out / "step-00000003" / "rng.pt", weights_only=True)["torch"]
    assert len(states) == 2                               # each rank's RNG, for exact resume


def test_nan_loss_stops_training_before_a_checkpoint(tmp_path):
    """A NaN loss ends training with an error naming the step, before any checkpoint could keep
    the broken weights (the losses are read back at log and checkpoint steps, not every step)."""
    from ddpm_fast.training import TrainingDivergedError

    data = torch.full((8, 1, 8, 8), float("nan"))
    cfg = TrainConfig(steps=6, batch_size=4, log_every=3, checkpoint_every=3)
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 1 \(checked at step 3\)"):
        train(_model(), data, cfg, out_dir=tmp_path / "run", log=_quiet)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_fp16_scaler_skips_are_not_divergence():
    """Under fp16's gradient scaler an overflowing step is skipped, so an Inf loss inside the
    window is tolerated; one at the latest step is not."""
    from ddpm_fast.training import TrainingDivergedError, _host_losses

    inf = float("inf")
    window = [torch.tensor(v) for v in (0.5, inf, 0.4)]
    assert _host_losses(window, 3, scaled=True)[::2] == [0.5, 0.4000000059604645]
    with pytest.raises(TrainingDivergedError, match=r"inf at step 2 \(checked at step 3\)"):
        _host_losses(window, 3, scaled=False)
    with pytest.raises(TrainingDivergedError, match=r"inf at step 2 \(checked at step 3\)"):
        _host_losses(window[:2] + [torch.tensor(inf)], 3, scaled=True)
    with pytest.raises(TrainingDivergedError, match=r"nan at step 3 \(checked at step 3\)"):
        _host_losses(window[:1] + [torch.tensor(0.3), torch.tensor(float("nan"))], 3, scaled=True)


def test_uint8_data_trains_like_float_data():
    """Pixels kept as uint8 and converted a batch at a time: the same losses, bit for bit."""
    from ddpm_fast.data import to_model_space

    pixels = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=5, batch_size=8, log_every=0, checkpoint_every=10**9, hflip=True)
    _, from_uint8 = train(_model(), pixels, cfg, log=_quiet)
    _, from_float = train(_model(), to_model_space(pixels), cfg, log=_quiet)
    assert from_uint8 == from_float


@pytest.mark.parametrize("kind", ["cosine", "bare_betas"])
def test_training_records_its_schedule(tmp_path, kind):
    import json

    from ddpm_fast.checkpoints import load_scheduler_config
    from ddpm_fast.pipeline import DDPMPipeline
    from ddpm_fast.schedule import Schedule, linear_betas

    if kind == "cosine":      # a non-default schedule with non-default spacing
        schedule = Schedule.cosine(timestep_spacing="trailing")
    else:                     # betas with no diffusers name: written as trained_betas
        schedule = Schedule(linear_betas(100, 1e-3, 0.05))
    data = digits_dataset(8)[:8]
    train(_model(), data, TrainConfig(steps=2, batch_size=4, log_every=0, checkpoint_every=2),
          schedule=schedule, out_dir=tmp_path / "run" / "checkpoint", log=_quiet)
    config = load_scheduler_config(tmp_path / "run")
    assert config == json.loads(json.dumps(schedule.scheduler_config()))
    if kind == "cosine":
        assert config["beta_schedule"] == "squaredcos_cap_v2"
        assert config["timestep_spacing"] == "trailing"
    pipe = DDPMPipeline.from_pretrained(tmp_path / "run", numerics="float64")
    assert torch.equal(pipe.schedule.betas, schedule.betas)
    assert pipe.schedule.timesteps(10) == schedule.timesteps(10)
    # resuming with another schedule is refused, like another U-Net
    with pytest.raises(ValueError, match="trained with another schedule"):
        train(_model(), data, TrainConfig(steps=3, batch_size=4, log_every=0),
              out_dir=tmp_path / "run" / "checkpoint", resume=True, log=_quiet)


def test_cli_train_pipeline_folder_has_the_trained_schedule(tmp_path):
    import json

    from ddpm_fast import cli
    from ddpm_fast.checkpoints import DEFAULT_SCHEDULER
    from ddpm_fast.schedule import Schedule, check_scheduler_config

    assert cli.main(["train", "--train-steps", "1", "--batch-size", "2", "--preset", "tiny",
                     "--out", str(tmp_path / "r"), "--device", "cpu"]) == 0
    written = json.loads((tmp_path / "r" / "pipeline" / "scheduler" / "scheduler_config.json")
                         .read_text())
    assert written == json.loads(json.dumps(Schedule.linear().scheduler_config()))
    assert check_scheduler_config(written) == check_scheduler_config(DEFAULT_SCHEDULER)
