"""GroupNorm(+add, +SiLU) on every backend built here against the fp32 torch reference."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TOL, TRITON
from ddpm_fast import _native
from ddpm_fast.ops import group_norm, group_norm_reference
from ddpm_fast.ops.backend import use_backend

BACKENDS = (["torch"] + (["native"] if _native.available() else [])
            + TRITON)
SHAPES = [
    (1, 128, 32, 32, 32),   # batch 1, CIFAR first level
    (3, 256, 8, 8, 32),     # batch > 1, 8×8
    (2, 512, 4, 4, 32),     # C = 512, 4×4
    (2, 96, 5, 7, 8),       # odd spatial sizes, groups of 12 channels
    (1, 64, 64, 40, 32),    # group larger than one chunk (2 × 64 × 40 = 5120 elements)
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, layout, scale=1.0, seed=0):
    n, c, h, w, groups = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * scale + 0.5 * scale).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(n, c, h, 2 * w, generator=g).to(dtype)[..., ::2]
    weight = torch.randn(c, generator=g)
    bias = torch.randn(c, generator=g)
    add = torch.randn(n, c, generator=g)
    return x, weight, bias, add, groups


def _torch_same_dtype(x, weight, bias, groups, silu, add):
    h = x + add.to(x.dtype)[:, :, None, None]
    y = F.group_norm(h, groups, weight.to(x.dtype), bias.to(x.dtype), 1e-6)
    return F.silu(y) if silu else y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("silu, use_add", [(True, True), (False, False)])
def test_group_norm(backend, shape, dtype, layout, silu, use_add):
    if backend == "triton" and shape[0] * shape[1] * shape[2] * shape[3] > 40_000 and layout != "contiguous":
        # ~1,000 interpreted programs per call: the large shapes run NCHW only here (the small
        # shapes cover every layout; channels_last at these sizes runs on a GPU in test_cuda.py)
        pytest.skip("Triton interpreter too slow for large shapes in every layout: NCHW only on "
                    "CPU; small shapes cover the other layouts")
    x, weight, bias, add, groups = _inputs(shape, dtype, layout)
    add = add if use_add else None
    with use_backend(backend):
        out = group_norm(x, weight, bias, groups, 1e-6, silu, add)
    assert out.dtype == dtype and out.shape == x.shape
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    ref = group_norm_reference(x.float(), weight, bias, groups, 1e-6, silu, add)
    err = (out.float() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * max(1.0, ref.abs().max().item())
    else:
        # at most twice the error of torch's own same-dtype GroupNorm (flash-attention's rule)
        torch_err = (_torch_same_dtype(x, weight, bias, groups, silu,
                                       add if add is not None else torch.zeros(x.shape[:2])).float()
                     - ref).abs().max().item()
        assert err <= 2 * torch_err + TOL[dtype] * 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_large_values_do_not_overflow(backend):
    # |x| ≈ 300: a fp16 sum of squares overflows (300² · 4096 ≫ 65504)
    x, weight, bias, add, groups = _inputs((1, 128, 16, 16, 32), torch.float16, "contiguous",
                                           scale=300.0)
    with use_backend(backend):
        out = group_norm(x, weight, bias, groups, 1e-6, True, None)
    ref = group_norm_reference(x.float(), weight, bias, groups, 1e-6, True, None)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 1e-2


def test_matches_nn_groupnorm_then_silu():
    x, weight, bias, _, groups = _inputs((2, 64, 8, 8, 32), torch.float32, "contiguous")
    gn = torch.nn.GroupNorm(groups, 64, eps=1e-6)
    gn.weight.data.copy_(weight)
    gn.bias.data.copy_(bias)
    expect = F.silu(gn(x))
    for backend in BACKENDS:
        with use_backend(backend):
            torch.testing.assert_close(group_norm(x, weight, bias, groups, 1e-6, True), expect,
                                       atol=1e-5, rtol=1e-5)


def test_bad_input():
    x, weight, bias, add, _ = _inputs((2, 64, 4, 4, 32), torch.float32, "contiguous")
    with pytest.raises(RuntimeError, match="multiple of groups"):
        group_norm(x, weight, bias, 7, 1e-6, True)
    with pytest.raises(RuntimeError, match="weight and bias"):
        group_norm(x, weight[:3], bias, 32, 1e-6, True)
    with pytest.raises(RuntimeError, match="add must be"):
        group_norm(x, weight, bias, 32, 1e-6, True, add[:1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    # the registration is checked, not the numerics (test_group_norm above): few groups, as the
    # interpreter's cost is per program (N·G of them) and opcheck runs the op many times
    x, weight, bias, add, groups = _inputs((2, 16, 4, 4, 4), torch.bfloat16, "channels_last")
    with use_backend(backend):
        torch.library.opcheck(torch.ops.ddpm_fast.group_norm.default,
                              (x, weight, bias, groups, 1e-6, True, add))
        f = torch.compile(lambda x: group_norm(x * 1, weight, bias, groups, 1e-6, True, add),
                          fullgraph=True)
        torch.testing.assert_close(f(x), group_norm(x, weight, bias, groups, 1e-6, True, add))
