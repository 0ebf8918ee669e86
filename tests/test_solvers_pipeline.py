"""Issue 21: the few-step solvers in the drop-in pipeline. A folder whose scheduler is
DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPC, Euler (ancestral), DEIS or
Heun, the `pipe.scheduler` swap and ddpm_fast's own scheduler objects all
sample as diffusers' loop does (reference mode, same generator, same state after); fast mode
(fp32) gives reference mode's images on the same Philox noise, and an image does not depend on
its batch. The shipped digits model keeps samples O(1), so 1e-5 is an absolute bound."""
import json

import numpy as np
import pytest
import torch

import ddpm_fast
import ddpm_fast.cli
from ddpm_fast.cli import default_model_path
from ddpm_fast.schedulers import (DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                                  EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
                                  UniPCMultistepScheduler)

diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

STEPS = 7


@pytest.fixture(scope="module")
def digits_unet():
    return diffusers.UNet2DModel.from_pretrained(default_model_path(), subfolder="unet",
                                                 torch_dtype=torch.float32).eval()


def _folder(tmp_path, unet, scheduler):
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    return pipe


def _run(pipe, steps=STEPS, batch=2, **kw):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = pipe(batch_size=batch, generator=g, num_inference_steps=steps, output_type="np",
                 **kw).images
    return x, g.get_state()


def _same(theirs, ours, tol=1e-5):
    assert np.abs(theirs[0] - ours[0]).max() <= tol, np.abs(theirs[0] - ours[0]).max()
    assert torch.equal(theirs[1], ours[1]), "the generators ended in different states"


CONFIGS = {
    "default": {},
    "sde++ order 3": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    "karras heun": {"use_karras_sigmas": True, "solver_type": "heun"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_folder_with_dpm_scheduler_samples_as_diffusers(tmp_path, digits_unet, name):
    theirs = _folder(tmp_path, digits_unet,
                     diffusers.DPMSolverMultistepScheduler(**CONFIGS[name]))
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    assert type(ours.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert ours.default_sampler == "dpm++"
    _same(_run(theirs), _run(ours))


def _canonical(unet, scheduler, steps=STEPS, batch=2):
    """diffusers' canonical loop, for schedulers DDPMPipeline cannot run (UniPC's step takes no
    generator): (images as DDPMPipeline outputs them, generator state)."""
    import inspect

    g = torch.Generator().manual_seed(0)
    c = unet.config
    scheduler.set_timesteps(steps)   # first, as diffusers' pipelines: init_noise_sigma follows it
    x = torch.randn((batch, c.in_channels, c.sample_size, c.sample_size), generator=g)
    x = x * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t).sample
            kw = {"generator": g} if takes_generator else {}
            x = scheduler.step(out, t, x, **kw).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), g.get_state()


CANONICAL = {       # schedulers diffusers' DDPMPipeline runs wrongly or not at all
    "unipc bh2 order 3": ("UniPCMultistepScheduler", "unipc", {"solver_order": 3}),
    "unipc bh1 sigma_min": ("UniPCMultistepScheduler", "unipc",
                            {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    "unipc karras, corrector off at 2": ("UniPCMultistepScheduler", "unipc",
                                         {"use_karras_sigmas": True, "disable_corrector": [2]}),
    "euler leading": ("EulerDiscreteScheduler", "euler", {"timestep_spacing": "leading"}),
    "euler karras v": ("EulerDiscreteScheduler", "euler",
                       {"use_karras_sigmas": True, "prediction_type": "v_prediction"}),
    "euler ancestral": ("EulerAncestralDiscreteScheduler", "euler-ancestral", {}),
    "deis order 3": ("DEISMultistepScheduler", "deis", {"solver_order": 3}),
    "heun, the DDPM swap's settings": ("HeunDiscreteScheduler", "heun",
                                       {"beta_start": 0.0001, "beta_end": 0.02,
                                        "clip_sample": True, "timestep_spacing": "leading",
                                        "steps_offset": 1}),
    # DDPMPipeline runs this one itself: the canonical loop is the same loop
    "singlestep order 3 sde": ("DPMSolverSinglestepScheduler", "dpm++-singlestep",
                               {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
}


@pytest.mark.parametrize("name", list(CANONICAL))
def test_folder_samples_as_diffusers_canonical_loop(tmp_path, digits_unet, name):
    cls, sampler, config = CANONICAL[name]
    sched = getattr(diffusers, cls)(**config)
    _folder(tmp_path, digits_unet, sched)
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    assert ours.default_sampler == sampler
    _same(_canonical(digits_unet, sched), _run(ours))


def test_scheduler_swap_samples_as_diffusers(tmp_path, digits_unet):
    _folder(tmp_path, digits_unet, diffusers.DDPMScheduler())
    # loaded from the folder, as a user has it (a scheduler built in memory lists its defaulted
    # settings in _use_default_values, which from_config then drops: another swap)
    theirs = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    # the swap a diffusers user writes, with either library's class
    theirs.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    want = _run(theirs)
    ours.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ours.scheduler.config)
    _same(want, _run(ours))
    ours.scheduler = DPMSolverMultistepScheduler.from_config(ours.scheduler.config)
    _same(want, _run(ours))
    # sampler="dpm++" on the DDPM pipeline: the same swap
    plain = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    _same(want, _run(plain, sampler="dpm++"))


def test_save_pretrained_round_trips_the_solver(tmp_path, digits_unet):
    sched = diffusers.DPMSolverMultistepScheduler(solver_order=3, use_karras_sigmas=True)
    ours = ddpm_fast.DDPMPipeline.from_pretrained(_folder(tmp_path / "a", digits_unet, sched)
                                                  and tmp_path / "a")
    ours.save_pretrained(tmp_path / "b")
    index = json.loads((tmp_path / "b" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    back = diffusers.DDPMPipeline.from_pretrained(tmp_path / "b")
    assert type(back.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert back.scheduler.config.solver_order == 3 and back.scheduler.config.use_karras_sigmas
    again = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path / "b")
    assert dict(again.scheduler.config) == dict(ours.scheduler.config)


@pytest.mark.parametrize("cls, config", [
    (DPMSolverMultistepScheduler, {}),
    (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    (UniPCMultistepScheduler, {"solver_order": 3}),                  # the corrector's buffers
    (EulerAncestralDiscreteScheduler, {}),                # input scale, init sigma, noise
    (DPMSolverSinglestepScheduler, {"solver_order": 3}),  # steps from the group's start
    (HeunDiscreteScheduler, {"beta_start": 0.0001, "beta_end": 0.02,
                             "clip_sample": True}),       # two calls a level, x̂0 clamped
    (DPMSolverMultistepScheduler, {"thresholding": True, "sample_max_value": 0.8}),  # torch step
])
def test_fast_mode_equals_reference_on_the_same_noise(cls, config):
    ref = ddpm_fast.DDPMPipeline.from_pretrained(default_model_path())
    fast = ddpm_fast.DDPMPipeline.from_pretrained(default_model_path(), mode="fast",
                                                  dtype=torch.float32)
    for pipe in (ref, fast):
        pipe.scheduler = cls(**config)
        pipe.set_progress_bar_config(disable=True)
    kw = dict(seed=3, num_inference_steps=STEPS, output_type="pt")
    want = ref(batch_size=3, **kw).images
    got = fast(batch_size=3, **kw).images
    assert (got - want).abs().max() <= 1e-4, (got - want).abs().max()
    alone = fast(batch_size=1, first_image=2, **kw).images       # image 2 of the seed, alone
    assert torch.equal(alone[0], got[2])


def test_singlestep_lower_order_final_switch_persists_as_in_diffusers(tmp_path, digits_unet):
    """diffusers' set_timesteps switches a singlestep scheduler's lower_order_final on for good
    after a step count that is not a multiple of the order: the next run, with a multiple, keeps
    the lower-order final steps. Ours changes pipe.scheduler's config the same way."""
    config = {"solver_order": 2, "final_sigmas_type": "sigma_min"}
    theirs = _folder(tmp_path, digits_unet, diffusers.DPMSolverSinglestepScheduler(**config))
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    for steps in (4, 5, 4):
        _same(_run(theirs, steps), _run(ours, steps))
    assert theirs.scheduler.config.lower_order_final and ours.scheduler.config.lower_order_final
    # a diffusers scheduler object assigned to our pipeline is changed as diffusers changes it
    ours.scheduler = sched = diffusers.DPMSolverSinglestepScheduler(**config)
    _run(ours, 5)
    assert sched.config.lower_order_final


def test_progress_counts_unet_calls():
    """The CLI's and sample_to_file's bar counts U-Net calls: 2n − 1 for Heun's n steps."""
    from ddpm_fast.distributed import pipeline_call, unet_calls

    pipe = ddpm_fast.DDPMPipeline.from_pretrained(default_model_path())
    for sampler, calls in (("heun", 9), ("dpm++", 5), ("ddim", 5)):
        assert unet_calls(pipe, pipeline_call(pipe, 0, 5, sampler, None, None, None)) == calls


def test_refused_before_any_work(tmp_path, digits_unet):
    theirs = _folder(tmp_path, digits_unet,
                     diffusers.DPMSolverMultistepScheduler(use_exponential_sigmas=True))
    with pytest.raises(ValueError, match="use_exponential_sigmas"):
        ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    ours = ddpm_fast.DDPMPipeline.from_pretrained(default_model_path())
    with pytest.raises(ValueError, match="PNDMScheduler.*DPMSolverMultistepScheduler"):
        ours.scheduler = diffusers.PNDMScheduler()
    with pytest.raises(ValueError, match="eta=0.3 is a DDIM argument"):
        ours(sampler="dpm++", eta=0.3, num_inference_steps=2)
    with pytest.raises(ValueError, match="clip is a DDPM / DDIM argument"):
        ours(sampler="dpm++", clip=False, num_inference_steps=2)
    del theirs


def test_cli_samples_with_dpm(tmp_path, capsys):
    out = tmp_path / "d.npz"
    assert ddpm_fast.cli.main(["sample", "--sampler", "dpm++", "--steps", "4", "--num-images",
                               "2", "--precision", "fp32", "--out", str(out)]) == 0
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 1)
    capsys.readouterr()
    try:
        ddpm_fast.cli.main(["sample", "--help"])
    except SystemExit:
        pass
    shown = capsys.readouterr().out
    assert "dpm++" in shown and "unipc" in shown
