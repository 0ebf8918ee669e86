"""Reference mode reproduces diffusers' DDPMPipeline; fast mode agrees with reference mode."""
import pytest
import torch

import ddpm_fast
from conftest import diffusers_kwargs
from ddpm_fast.unet import PRESETS, UNetConfig

diffusers = pytest.importorskip("diffusers")


def _save(tmp_path, unet, **sched):
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**sched))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    return pipe


# The smallest U-Net with the tiny one's kinds of block (an attention level, the mid block's
# attention), for the 1000-step chain: 1000 forwards of each implementation at a third of the
# tiny U-Net's cost. Their forwards' equality is test_unet.py's; what the chain checks is the
# sampler's, which runs the same code for any U-Net.
MICRO = UNetConfig(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                   norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def _reference_equals_diffusers(tmp_path, unet, variance, clip, steps):
    theirs = _save(tmp_path, unet, variance_type=variance, clip_sample=clip)
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    a = theirs(batch_size=2, generator=torch.manual_seed(7), num_inference_steps=steps,
               output_type="np").images
    b = ours(batch_size=2, generator=torch.manual_seed(7), num_inference_steps=steps,
             output_type="np").images
    assert abs(a - b).max() <= 1e-4


def test_reference_equals_diffusers_full_chain(tmp_path):
    """The full 1000-step chain once, with diffusers' default scheduler: every row of the step
    table (prev = t - 1), and errors that compound over 1000 steps, would show only here."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**diffusers_kwargs(MICRO)).eval()
    _reference_equals_diffusers(tmp_path, unet, "fixed_small", True, 1000)


# each variance/clip setting on the same 1000-timestep schedule with 20 steps: the step table's
# rows are the same formulas for any step count (one row per timestep, prev the next timestep),
# so 20 steps check each branch, first (t=950) to last (t=0, no noise)
@pytest.mark.parametrize("variance, clip", [
    ("fixed_small", True), ("fixed_large", True), ("fixed_small", False), ("fixed_large", False),
])
def test_reference_equals_diffusers(tmp_path, tiny_diffusers_unet, variance, clip):
    _reference_equals_diffusers(tmp_path, tiny_diffusers_unet, variance, clip, 20)


def test_reference_equals_diffusers_cifar10_steps(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**diffusers_kwargs(PRESETS["cifar10"])).eval()
    theirs = _save(tmp_path, unet, variance_type="fixed_large")
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    # 3 full sampler steps (num_inference_steps=3: t = 666, 333, 0)
    a = theirs(batch_size=1, generator=torch.manual_seed(1), num_inference_steps=3,
               output_type="pt").images
    b = ours(batch_size=1, generator=torch.manual_seed(1), num_inference_steps=3,
             output_type="pt").images
    assert (a - b).abs().max() <= 1e-4


def test_generator_list_and_output_types(tmp_path, tiny_diffusers_unet):
    theirs = _save(tmp_path, tiny_diffusers_unet)
    ours = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    gens = lambda: [torch.Generator().manual_seed(i) for i in (3, 4)]  # noqa: E731
    a = theirs(batch_size=2, generator=gens(), num_inference_steps=5, output_type="np").images
    b = ours(batch_size=2, generator=gens(), num_inference_steps=5, output_type="np").images
    assert abs(a - b).max() <= 1e-4
    pil = ours(batch_size=1, num_inference_steps=2).images
    assert pil[0].size == (16, 16)
    pt = ours(batch_size=1, num_inference_steps=2, output_type="pt").images
    assert pt.shape == (1, 3, 16, 16) and 0 <= pt.min() and pt.max() <= 1


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_fast_fp32_equals_reference_same_noise(tmp_path, tiny_diffusers_unet, variance):
    _save(tmp_path, tiny_diffusers_unet, variance_type=variance)
    ref = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, numerics="float64")
    fast = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, mode="fast", dtype=torch.float32)
    # both with Philox noise from the same seed: the fast path is the same computation (the
    # step is the same code for any step count: 20 steps of the 1000-timestep schedule)
    a = ref(batch_size=3, seed=11, num_inference_steps=20, output_type="pt").images
    b = fast(batch_size=3, seed=11, num_inference_steps=20, output_type="pt").images
    assert (a - b).abs().max() <= 1e-4



def _fast(tmp_path, unet):
    _save(tmp_path, unet)
    return ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, mode="fast", dtype=torch.float32)


def _run(pipe, **kw):
    return pipe(batch_size=2, num_inference_steps=3, output_type="pt", **kw).images


def test_fast_mode_without_seed_uses_torch_default_generator(tmp_path, tiny_diffusers_unet):
    # issue 14: no seed and no generator used to mean Philox seed 0 on every call
    fast = _fast(tmp_path, tiny_diffusers_unet)
    torch.manual_seed(3)
    a, b = _run(fast), _run(fast)
    assert not torch.equal(a, b)                     # consecutive calls differ
    torch.manual_seed(3)
    assert torch.equal(_run(fast), a)                # torch.manual_seed fixes a call
    assert torch.equal(_run(fast, seed=0), _run(fast, seed=0))   # seed= stays reproducible


def test_fast_mode_draws_its_seed_from_the_generator(tmp_path, tiny_diffusers_unet):
    # issue 14: a generator used to be reduced to its initial_seed(), so it never advanced
    fast = _fast(tmp_path, tiny_diffusers_unet)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a, b = _run(fast, generator=g), _run(fast, generator=g)
    assert not torch.equal(a, b)                     # the generator advanced
    assert not torch.equal(g.get_state(), state)
    assert torch.equal(_run(fast, generator=torch.Generator().manual_seed(5)), a)


def test_fast_mode_refuses_a_list_of_generators(tmp_path, tiny_diffusers_unet):
    fast = _fast(tmp_path, tiny_diffusers_unet)
    gens = [torch.Generator().manual_seed(i) for i in (3, 4)]
    with pytest.raises(ValueError, match=r"fast mode takes one generator.*\(seed, image index\)"
                                         r".*seed="):
        _run(fast, generator=gens)

@pytest.mark.parametrize("mode, dtype, tol", [
    ("reference", None, 1e-5), ("fast", torch.float32, 1e-5),
    # bf16 convolutions round differently per batch shape (oneDNN picks kernels by shape): the
    # noise is the same, the images agree to a few 8-bit levels (measured 0.0094 of [0, 1])
    ("fast", torch.bfloat16, 0.03),
])
def test_seeded_images_independent_of_batch(tmp_path, tiny_diffusers_unet, mode, dtype, tol):
    _save(tmp_path, tiny_diffusers_unet)
    pipe = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path, mode=mode, dtype=dtype)
    big = pipe(batch_size=4, seed=5, num_inference_steps=20, output_type="pt").images
    one = pipe(batch_size=1, seed=5, first_image=2, num_inference_steps=20,
               output_type="pt").images
    assert (big[2:3] - one).abs().max() <= tol


def test_ddim_deterministic_and_close_to_ddpm_statistics(tmp_path, tiny_diffusers_unet):
    _save(tmp_path, tiny_diffusers_unet)
    pipe = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    a = pipe(batch_size=2, seed=1, sampler="ddim", num_inference_steps=10, output_type="pt").images
    b = pipe(batch_size=2, seed=1, sampler="ddim", num_inference_steps=10, output_type="pt").images
    assert torch.equal(a, b)


def test_intermediates(tmp_path, tiny_diffusers_unet):
    _save(tmp_path, tiny_diffusers_unet)
    pipe = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    out = ddpm_fast.ddpm_sample(pipe.unet, pipe.schedule, (1, 3, 16, 16), seed=0,
                                num_inference_steps=10, intermediates_every=3)
    ts = [t for t, _, _ in out.intermediates]
    assert ts == [900, 600, 300, 0]
    t, xt, x0 = out.intermediates[-1]
    assert xt.shape == x0.shape == (1, 3, 16, 16) and x0.abs().max() <= 1


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_batch_size(tmp_path, tiny_diffusers_unet, bad):
    _save(tmp_path, tiny_diffusers_unet)
    pipe = ddpm_fast.DDPMPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        pipe(batch_size=bad)


def test_accelerate_diffusers_pipeline(tiny_diffusers_unet):
    pipe = diffusers.DDPMPipeline(unet=tiny_diffusers_unet, scheduler=diffusers.DDPMScheduler())
    fast = ddpm_fast.accelerate(pipe)
    assert fast.mode == "fast"
    out = fast(batch_size=2, num_inference_steps=3, output_type="np").images
    assert out.shape == (2, 16, 16, 3)


def test_unsupported_variance_type_is_named(tiny_diffusers_unet):
    from ddpm_fast.unet import UNet2DModel

    with pytest.raises(ValueError, match="learned_range"):
        ddpm_fast.DDPMPipeline(UNet2DModel("tiny"), {"variance_type": "learned_range"})


def test_bf16_fast_path_tracks_fp32():
    """The bf16 U-Net (fast mode's GPU default, here on CPU) against the fp32 one, same Philox
    noise, shipped digits model. bf16 keeps 8 mantissa bits, so each ε̂ carries ~2^-9 relative
    error; the fp32 sampler state and the contracting ancestral chain keep it from compounding:
    measured after 1000 steps a mean |Δ| of 0.0033 (0.4 of an 8-bit level), 15 of 16 images
    within 0.02 everywhere; one image's trajectory, near a decision point of the reverse chain,
    moved by 0.16 (noise-driven chains amplify small differences there). The 4 images run here
    (the first 4 of those 16: noise is per image; the first 8 are all within 0.017, mean
    0.0017) may hold one such outlier. Statistics of 512 samples (100 steps) agree to 0.002; with 50 steps,
    of 128 samples to 0.0017 (means) and 0.0005 (standard deviations), and of the 32 run here
    (a quarter of the cost) to the same 0.0017 and 0.0005: six and twenty times inside the
    bound."""
    from ddpm_fast.checkpoints import load_unet
    from ddpm_fast.cli import default_model_path
    from ddpm_fast.fast import FastRunner
    from ddpm_fast.schedule import Schedule

    unet, s = load_unet(default_model_path()), Schedule.linear()

    def run(dtype, steps, batch):
        ts = s.timesteps(steps)
        return FastRunner(unet, "cpu", dtype=dtype).sample(s.step_table(ts, "fixed_small"), ts,
                                                          batch, seed=3)

    d = (run(torch.float32, 1000, 4) - run(torch.bfloat16, 1000, 4)).abs()
    per_image = d.flatten(1).amax(1)
    assert d.mean() < 0.01 and (per_image < 0.03).sum() >= 3, (d.mean(), per_image)
    a, b = run(torch.float32, 50, 32), run(torch.bfloat16, 50, 32)
    dims = (0, 2, 3)                                      # per channel
    assert (a.mean(dims) - b.mean(dims)).abs().max() < 0.01
    assert (a.std(dims) - b.std(dims)).abs().max() < 0.01


@pytest.mark.parametrize("sampler", ["dpm++", "unipc"])
def test_bf16_solvers_track_fp32(sampler):
    """The bf16 rule above for the recommended few-step solvers (10 steps, diffusers' default
    settings, shipped digits model, same Philox noise). Their chains are deterministic after
    x_T, so bf16's ~2^-9 error in each output is not averaged away by fresh noise, but ten
    steps do not let it grow: measured over 64 images a mean |Δ| of 0.0046 (DPM-Solver++) and
    0.0055 (UniPC), the largest pixel 0.06 and 0.12; per-channel means of the 32 run here
    within 0.0039 and 0.0045, standard deviations within 0.0012 and 0.0014 (bound 0.01)."""
    from ddpm_fast.checkpoints import load_unet
    from ddpm_fast.cli import default_model_path
    from ddpm_fast.fast import FastRunner
    from ddpm_fast.solvers import BY_SAMPLER

    unet, family = load_unet(default_model_path()), BY_SAMPLER[sampler]
    plan = family.plan(family.settings({}), 10)
    a, b = (FastRunner(unet, "cpu", dtype=dtype).sample_plan(plan, 32, seed=3)
            for dtype in (torch.float32, torch.bfloat16))
    assert (a - b).abs().mean() < 0.01
    dims = (0, 2, 3)
    assert (a.mean(dims) - b.mean(dims)).abs().max() < 0.01
    assert (a.std(dims) - b.std(dims)).abs().max() < 0.01
