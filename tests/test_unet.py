import pytest
import torch

from ddpm_fast.unet import PRESETS, UNet2DModel, UNetConfig
from conftest import diffusers_kwargs

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "tiny": PRESETS["tiny"],   # attention at two resolutions
    "cifar10": PRESETS["cifar10"],
    # odd settings: 3 layers per block, mid-scale, flip_sin_to_cos, padding=1, multi-head attention
    "odd": UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=3,
                      norm_num_groups=16, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D"), flip_sin_to_cos=True,
                      freq_shift=0, downsample_padding=1, attention_head_dim=16,
                      mid_block_scale_factor=1.4142, in_channels=1, out_channels=1),
}


def test_cifar10_parameter_count():
    with torch.device("meta"):           # shapes only: no 35.7 M weights drawn
        unet = UNet2DModel("cifar10")
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_equals_diffusers(name):
    cfg = CONFIGS[name]
    torch.manual_seed(1)
    theirs = diffusers.UNet2DModel(**diffusers_kwargs(cfg)).eval()
    ours = UNet2DModel(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)   # same names, same shapes
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    for t in (0, 421, 999):
        with torch.no_grad():
            d = (ours(x, torch.tensor(t)) - theirs(x, torch.tensor(t)).sample).abs().max()
        assert d <= 1e-5


def test_unknown_block_type_is_named():
    with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
        UNetConfig(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
                                     "DownBlock2D"))


def test_unsupported_setting_is_named():
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        UNetConfig.from_dict({"resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ValueError, match="unknown UNet setting 'foo'"):
        UNetConfig.from_dict({"foo": 1})


@pytest.mark.parametrize("name", ["cifar10", "odd"])
def test_fused_kernels_equal_reference(name):
    import copy

    from ddpm_fast.ops.backend import use_backend
    from test_group_norm import BACKENDS

    cfg = CONFIGS[name]
    torch.manual_seed(2)
    ref = UNet2DModel(cfg).eval()
    fused = copy.deepcopy(ref).set_kernels("fused")
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        expect = ref(x, t)
        for backend in BACKENDS:
            if backend == "triton" and name == "cifar10":
                continue   # the Triton interpreter is too slow for the full model
            # the interpreter's cost is per program, N·G of them a norm: one image on Triton
            # (its kernels take each image's row of the add at any batch: test_group_norm.py;
            # the U-Net hands over the rows alike to every backend: the two images here)
            n = 1 if backend == "triton" else 2
            with use_backend(backend):
                assert (fused(x[:n], t[:n]) - expect[:n]).abs().max() <= 1e-4


def test_set_kernels_rejects_unknown():
    with pytest.raises(ValueError, match="kernels must be one of"):
        UNet2DModel("tiny").set_kernels("cuda")
    with pytest.raises(ValueError, match="got 'flash'"):
        UNet2DModel("tiny").set_kernels("fused", attention="flash")


@pytest.mark.parametrize("kernels", ["reference", "fused"])
@pytest.mark.parametrize("head_dim", [None, 16])
def test_fused_qkv_equals_three_projections(kernels, head_dim):
    """fuse_qkv stacks to_q/to_k/to_v into one GEMM: the same outputs (fp32, one head or
    several), the same state_dict, and the stacked copies follow .to() like the weights."""
    import copy

    torch.manual_seed(4)
    cfg = UNetConfig(**{**PRESETS["tiny"].__dict__, "attention_head_dim": head_dim})
    ref = UNet2DModel(cfg).eval().set_kernels(kernels)
    fused = copy.deepcopy(ref).fuse_qkv()
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 500, 999])
    with torch.no_grad():
        assert (fused(x, t) - ref(x, t)).abs().max() <= 1e-5
        half = fused.to(torch.bfloat16)
        attn = next(m for m in half.modules() if hasattr(m, "qkv_weight"))
        assert attn.qkv_weight.dtype == torch.bfloat16
        assert torch.equal(attn.qkv_weight[:attn.to_q.out_features], attn.to_q.weight)
        assert half(x.bfloat16(), t).dtype == torch.bfloat16
