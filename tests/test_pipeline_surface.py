"""Issue 16: the pipeline calls diffusers users already write, with `from ddpm_fast import
DDPMPipeline` in place of diffusers' — .to(), torch_dtype=, set_progress_bar_config, device /
dtype / components, pipe.scheduler (read, round-trip, swap) and the knobs diffusers users reach
for. Each is checked against diffusers on a tiny random model saved by diffusers (reference
mode, a few steps, the same torch.Generator)."""
import pytest
import torch

import ddpm_fast
from conftest import diffusers_kwargs
from ddpm_fast import DDPMPipeline
from ddpm_fast.unet import PRESETS

diffusers = pytest.importorskip("diffusers")

STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**diffusers_kwargs(PRESETS["tiny"])).eval()
    path = tmp_path_factory.mktemp("tiny")
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def theirs(folder):
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, **kw):
    kw.setdefault("generator", torch.manual_seed(7))
    kw.setdefault("num_inference_steps", STEPS)
    return pipe(batch_size=2, output_type="pt", **kw).images


@pytest.fixture(scope="module")
def their_images(theirs):
    return images(theirs)


def ours(folder, **kw):
    pipe = DDPMPipeline.from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_to_device_returns_the_pipeline(folder, their_images):
    pipe = ours(folder)
    assert pipe.to("cpu") is pipe
    assert pipe.to(torch.device("cpu")) is pipe
    assert pipe.to("cpu", torch.float32) is pipe
    assert pipe.to(device="cpu", dtype=torch.float32) is pipe
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert torch.equal(images(pipe), their_images)
    with pytest.raises(ValueError, match="device"):
        pipe.to(torch.float32, "cpu")                 # diffusers refuses this order too


def test_to_resets_the_fast_runner(folder):
    pipe = ours(folder, mode="fast", dtype=torch.float32)
    a = pipe(batch_size=1, seed=3, num_inference_steps=3, output_type="pt").images
    first = pipe.runner
    assert pipe.to("cpu") is pipe and pipe.runner is not first       # rebuilt for the device
    b = pipe(batch_size=1, seed=3, num_inference_steps=3, output_type="pt").images
    assert torch.equal(a, b)
    pipe.to(torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.runner.dtype == torch.bfloat16
    assert pipe.unet.dtype == torch.float32           # fast mode keeps fp32 master weights


@pytest.fixture(scope="module")
def their_fp16_images(folder):
    pipe = diffusers.DDPMPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    return images(pipe).float()


@pytest.fixture(scope="module")
def our_fp16_images(folder):
    pipe = ours(folder).to(torch.float16)
    assert pipe.dtype == torch.float16 and pipe.unet.dtype == torch.float16
    return images(pipe)


def test_to_dtype_runs_the_unet_in_that_dtype(folder, their_images, their_fp16_images,
                                              our_fp16_images):
    # diffusers runs the U-Net (and its sampler state) in fp16; reference mode runs the U-Net
    # in fp16 with the weights cast as diffusers casts them, and keeps x_t in fp32
    x = our_fp16_images
    assert (x - their_fp16_images).abs().max() <= 1e-2
    assert (x - their_images).abs().max() > 0        # honoured, not ignored
    pipe = ours(folder).to("cpu", torch.float16)
    assert pipe.to(torch.float32).dtype == torch.float32 == pipe.unet.dtype


def test_from_pretrained_torch_dtype(folder, our_fp16_images):
    assert torch.equal(images(ours(folder, torch_dtype=torch.float16)), our_fp16_images)
    assert ours(folder, mode="fast", torch_dtype=torch.float32).runner.dtype == torch.float32
    with pytest.raises(ValueError, match="disagree"):
        DDPMPipeline.from_pretrained(folder, torch_dtype=torch.float16, dtype=torch.float32)


def test_set_progress_bar_config_silences_the_bar(folder, capsys):
    pipe = DDPMPipeline.from_pretrained(folder)
    pipe(batch_size=1, num_inference_steps=2)
    assert "2/2" in capsys.readouterr().err          # a tqdm bar, as diffusers shows
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=1, num_inference_steps=2)
    assert capsys.readouterr().err == ""
    pipe.set_progress_bar_config(desc="sampling")
    pipe(batch_size=1, num_inference_steps=2)
    assert "sampling" in capsys.readouterr().err


def test_components_build_the_same_pipeline(folder, their_images):
    pipe = ours(folder)
    assert set(pipe.components) == {"unet", "scheduler"}
    again = DDPMPipeline(**pipe.components)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(images(again), their_images)


def test_scheduler_config_round_trips(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**diffusers_kwargs(PRESETS["tiny"])).eval()
    sched = diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=False,
                                    beta_end=0.015, timestep_spacing="trailing")
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path)
    pipe = ours(tmp_path)
    rebuilt = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    for key, value in sched.config.items():
        if not key.startswith("_"):
            assert rebuilt.config[key] == value, key
            assert pipe.scheduler.config[key] == value and getattr(pipe.scheduler.config, key) == value
    mine = ddpm_fast.schedulers.DDPMScheduler.from_config(pipe.scheduler.config)
    assert dict(mine.config) == dict(pipe.scheduler.config)
    with pytest.raises(TypeError, match="read-only"):
        pipe.scheduler.config["beta_end"] = 0.02
    pipe.scheduler.set_timesteps(7)
    sched.set_timesteps(7)
    assert torch.equal(pipe.scheduler.timesteps, sched.timesteps)


def test_assigning_a_ddpm_scheduler_switches_its_settings(folder, theirs):
    sched = diffusers.DDPMScheduler.from_config(theirs.scheduler.config,
                                                variance_type="fixed_large", clip_sample=False)
    ref = diffusers.DDPMPipeline(unet=theirs.unet, scheduler=sched)
    ref.set_progress_bar_config(disable=True)
    expected = images(ref)
    pipe = ours(folder)
    pipe.scheduler = sched
    assert pipe.scheduler is sched
    assert torch.equal(images(pipe), expected)
    # ours, built from the same config, gives the same images
    pipe.scheduler = ddpm_fast.schedulers.DDPMScheduler.from_config(sched.config)
    assert torch.equal(images(pipe), expected)


def test_unsupported_scheduler_settings_and_classes_are_refused_by_name(folder, their_images):
    pipe = ours(folder)
    with pytest.raises(ValueError, match="variance_type='learned' needs a U-Net"):
        pipe.scheduler = diffusers.DDPMScheduler(variance_type="learned")   # 3 output channels
    with pytest.raises(ValueError, match="PNDMScheduler"):
        pipe.scheduler = diffusers.PNDMScheduler()
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        ddpm_fast.schedulers.DDPMScheduler(set_alpha_to_one=False)
    # a refused scheduler changes nothing
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.variance == "fixed_small"


DDIM_CASES = {
    "default": ({}, {}),
    "eta=0.5": ({}, dict(eta=0.5)),
    "trailing, set_alpha_to_one=False": (dict(timestep_spacing="trailing",
                                              set_alpha_to_one=False), {}),
    "v_prediction, use_clipped_model_output": (dict(prediction_type="v_prediction"),
                                               dict(use_clipped_model_output=True, eta=0.3)),
}


@pytest.mark.parametrize("case", list(DDIM_CASES))
def test_ddim_scheduler_swap_gives_ddim_pipeline_images(folder, theirs, case):
    settings, call = DDIM_CASES[case]
    pipe = ours(folder)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, **settings)
    ref = diffusers.DDIMPipeline(unet=theirs.unet, scheduler=pipe.scheduler)
    ref.set_progress_bar_config(disable=True)
    # 3 steps: "trailing" runs t = 999, 666, 332 and DDIM steps to t − 1000 // 3 (666, 333, −1)
    a = images(ref, **call)
    b = images(pipe, **call)
    if case in ("default", "eta=0.5"):
        assert torch.equal(a, b), (a - b).abs().max()
    else:
        assert (a - b).abs().max() <= 1e-6
    if case == "trailing, set_alpha_to_one=False":
        # ddpm_fast's own DDIMScheduler from the same config: the same images
        pipe.scheduler = ddpm_fast.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)
        assert torch.equal(images(pipe, **call), b)


def test_ddim_scheduler_in_fast_mode_tracks_reference(folder):
    pipe = ours(folder, numerics="float64")           # fast mode's float64 tables
    fast = ours(folder, mode="fast", dtype=torch.float32)
    for p in (pipe, fast):
        p.scheduler = diffusers.DDIMScheduler.from_config(p.scheduler.config)
    a = images(pipe, generator=None, seed=4)
    b = images(fast, generator=None, seed=4)
    assert (a - b).abs().max() <= 1e-5
    pipe.save_pretrained(folder / "ddim")      # a DDIMScheduler folder, as diffusers writes it
    assert type(ours(folder / "ddim").scheduler).__name__ == "DDIMScheduler"


def test_diffusers_knobs_are_no_ops_or_clear_errors(folder, their_images):
    pipe = ours(folder)
    pipe.enable_xformers_memory_efficient_attention()
    pipe.enable_attention_slicing()
    pipe.disable_attention_slicing()
    assert torch.equal(images(pipe), their_images)
    with pytest.raises(NotImplementedError, match=r"pipe\.to\('cuda'\)"):
        pipe.enable_model_cpu_offload()
    with pytest.raises(AttributeError, match="no VAE"):
        pipe.vae
    with pytest.raises(AttributeError, match="has no attribute 'frobnicate'.*components"):
        pipe.frobnicate
    assert not hasattr(pipe, "frobnicate")
    assert pipe.unet.config.sample_size == 16
    bar = pipe.progress_bar(total=3)
    bar.close()
    assert len(pipe.numpy_to_pil(their_images.permute(0, 2, 3, 1).numpy())) == 2
