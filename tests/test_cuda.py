"""GPU checks: the CUDA kernels against the torch references, and the fast runner (graphs, bf16).
Skipped without a GPU; on a GPU machine benchmarks/gpu_suite.sh runs them with the rest."""
import pytest
import torch

from conftest import needs_cuda
from ddpm_fast import _native
from ddpm_fast.fast import FastRunner
from ddpm_fast.ops import ddpm_step, ddpm_step_reference, philox_normal
from ddpm_fast.ops.backend import use_backend
from ddpm_fast.ops.philox import key_tensor, philox_normal_reference
from ddpm_fast.schedule import Schedule
from ddpm_fast.unet import UNet2DModel

pytestmark = needs_cuda


def test_cuda_kernels_built():
    assert _native.has_cuda(), _native.build_info()


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (5, 3, 17, 13), (64, 3, 32, 32)])
def test_philox_cuda_bit_exact(backend, shape):
    with use_backend(backend):
        out = philox_normal(shape, 2 ** 33 + 5, 77, first_image=9, device="cuda")
    ref = philox_normal_reference(2 ** 33 + 5, 9, shape[0], out[0].numel(), 77)
    mismatches = (out.cpu().view(shape[0], -1) != ref).sum().item()
    assert mismatches == 0


@pytest.mark.parametrize("eps_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("philox", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (7, 3, 17, 13)])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_ddpm_step_cuda(eps_dtype, channels_last, philox, shape, backend):
    s = Schedule.linear()
    table = s.step_table(s.timesteps(20), "fixed_small", "cuda")
    x = torch.randn(shape, device="cuda")
    eps = torch.randn(shape, device="cuda").to(eps_dtype)
    if channels_last:
        eps = eps.contiguous(memory_format=torch.channels_last)
    noise = None if philox else torch.randn(shape, device="cuda")
    key = key_tensor(11, 2, "cuda")
    for i in (0, 10, 19):
        step = torch.tensor([i], device="cuda")
        ref = ddpm_step_reference(x.cpu(), eps.float().cpu(), table.cpu(), step.cpu(), key.cpu(),
                                  None if noise is None else noise.cpu(), True)
        with use_backend(backend):
            out = ddpm_step(x, eps, table, step, key, noise, True)
        # nvcc contracts a·b + c into FMA: a few fp32 ulps, no more
        torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel("tiny").eval()


def test_graph_replay_equals_eager_fp32():
    unet = _tiny()
    s = Schedule.linear()
    ts = s.timesteps(25)
    table = s.step_table(ts, "fixed_large")
    eager = FastRunner(unet, "cuda", dtype=torch.float32, use_graphs=False, compile=False)
    graphs = FastRunner(unet, "cuda", dtype=torch.float32, use_graphs=True, compile=False)
    a = eager.sample(table, ts, 4, seed=5)
    b = graphs.sample(table, ts, 4, seed=5)
    c = graphs.sample(table, ts, 4, seed=5)       # replay of the cached graph
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert torch.equal(b, c)


@pytest.mark.parametrize("rule", ["threshold", "learned_range"])
def test_torch_step_rules_capture_in_graphs(rule):
    """Dynamic thresholding (a per-image quantile) and learned variances take the torch step
    instead of the fused kernel: it must capture into the CUDA graph without a host sync (no
    silent fall-back to eager) and replay to the eager result."""
    import warnings

    from ddpm_fast.unet import PRESETS, UNetConfig

    torch.manual_seed(0)
    if rule == "threshold":
        unet, kw = _tiny(), dict(threshold=(0.9, 1.0))
        table_variance = "fixed_small"
    else:
        cfg = UNetConfig(**{**PRESETS["tiny"].__dict__, "out_channels": 6})
        unet, kw = UNet2DModel(cfg).eval(), dict(variance="learned_range")
        table_variance = "learned_range"
    s = Schedule.linear()
    ts = s.timesteps(10)
    table = s.step_table(ts, table_variance)
    eager = FastRunner(unet, "cuda", dtype=torch.float32, use_graphs=False, compile=False)
    graphs = FastRunner(unet, "cuda", dtype=torch.float32, use_graphs=True, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # "sampling without CUDA graphs" fails here
        b = graphs.sample(table, ts, 3, seed=5, **kw)
        c = graphs.sample(table, ts, 3, seed=5, **kw)
    a = eager.sample(table, ts, 3, seed=5, **kw)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert torch.equal(b, c)


def test_images_independent_of_batch_size(monkeypatch):
    # The noise of image 5 is the same in both runs (Philox by index); the U-Net's convolutions
    # may pick other algorithms per batch size, so allow fp32 rounding, with TF32 off.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    unet = _tiny()
    s = Schedule.linear()
    ts = s.timesteps(10)
    table = s.step_table(ts, "fixed_small")
    r = FastRunner(unet, "cuda", dtype=torch.float32, compile=False)
    big = r.sample(table, ts, 7, seed=3)
    one = r.sample(table, ts, 1, seed=3, first_image=5)
    torch.testing.assert_close(big[5:6], one, atol=1e-4, rtol=0)


def test_conv_autotuning_changes_no_image(monkeypatch):
    """cuDNN benchmark mode (fast mode's default on CUDA) picks algorithms by timing them before
    capture; the images must be those of the heuristic choice to fp32 rounding (TF32 off)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    unet = _tiny()
    s = Schedule.linear()
    ts = s.timesteps(10)
    table = s.step_table(ts, "fixed_small")
    runs = [FastRunner(unet, "cuda", dtype=torch.float32, compile=False, autotune_convs=on)
            .sample(table, ts, 16, seed=2) for on in (False, True)]
    torch.testing.assert_close(runs[0], runs[1], atol=1e-4, rtol=0)


def _bf16_run_against_fp32(runner: FastRunner) -> torch.Tensor:
    """50 steps of 512 tiny-model images with `runner` and with an fp32 eager runner, same noise:
    per-channel mean/std within 0.02. Returns the runner's images."""
    s = Schedule.linear()
    ts = s.timesteps(50)
    table = s.step_table(ts, "fixed_large")
    ref = FastRunner(_tiny(), "cuda", dtype=torch.float32, use_graphs=False,
                     compile=False).sample(table, ts, 512, 1)
    out = runner.sample(table, ts, 512, 1)
    assert torch.isfinite(out).all()
    for dim_stats in (lambda v: v.mean(dim=(0, 2, 3)), lambda v: v.std(dim=(0, 2, 3))):
        torch.testing.assert_close(dim_stats(out), dim_stats(ref), atol=2e-2, rtol=0)
    return out


def test_bf16_fast_matches_fp32_reference_statistics():
    _bf16_run_against_fp32(FastRunner(_tiny(), "cuda"))          # bf16, compiled, graphs


@pytest.mark.parametrize("backend", ["triton"])      # GroupNorm's native kernel is CPU-only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 128, 32, 32), (64, 256, 8, 8), (3, 96, 5, 7),
                                   (2, 128, 64, 64)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_cuda(backend, dtype, shape, channels_last):
    import torch.nn.functional as F

    from ddpm_fast.ops import group_norm, group_norm_reference

    x = (torch.randn(shape, device="cuda") * 3 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    add = torch.randn(shape[0], c, device="cuda")
    with use_backend(backend):
        out = group_norm(x, w, b, 32, 1e-6, True, add)
    ref = group_norm_reference(x.float(), w, b, 32, 1e-6, True, add)
    err = (out.float() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4
    else:
        same = F.silu(F.group_norm(x + add.to(dtype)[:, :, None, None], 32, w.to(dtype),
                                   b.to(dtype), 1e-6))
        assert err <= 2 * (same.float() - ref).abs().max().item() + 1e-3


def test_fused_unet_cuda_matches_reference():
    import copy

    torch.manual_seed(0)
    ref = UNet2DModel("cifar10").cuda().eval()
    fused = copy.deepcopy(ref).set_kernels("fused")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    t = torch.tensor([5, 50, 500, 999], device="cuda")
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        for backend in ("native", "triton"):
            with use_backend(backend):
                assert (fused(x, t) - ref(x, t)).abs().max() <= 1e-3


@pytest.mark.parametrize("steps", [1, 2])
def test_short_runs_with_graphs(steps):
    # warm-up and capture must stay inside one- and two-row tables
    s = Schedule.linear()
    ts = s.timesteps(steps)
    r = FastRunner(_tiny(), "cuda", compile=False)
    out = r.sample(s.step_table(ts), ts, 2, seed=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 16, 256), (8, 256, 256), (2, 1024, 512), (3, 37, 40)])
def test_attention_triton_cuda(dtype, shape):
    import torch.nn.functional as F

    from ddpm_fast.ops import attention, attention_reference

    q, k, v = (torch.randn(shape, device="cuda").to(dtype) for _ in range(3))
    scale = shape[2] ** -0.5
    with use_backend("triton"):
        out = attention(q, k, v, scale)
    ref = attention_reference(q.float(), k.float(), v.float(), scale)
    err = (out.float() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * max(1.0, ref.abs().max().item())
    else:
        sdpa = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=scale)
        assert err <= 2 * (sdpa[:, 0].float() - ref).abs().max().item() + 1e-3


def _conv_layers():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.conv2d_layers import CIFAR_LAYERS

    return CIFAR_LAYERS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("batch", [1, 3], ids=["b1", "b3"])
@pytest.mark.parametrize("layer", list(_conv_layers()))
def test_conv2d_triton_cuda(layer, batch, dtype):
    """Every CIFAR layer kind of the fused conv on the GPU: fp32 (IEEE dots) within 1e-4 of the
    fp32 reference; bf16/fp16 within twice stock torch's same-dtype error (flash-attention's
    rule); output statistics equal to the reference's."""
    from benchmarks.conv2d_layers import as_float, make_inputs, torch_composite
    from ddpm_fast.ops.conv2d import conv2d, per_channel_stats

    args = make_inputs(_conv_layers()[layer], batch, "cuda", dtype)
    with use_backend("torch"), torch.backends.cudnn.flags(allow_tf32=False):
        ref, ref_stats = conv2d(**as_float(args), return_stats=True)
        same_dtype = torch_composite(**args)
    with use_backend("triton"):
        out, stats = conv2d(**args, return_stats=True)
    scale = max(1.0, ref.abs().max().item())
    err = (out.float() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4 * scale
    else:
        assert err <= 2 * (same_dtype.float() - ref).abs().max().item() + 1e-3 * scale
    got, want = per_channel_stats(stats), per_channel_stats(ref_stats)
    assert torch.equal(got[..., 0], want[..., 0])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[..., 1], want[..., 1], atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("batch", [3, 64], ids=["b3", "b64"])
@pytest.mark.parametrize("layer", list(_conv_layers()))
def test_conv2d_group_statistics_cuda(layer, batch):
    """The "conv" U-Net's way on the GPU (bf16): the input norm read from finished group
    statistics equals it from partials (a finalizer launch); y's group statistics, merged by each
    image's last program after an atomic ticket, equal the merge of its partials in every one of
    20 launches (programs of many images racing), and the tickets are zero afterwards."""
    from benchmarks.conv2d_layers import make_inputs
    from ddpm_fast.kernels.triton.conv2d import _TICKETS
    from ddpm_fast.ops.conv2d import ConvStats, channel_stats, conv2d, group_stats

    args = make_inputs(_conv_layers()[layer], batch, "cuda", torch.bfloat16)
    skip = args.get("skip")
    finished = dict(args)
    if "norm" in args:
        parts = [channel_stats(args["x"])] + ([] if skip is None else [channel_stats(skip)])
        cin = args["weight"].shape[1]
        first = ConvStats(parts[0], group_stats(parts, args["norm"][2]), cin)
        args["norm_stats"] = tuple(parts) if skip is not None else parts[0]
        finished["norm_stats"] = (first, parts[1]) if skip is not None else first
    cout = args["weight"].shape[0]
    groups = 32 if cout % 32 == 0 else 0
    with use_backend("triton"):
        want = conv2d(**args)
        runs = [conv2d(**finished, return_stats=True, stats_groups=groups) for _ in range(20)]
    torch.cuda.synchronize()
    y, stats = runs[0]
    scale = max(1.0, want.float().abs().max().item())
    assert (y.float() - want.float()).abs().max().item() <= 2e-2 * scale
    if groups:
        torch.testing.assert_close(stats.groups, group_stats(stats.partials, groups),
                                   rtol=1e-5, atol=1e-5 * scale)
        assert all(torch.equal(s.groups, stats.groups) for _, s in runs)
        assert all(int(t.abs().sum()) == 0 for t in _TICKETS.values())


@pytest.mark.parametrize("layer", list(_conv_layers()))
def test_conv2d_split_k_cuda(layer, monkeypatch):
    """Batch 1, where the low-resolution layers split their reduction (split_k): 20 racing
    launches give the same bits (the last split sums the partials in split order), equal to the
    unsplit kernel within fp32 summation order (fp32) and one bf16 rounding (bf16), with the
    producer-finished groups; every ticket is zero afterwards."""
    from benchmarks.conv2d_layers import make_inputs
    from ddpm_fast.kernels.triton.conv2d import _TICKETS
    from ddpm_fast.ops.conv2d import conv2d

    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        args = make_inputs(_conv_layers()[layer], 1, "cuda", dtype)
        groups = 32 if args["weight"].shape[0] % 32 == 0 else 0
        with use_backend("triton"):
            runs = [conv2d(**args, return_stats=True, stats_groups=groups) for _ in range(20)]
            monkeypatch.setenv("DDPM_FAST_CONV_SPLITK", "0")
            unsplit, unsplit_stats = conv2d(**args, return_stats=True, stats_groups=groups)
            monkeypatch.delenv("DDPM_FAST_CONV_SPLITK")
        torch.cuda.synchronize()
        y, stats = runs[0]
        assert all(torch.equal(r, y) for r, _ in runs)
        scale = max(1.0, unsplit.float().abs().max().item())
        assert (y.float() - unsplit.float()).abs().max().item() <= tol * scale
        if groups:
            assert all(torch.equal(s.groups, stats.groups) for _, s in runs)
            torch.testing.assert_close(stats.groups[..., 1], unsplit_stats.groups[..., 1],
                                       rtol=tol, atol=tol * scale)
        assert all(int(t.abs().sum()) == 0 for t in _TICKETS.values())


def test_conv_unet_cuda_matches_reference():
    """The CIFAR U-Net under "conv" kernels (fp32, IEEE dots) equals its reference forward."""
    import copy

    from ddpm_fast.fast import gemm_layout

    torch.manual_seed(0)
    ref = UNet2DModel("cifar10").cuda().eval()
    conv = gemm_layout(copy.deepcopy(ref).set_kernels("conv").to(memory_format=torch.channels_last))
    x = torch.randn(4, 3, 32, 32, device="cuda")
    t = torch.tensor([5, 50, 500, 999], device="cuda")
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        expect = ref(x, t)
        got = conv(x.contiguous(memory_format=torch.channels_last), t)
    assert (got - expect).abs().max() <= 1e-3


def test_conv_kernels_bf16_sampling_with_graphs():
    """FastRunner(kernels="conv"): bf16, CUDA graphs; same per-channel statistics as fp32."""
    fast = FastRunner(_tiny(), "cuda", kernels="conv")
    out = _bf16_run_against_fp32(fast)
    s = Schedule.linear()
    ts = s.timesteps(50)
    again = fast.sample(s.step_table(ts, "fixed_large"), ts, 512, 1)
    assert torch.equal(out, again)                                  # graph replay is deterministic


def test_conv_unet_pdl_changes_nothing(monkeypatch):
    """Programmatic dependent launch only overlaps launches: same bytes with it on and off."""
    from ddpm_fast.fast import gemm_layout

    torch.manual_seed(0)
    conv = gemm_layout(UNet2DModel("cifar10").cuda().eval().to(torch.bfloat16)
                       .set_kernels("conv").to(memory_format=torch.channels_last))
    x = torch.randn(2, 3, 32, 32, device="cuda").to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    t = torch.tensor([5, 999], device="cuda")
    with torch.no_grad():
        off = conv(x, t)
        monkeypatch.setenv("DDPM_FAST_PDL", "1")
        on = conv(x, t)
    assert torch.equal(on, off)
