"""The bad-input table: each case is refused with an error that names the problem, before any
work, and leaves nothing behind. Library calls raise ValueError; the CLI prints one line and
exits with status 2 (bad input) or 1 (a failure while running: full disk, diverging model)."""
import errno
import json

import pytest
import torch

from ddpm_fast import cli
from ddpm_fast.checkpoints import save_pretrained
from ddpm_fast.pipeline import DDPMPipeline
from ddpm_fast.sampling import NonFiniteError, denoise_from
from ddpm_fast.schedule import Schedule
from ddpm_fast.training import DIGITS_CONFIG
from ddpm_fast.unet import UNet2DModel


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(DIGITS_CONFIG).eval()          # 1 × 8 × 8, downsampling by 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, unet):
    path = tmp_path_factory.mktemp("model")
    save_pretrained(unet, path)
    return path


T = torch.tensor([10])


@pytest.mark.parametrize("make_input, message", [
    (lambda: torch.zeros(1, 8, 8), r"must be \[batch, 1, H, W\], got \(1, 8, 8\)"),
    (lambda: torch.zeros(1, 3, 8, 8), "has 3 channels, the model takes 1"),
    (lambda: torch.zeros(1, 1, 8, 8, dtype=torch.int64), "floating-point tensor, got torch.int64"),
    (lambda: torch.zeros(1, 1, 8, 8, device="meta"), "is on meta, the model on cpu"),
    (lambda: torch.zeros(1, 1, 10, 10), "10×10 is not divisible by 4"),
])
def test_unet_input(unet, make_input, message):
    with pytest.raises(ValueError, match=message):
        unet(make_input(), T)


@pytest.mark.parametrize("t", [-2, 1000, 5000])
def test_timestep_outside_schedule(unet, t):
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        denoise_from(unet, Schedule.linear(), torch.zeros(1, 1, 8, 8), t)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=1001), r"num_inference_steps must be in \[1, 1000\]"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(batch_size=-3), "batch_size must be a positive integer"),
    (dict(variance="fixed_large_log"), "variance must be one of"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*63\)"),
    (dict(seed=0, first_image=2 ** 32), r"image index must be in \[0, 2\*\*32\)"),
])
@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_pipeline_arguments(model_dir, mode, kwargs, message):
    pipe = DDPMPipeline.from_pretrained(model_dir, mode=mode)
    with pytest.raises(ValueError, match=message):
        pipe(**{"num_inference_steps": 2, **kwargs})


def test_unknown_scheduler_variance(model_dir, tmp_path):
    import shutil

    shutil.copytree(model_dir, tmp_path / "m")
    cfg_path = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["variance_type"] = "learned_range"
    cfg_path.write_text(json.dumps(cfg))
    # a learned variance needs a U-Net with 2 × in_channels outputs (this one has 3)
    with pytest.raises(ValueError, match="variance_type='learned_range' needs a U-Net"):
        DDPMPipeline.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_diverging_model_is_stopped_with_step_and_images(unet, mode):
    import copy

    broken = copy.deepcopy(unet)
    with torch.no_grad():
        broken.conv_out.bias.fill_(float("inf"))
    pipe = DDPMPipeline(broken, None, mode=mode)
    with pytest.raises(NonFiniteError, match=r"by step 1 \(t = \d+\) in images 5, 6, 7"):
        pipe(batch_size=3, seed=0, first_image=5, num_inference_steps=2, output_type="pt")


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--image-ids", "0-4294967296"], "outside [0, 4294967295]"),
    (["--image-ids", "0-9,3"], "overlaps"),
    (["--image-ids", "x"], "not an integer"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--steps", "1001"], "exceeds the model's 1000"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--variance", "learned"], "invalid choice"),
    (["--seed", "-5"], "--seed must be non-negative"),
])
def test_cli_sample_arguments(tmp_path, capsys, model_dir, argv, message):
    code, err = run(capsys, "sample", "--model", model_dir, "--out", tmp_path / "x.npz", *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_output_folder_not_writable(tmp_path, capsys, model_dir):
    (tmp_path / "file").write_text("not a folder")
    code, err = run(capsys, "sample", "--model", model_dir, "--out", tmp_path / "file" / "x.png")
    assert code == 2 and "is not a folder" in err


def test_disk_full_during_shard_write(tmp_path, capsys, model_dir, monkeypatch):
    import ddpm_fast.atomic as atomic

    real_fsync, calls = atomic.os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= 4:        # run.json and the first shard (npz + manifest) get through
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    out = tmp_path / "s.npz"
    code, err = run(capsys, "sample", "--model", model_dir, "--image-ids", "0-5",
                    "--shard-size", 2, "--batch-size", 2, "--steps", 2, "--out", out)
    last = err.strip().splitlines()[-1]         # (the progress bar shares stderr)
    assert code == 1 and last.startswith("ddpm-fast: error: ") and "No space left" in last
    assert "shard-0000000002-000002.npz" in last
    parts = tmp_path / "s.npz.parts"
    assert not out.exists()
    assert sorted(p.name for p in parts.iterdir()) == [
        "run.json", "shard-0000000000-000002.json", "shard-0000000000-000002.npz"]
    monkeypatch.undo()               # space again: the rerun finishes the other shards
    code, err = run(capsys, "sample", "--model", model_dir, "--image-ids", "0-5",
                    "--shard-size", 2, "--batch-size", 2, "--steps", 2, "--out", out)
    assert code == 0, err


@pytest.mark.parametrize("scale", [300.0, 6.0e4])
def test_fp16_norm_and_attention_do_not_overflow(scale):
    """Activations at the fp16 limit: statistics are fp32, attention follows a GroupNorm."""
    from ddpm_fast.ops.group_norm import group_norm, group_norm_reference
    from ddpm_fast.unet import PRESETS

    torch.manual_seed(0)
    x = (torch.randn(2, 256, 16, 16) * scale).clamp(-65000, 65000)
    w, b = torch.rand(256) + 0.5, torch.randn(256)
    ref = group_norm_reference(x, w, b, 32, 1e-6, True)
    out = group_norm(x.half(), w.half(), b.half(), 32, 1e-6, True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    attn = UNet2DModel(PRESETS["cifar10"]).mid_block.attentions[0].eval()
    with torch.no_grad():
        ref = attn(x.clamp(-6e4, 6e4))
        half = attn.half()(x.clamp(-6e4, 6e4).half())
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), ref, atol=scale * 2e-3, rtol=2e-3)
