"""The fast runner's CPU-side preparation: cuDNN flag scoping and prepacked convolutions."""
import pytest
import torch
import torch.nn.functional as F

from ddpm_fast.fast import (FastRunner, PackedConv2d, cudnn_benchmark, default_autotune,
                            mkldnn_bf16, mkldnn_packing_available, pack_convolutions)
from ddpm_fast.schedule import Schedule
from ddpm_fast.unet import UNet2DModel

needs_packing = pytest.mark.skipif(not mkldnn_packing_available(),
                                   reason="this torch build has no oneDNN weight packing")


@pytest.mark.parametrize("caller_setting", [False, True])
def test_cudnn_benchmark_is_scoped_to_the_run(caller_setting):
    """Fast mode turns cuDNN's benchmark mode on for its own convolutions only on CUDA, and the
    caller's global setting is back when sampling ends, also when it ends in an error."""
    torch.backends.cudnn.benchmark = caller_setting
    try:
        runner = FastRunner(UNet2DModel("tiny"), "cpu", dtype=torch.float32)
        assert runner.autotune_convs is False          # no cuDNN on the CPU
        s = Schedule.linear()
        ts = s.timesteps(2)
        runner.autotune_convs = not caller_setting
        seen = []
        runner.unet.register_forward_hook(lambda *_: seen.append(torch.backends.cudnn.benchmark))
        runner.sample(s.step_table(ts, "fixed_small"), ts, 1, seed=0)
        assert seen == [not caller_setting] * 2            # both U-Net calls ran with it
        assert torch.backends.cudnn.benchmark is caller_setting
        with pytest.raises(ZeroDivisionError), cudnn_benchmark(not caller_setting):
            assert torch.backends.cudnn.benchmark is not caller_setting
            1 / 0
        assert torch.backends.cudnn.benchmark is caller_setting
    finally:
        torch.backends.cudnn.benchmark = False


def test_autotuning_yields_to_determinism(monkeypatch):
    cuda = torch.device("cuda")
    assert default_autotune(cuda) and not default_autotune(torch.device("cpu"))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    assert not default_autotune(cuda)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not default_autotune(cuda)


@needs_packing
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("cin, cout, kernel, stride, padding", [
    (32, 16, 3, 1, 1),      # the ResBlock convolutions
    (16, 16, 3, 2, 0),      # DDPM's downsampling (after an asymmetric F.pad)
    (48, 16, 1, 1, 0),      # the 1×1 shortcut
    (3, 32, 3, 1, 1),       # conv_in: 3 input channels
])
def test_packed_conv_equals_conv2d(dtype, tol, cin, cout, kernel, stride, padding):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, kernel, stride, padding).to(dtype).eval()
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    packed = PackedConv2d.wrap(conv)
    with torch.no_grad():
        # packed at the first call; later calls with other batch sizes and layouts reuse it
        for batch, layout in ((2, torch.channels_last), (5, torch.contiguous_format),
                              (1, torch.channels_last)):
            x = torch.randn(batch, cin, 9, 9).to(dtype).contiguous(memory_format=layout)
            expect = F.conv2d(x, weight, bias, stride, padding)
            got = packed(x)
            assert got.shape == expect.shape
            assert (got.float() - expect.float()).abs().max() <= tol * expect.abs().max()
    # oneDNN packs bf16 only where it has a bf16 path (not on AVX2-only CPUs): else torch's conv
    assert (packed.packed_weight is not None) == (dtype == torch.float32 or mkldnn_bf16())


@needs_packing
def test_packed_conv_trains_like_conv2d():
    """With autograd on, the plain convolution runs: gradients reach the weight."""
    conv = PackedConv2d.wrap(torch.nn.Conv2d(4, 4, 3, padding=1))
    conv(torch.randn(1, 4, 5, 5)).sum().backward()
    assert conv.weight.grad is not None and conv.packed_weight is None


def test_cpu_runner_packs_its_own_copy_only():
    unet = UNet2DModel("tiny").eval()
    runner = FastRunner(unet, "cpu", dtype=torch.float32)
    convs = [m for m in runner.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(isinstance(m, PackedConv2d) for m in convs) == mkldnn_packing_available()
    assert not any(isinstance(m, PackedConv2d) for m in unet.modules())   # the caller's model
    assert runner.unet.state_dict().keys() == unet.state_dict().keys()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        assert (runner.unet(x.contiguous(memory_format=torch.channels_last), t)
                - unet(x, t)).abs().max() <= 1e-5
    assert pack_convolutions(runner.unet) is runner.unet        # a second call changes nothing


def test_cpu_default_kernels():
    """The CPU fast path runs the C++ GroupNorm(+add, +SiLU) and torch's attention blocks (the
    mix that measured fastest there); the caller's model keeps torch's ops."""
    from ddpm_fast import _native
    from ddpm_fast.unet import Attention, ResnetBlock2D

    unet = UNet2DModel("tiny").eval()
    runner = FastRunner(unet, "cpu", dtype=torch.float32)
    blocks = {kind: [m.fused for m in runner.unet.modules() if isinstance(m, kind)]
              for kind in (ResnetBlock2D, Attention)}
    assert blocks[ResnetBlock2D] and blocks[Attention]
    assert all(blocks[ResnetBlock2D]) == _native.available() and not any(blocks[Attention])
    assert unet.kernels == "reference"
    explicit = FastRunner(unet, "cpu", dtype=torch.float32, kernels="fused")
    assert all(m.fused for m in explicit.unet.modules() if isinstance(m, Attention))


def test_fused_norms_keep_fp32_affine_once():
    """The fused GroupNorm reads fp32 weight and bias: the bf16 runner casts them once instead
    of at every call, with the same output as casting per call."""
    from ddpm_fast import _native

    if not _native.available():
        pytest.skip("the CPU fast path fuses no norms without the native module")
    unet = UNet2DModel("tiny").eval()
    runner = FastRunner(unet, "cpu", dtype=torch.bfloat16)
    norms = runner.unet.fused_norms()
    assert norms and all(n.weight.dtype == n.bias.dtype == torch.float32 for n in norms)
    assert runner.unet.conv_in.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 16, 16).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        once = runner.unet(x, t)
        for n in norms:
            n.to(torch.bfloat16)
        per_call = runner.unet(x, t)
    assert torch.equal(once, per_call)


def test_failed_compile_falls_back_to_the_fused_eager_unet(monkeypatch):
    """A torch.compile failure warns once and runs the eager U-Net with the fused kernels (not
    the reference ops compile had chosen); the images are the eager runner's."""
    def broken_compile(model, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("inductor exploded")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    unet = UNet2DModel("tiny").eval()
    s = Schedule.linear()
    ts = s.timesteps(4)
    table = s.step_table(ts)
    runner = FastRunner(unet, "cpu", dtype=torch.float32, compile=True)
    assert runner.unet.kernels == "reference"           # what compile left to Inductor
    with pytest.warns(UserWarning, match="inductor exploded"):
        out = runner.sample(table, ts, 2, seed=1)
    assert runner.model is runner.unet and runner.unet.kernels == "fused"
    eager = FastRunner(unet, "cpu", dtype=torch.float32, compile=False, kernels="fused")
    torch.testing.assert_close(out, eager.sample(table, ts, 2, seed=1), atol=1e-5, rtol=0)


def test_table_and_timesteps_must_match():
    runner = FastRunner(UNet2DModel("tiny").eval(), "cpu", dtype=torch.float32)
    s = Schedule.linear()
    ts = s.timesteps(10)
    with pytest.raises(ValueError, match="5 rows for 10 timesteps"):
        runner.sample(s.step_table(ts[:5]), ts, 1, seed=0)
    with pytest.raises(ValueError, match="float32"):
        runner.sample(s.step_table(ts).double(), ts, 1, seed=0)
