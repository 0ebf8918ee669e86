"""The fused sampler step and Philox noise against their torch references, on every backend
built here (native C++ always; the CUDA twins are tested in test_cuda.py on a GPU)."""
import math

import pytest
import torch

from conftest import TRITON
from ddpm_fast import _native
from ddpm_fast.ops import ddpm_step, ddpm_step_out, ddpm_step_reference, philox_normal
from ddpm_fast.ops.backend import use_backend
from ddpm_fast.ops.philox import (key_tensor, philox4x32_10_reference, philox_normal_reference)
from ddpm_fast.schedule import Schedule


BACKENDS = (["torch"] + (["native"] if _native.available() else [])
            + TRITON)
SHAPES = [
    (1, 3, 32, 32),    # batch 1, CIFAR
    (5, 3, 17, 13),    # odd sizes, C·H·W not a multiple of 4
    (2, 1, 4, 4),      # tiny, one channel
]


def test_native_module_is_built():
    # CI installs the package: a missing native module must fail loudly, not skip
    assert _native.available(), _native.build_info()


def test_philox_known_answers():
    # Random123's published test vectors for philox4x32-10
    r = philox4x32_10_reference(0, 0, 0, 0, 0, 0).tolist()
    assert r == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    r = philox4x32_10_reference(*(0xFFFFFFFF,) * 6).tolist()
    assert r == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    r = philox4x32_10_reference(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344,
                                0xA4093822, 0x299F31D0).tolist()
    assert r == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_philox_raw_native_bit_exact():
    out = torch.zeros(64, 4, dtype=torch.int32)
    _native._C.philox_raw_cpu(out.data_ptr(), 64, 7, 0xDEADBEEF, 9, 0xFFFFFFF0, 11)
    ref = philox4x32_10_reference(torch.arange(64), 7, 0xDEADBEEF, 9, 0xFFFFFFF0, 11)
    assert torch.equal(out.long() & 0xFFFFFFFF, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 12345, 2 ** 40 + 7])
def test_philox_normal_bit_exact_across_backends(backend, seed):
    ref = philox_normal_reference(seed, 3, 4, 3 * 17 * 13, 999)
    with use_backend(backend):
        out = philox_normal((4, 3, 17, 13), seed, 999, first_image=3)
    assert torch.equal(out.view(4, -1), ref)


def test_philox_normal_statistics():
    z = philox_normal_reference(7, 0, 10, 100_000, 500).double().view(-1)   # 10⁶ draws
    n = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z ** 3).mean()) < 5 * math.sqrt(15 / n)          # skewness
    assert abs((z ** 4).mean() - 3) < 5 * math.sqrt(96 / n)      # kurtosis
    # Kolmogorov–Smirnov against N(0, 1): D·√n < 1.95 is the 0.1% critical value
    zs = torch.sort(z).values
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()
    assert d * math.sqrt(n) < 1.95


def test_philox_independent_across_steps_and_images():
    a = philox_normal_reference(7, 0, 2, 50_000, 10).double()
    b = philox_normal_reference(7, 0, 2, 50_000, 11).double()
    for u, v in ((a[0], b[0]), (a[0], a[1]), (a[1], b[0])):
        corr = torch.corrcoef(torch.stack([u, v]))[0, 1]
        assert abs(corr) < 5 / math.sqrt(50_000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_noise_independent_of_batch(backend):
    with use_backend(backend):
        big = philox_normal((8, 3, 8, 8), 99, 5)
        one = philox_normal((1, 3, 8, 8), 99, 5, first_image=6)
        mid = philox_normal((3, 3, 8, 8), 99, 5, first_image=4)
    assert torch.equal(big[6], one[0]) and torch.equal(big[4:7], mid)


def _inputs(shape, eps_dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5
    eps = torch.randn(shape, generator=g)
    if layout == "channels_last":
        eps = eps.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        eps = torch.randn(shape[0], shape[1], shape[2], shape[3] * 2, generator=g)[..., ::2]
    return x, eps.to(eps_dtype), torch.randn(shape, generator=g)


def _table(kind):
    s = Schedule.linear(numerics="diffusers")
    ts = s.timesteps(20)
    return (s.ddim_table(ts, eta=0.5) if kind == "ddim" else s.step_table(ts, kind)), ts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
# fixed_large differs from fixed_small only in the SIGMA column's values: every backend (and the
# reference) runs the same code for both, so fixed_small stands for the two; ddim adds the C2
# term (the reference's C2 != 0 branch). fixed_large's σ itself is checked against diffusers in
# test_schedule.py / test_pipeline.py.
@pytest.mark.parametrize("kind", ["fixed_small", "ddim"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("noise_kind", ["external", "philox"])
def test_ddpm_step_matches_reference(backend, shape, eps_dtype, layout, kind, clip, noise_kind):
    x, eps, noise = _inputs(shape, eps_dtype, layout)
    table, _ = _table(kind)
    key = key_tensor(2024, 5)
    for i in (0, 10, 19):   # early, middle, last step (σ = 0 for DDPM)
        step = torch.tensor([i])
        z = noise if noise_kind == "external" else None
        ref = ddpm_step_reference(x, eps.float(), table, step, key, z, clip)
        with use_backend(backend):
            out = ddpm_step(x, eps, table, step, key, z, clip)
        assert out.dtype == torch.float32 and out.is_contiguous()
        # fp32 arithmetic in the same order: equal to 1e-6 (bit-equal in practice)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddpm_step_out_in_place(backend):
    x, eps, noise = _inputs((2, 3, 8, 8), torch.float32, "contiguous")
    table, _ = _table("fixed_large")
    step, key = torch.tensor([3]), key_tensor(1)
    ref = ddpm_step_reference(x, eps, table, step, key, noise, True)
    with use_backend(backend):
        ddpm_step_out(x, x, eps, table, step, key, noise, True)
    torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)


def test_ddpm_step_rejects_bad_input():
    x, eps, noise = _inputs((2, 3, 8, 8), torch.float32, "contiguous")
    table, _ = _table("fixed_small")
    with pytest.raises(RuntimeError, match="eps shape"):
        ddpm_step(x, eps[:1], table, torch.tensor([0]), key_tensor(0), None, True)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ddpm_step(x.double(), eps, table, torch.tensor([0]), key_tensor(0), None, True)
    with pytest.raises(ValueError, match="seed"):
        key_tensor(-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, eps, noise = _inputs((2, 3, 8, 8), torch.bfloat16, "channels_last")
    table, _ = _table("fixed_small")
    step, key = torch.tensor([2]), key_tensor(3)
    with use_backend(backend):
        for z in (noise, None):
            torch.library.opcheck(torch.ops.ddpm_fast.ddpm_step.default,
                                  (x, eps, table, step, key, z, True))
        out = torch.empty_like(x)
        torch.library.opcheck(torch.ops.ddpm_fast.ddpm_step_out.default,
                              (out, x, eps, table, step, key, noise, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_works_in_torch_compile(backend):
    x, eps, noise = _inputs((2, 3, 8, 8), torch.float32, "contiguous")
    table, _ = _table("fixed_small")
    step, key = torch.tensor([4]), key_tensor(3)

    def f(x, eps, noise):
        return ddpm_step(x * 1.0, eps, table, step, key, noise, True) + 0.0

    with use_backend(backend):
        compiled = torch.compile(f, fullgraph=True)
        torch.testing.assert_close(compiled(x, eps, noise), f(x, eps, noise), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_index_past_the_table_never_reads_it(backend):
    """A step index outside the table: the torch reference raises, the kernels write NaN (which
    the runner's NaN watch reports) instead of reading past the table."""
    s = Schedule.linear()
    table = s.step_table(s.timesteps(5))
    x, eps, key = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([1, 0])
    for bad in (5, -1):
        step = torch.tensor([bad])
        with use_backend(backend):
            if backend == "torch":
                with pytest.raises((IndexError, RuntimeError)):
                    ddpm_step(x, eps, table, step, key, None, True)
            else:
                assert torch.isnan(ddpm_step(x, eps, table, step, key, None, True)).all()
    with use_backend(backend):                           # the last row still works
        assert torch.isfinite(ddpm_step(x, eps, table, torch.tensor([4]), key, None, True)).all()
