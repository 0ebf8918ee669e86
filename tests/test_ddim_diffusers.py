"""ddpm_fast's DDIM extra (sampler="ddim" with the folder's DDPM scheduler config) is diffusers'
DDIMPipeline with DDIMScheduler.from_config(that config): the same images for the same
torch.Generator in reference mode, and fast mode runs the same table."""
import json

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast.sampling import ddim_sample

diffusers = pytest.importorskip("diffusers")

CASES = {                       # DDPM scheduler settings, η
    "eta0": ({}, 0.0),
    "eta1_noclip": ({"clip_sample": False}, 1.0),
    "trailing_eta1": ({"timestep_spacing": "trailing"}, 1.0),      # t_prev = t − T//n, not the run's
    "leading_offset_eta1": ({"steps_offset": 1, "beta_schedule": "squaredcos_cap_v2"}, 1.0),
}


def _pipelines(tmp_path, unet, settings):
    ddpm = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**settings))
    ddpm.save_pretrained(tmp_path)
    ddim = diffusers.DDIMPipeline(unet=unet,
                                  scheduler=diffusers.DDIMScheduler.from_config(ddpm.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    return ddim, ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_ddim_equals_diffusers_ddim_pipeline(tmp_path, tiny_diffusers_unet, case):
    settings, eta = CASES[case]
    theirs, ours = _pipelines(tmp_path, tiny_diffusers_unet, settings)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        a = theirs(batch_size=1, generator=g1, eta=eta, num_inference_steps=10,
                   output_type="pt").images
    b = ours(batch_size=1, generator=g2, sampler="ddim", eta=eta, num_inference_steps=10,
             output_type="pt").images
    assert torch.equal(a, b), (a - b).abs().max()
    # the same draws: the generators end in the same state (η > 0 draws at every step)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_ddim_sample_x_equals_diffusers_before_output_scaling(tmp_path, tiny_diffusers_unet):
    # the sampler itself (model space, before (x/2 + 1/2).clamp): every step's arithmetic
    theirs, ours = _pipelines(tmp_path, tiny_diffusers_unet, {})
    sched = theirs.scheduler
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 3, 16, 16), generator=g)
    sched.set_timesteps(10)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(tiny_diffusers_unet(x, t).sample, t, x, eta=1.0, generator=g).prev_sample
    mine = ddim_sample(ours.unet, ours.schedule, (1, 3, 16, 16), num_inference_steps=10, eta=1.0,
                       generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(x, mine)


def test_fast_mode_ddim_table_matches_reference(tmp_path, tiny_diffusers_unet):
    # fast mode reads the same table in float64 numerics; with the same Philox seed it agrees
    _, ref = _pipelines(tmp_path, tiny_diffusers_unet, {"timestep_spacing": "trailing"})
    ref64 = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, numerics="float64")
    fast = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, mode="fast", dtype=torch.float32,
                                                  use_graphs=False, compile=False)
    ts = ref.schedule.timesteps(10)
    for eta in (0.0, 0.5, 1.0):
        torch.testing.assert_close(ref.schedule.ddim_table(ts, eta),
                                   ref64.schedule.ddim_table(ts, eta), rtol=1e-5, atol=1e-6)
    kw = dict(batch_size=1, seed=4, sampler="ddim", eta=1.0, num_inference_steps=5,
              output_type="pt")
    a, b, c = ref(**kw).images, ref64(**kw).images, fast(**kw).images
    # float32 against float64 coefficients; fast mode's fused step and convolutions
    assert (a - b).abs().max() <= 5e-4 and (b - c).abs().max() <= 5e-4


# ---------------------------------------------------------------------- DDIMScheduler folders

FOLDER_CASES = {        # DDIMScheduler settings; "index": only model_index.json names DDIM
    "defaults": {},
    "no_alpha_to_one_trailing_noclip": {"set_alpha_to_one": False, "timestep_spacing": "trailing",
                                        "clip_sample": False},
    "index": {"beta_schedule": "squaredcos_cap_v2"},
}


def _ddim_folder(path, unet, case):
    settings = FOLDER_CASES[case]
    if case == "index":     # a DDPM folder whose model_index.json says DDIMScheduler
        diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**settings)) \
            .save_pretrained(path)
        index = json.loads((path / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", "DDIMScheduler"]
        (path / "model_index.json").write_text(json.dumps(index))
    else:
        diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**settings)) \
            .save_pretrained(path)
    # the scheduler diffusers builds from the folder, the U-Net in memory (a U-Net diffusers
    # loads computes its last bits differently: ≈ 1e-6 on this model)
    scheduler = diffusers.DDPMPipeline.from_pretrained(path).scheduler
    assert type(scheduler).__name__ == "DDIMScheduler"
    theirs = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    theirs.set_progress_bar_config(disable=True)
    return theirs


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_ddim_folder_samples_as_diffusers_ddpm_pipeline(tmp_path, tiny_diffusers_unet, case):
    # diffusers' DDPMPipeline with the folder's DDIMScheduler: set_timesteps(n), then
    # step(output, t, image, generator=…), so DDIM with eta = 0
    theirs = _ddim_folder(tmp_path, tiny_diffusers_unet, case)
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    assert type(ours.scheduler).__name__ == "DDIMScheduler"
    assert ours.scheduler.config["set_alpha_to_one"] == theirs.scheduler.config.set_alpha_to_one
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        a = theirs(batch_size=1, generator=g1, num_inference_steps=8, output_type="pt").images
    b = ours(batch_size=1, generator=g2, num_inference_steps=8, output_type="pt").images
    assert torch.equal(a, b), (a - b).abs().max()
    assert torch.equal(g1.get_state(), g2.get_state())
    if case == "defaults":       # fast mode runs the same DDIM table
        ref = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, numerics="float64")
        fast = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, mode="fast", dtype=torch.float32)
        kw = dict(batch_size=1, seed=2, num_inference_steps=8, output_type="pt")
        # fast mode's convolutions round differently; deterministic DDIM carries it (2.2e-5)
        assert (ref(**kw).images - fast(**kw).images).abs().max() <= 1e-4


def test_ddim_folder_info_convert_save_and_accelerate(tmp_path, tiny_diffusers_unet, capsys):
    from ddpm_fast import cli

    case = "no_alpha_to_one_trailing_noclip"
    theirs = _ddim_folder(tmp_path / "m", tiny_diffusers_unet, case)
    shown = cli.scheduler_settings(tmp_path / "m")
    assert shown["_class_name"] == "DDIMScheduler" and shown["set_alpha_to_one"] is False
    assert "variance_type" not in shown
    assert cli.main(["convert", str(tmp_path / "m"), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "DDIMScheduler with" in out and "set_alpha_to_one=False" in out
    # the converted folder and ours.save_pretrained are DDIMScheduler folders for diffusers too
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path / "m")
    ours.save_pretrained(tmp_path / "s")
    for folder in ("c", "s"):
        back = diffusers.DDPMPipeline.from_pretrained(tmp_path / folder)
        assert type(back.scheduler).__name__ == "DDIMScheduler"
        public = [{k: v for k, v in p.scheduler.config.items() if not k.startswith("_")}
                  for p in (back, theirs)]
        assert public[0] == public[1]
    # `ddpm-fast sample` on the folder samples with its scheduler (DDIM), as the API does
    assert cli.main(["sample", "--model", str(tmp_path / "m"), "--mode", "reference",
                     "--num-images", "2", "--steps", "4", "--device", "cpu",
                     "--out", str(tmp_path / "cli.npz")]) == 0
    from ddpm_fast.images import unit_to_uint8

    api = ours(batch_size=2, seed=0, num_inference_steps=4, output_type="pt").images
    assert np.array_equal(np.load(tmp_path / "cli.npz")["arr_0"], unit_to_uint8(api))
    ddpm = ours(batch_size=2, seed=0, num_inference_steps=4, output_type="pt", sampler="ddpm")
    assert not np.array_equal(unit_to_uint8(ddpm.images), unit_to_uint8(api))
    # accelerate() of a diffusers DDPMPipeline carrying a DDIMScheduler keeps it
    fast = ddpm_fast.accelerate(theirs, dtype=torch.float32)
    assert type(fast.scheduler).__name__ == "DDIMScheduler"
    assert fast.scheduler.config["timestep_spacing"] == "trailing"
