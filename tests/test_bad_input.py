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


# ---------------------------------------------------------------------- a file that is not
# what its name says: one line naming it and what it is, exit 2, in every command

@pytest.fixture
def text_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("x.npz", "x.npy", "w.ckpt", "w.pt", "w.pth", "w.safetensors"):
        (tmp_path / name).write_text("hello world\n")
    return tmp_path


@pytest.mark.parametrize("argv, file, what", [
    (["train", "--data", "x.npz", "--out", "r"], "x.npz", "an .npz archive"),
    (["train", "--data", "x.npy", "--out", "r"], "x.npy", "an .npy array"),
    (["eval", "--data", "x.npz"], "x.npz", "an .npz archive"),
    (["from-t", "--data", "x.npz", "--out", "f.png"], "x.npz", "an .npz archive"),
    (["interpolate", "--data", "x.npy", "--out", "i.png"], "x.npy", "an .npy array"),
    (["eval", "--model", "w.ckpt"], "w.ckpt", "a PyTorch checkpoint"),
    (["sample", "--model", "w.pt", "--out", "s.png"], "w.pt", "a PyTorch checkpoint"),
    (["progressive", "--model", "w.safetensors", "--out", "p.png"], "w.safetensors",
     "a safetensors file"),
    (["info", "--model", "w.ckpt"], "w.ckpt", "a PyTorch checkpoint"),
    (["convert", "w.ckpt", "--out", "c"], "w.ckpt", "a PyTorch checkpoint"),
    (["convert", "w.safetensors", "--out", "c"], "w.safetensors", "a safetensors file"),
    (["fid", "x.npz", "--ref", "x.npy"], "x.npz", "an .npz archive"),
    (["fid", "x.npz", "--ref", "x.npz", "--inception-weights", "w.pth"], "x.npz",
     "an .npz archive"),
])
def test_text_file_as_data_or_weights_is_named(capsys, text_files, argv, file, what):
    code, err = run(capsys, *argv)
    assert code == 2 and err == f"ddpm-fast: error: {file} is a text file, not {what}\n"
    assert sorted(p.name for p in text_files.iterdir()) == [
        "w.ckpt", "w.pt", "w.pth", "w.safetensors", "x.npy", "x.npz"]     # nothing written


@pytest.mark.parametrize("argv, message", [
    (["fid", "missing.npz", "--ref", "missing.npz"], "missing.npz: no such file"),  # fid's own
    (["fid", "--ref"], "--ref: expected one argument"),                  # fid's parser
    (["fid", "a", "--ref", "b", "--device", "cuda:x"], "is not a device"),
    (["bench", "--device", "nope"], "is not a device"),
    (["bench", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["bench", "--preset", "huge"], "invalid choice: 'huge'"),
    (["info", "--model", "missing"], "--model missing does not exist"),
    (["train", "--seed", "-1", "--out", "r"], "--seed must be non-negative"),
])
def test_every_command_exits_2_with_one_line(capsys, text_files, argv, message):
    code, err = run(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("ddpm-fast: error: ")


def test_file_kinds(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from ddpm_fast.filetypes import expect, kind_of

    t = {"w": torch.zeros(2)}
    torch.save(t, tmp_path / "zip.pt")
    torch.save(t, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(t, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "a.npz", np.zeros(2))
    np.save(tmp_path / "a.npy", np.zeros(2))
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "lfs.ckpt").write_text("version https://git-lfs.github.com/spec/v1\noid x\n")
    (tmp_path / "utf8.npz").write_text("é" * 3000)            # a character across byte 4096
    (tmp_path / "bin.npz").write_bytes(bytes(range(256)) * 4)
    kinds = {p.name: kind_of(p) for p in tmp_path.iterdir()}
    assert kinds == {"zip.pt": "a zip archive", "legacy.pt": "a pickle",
                     "w.safetensors": "a safetensors file", "a.npz": "a zip archive",
                     "a.npy": "an .npy array", "empty.npz": "an empty file",
                     "lfs.ckpt": "a git-lfs pointer", "utf8.npz": "a text file",
                     "bin.npz": "a binary file of no format ddpm_fast knows"}
    for name, kind in (("zip.pt", "torch"), ("legacy.pt", "torch"), ("a.npz", "npz"),
                       ("a.npy", "npy"), ("w.safetensors", "safetensors")):
        expect(tmp_path / name, kind)                            # passes
    with pytest.raises(ValueError, match=r"lfs.ckpt is a git-lfs pointer, not a PyTorch "
                       r"checkpoint \(fetch the file itself: git lfs pull\)"):
        expect(tmp_path / "lfs.ckpt", "torch")
    with pytest.raises(ValueError, match="empty.npz is an empty file, not an .npz archive"):
        expect(tmp_path / "empty.npz", "npz")
    expect(tmp_path / "missing.npz", "npz")                      # left to the loader
