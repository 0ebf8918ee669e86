"""The few-step solvers' fused step (ops/solver_step.py): every implementation against the torch
reference, over odd shapes, model-output dtypes and layouts, with and without the corrector and
the noise, the history shift, and a step index past the table."""
import pytest
import torch

from conftest import TRITON, needs_cuda

from ddpm_fast import _native
from ddpm_fast.ops import backend
from ddpm_fast.ops.philox import key_tensor
from ddpm_fast.ops.solver_step import solver_step_, solver_step_reference
from ddpm_fast.solvers import COLS, WORD

IMPLS = (["native"] if _native.available() else []) + TRITON
SHAPES = [(2, 3, 5, 7), (1, 1, 8, 8), (3, 4, 3, 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(shape, dtype, channels_last=False, extra_channels=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = [torch.randn(shape, generator=g) for _ in range(5)]       # x, x_last, m1, m2, m3
    n, c, h, w = shape
    out = torch.randn((n, c + extra_channels, h, w), generator=g).to(dtype)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    coef = torch.randn(4, COLS, generator=g)
    coef[:, WORD] = torch.tensor([1001.0, 1002.0, 1003.0, 1004.0])
    return state, out, coef


def _run(which, state, out, coef, step, corrector, stochastic):
    state = [t.clone() for t in state]
    key = key_tensor(7, 3)
    step = torch.tensor([step])
    if which == "reference":
        solver_step_reference(*state, out, coef, step, key, corrector, stochastic)
    else:
        with backend.use_backend(which):
            solver_step_(*state, out, coef, step, key, corrector, stochastic)
    return state


@pytest.mark.parametrize("which", IMPLS + ["torch"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("corrector, stochastic", [(False, False), (True, False), (False, True),
                                                    (True, True)])
def test_implementations_equal_the_reference(which, shape, corrector, stochastic):
    state, out, coef = _case(shape, torch.float32)
    want = _run("reference", state, out, coef, 2, corrector, stochastic)
    got = _run(which, state, out, coef, 2, corrector, stochastic)
    # fp32 on the CPU: the same operations in the same order (no FMA contraction), same bits
    for name, a, b in zip(("x", "x_last", "m1", "m2", "m3"), got, want):
        assert torch.equal(a, b), (name, (a - b).abs().max())


@pytest.mark.parametrize("which", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last, extra", [(False, 0), (True, 0), (False, 3)])
def test_output_dtypes_layouts_and_extra_channels(which, dtype, channels_last, extra):
    # a bf16/fp16 channels_last output (fast mode's U-Net), or a learned variance's 2·C channels
    state, out, coef = _case((2, 3, 4, 6), dtype, channels_last, extra)
    want = _run("reference", state, out, coef, 1, True, True)
    got = _run(which, state, out, coef, 1, True, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a - b).abs().max()


def test_the_step_is_the_documented_formula_and_shifts_the_history():
    state, out, coef = _case((1, 2, 3, 3), torch.float32)
    x, last, m1, m2, m3 = state
    got = _run("reference", state, out, coef, 0, True, False)
    r = coef[0].double()
    m = r[1] * x.double() + r[2] * out.double()
    xc = r[3] * x + r[4] * last + r[5] * m + r[6] * m1 + r[7] * m2 + r[8] * m3
    new = r[9] * xc + r[10] * m + r[11] * m1 + r[12] * m2
    for a, b in zip(got, (new, xc, m, m1, m2)):
        assert torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", IMPLS + ["torch"])
def test_noise_depends_on_the_word_and_image_only(which):
    # the z of image i equals the z the same step draws for it in a batch of its own
    state, out, coef = _case((3, 2, 4, 4), torch.float32)
    coef[:, :WORD] = 0
    coef[:, 13] = 1.0                                # x' = S·z
    full = _run(which, state, out, coef, 1, False, True)[0]
    key = key_tensor(7, 5)                           # image 2 of key (7, 3) alone
    alone = [t[2:3].clone() for t in state]
    with backend.use_backend(which):
        solver_step_(*alone, out[2:3], coef, torch.tensor([1]), key, False, True)
    assert torch.equal(alone[0][0], full[2])
    assert full.std() > 0.5


@pytest.mark.parametrize("which", IMPLS)
def test_a_step_past_the_table_poisons_x(which):
    state, out, coef = _case((1, 2, 4, 4), torch.float32)
    got = _run(which, state, out, coef, 4, False, False)[0]
    assert bool(torch.isnan(got).all())


def test_bad_arguments_are_named():
    state, out, coef = _case((1, 2, 4, 4), torch.float32)
    with pytest.raises(RuntimeError, match="coef must be float32"):
        solver_step_(*state, out, coef[:, :12], torch.tensor([0]), key_tensor(0), False, False)
    with pytest.raises(RuntimeError, match="m2 must be float32"):
        bad = list(state)
        bad[3] = bad[3].double()
        solver_step_(*bad, out, coef, torch.tensor([0]), key_tensor(0), False, False)


@needs_cuda
@pytest.mark.parametrize("which", ["native", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_equal_the_reference(which, dtype):
    # on the GPU the compilers may fuse multiply-adds: equal within float32 rounding
    state, out, coef = _case((3, 3, 8, 8), dtype, channels_last=True, extra_channels=3)
    want = _run("reference", state, out, coef, 2, True, True)
    cuda = [t.cuda() for t in state]
    key, step = key_tensor(7, 3, "cuda"), torch.tensor([2], device="cuda")
    with backend.use_backend(which):
        solver_step_(*cuda, out.cuda(), coef.cuda(), step, key, True, True)
    for a, b in zip(cuda, want):
        assert torch.allclose(a.cpu(), b, rtol=1e-5, atol=1e-5), (a.cpu() - b).abs().max()


@needs_cuda
def test_cuda_graph_replays_the_solver_run():
    from ddpm_fast.cli import default_model_path
    from ddpm_fast.pipeline import DDPMPipeline

    runs = {}
    for graphs in (False, True):
        pipe = DDPMPipeline.from_pretrained(default_model_path(), mode="fast", device="cuda",
                                            dtype=torch.float32, use_graphs=graphs)
        pipe.set_progress_bar_config(disable=True)
        for sampler in ("dpm++", "unipc", "euler-ancestral"):
            runs[graphs, sampler] = pipe(batch_size=4, seed=1, sampler=sampler,
                                         num_inference_steps=8, output_type="pt").images
    for sampler in ("dpm++", "unipc", "euler-ancestral"):
        a, b = runs[False, sampler], runs[True, sampler]
        assert torch.allclose(a, b, atol=1e-5), (sampler, (a - b).abs().max())
