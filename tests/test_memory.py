"""Memory: the per-image estimate behind batch_size="auto", and peak reporting."""
import pytest
import torch

from ddpm_fast.memory import MAX_AUTO_BATCH, activation_bytes_per_image, max_batch_size, peak_bytes
from ddpm_fast.pipeline import DDPMPipeline
from ddpm_fast.training import DIGITS_CONFIG
from ddpm_fast.unet import PRESETS, UNet2DModel, UNetConfig


def _cifar10_shapes():
    """The CIFAR-10 U-Net on the meta device: the estimates read its config and shapes only
    (no 35.7 M weights drawn)."""
    with torch.device("meta"):
        return UNet2DModel("cifar10")


def test_activation_estimate_scales_with_resolution_and_dtype():
    small = UNet2DModel(PRESETS["tiny"])
    big = UNet2DModel(UNetConfig(**{**PRESETS["tiny"].__dict__, "sample_size": 32}))
    a16 = activation_bytes_per_image(small, torch.float32)
    a32 = activation_bytes_per_image(big, torch.float32)
    assert a16 > 0 and abs(a32 / a16 - 4.0) < 0.2          # activations grow with H·W
    assert activation_bytes_per_image(small, torch.bfloat16) * 2 == a16
    # the CIFAR-10 model: tens of MiB of outputs per image in fp32 (measured 35 MiB)
    assert 20 * 2**20 < activation_bytes_per_image(_cifar10_shapes(), torch.float32) < 60 * 2**20


def test_max_batch_size_bounds():
    cifar10 = _cifar10_shapes()
    b = max_batch_size(cifar10, "cpu")
    assert 1 <= b <= MAX_AUTO_BATCH
    assert max_batch_size(cifar10, "cpu", fraction=0.1) <= b
    with pytest.raises(ValueError, match="fraction"):
        max_batch_size(UNet2DModel("tiny"), "cpu", fraction=0)


def test_pipeline_auto_batch_and_peak():
    torch.manual_seed(0)
    pipe = DDPMPipeline(UNet2DModel(DIGITS_CONFIG).eval(), mode="fast")
    pipe.max_batch_size = lambda fraction=0.8: 3        # keep the test small
    out = pipe(batch_size="auto", seed=0, num_inference_steps=2, output_type="pt").images
    assert out.shape[0] == 3
    assert pipe.last_peak_memory and pipe.last_peak_memory >= peak_bytes("cpu") // 2
