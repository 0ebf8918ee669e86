"""Single-head attention (the U-Net's spatial self-attention) on every backend here against the
fp32 reference. bf16/fp16 follow the rule of the best kernel libraries: the kernel's error
against fp32 is at most twice that of torch's same-dtype SDPA on the same input (plus a small
slack: on CPU the Triton interpreter rounds its bf16 stores towards zero, a GPU to nearest)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TOL, TRITON
from ddpm_fast.ops import attention, attention_reference
from ddpm_fast.ops.backend import use_backend

BACKENDS = ["torch"] + TRITON
SHAPES = [            # (batch, L = H·W, D = channels)
    (1, 16, 256),     # batch 1, 4×4 map, the CIFAR mid block
    (2, 64, 128),     # 8×8
    (2, 256, 256),    # 16×16, the CIFAR attention level
    (1, 64, 512),     # D = 512 (the 256-px model's width)
    (3, 37, 40),      # odd sizes
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _qkv(shape, dtype, layout, seed=0):
    b, length, d = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "fused_qkv":          # slices of one [B, L, 3D] projection: strided views
        qkv = torch.randn(b, length, 3 * d, generator=g)
        qkv[..., :d] *= 2.0
        qkv = qkv.to(dtype)
        return qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    q = torch.randn(b, length, d, generator=g) * 2.0
    k, v = torch.randn(b, length, d, generator=g), torch.randn(b, length, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv"])
def test_attention(backend, shape, dtype, layout):
    q, k, v = _qkv(shape, dtype, layout)
    scale = shape[2] ** -0.5
    with use_backend(backend):
        out = attention(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    ref = attention_reference(q.float(), k.float(), v.float(), scale)
    err = (out.float() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * max(1.0, ref.abs().max().item())
    else:
        sdpa = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=scale)
        torch_err = (sdpa[:, 0].float() - ref).abs().max().item()
        assert err <= 2 * torch_err + TOL[dtype] * 0.1, (err, torch_err)


def test_reference_is_sdpa():
    q, k, v = _qkv((2, 64, 128), torch.float32, "contiguous")
    torch.testing.assert_close(attention_reference(q, k, v, 0.1),
                               F.scaled_dot_product_attention(q, k, v, scale=0.1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scores_stay_finite(backend):
    # scores of ±1e4: an unstabilised exp overflows; the online max keeps it exact
    q, k, v = _qkv((1, 32, 64), torch.float32, "contiguous")
    q = q * 300
    with use_backend(backend):
        out = attention(q.half(), k.half(), v.half(), 1.0)
    ref = attention_reference(q.half().float(), k.half().float(), v.half().float(), 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=4e-3, rtol=4e-3)


def test_bad_input():
    q = torch.zeros(1, 4, 8)
    with pytest.raises(RuntimeError, match="shapes differ"):
        attention(q, torch.zeros(1, 5, 8), q, 1.0)
    with pytest.raises(RuntimeError, match=r"must be \[B, L, D\]"):
        attention(q[0], q[0], q[0], 1.0)
    with pytest.raises(RuntimeError, match="fp32/bf16/fp16"):
        attention(q, q.double(), q, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    q, k, v = _qkv((1, 16, 32), torch.float32, "contiguous")
    with use_backend(backend):
        torch.library.opcheck(attention, (q, k, v, 0.2))
        compiled = torch.compile(lambda a, b, c: attention(a, b, c, 0.2) * 2, fullgraph=True)
        torch.testing.assert_close(compiled(q, k, v), 2 * attention_reference(q, k, v, 0.2),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unet_attention_block_fused_equals_reference(backend):
    from ddpm_fast.unet import PRESETS, UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(PRESETS["tiny"]).eval()
    block = next(m for m in model.modules() if type(m).__name__ == "Attention")
    x = torch.randn(2, block.to_q.in_features, 8, 8)
    with torch.no_grad():
        ref = block(x)
        block.fused = True
        with use_backend(backend):
            fused = block(x)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
