"""Issue 16: every DDPMScheduler setting of a diffusers folder is honoured exactly or refused by
name, never ignored. Reference mode is compared with diffusers' DDPMPipeline on a saved tiny
random model (same torch.Generator); fast mode (fp32) with reference mode on the same Philox
noise; the step kernels with the torch reference on each new kind of table row."""
import importlib
import json

import pytest
import torch

from conftest import TRITON

import ddpm_fast
from ddpm_fast.checkpoints import CheckpointError, load_scheduler_config
from ddpm_fast.ops import backend
from ddpm_fast.ops.ddpm_step import ddpm_step, ddpm_step_reference
from ddpm_fast.schedule import Schedule, check_scheduler_config
from ddpm_fast.unet import PRESETS, UNet2DModel

diffusers = pytest.importorskip("diffusers")

STEPS = 20

# Each honoured setting (beyond the defaults, which tests/test_pipeline.py covers at 1000 steps).
# Zero terminal SNR is paired with "trailing" spacing so that the run starts at t = 999, ᾱ = 0.
HONOURED = {
    "clip_sample_range=0.5": dict(clip_sample_range=0.5),
    "clip_sample_range=0.7": dict(clip_sample_range=0.7),
    "rescale_betas_zero_snr": dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "v_prediction": dict(prediction_type="v_prediction"),
    "sample": dict(prediction_type="sample"),
    "v_prediction+zero_snr": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing", clip_sample=False),
    "fixed_small_log": dict(variance_type="fixed_small_log"),
    "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.9,
                         sample_max_value=1.5),
    "scaled_linear": dict(beta_schedule="scaled_linear"),
    "sigmoid": dict(beta_schedule="sigmoid"),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "laplace": dict(beta_schedule="laplace"),
    "trained_betas": dict(trained_betas=torch.linspace(1e-4, 0.03, 1000, dtype=torch.float64)
                          .tolist()),
    "linspace": dict(timestep_spacing="linspace"),
    "steps_offset=1": dict(steps_offset=1),
}


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    d = PRESETS["tiny"].to_dict()
    d.pop("_class_name")
    return diffusers.UNet2DModel(**d).eval()


def _save(path, unet, **sched):
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**sched))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(path)
    return pipe


def _images(pipe, **kw):
    kw.setdefault("generator", torch.manual_seed(7))
    return pipe(batch_size=2, num_inference_steps=STEPS, output_type="pt", **kw).images


@pytest.fixture(scope="module")
def default_images(tiny_unet, tmp_path_factory):
    path = tmp_path_factory.mktemp("default")
    _save(path, tiny_unet)
    return _images(ddpm_fast.DDPMPipeline.from_pretrained(path))


@pytest.mark.parametrize("name", list(HONOURED))
def test_reference_mode_equals_diffusers(tmp_path, tiny_unet, default_images, name):
    theirs = _save(tmp_path, tiny_unet, **HONOURED[name])
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    a, b = _images(theirs), _images(ours)
    assert torch.isfinite(b).all()
    assert torch.equal(a, b), (a - b).abs().max()        # bit for bit, like the defaults
    # the setting is not ignored: the images are not the default config's (fixed_small_log is
    # fixed_small's σ in exact arithmetic: there only the rounding differs, as in diffusers)
    if name == "fixed_small_log":
        assert not torch.equal(b, default_images)
    else:
        assert (b - default_images).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(HONOURED))
def test_fast_mode_fp32_agrees_with_reference(tmp_path, tiny_unet, name):
    _save(tmp_path, tiny_unet, **HONOURED[name])
    ref = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, numerics="float64")
    fast = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, mode="fast", dtype=torch.float32)
    # the same Philox noise (seed=): the fast path is the same computation
    a = _images(ref, generator=None, seed=3)
    b = _images(fast, generator=None, seed=3)
    assert (a - b).abs().max() <= 1e-5


def _row_kinds():
    """Tables whose rows use the generalised columns: x̂0 = (D·x − A·out)/B and a clip range."""
    out = {}
    for name in ("clip_sample_range=0.7", "v_prediction", "sample", "v_prediction+zero_snr",
                 "fixed_small_log"):
        s = Schedule.from_scheduler_config(HONOURED[name], "diffusers")
        ts = s.timesteps(STEPS)
        out[name] = s.step_table(ts, "fixed_small_log" if "log" in name else "fixed_small")
        out[name + " ddim"] = s.ddim_table(ts, eta=0.5)
    return out


@pytest.mark.parametrize("which", ["native", "triton"])
def test_step_kernels_equal_torch_reference_on_new_rows(which):
    if which == "triton" and not TRITON:
        pytest.skip("triton is a Linux-only test extra; not installed here")
    if which == "native" and not backend.native_available(torch.device("cpu")):
        pytest.skip("ddpm_fast._C is not built (a source checkout without pip install)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=g) * 2
    eps = torch.randn(2, 3, 5, 7, generator=g)
    key = torch.tensor([5, 1])
    # the interpreter pays per launch: Triton gets one noisy row per table, in-kernel Philox
    rows = (1,) if which == "triton" else (0, 1, STEPS - 1)
    noises = (None,) if which == "triton" else (None, torch.randn(x.shape, generator=g))
    for name, table in _row_kinds().items():
        for i in rows:
            step = torch.tensor([i])
            for noise in noises:
                for clip in (True, False):
                    want = ddpm_step_reference(x, eps, table, step, key, noise, clip)
                    with backend.use_backend(which):
                        got = ddpm_step(x, eps, table, step, key, noise, clip)
                    assert torch.equal(got, want), (name, i, clip, (got - want).abs().max())


def test_use_default_values_is_followed_like_diffusers(tmp_path, tiny_unet, default_images):
    # diffusers drops the keys "_use_default_values" lists and takes their defaults
    _save(tmp_path, tiny_unet)
    p = tmp_path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(clip_sample_range=0.5, _use_default_values=["clip_sample_range"])
    p.write_text(json.dumps(cfg))
    theirs = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    theirs.set_progress_bar_config(disable=True)
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    assert torch.equal(_images(ours), default_images)
    assert torch.equal(_images(theirs), default_images)


# ---------------------------------------------------------------------- refused, by name

REFUSED = [
    ({"variance_power": 2.0}, "variance_power"),
    ({"set_alpha_to_one": False}, "set_alpha_to_one"),          # a DDIMScheduler setting
    ({"_class_name": "PNDMScheduler"}, "PNDMScheduler"),
    ({"variance_type": "fixed_large_log"}, "variance_type='fixed_large_log'.*NaN"),
    ({"variance_type": "learned_"}, "variance_type='learned_'"),
    ({"prediction_type": "x_prediction"}, "prediction_type='x_prediction'"),
    ({"beta_schedule": "exponential"}, "beta_schedule='exponential'"),
    ({"timestep_spacing": "middle"}, "timestep_spacing='middle'"),
    ({"clip_sample": "yes"}, "clip_sample='yes'"),
    ({"clip_sample_range": 0.0}, "clip_sample_range=0.0"),
    ({"clip_sample_range": "1"}, "clip_sample_range='1'"),
    ({"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    ({"num_train_timesteps": 10.5}, "num_train_timesteps"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas has 2 values"),
]


@pytest.mark.parametrize("setting, name", REFUSED, ids=[r[1].split("'")[0] + str(i)
                                                          for i, r in enumerate(REFUSED)])
def test_refused_settings_are_named(tmp_path, setting, name):
    with pytest.raises(ValueError, match=name):
        check_scheduler_config(setting)
    with pytest.raises(ValueError, match=name):
        ddpm_fast.DDPMPipeline(UNet2DModel("tiny"), setting)
    cfg = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.42.1", **setting}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=name):
        load_scheduler_config(tmp_path)


def test_private_keys_and_harmless_settings_pass():
    cfg = check_scheduler_config({"_class_name": "DDPMScheduler", "_diffusers_version": "0.42.1",
                                  "_name_or_path": "x", "clip_sample": False,
                                  "clip_sample_range": -3.0,      # unused without clip_sample
                                  "dynamic_thresholding_ratio": 7})   # unused without thresholding
    assert cfg["clip_sample"] is False and cfg["prediction_type"] == "epsilon"


def test_model_index_naming_another_scheduler_is_refused(tmp_path, tiny_unet):
    # diffusers builds the class model_index.json names (DDIM folders: test_ddim_diffusers.py)
    _save(tmp_path, tiny_unet)
    p = tmp_path / "model_index.json"
    index = json.loads(p.read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    p.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model_index.json.*PNDMScheduler"):
        ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)


def test_thresholding_refuses_clip():
    pipe = ddpm_fast.DDPMPipeline(UNet2DModel("tiny"), {"thresholding": True})
    with pytest.raises(ValueError, match="clip= has no effect.*thresholding"):
        pipe(num_inference_steps=2, clip=False)


def test_bits_per_dim_and_training_refuse_other_prediction_types():
    # both are written for ε-prediction: a v-prediction schedule must not be used silently
    from ddpm_fast.likelihood import bits_per_dim
    from ddpm_fast.training import TrainConfig, train

    s = Schedule.from_scheduler_config({"prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="v_prediction"):
        bits_per_dim(UNet2DModel("tiny"), s, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="v_prediction"):
        train(UNet2DModel("tiny"), torch.zeros(2, 3, 16, 16), TrainConfig(steps=1), schedule=s,
              log=lambda m: None)


def test_stale_native_module_is_never_run(monkeypatch):
    # a _C built for the old 8-column table must not read the new rows
    op = importlib.import_module("ddpm_fast.ops.ddpm_step")     # the module, not the op

    if not backend.native_available(torch.device("cpu")):
        pytest.skip("ddpm_fast._C is not built (a source checkout without pip install)")
    monkeypatch.setattr(op, "native_table_width", lambda: 8)
    s = Schedule.from_scheduler_config({"prediction_type": "sample"})
    table = s.step_table(s.timesteps(5))
    x, eps, key, step = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.tensor([0, 0]), \
        torch.tensor([1])
    with pytest.warns(UserWarning, match="rebuild"):
        got = ddpm_step(x, eps, table, step, key, None, True)
    assert torch.equal(got, ddpm_step_reference(x, eps, table, step, key, None, True))
    with backend.use_backend("native"), pytest.raises(RuntimeError, match="rebuild"):
        ddpm_step(x, eps, table, step, key, None, True)


# ---------------------------------------------------------------------- learned variances

LEARNED_STEPS = 6


@pytest.fixture(scope="module")
def learned_unet():
    """A tiny random U-Net with 2 × 3 output channels, the second half its variance. diffusers'
    "learned" reads that half as the variance itself (σ = √v): it is kept small and positive
    here, as a random model's negative values would make every image NaN (in diffusers too)."""
    torch.manual_seed(1)
    d = PRESETS["tiny"].to_dict()
    d.pop("_class_name")
    unet = diffusers.UNet2DModel(**{**d, "out_channels": 6}).eval()
    with torch.no_grad():
        unet.conv_out.weight[3:] *= 0.002
        unet.conv_out.bias[3:] = 0.05
    return unet


@pytest.mark.parametrize("variance", ["learned", "learned_range"])
def test_learned_variance_equals_diffusers_and_fast_mode(tmp_path, learned_unet, variance):
    theirs = _save(tmp_path, learned_unet, variance_type=variance)
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    kw = dict(batch_size=1, num_inference_steps=LEARNED_STEPS, output_type="pt")
    a = theirs(generator=torch.manual_seed(7), **kw).images
    b = ours(generator=torch.manual_seed(7), **kw).images
    assert torch.isfinite(b).all()
    assert torch.equal(a, b), (a - b).abs().max()      # bit for bit
    # the predicted variance is used: σ from a larger v changes the images
    bigger = ours.unet.conv_out.bias.detach().clone()
    bigger[3:] = 0.5
    with torch.no_grad():
        ours.unet.conv_out.bias.copy_(bigger)
    assert (ours(generator=torch.manual_seed(7), **kw).images - b).abs().max() > 1e-3
    # fast mode (fp32, its torch step for learned variances) on the same Philox noise
    ref = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, numerics="float64")
    fast = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, mode="fast", dtype=torch.float32)
    kw.update(seed=3)
    assert (ref(**kw).images - fast(**kw).images).abs().max() <= 1e-5


def test_learned_variance_needs_twice_the_channels_and_fixed_refuses_them(learned_unet):
    c_only = UNet2DModel("tiny")                                    # out_channels = 3
    for variance in ("learned", "learned_range"):
        with pytest.raises(ValueError, match=f"variance_type='{variance}'.*out_channels=3"):
            ddpm_fast.DDPMPipeline(c_only, {"variance_type": variance})
    two_c = UNet2DModel(dict(learned_unet.config))                 # out_channels = 6
    # diffusers' DDPMScheduler does not split the output then: a shape error mid-run
    with pytest.raises(ValueError, match="out_channels=6.*'learned_range'"):
        ddpm_fast.DDPMPipeline(two_c, {"variance_type": "fixed_large"})
    pipe = ddpm_fast.DDPMPipeline(two_c, {"variance_type": "learned_range"})
    with pytest.raises(ValueError, match="out_channels=6.*variance_type='fixed_small'"):
        pipe(num_inference_steps=2, variance="fixed_small")
    # diffusers' DDIMScheduler does not split it off either
    with pytest.raises(ValueError, match="DDIM.*out_channels=6"):
        pipe(num_inference_steps=2, sampler="ddim")
    with pytest.raises(ValueError, match="DDIM.*out_channels=6"):
        pipe.scheduler = ddpm_fast.schedulers.DDIMScheduler()


# ---------------------------------------------------------------------- thresholding, fast

def test_thresholded_step_is_batch_invariant_and_fast_equals_reference():
    from ddpm_fast.ops.ddpm_step import ddpm_step_general
    from ddpm_fast.ops.philox import key_tensor, philox_normal

    s = Schedule.from_scheduler_config(HONOURED["thresholding"], "float64")
    ts = s.timesteps(STEPS)
    table = s.step_table(ts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g) * 3          # |x̂0| well above 1: s is active
    eps = torch.randn(3, 3, 8, 8, generator=g)
    step = torch.tensor([1])
    th = s.threshold
    batch = ddpm_step_general(x, eps, table, step, key_tensor(5, 0), None, True, th)
    for i in range(3):      # image i alone, as image index i: the same bits
        one = ddpm_step_general(x[i:i + 1], eps[i:i + 1], table, step, key_tensor(5, i), None,
                                True, th)
        assert torch.equal(one, batch[i:i + 1])
    # in-graph Philox noise (fast mode) = the same noise given from outside (reference mode)
    z = philox_normal(x.shape, 5, ts[1])
    assert torch.equal(batch, ddpm_step_general(x, eps, table, step, key_tensor(5, 0), z, True,
                                                th))
    assert not torch.equal(batch, ddpm_step_general(x, eps, table, step, key_tensor(5, 0), z,
                                                    True))      # thresholding acts here


def test_fast_thresholding_images_independent_of_batch(tmp_path, tiny_unet):
    _save(tmp_path, tiny_unet, **HONOURED["thresholding"])
    fast = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, mode="fast", dtype=torch.float32)
    kw = dict(seed=5, num_inference_steps=5, output_type="pt")
    big = fast(batch_size=3, **kw).images
    one = fast(batch_size=1, first_image=2, **kw).images
    assert (big[2:3] - one).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_benchmark_step_takes_the_torch_step_for_learned_variances(learned_unet, mode):
    pipe = ddpm_fast.DDPMPipeline(UNet2DModel(dict(learned_unet.config)),
                                  {"variance_type": "learned_range", "thresholding": True},
                                  mode=mode, dtype=torch.float32)
    step = pipe.benchmark_step_fn(2)
    for i in range(2):        # the fused kernel would refuse the 6-channel output
        step(i)


def test_bits_per_dim_refuses_learned_variances_by_name():
    """The bound is implemented for the fixed variances (their *_log forms are the same σ²);
    a learned σ² is refused before any work, not silently treated as fixed."""
    from ddpm_fast.likelihood import bits_per_dim
    from ddpm_fast.schedule import Schedule

    for variance in ("learned", "learned_range"):
        with pytest.raises(ValueError, match=f"variance_type '{variance}'"):
            bits_per_dim(None, Schedule.linear(), torch.zeros(1, 1, 8, 8), variance=variance)


def test_training_refuses_a_learned_variance_head_by_name():
    from ddpm_fast.training import TrainConfig, train
    from ddpm_fast.unet import PRESETS, UNet2DModel, UNetConfig

    cfg = UNetConfig(**{**PRESETS["tiny"].__dict__, "out_channels": 6})
    with pytest.raises(ValueError, match="out_channels=6"):
        train(UNet2DModel(cfg), torch.zeros(2, 3, 16, 16), TrainConfig(steps=1, batch_size=2))
