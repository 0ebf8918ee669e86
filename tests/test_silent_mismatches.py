"""Issue 24: six ways a user got other images than diffusers without an error. Each case is
compared with diffusers 0.42.1 on a saved tiny random model (same torch.Generator, same state
after), with a fresh pipeline (case 1), or must raise before any work."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import ddpm_fast
import ddpm_fast.cli
from ddpm_fast.checkpoints import CheckpointError
from ddpm_fast.unet import PRESETS, UNet2DModel

diffusers = pytest.importorskip("diffusers")

STEPS = 5


def _tiny(seed: int):
    torch.manual_seed(seed)
    d = PRESETS["tiny"].to_dict()
    d.pop("_class_name")
    return diffusers.UNet2DModel(**d).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    pipe = diffusers.DDPMPipeline(unet=_tiny(0), scheduler=diffusers.DDPMScheduler())
    pipe.save_pretrained(path)
    return path


def _theirs(pipe, steps=STEPS, seed=0):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = pipe(batch_size=1, generator=g, num_inference_steps=steps, output_type="np").images
    return x, g.get_state()


def _ours(pipe, steps=STEPS, seed=0, **kw):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    x = pipe(batch_size=1, generator=g, num_inference_steps=steps, output_type="np", **kw).images
    return x, g.get_state()


def _assert_same(theirs, ours, tol=1e-5):
    assert np.abs(theirs[0] - ours[0]).max() <= tol, np.abs(theirs[0] - ours[0]).max()
    assert torch.equal(theirs[1], ours[1]), "the generators ended in different states"


# ---------------------------------------------------------------- 1. fast mode follows the U-Net

@pytest.mark.parametrize("change", ["load_state_dict", "assign", "in_place"])
def test_fast_mode_samples_the_current_weights(folder, change):
    pipe = ddpm_fast.DDPMPipeline.from_pretrained(folder, mode="fast", dtype=torch.float32)
    before = pipe(batch_size=2, seed=1, num_inference_steps=STEPS, output_type="pt").images
    other = UNet2DModel(PRESETS["tiny"])         # random weights, unlike the folder's
    if change == "load_state_dict":              # e.g. new EMA weights each epoch
        pipe.unet.load_state_dict(other.state_dict())
    elif change == "assign":
        pipe.unet = other
    else:
        with torch.no_grad():
            for p in pipe.unet.parameters():
                p.copy_(dict(other.named_parameters())[next(
                    n for n, q in pipe.unet.named_parameters() if q is p)])
    after = pipe(batch_size=2, seed=1, num_inference_steps=STEPS, output_type="pt").images
    fresh = ddpm_fast.DDPMPipeline(other, mode="fast", dtype=torch.float32)
    want = fresh(batch_size=2, seed=1, num_inference_steps=STEPS, output_type="pt").images
    assert not torch.equal(before, want)
    assert torch.equal(after, want), (after - want).abs().max()


def test_fast_runner_is_kept_while_the_weights_stay(folder):
    pipe = ddpm_fast.DDPMPipeline.from_pretrained(folder, mode="fast", dtype=torch.float32)
    runner = pipe.runner
    pipe(batch_size=1, seed=0, num_inference_steps=2)
    assert pipe.runner is runner                 # sampling does not touch pipe.unet's weights


def _replace_param(m):
    m.conv_in.weight = torch.nn.Parameter(m.conv_in.weight.detach().clone())


def _replace_module(m):
    m.conv_in = torch.nn.Conv2d(3, 32, 3, padding=1)


def _set_data(m):
    m.conv_in.weight.data = m.conv_in.weight.data.clone()


def _in_place(m):
    with torch.no_grad():
        m.conv_in.bias.add_(1)


@pytest.mark.parametrize("change", [_replace_param, _replace_module, _set_data, _in_place,
                                   lambda m: m.half()])
def test_weights_watch_sees_every_kind_of_change(change):
    from ddpm_fast.fast import WeightsWatch

    m = UNet2DModel(PRESETS["tiny"])
    watch = WeightsWatch(m)
    torch.nn.Linear(2, 2)                 # a registration elsewhere: a walk, still unchanged
    assert watch.unchanged(m) and not watch.unchanged(UNet2DModel(PRESETS["tiny"]))
    change(m)
    assert not watch.unchanged(m)


# ---------------------------------------------------------------- 2. absent config.json keys

@pytest.mark.parametrize("key", ["attention_head_dim", "flip_sin_to_cos", "freq_shift",
                                 "downsample_padding", "norm_eps"])
def test_absent_unet_keys_take_diffusers_defaults(folder, tmp_path, key):
    path = tmp_path / "m"
    shutil.copytree(folder, path)
    config_file = path / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    del config[key]
    config_file.write_text(json.dumps(config))
    theirs = _theirs(diffusers.DDPMPipeline.from_pretrained(path))
    ours = _ours(ddpm_fast.DDPMPipeline.from_pretrained(path))
    _assert_same(theirs, ours)


def test_absent_sample_size_is_refused(folder, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(folder, path)
    config_file = path / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    del config["sample_size"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no sample_size"):
        ddpm_fast.DDPMPipeline.from_pretrained(path)
    # convert --sample-size gives it one (and changes a diffusers folder's size when given)
    assert ddpm_fast.cli.main(["convert", str(path), "--out", str(tmp_path / "c"),
                               "--image-size", "32"]) == 0
    assert json.loads((tmp_path / "c" / "unet" / "config.json").read_text())["sample_size"] == 32
    with pytest.raises(CheckpointError, match="sample_size=10 is not a multiple of 4"):
        ddpm_fast.checkpoints.load_unet(path, sample_size=10)


# ---------------------------------------------------------------- 3. absent scheduler config

def test_model_index_naming_an_absent_scheduler_is_refused(folder, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(folder, path)
    shutil.rmtree(path / "scheduler")            # a partial download
    with pytest.raises(Exception):
        diffusers.DDPMPipeline.from_pretrained(path)
    with pytest.raises(CheckpointError, match="names the scheduler DDPMScheduler.*missing"):
        ddpm_fast.DDPMPipeline.from_pretrained(path)


def test_bare_unet_folder_says_what_it_assumes(folder, capsys):
    with pytest.warns(UserWarning, match="assuming DDPMScheduler's defaults"):
        pipe = ddpm_fast.DDPMPipeline.from_pretrained(folder / "unet")
    assert pipe.variance == "fixed_small" and pipe.clip
    assert ddpm_fast.cli.main(["info", "--model", str(folder / "unet")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "assuming DDPMScheduler's defaults" in info["scheduler"]["assumed"]
    assert ddpm_fast.cli.main(["info", "--model", str(folder)]) == 0
    assert "assumed" not in json.loads(capsys.readouterr().out)["scheduler"]


# ---------------------------------------------------------------- 4. live scheduler settings

@pytest.mark.parametrize("how", ["from_diffusers", "accelerate", "config"])
def test_settings_registered_on_the_live_scheduler_are_kept(folder, how):
    # a scheduler built with defaults lists them in _use_default_values
    d = diffusers.DDPMPipeline(unet=_tiny(0), scheduler=diffusers.DDPMScheduler())
    d.scheduler.register_to_config(clip_sample=False)
    assert "clip_sample" in d.scheduler.config["_use_default_values"]
    theirs = _theirs(d)
    if how == "from_diffusers":
        ours = ddpm_fast.DDPMPipeline.from_diffusers(d)
    elif how == "accelerate":
        ours = ddpm_fast.accelerate(d, mode="reference")
    else:
        ours = ddpm_fast.DDPMPipeline(ddpm_fast.DDPMPipeline.from_pretrained(folder).unet,
                                      d.scheduler.config)
    assert ours.clip is False
    _assert_same(theirs, _ours(ours))


# ---------------------------------------------------------------- 5. unused arguments

def test_arguments_the_sampler_does_not_use_are_refused(folder):
    pipe = ddpm_fast.DDPMPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="eta=0.7 is a DDIM argument"):
        pipe(eta=0.7, num_inference_steps=2)
    with pytest.raises(ValueError, match="variance='fixed_large' is a DDPM argument"):
        pipe(sampler="ddim", variance="fixed_large", num_inference_steps=2)
    pipe(sampler="ddim", eta=0.5, num_inference_steps=2)       # used: no error


@pytest.mark.parametrize("args, named", [(["--eta", "0.7"], "eta=0.7"),
                                         (["--sampler", "ddim", "--variance", "fixed_large"],
                                          "variance='fixed_large'")])
def test_cli_refuses_arguments_the_sampler_does_not_use(folder, tmp_path, capsys, args, named):
    out = tmp_path / "x.png"
    code = ddpm_fast.cli.main(["sample", "--model", str(folder), "--num-images", "1",
                               "--steps", "2", "--out", str(out), *args])
    assert code == 2 and not out.exists()
    assert named in capsys.readouterr().err


# ---------------------------------------------------------------- 6. noise where σ = 0, t > 0

def test_noise_is_drawn_at_every_positive_t_even_where_sigma_is_zero(tmp_path):
    # β_7 = 1e-9: 1 − β_7 rounds to 1 in float32, so ᾱ_7 = ᾱ_6 and σ_7 = 0 (fixed_large)
    betas = np.linspace(0.01, 0.3, 20)
    betas[7] = 1e-9
    d = diffusers.DDPMPipeline(unet=_tiny(0), scheduler=diffusers.DDPMScheduler(
        num_train_timesteps=20, trained_betas=betas.tolist(), variance_type="fixed_large"))
    d.save_pretrained(tmp_path)
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    timesteps = ours.schedule.timesteps(20)
    sigma = ours.schedule.step_table(timesteps, "fixed_large")[:, 5]
    assert sigma[timesteps.index(7)] == 0        # the case: zero σ at t > 0
    _assert_same(_theirs(d, steps=20), _ours(ours, steps=20))


def test_no_warning_for_a_full_pipeline_folder(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddpm_fast.DDPMPipeline.from_pretrained(folder)
