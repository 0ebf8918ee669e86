"""The fused convolution op (ddpm_fast.ops.conv2d): its torch reference against the U-Net's plain
modules, and every backend built here against that reference (Triton under TRITON_INTERPRET=1 on
the CPU, in fp32: the interpreter's bf16 dot multiplies bit patterns; bf16 runs in test_cuda.py)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON
from ddpm_fast.ops.backend import use_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# the same computation with the modules the U-Net is made of (what the op must equal); the
# per-layer benchmark times it as the stock baseline
from benchmarks.conv2d_layers import torch_composite as _plain  # noqa: E402
from ddpm_fast.ops.conv2d import (ConvStats, Norm, channel_stats, conv2d, group_stats,
                                  norm_affine, per_channel_stats)

BACKENDS = ["torch"] + TRITON
EPS = 1e-6


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _case(n, cin, cout, h, w, *, k=3, groups=8, skip_ch=0, layout="channels_last", seed=0):
    x = _randn(n, cin, h, w, seed=seed) + 0.3
    skip = None if not skip_ch else _randn(n, skip_ch, h, w, seed=seed + 1) - 0.2
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        skip = None if skip is None else skip.contiguous(memory_format=torch.channels_last)
    c = cin + skip_ch
    return dict(
        x=x, skip=skip,
        weight=_randn(cout, c, k, k, seed=seed + 2, scale=(c * k * k) ** -0.5),
        bias=_randn(cout, seed=seed + 3),
        norm=(1 + 0.2 * _randn(c, seed=seed + 4), 0.2 * _randn(c, seed=seed + 5), groups, EPS))


# Each case: why it is here. Sizes are odd or off-tile where it matters.
CASES = {
    "plain_batch1": lambda: _case(1, 32, 40, 8, 8),                       # Cout off the tile
    "odd_map_batch3_nchw": lambda: _case(3, 24, 40, 7, 9, layout="nchw"),
    "norm_silu": lambda: dict(_case(2, 32, 48, 7, 9), silu=True),
    "norm_silu_temb_rows": lambda: dict(_case(3, 32, 48, 5, 6), silu=True,
                                        temb=_randn(3, 48, seed=9)),
    "temb_broadcast_residual": lambda: dict(_case(1, 24, 24, 7, 9), silu=True,
                                            temb=_randn(1, 24, seed=9),
                                            residual=_randn(1, 24, 7, 9, seed=10)),
    # 40 + 24 channels in groups of 16: group 2 straddles the x/skip boundary
    "skip_straddling_group_shortcut": lambda: (lambda c: dict(
        c, silu=True, temb=_randn(2, 40, seed=9),
        shortcut=((c["x"], c["skip"]), _randn(40, 64, 1, 1, seed=11, scale=0.125),
                  _randn(40, seed=12))))(_case(2, 40, 40, 6, 5, skip_ch=24, groups=4)),
    "shortcut_plain_input": lambda: (lambda c: dict(
        c, silu=True, shortcut=(c["x"], _randn(40, 24, 1, 1, seed=11, scale=0.2), None)))(
        _case(1, 24, 40, 7, 9)),
    "downsample_stride2_pad0101": lambda: dict(_case(3, 24, 24, 7, 9, groups=1),
                                               norm=None, stride=2, padding=(0, 1, 0, 1)),
    "upsample": lambda: dict(_case(1, 32, 32, 5, 7), norm=None, upsample=True),
    "upsample_after_norm": lambda: dict(_case(2, 32, 24, 4, 3), silu=True, upsample=True),
    "conv_in_3ch": lambda: dict(_case(2, 3, 32, 8, 8, groups=1), norm=None),
    "conv_out_1x1_k": lambda: dict(_case(1, 32, 3, 8, 8, k=1), silu=True),
}


@pytest.mark.parametrize("name", CASES)
def test_reference_equals_plain_modules(name):
    args = CASES[name]()
    expect = _plain(**args)
    got = conv2d(**args)
    torch.testing.assert_close(got.float(), expect, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_backend_equals_reference(backend, name):
    args = CASES[name]()
    with use_backend("torch"):
        ref, ref_stats = conv2d(**args, return_stats=True)
    with use_backend(backend):
        y, stats = conv2d(**args, return_stats=True)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == \
        args["x"].is_contiguous(memory_format=torch.channels_last)
    scale = max(1.0, ref.abs().max().item())
    assert (y - ref).abs().max().item() <= 1e-4 * scale
    # statistics: whatever the tiling, the same per-channel count, mean and variance
    got, want = per_channel_stats(stats), per_channel_stats(ref_stats)
    torch.testing.assert_close(got[..., 0], want[..., 0])
    torch.testing.assert_close(got[..., 1], want[..., 1], atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(got[..., 2] / got[..., 0], want[..., 2] / want[..., 0],
                               atol=1e-5 * scale ** 2, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_chain_into_next_conv(backend):
    """A ResBlock as two convs: conv1's output statistics feed conv2's norm (no separate pass),
    and an up block's norm of cat([h, skip]) takes (stats of h, stats of skip)."""
    c = _case(2, 24, 32, 7, 9, groups=8)
    temb = _randn(2, 32, seed=20)
    norm2 = (1 + 0.1 * _randn(32, seed=21), 0.1 * _randn(32, seed=22), 8, EPS)
    w2 = _randn(32, 32, 3, 3, seed=23, scale=1 / 17)
    sc = (c["x"], _randn(32, 24, 1, 1, seed=24, scale=0.2), _randn(32, seed=25))
    with use_backend(backend):
        h, h_stats = conv2d(c["x"], c["weight"], c["bias"], norm=c["norm"], silu=True, temb=temb,
                            return_stats=True)
        out, out_stats = conv2d(h, w2, None, norm=norm2, norm_stats=h_stats, silu=True,
                                shortcut=sc, return_stats=True)
        skip, skip_stats = conv2d(c["x"], _randn(16, 24, 3, 3, seed=26, scale=0.1), None,
                                  return_stats=True)
        norm3 = (torch.ones(48), torch.zeros(48), 4, EPS)      # groups of 12 straddle 32 | 16
        up = conv2d(out, _randn(8, 48, 3, 3, seed=27, scale=0.05), None, skip=skip, norm=norm3,
                    norm_stats=(out_stats, skip_stats), silu=True, upsample=True)
    h_ref = _plain(c["x"], c["weight"], c["bias"], norm=c["norm"], silu=True, temb=temb)
    out_ref = _plain(h_ref, w2, None, norm=norm2, silu=True, shortcut=sc)
    skip_ref = F.conv2d(c["x"], _randn(16, 24, 3, 3, seed=26, scale=0.1), padding=1)
    up_ref = _plain(out_ref, _randn(8, 48, 3, 3, seed=27, scale=0.05), None, skip=skip_ref,
                    norm=norm3, silu=True, upsample=True)
    for got, want in ((out, out_ref), (up, up_ref)):
        assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_norm_affine_is_group_norm_at_large_offsets():
    """fp32 partials with a mean of 1e4 and unit spread: Chan's merge keeps the variance (a bare
    E[x²] − E[x]² would lose it to cancellation)."""
    x = _randn(2, 16, 9, 11, seed=3) + 1e4
    parts = torch.stack([torch.stack([
        torch.full((2, 16), 33.0), x.flatten(2)[..., i:i + 33].mean(-1),
        ((x.flatten(2)[..., i:i + 33] - x.flatten(2)[..., i:i + 33].mean(-1, keepdim=True)) ** 2
         ).sum(-1)], -1) for i in range(0, 99, 33)], dim=1)              # [2, 3 tiles, 16, 3]
    w, b = torch.ones(16), torch.zeros(16)
    scale, shift = norm_affine([parts], Norm(w, b, 4, EPS))
    got = x * scale[:, :, None, None] + shift[:, :, None, None]
    expect = F.group_norm(x.double(), 4, w.double(), b.double(), EPS).float()
    torch.testing.assert_close(got, expect, atol=2e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    c = _case(1, 16, 16, 4, 4, groups=4)
    temb = _randn(1, 16, seed=5)
    with use_backend(backend):
        op = torch.ops.ddpm_fast.conv2d.default
        torch.library.opcheck(op, (c["x"], c["weight"], c["bias"], 1, [1, 1, 1, 1], False, None,
                                   c["norm"][0], c["norm"][1], 4, EPS, None, None, None, True,
                                   temb, None, None, None, None, None, False, 0, None))
        x_stats = channel_stats(c["x"])     # group statistics in, and finished ones out
        torch.library.opcheck(op, (c["x"], c["weight"], c["bias"], 1, [1, 1, 1, 1], False, None,
                                   c["norm"][0], c["norm"][1], 4, EPS, x_stats,
                                   None, group_stats(x_stats, 4), True, temb, None, None, None,
                                   None, None, True, 8, channel_stats(c["x"][:, :8])))
        f = torch.compile(lambda x: conv2d(x * 1, c["weight"], c["bias"], norm=c["norm"],
                                           silu=True, temb=temb), fullgraph=True)
        torch.testing.assert_close(f(c["x"]), conv2d(c["x"], c["weight"], c["bias"],
                                                     norm=c["norm"], silu=True, temb=temb))


def _bad(**changes):
    c = dict(_case(2, 16, 16, 4, 4, groups=4), silu=True)
    c.update(changes)
    return c


@pytest.mark.parametrize("changes, message", [
    (dict(x=torch.randn(16, 4, 4)), "x must be"),
    (dict(x=torch.randn(2, 16, 4, 4).double()), "x dtype"),
    (dict(weight=torch.randn(16, 12, 3, 3)), "weight .* must be"),
    (dict(weight=torch.randn(16, 16, 3, 3).half()), "weight dtype"),
    (dict(weight=torch.randn(16, 16, 3, 3, device="meta")), "weight is on meta"),
    (dict(skip=torch.randn(2, 8, 4, 4, device="meta")), "skip is on meta"),
    (dict(skip=torch.randn(2, 8, 5, 4)), "skip .* must be"),
    (dict(norm_stats=torch.zeros(2, 1, 16, 3, device="meta")), "norm_stats is on meta"),
    (dict(norm_stats=torch.zeros(2, 1, 12, 3)), "norm_stats must be"),
    (dict(norm=(torch.ones(16), torch.zeros(16), 5, EPS)), "groups 5"),
    (dict(temb=torch.randn(3, 16)), "temb must be"),
    (dict(residual=torch.randn(2, 16, 3, 3)), "residual must be"),
    (dict(stride=3), "stride must be"),
    (dict(padding=(1, 2, 3)), "padding must be"),
])
def test_bad_input_is_refused_before_launch(changes, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        conv2d(**_bad(**changes))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unet_conv_kernels_equal_reference(backend, monkeypatch):
    """The tiny U-Net (attention at two levels, shortcuts, skips, down/upsampling) under the
    "conv" kernel setting equals its reference forward, with weights in the fast runner's
    [KH, KW, Cin, Cout] layout and activations channels_last. On Triton every norm, the up
    blocks' norms over cat([h, skip]) included, reads the group statistics its producer
    finished: no finalizer launch at all."""
    from ddpm_fast.fast import gemm_layout
    from ddpm_fast.unet import UNet2DModel

    finalizers = _count_finalizers(monkeypatch) if backend == "triton" else []
    torch.manual_seed(0)
    unet = UNet2DModel("tiny").eval()
    for m in unet.modules():          # non-trivial norms, so a wrong scale/shift shows
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.data.normal_(1.0, 0.3)
            m.bias.data.normal_(0.0, 0.3)
    # 8×8 (the U-Net takes any multiple of its downsampling): a quarter of the interpreter's
    # programs of 16×16; a tile still spans several images' rows at the inner levels
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expect = unet(x, t)
        fast = gemm_layout(unet.set_kernels("conv").to(memory_format=torch.channels_last))
        assert fast.kernels == "conv"
        with use_backend(backend):
            got = fast(x.contiguous(memory_format=torch.channels_last), t)
    assert finalizers == []
    assert (got - expect).abs().max().item() <= 1e-4 * expect.abs().max().item()


def test_fast_runner_conv_kernels_sample_like_the_reference_kernels():
    """A fast-mode step with every convolution through conv2d: the Triton backend (when here)
    and the torch one give the images of the runner's reference kernels (fp32). One step: the
    U-Net is the only part the kernel setting changes, and under the interpreter each of its
    forwards costs seconds (the runner's steps after the first are test_pipeline.py's, with the
    same U-Net code)."""
    from ddpm_fast.fast import FastRunner
    from ddpm_fast.schedule import Schedule
    from ddpm_fast.unet import UNet2DModel

    torch.manual_seed(1)
    unet = UNet2DModel("tiny").eval()
    schedule = Schedule.linear()
    # a late step (t = 0): near t = T, x̂₀ = (x − √(1−ᾱ)·ε)/√ᾱ magnifies ε's rounding ~150×
    timesteps = schedule.timesteps(100)[-1:]
    table = schedule.step_table(timesteps)

    def sample(kernels, backend="torch"):
        runner = FastRunner(unet, "cpu", dtype=torch.float32, kernels=kernels)
        with use_backend(backend):
            return runner.sample(table, timesteps, 1, seed=3)

    expect = sample("reference")
    for backend in BACKENDS:
        got = sample("conv", backend)
        assert (got - expect).abs().max().item() <= 1e-4 * expect.abs().max().item(), backend


def test_layer_benchmark_smoke():
    """benchmarks/conv2d_layers.py (what a GPU session runs) works: its inputs and its stock-torch
    composite agree with the op on the interpreter's tiny layers."""
    from benchmarks.conv2d_layers import main

    assert main(["--smoke"]) == 0


def _partials(x, tile):
    """Per-channel (count, mean, M2) partials of x [N, C, H, W] over pixel tiles: [N, T, C, 3]."""
    flat = x.flatten(2)
    parts = []
    for i in range(0, flat.shape[2], tile):
        chunk = flat[..., i:i + tile]
        mean = chunk.mean(-1)
        parts.append(torch.stack([torch.full_like(mean, chunk.shape[-1]), mean,
                                  ((chunk - mean[..., None]) ** 2).sum(-1)], -1))
    return torch.stack(parts, dim=1)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (interpreter on CPU)")
@pytest.mark.parametrize("tiles", [(7, 13), (1, 100)])    # 100 tiles: more than one T block
def test_triton_norm_affine_equals_torch(tiles):
    """The one-launch finalize (partials → per-channel scale/shift) of the Triton path against
    the torch merge, for a group straddling the x/skip boundary and a mean of 1e3."""
    from ddpm_fast.kernels.triton.conv2d import norm_affine as triton_norm_affine

    x = _randn(3, 40, 10, 10, seed=1) + 1e3
    skip = _randn(3, 24, 10, 10, seed=2) * 3
    parts = [_partials(x, tiles[0]), _partials(skip, tiles[1])]
    norm = Norm(_randn(64, seed=3), _randn(64, seed=4), 4, EPS)      # 16 channels a group
    scale, shift = triton_norm_affine(parts, *norm)
    want_scale, want_shift = norm_affine(parts, norm)
    torch.testing.assert_close(scale, want_scale, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(shift, want_shift, rtol=1e-4, atol=1e-3)


def test_unet_conv_kernels_honour_reference_attention_and_refuse_training_dropout():
    from ddpm_fast.unet import UNet2DModel, UNetConfig, PRESETS

    torch.manual_seed(0)
    unet = UNet2DModel("tiny").eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([3])
    with torch.no_grad():
        expect = unet(x, t)
        unet.set_kernels("conv", attention="reference")
        assert not any(m.fused for m in unet.modules() if type(m).__name__ == "Attention")
        torch.testing.assert_close(unet(x, t), expect, atol=1e-5, rtol=1e-5)
    cfg = UNetConfig(**{**PRESETS["tiny"].__dict__, "dropout": 0.1})
    with pytest.raises(RuntimeError, match="for inference"):
        UNet2DModel(cfg).train().set_kernels("conv")(x, t)


def _count_finalizers(monkeypatch):
    """Counts the Triton path's separate norm-finalizer launches."""
    from ddpm_fast.kernels.triton import conv2d as triton_conv

    calls = []
    real = triton_conv.norm_affine
    monkeypatch.setattr(triton_conv, "norm_affine",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# The consumers' tile in the producer tests: one program an image (the interpreter's cost is per
# program and reduction step), with the producers' 16 channels a reduction step, so that the
# norm's groups still straddle the steps' channel chunks
CONSUMER_TILE = (64, 64, 16, 4, 1)


def _small_tiles(monkeypatch, backend):
    """On Triton, 16×16×16 tiles from here on (tiles[0]: the tile every launch gets)."""
    tiles = [(16, 16, 16, 4, 1)]
    if backend == "triton":
        from ddpm_fast.kernels.triton import conv2d as triton_conv

        monkeypatch.setattr(triton_conv, "tile_config", lambda *a: tiles[0])
    return tiles


@pytest.mark.parametrize("backend", BACKENDS)
def test_producer_finishes_group_stats_for_the_next_norm(backend, monkeypatch):
    """stats_groups=G: the producer also returns y's G groups' (count, mean, M2), equal to the
    merge of its partials (Triton: merged by each image's last program, here with 16×16 tiles so
    that an image has 4 × 3 programs); a following conv2d whose norm has G groups reads them with
    no finalizer launch and equals the same conv given only the partials; the per-image ticket
    counters are zero again after the launch."""
    tiles = _small_tiles(monkeypatch, backend)
    finalizers = _count_finalizers(monkeypatch) if backend == "triton" else []
    c = _case(3, 16, 40, 7, 9, groups=4)
    x = c["x"] * 5 + 100                       # a large mean: the merge must not cancel
    w2 = _randn(24, 40, 3, 3, seed=21, scale=0.05)
    norm2 = (1 + 0.2 * _randn(40, seed=22), 0.2 * _randn(40, seed=23), 4, EPS)
    with use_backend(backend):
        y, stats = conv2d(x, c["weight"], c["bias"], return_stats=True, stats_groups=4)
        assert isinstance(stats, ConvStats) and stats.groups.shape == (3, 4, 3)
        want = group_stats(stats.partials, 4)
        torch.testing.assert_close(stats.groups[..., 0], want[..., 0])
        torch.testing.assert_close(stats.groups[..., 1:], want[..., 1:], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(group_stats(channel_stats(y), 4), want, rtol=1e-4, atol=1e-3)
        if backend == "triton":
            from ddpm_fast.kernels.triton.conv2d import _TICKETS

            assert all(int(t.abs().sum()) == 0 for t in _TICKETS.values())
        tiles[0] = CONSUMER_TILE
        from_groups = conv2d(y, w2, None, norm=norm2, norm_stats=stats, silu=True)
        assert finalizers == []
        from_partials = conv2d(y, w2, None, norm=norm2, norm_stats=stats.partials, silu=True)
        assert len(finalizers) == (1 if backend == "triton" else 0)
        # a norm with other groups cannot use them: the partials serve
        other = conv2d(y, w2, None, norm=norm2[:2] + (8, EPS), norm_stats=stats, silu=True)
    scale = from_partials.abs().max().item()
    assert (from_groups - from_partials).abs().max().item() <= 1e-5 * scale
    with use_backend("torch"):
        expect_other = conv2d(y, w2, None, norm=norm2[:2] + (8, EPS), silu=True)
    assert (other - expect_other).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_producer_finishes_groups_of_a_concatenation(backend, monkeypatch):
    """next_skip_stats: the producer of h finishes the groups of cat([h, skip]) (40 + 24
    channels in groups of 16: one straddles the boundary), and the up block's conv2d reads them
    with no finalizer launch, equal to the same conv from the partials."""
    tiles = _small_tiles(monkeypatch, backend)
    finalizers = _count_finalizers(monkeypatch) if backend == "triton" else []
    c = _case(2, 16, 40, 5, 6, groups=4)
    skip = _randn(2, 24, 5, 6, seed=30).contiguous(memory_format=torch.channels_last) * 3 - 2
    w2 = _randn(16, 64, 3, 3, seed=31, scale=0.05)
    norm2 = (1 + 0.2 * _randn(64, seed=32), 0.2 * _randn(64, seed=33), 4, EPS)
    with use_backend(backend):
        skip_stats = channel_stats(skip)
        h, stats = conv2d(c["x"], c["weight"], c["bias"], return_stats=True, stats_groups=4,
                          next_skip_stats=skip_stats)
        assert stats.channels == 64
        torch.testing.assert_close(stats.groups, group_stats([stats.partials, skip_stats], 4),
                                   rtol=1e-5, atol=1e-5)
        tiles[0] = CONSUMER_TILE
        from_groups = conv2d(h, w2, None, skip=skip, norm=norm2, norm_stats=(stats, skip_stats),
                             silu=True)
        assert finalizers == []
        from_partials = conv2d(h, w2, None, skip=skip, norm=norm2,
                               norm_stats=(stats.partials, skip_stats), silu=True)
    scale = from_partials.abs().max().item()
    assert (from_groups - from_partials).abs().max().item() <= 1e-5 * scale


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (interpreter on CPU)")
def test_cifar_conv_unet_kernel_count(monkeypatch):
    """The CIFAR-10 U-Net under "conv" kernels is 64 convolution launches and 6 attentions per
    forward, and no norm finalizer (counted, not run: the outputs stay uninitialised)."""
    from ddpm_fast.kernels.triton import conv2d as triton_conv
    from ddpm_fast.unet import UNet2DModel

    launches = []

    class Count:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append(grid)

    attention_op = sys.modules["ddpm_fast.ops.attention"]   # the package exports the op's name
    attentions = []
    monkeypatch.setattr(attention_op, "attention",
                        lambda q, k, v, scale: attentions.append(1) or torch.empty_like(q))
    monkeypatch.setattr(triton_conv, "_conv2d_kernel", Count())
    finalizers = _count_finalizers(monkeypatch)
    unet = UNet2DModel("cifar10").eval().set_kernels("conv")
    with torch.no_grad(), use_backend("triton"):
        unet(torch.zeros(1, 3, 32, 32), torch.tensor([10]))
    assert (len(launches), len(finalizers), len(attentions)) == (64, 0, 6)


def test_tile_autotune_times_each_candidate_once(monkeypatch):
    """DDPM_FAST_CONV_AUTOTUNE: the candidates start with the heuristic's tile and fit the map;
    the fastest is kept per layer key and not timed again."""
    import triton.testing

    from ddpm_fast.kernels.triton import conv2d as triton_conv

    cands = triton_conv.tile_candidates(1, 16, 256, 256, torch.bfloat16)
    assert cands[0] == triton_conv.tile_config(1, 16, 256, 256, torch.bfloat16, False)
    assert len(set(cands)) == len(cands) and all(bm <= 32 for bm, *_ in cands)
    # 128×256 (two stages) only where there are 256 output channels and pixels to fill it
    assert (128, 256, 64, 8, 2) in triton_conv.tile_candidates(256, 256, 256, 256, torch.bfloat16)
    assert all(bn <= 128 for _, bn, *_ in triton_conv.tile_candidates(256, 256, 128, 256,
                                                                      torch.bfloat16))
    timed = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: fn())
    monkeypatch.setattr(triton_conv, "_TUNED", {})
    times = {cfg: 3.0 - i / len(cands) for i, cfg in enumerate(cands)}     # the last is fastest

    def launch(cfg):
        timed.append(cfg)
        return times[cfg]
    assert triton_conv._tuned("layer", cands, launch) == cands[-1]
    assert triton_conv._tuned("layer", cands, launch) == cands[-1]
    assert timed == cands


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (interpreter on CPU)")
@pytest.mark.parametrize("name", ["skip_straddling_group_shortcut", "downsample_stride2_pad0101",
                                  "temb_broadcast_residual"])
def test_split_k_equals_reference(name, monkeypatch):
    """Split-K (the batch-1 low-resolution layers on a GPU), forced here to 3 splits with
    16×16×16 tiles: in the shortcut case 9 taps × 5 channel chunks + 5 shortcut chunks = 50
    steps split 17 / 17 / 16, so splits end mid-tap and the last covers the main loop's end and
    the whole 1×1 shortcut. The output, its statistics and the producer-finished groups equal
    the torch reference's; every split and group ticket is zero again after the launch."""
    from ddpm_fast.kernels.triton import conv2d as triton_conv

    monkeypatch.setattr(triton_conv, "tile_config", lambda *a: (16, 16, 16, 4, 1))
    monkeypatch.setattr(triton_conv, "split_k", lambda programs, steps, interpret: 3)
    args = CASES[name]()
    groups = 4 if args["weight"].shape[0] % 4 == 0 else 1
    with use_backend("torch"):
        ref, ref_stats = conv2d(**args, return_stats=True, stats_groups=groups)
    with use_backend("triton"):
        y, stats = conv2d(**args, return_stats=True, stats_groups=groups)
    scale = max(1.0, ref.abs().max().item())
    assert (y - ref).abs().max().item() <= 1e-4 * scale
    torch.testing.assert_close(stats.groups[..., :2], ref_stats.groups[..., :2],
                               atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(stats.groups[..., 2], ref_stats.groups[..., 2],
                               atol=1e-5 * scale ** 2, rtol=1e-4)
    assert all(int(t.abs().sum()) == 0 for t in triton_conv._TICKETS.values())


def test_split_k_only_where_the_gpu_would_idle(monkeypatch):
    """The split heuristic: batch-1 layers of 8-64 tiles split up to about one program per SM
    with ≥ 4 steps each; full launches, short reductions, the interpreter and
    DDPM_FAST_CONV_SPLITK=0 do not split."""
    pytest.importorskip("triton")
    from ddpm_fast.kernels.triton.conv2d import GPU_PROGRAMS, split_k

    monkeypatch.delenv("DDPM_FAST_CONV_SPLITK", raising=False)
    assert split_k(8, 36, False) == 8            # 4×4 map, 256 channels: 64 programs
    assert split_k(8, 72, False) == 16           # the up block's 256 + 256 channels
    assert split_k(64, 36, False) == 2
    assert split_k(128, 18, False) == 1          # 32×32 map: every SM busy already
    assert split_k(8, 4, False) == 1             # conv_in: too short to split
    assert split_k(8 * 64, 36, False) == 1       # batch 64
    assert all(p * split_k(p, 72, False) <= max(p, GPU_PROGRAMS) for p in range(1, 300))
    assert split_k(8, 36, True) == 1
    monkeypatch.setenv("DDPM_FAST_CONV_SPLITK", "0")
    assert split_k(8, 36, False) == 1
