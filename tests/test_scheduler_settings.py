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
REFERENCE_ONLY = {"thresholding"}


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


@pytest.mark.parametrize("name", [n for n in HONOURED if n not in REFERENCE_ONLY])
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
    ({"_class_name": "DDIMScheduler"}, "DDIMScheduler"),
    ({"_class_name": "EulerDiscreteScheduler"}, "EulerDiscreteScheduler"),
    ({"variance_type": "fixed_large_log"}, "variance_type='fixed_large_log'.*NaN"),
    ({"variance_type": "learned"}, "variance_type='learned'"),
    ({"variance_type": "learned_range"}, "variance_type='learned_range'"),
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
    _save(tmp_path, tiny_unet)
    p = tmp_path / "model_index.json"
    index = json.loads(p.read_text())
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    p.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="DDIMScheduler"):
        ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)


def test_thresholding_is_refused_in_fast_mode_and_with_clip():
    with pytest.raises(ValueError, match="thresholding.*fast mode"):
        ddpm_fast.DDPMPipeline(UNet2DModel("tiny"), {"thresholding": True}, mode="fast")
    pipe = ddpm_fast.DDPMPipeline(UNet2DModel("tiny"), {"thresholding": True})
    with pytest.raises(ValueError, match="clip= has no effect.*thresholding"):
        pipe(num_inference_steps=2, clip=False)


def test_accelerate_refuses_a_ddim_scheduler(tiny_unet):
    pipe = diffusers.DDPMPipeline(unet=tiny_unet, scheduler=diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="DDIMScheduler"):
        ddpm_fast.accelerate(pipe)


def test_bits_per_dim_and_training_refuse_other_prediction_types():
    # both are written for ε-prediction: a v-prediction schedule must not be used silently
    from ddpm_fast.training import TrainConfig, bits_per_dim, train

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
