"""Each subcommand end to end on a small model (few steps), and one-line errors for bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast import cli
from ddpm_fast.checkpoints import save_pretrained
from ddpm_fast.training import DIGITS_CONFIG
from ddpm_fast.unet import UNet2DModel


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    save_pretrained(UNet2DModel(DIGITS_CONFIG), path)
    return path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_sample_png_grid(tmp_path, capsys, model_dir, mode):
    out = tmp_path / "grid.png"
    code, _, err = run(capsys, "sample", "--model", model_dir, "--num-images", 6, "--batch-size", 4,
                       "--steps", 3, "--mode", mode, "--out", out, "--scale", 1)
    assert code == 0, err
    im = Image.open(out)
    assert im.size == (3 * 10 + 2, 2 * 10 + 2)     # 3×2 grid of 8×8 images, 2 px padding


def test_sample_npz_and_folder_same_images(tmp_path, capsys, model_dir):
    # fp32: bit-identical across batch sizes on the CPU (bf16 kernels are picked per batch shape)
    code, _, err = run(capsys, "sample", "--model", model_dir, "--num-images", 5, "--batch-size", 2,
                       "--steps", 4, "--out", tmp_path / "s.npz", "--dtype", "fp32")
    assert code == 0, err
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    code, _, err = run(capsys, "sample", "--model", model_dir, "--num-images", 5, "--batch-size", 5,
                       "--steps", 4, "--out", tmp_path / "folder", "--dtype", "fp32")
    assert code == 0, err
    files = sorted((tmp_path / "folder").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    # same seed: image i is the same whatever the batch size
    again = np.stack([np.array(Image.open(f)) for f in files])[..., None]
    assert np.array_equal(again, images)


def test_sample_ddim(tmp_path, capsys, model_dir):
    code, _, err = run(capsys, "sample", "--model", model_dir, "--num-images", 2, "--sampler", "ddim",
                       "--steps", 5, "--out", tmp_path / "d.png")
    assert code == 0, err


def test_progressive(tmp_path, capsys, model_dir):
    code, _, err = run(capsys, "progressive", "--model", model_dir, "--num-images", 2, "--every", 250,
                       "--out", tmp_path / "p.png", "--scale", 1)
    assert code == 0, err
    assert Image.open(tmp_path / "p.png").size[1] == 2 * 10 + 2


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0 and json.loads(out)["native"]["native"] is True


def test_train_then_sample(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", "--steps", 3,
                       "--batch-size", 4, "--checkpoint-every", 2, "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "run" / "pipeline" / "unet" / "config.json").is_file()
    code, _, err = run(capsys, "sample", "--model", tmp_path / "run" / "pipeline", "--num-images", 1,
                       "--steps", 2, "--out", tmp_path / "x.png")
    assert code == 0, err


def test_train_on_image_folder_bf16(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(6):      # different sizes and formats: centre-cropped and resized to 16×16
        im = Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8))
        im.save(tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i}.{'jpg' if i % 3 else 'png'}")
    code, _, err = run(capsys, "train", "--data", tmp_path / "imgs", "--image-size", 16,
                       "--preset", "tiny", "--precision", "bf16", "--hflip", "--steps", 2,
                       "--batch-size", 2, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "pipeline" / "unet" / "config.json").read_text())
    assert (config["sample_size"], config["in_channels"]) == (16, 3)


def test_convert_original_checkpoint_then_sample(tmp_path, capsys):
    from original_ddpm import Model

    torch.manual_seed(0)
    torch.save(Model(ch=32, ch_mult=(1, 2), in_ch=1).state_dict(), tmp_path / "orig.ckpt")
    code, out, err = run(capsys, "convert", tmp_path / "orig.ckpt", "--sample-size", 8,
                         "--out", tmp_path / "conv", "--dtype", "fp16")
    assert code == 0, err
    assert "fixed_large" in out
    assert (tmp_path / "conv" / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp folder left
    code, _, err = run(capsys, "sample", "--model", tmp_path / "conv", "--num-images", 2, "--steps", 2,
                       "--out", tmp_path / "c.png")
    assert code == 0, err
    code, _, err = run(capsys, "convert", tmp_path / "orig.ckpt", "--out", tmp_path / "conv")
    assert code == 2 and "--overwrite" in err


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model", "/nonexistent", "--out", "{tmp}/a.png"], "does not exist"),
    (["sample", "--num-images", "0", "--out", "{tmp}/a.png"], "--num-images must be a positive integer"),
    (["sample", "--num-images", "-2", "--out", "{tmp}/a.png"], "--num-images must be a positive integer"),
    (["sample", "--out", "{tmp}/a.jpg"], "use .png"),
    (["sample", "--steps", "5000", "--out", "{tmp}/a.png"], "exceeds"),
    (["sample", "--device", "cuda:0", "--out", "{tmp}/a.png"], None),
    (["train", "--data", "{tmp}/missing.npz", "--out", "{tmp}/r"], "not 'digits'"),
    (["train", "--data", "{tmp}", "--out", "{tmp}/r"], "no images"),
    (["convert", "{tmp}/missing.ckpt", "--out", "{tmp}/c"], "does not exist"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, model_dir, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--model" not in argv and argv[0] == "sample":
        argv += ["--model", str(model_dir)]
    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("checks the no-GPU error for --device cuda:0; a GPU is present")
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and (message is None or message in lines[0])
    assert not list(tmp_path.glob("a.*"))          # nothing written


def test_help_has_examples(capsys):
    code, out, _ = run(capsys, "sample", "--help")
    assert code == 0 and "examples:" in out


def test_existing_output_needs_overwrite(tmp_path, capsys, model_dir):
    out = tmp_path / "a.png"
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "sample", "--model", model_dir, "--out", out)
    assert code == 2 and "--overwrite" in err
    assert out.read_bytes() == b"keep me"


def test_sample_with_shipped_default_model(tmp_path, capsys):
    assert cli.default_model_path().joinpath("unet", "config.json").is_file()
    code, out, err = run(capsys, "sample", "--num-images", 4, "--steps", 5, "--out", tmp_path / "d.png")
    assert code == 0, err
    assert Image.open(tmp_path / "d.png").size[0] > 0


def test_eval(capsys):
    code, out, err = run(capsys, "eval", "--num-data", 16, "--terms", 8, "--num-images", 32, "--steps", 20)
    assert code == 0, err
    result = json.loads(out)["bits_per_dim"]
    assert result["total"] > 0 and 0 <= result["quality"]["confident"] <= 1


def test_eval_on_image_array(tmp_path, capsys, model_dir):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "held_out.npy", rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8))
    code, out, err = run(capsys, "eval", "--model", model_dir, "--data", tmp_path / "held_out.npy",
                         "--terms", 4, "--batch-size", 2, "--num-images", 4, "--steps", 2)
    assert code == 0, err
    result = json.loads(out)["bits_per_dim"]
    assert result["images"] == 5 and result["total"] > 0
    np.save(tmp_path / "rgb.npy", rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    code, _, err = run(capsys, "eval", "--model", model_dir, "--data", tmp_path / "rgb.npy")
    assert code == 2 and "3 channels, expected 1" in err


def test_from_t_and_interpolate(tmp_path, capsys):
    code, _, err = run(capsys, "from-t", "--num-images", 2, "--t", 5, 20, "--out", tmp_path / "f.png",
                       "--scale", 1)
    assert code == 0, err
    assert Image.open(tmp_path / "f.png").size == (3 * 10 + 2, 2 * 10 + 2)
    code, _, err = run(capsys, "interpolate", "--t", 10, "--steps", 3, "--out",
                       tmp_path / "i.png", "--scale", 1)
    assert code == 0, err
    assert Image.open(tmp_path / "i.png").size == (5 * 10 + 2, 2 * 10 + 2)
    code, _, err = run(capsys, "from-t", "--t", 5000, "--out", tmp_path / "g.png")
    assert code == 2 and "--t values must lie" in err and not (tmp_path / "g.png").exists()


def test_slerp_endpoints():
    from ddpm_fast.sampling import slerp

    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-5, rtol=1e-5)


def test_missing_gpu_index_is_named(monkeypatch):
    """--device cuda:3 on a machine with one GPU: a usage error naming the visible GPUs, not
    CUDA's "invalid device ordinal" from deep inside the first copy to the device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(cli.UsageError, match=r"cuda:3: there is no such GPU \(1 visible, cuda:0\)"):
        cli.resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(cli.UsageError, match=r"\(2 visible, cuda:0 to cuda:1\)"):
        cli.resolve_device("cuda:2")


def test_no_autotune_reaches_the_fast_runner(tmp_path, capsys, model_dir):
    import argparse

    args = argparse.Namespace(model=str(model_dir), mode="fast", dtype="auto", no_autotune=True)
    assert cli.load_pipeline(args, torch.device("cpu")).runner.autotune_convs is False
    code, _, err = run(capsys, "sample", "--model", model_dir, "--num-images", 2, "--steps", 2,
                       "--no-autotune", "--out", tmp_path / "a.png")
    assert code == 0, err


def test_info_and_convert_show_scheduler_settings(tmp_path, capsys):
    from ddpm_fast.checkpoints import DEFAULT_SCHEDULER, save_pretrained
    from ddpm_fast.unet import UNet2DModel

    save_pretrained(UNet2DModel("tiny"), tmp_path / "m",
                    {**DEFAULT_SCHEDULER, "clip_sample_range": 0.5,
                     "prediction_type": "v_prediction"})
    code, out, err = run(capsys, "info", "--model", tmp_path / "m")
    assert code == 0, err
    sched = json.loads(out)["scheduler"]
    assert sched["clip_sample_range"] == 0.5 and sched["rescale_betas_zero_snr"] is False
    code, out, err = run(capsys, "convert", tmp_path / "m", "--out", tmp_path / "c")
    assert code == 0, err
    assert "clip_sample_range=0.5" in out and "prediction_type='v_prediction'" in out
    save_pretrained(UNet2DModel("tiny"), tmp_path / "bad",
                    {**DEFAULT_SCHEDULER, "variance_power": 2.0})
    code, out, err = run(capsys, "info", "--model", tmp_path / "bad")
    assert code == 0 and "variance_power" in json.loads(out)["scheduler"]["error"]
    code, _, err = run(capsys, "convert", tmp_path / "bad", "--out", tmp_path / "c2")
    assert code == 2 and "variance_power" in err


def test_convert_ddim_repo_checkpoint_ema_or_raw(tmp_path, capsys):
    from test_checkpoints import _ddim_repo_checkpoint

    from ddpm_fast.checkpoints import load_unet

    raw, ema = _ddim_repo_checkpoint(tmp_path / "ckpt.pth", with_ema=True)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    for flag, model, word in (((), ema, "EMA weights"), (("--raw-weights",), raw, "raw weights")):
        out = tmp_path / f"out{len(flag)}"
        code, text, err = run(capsys, "convert", tmp_path / "ckpt.pth", "--out", out,
                              "--sample-size", 16, *flag)
        assert code == 0, err
        assert f"weights: {tmp_path / 'ckpt.pth'}: {word}" in text
        with torch.no_grad():
            torch.testing.assert_close(load_unet(out)(x, t), model(x, t), rtol=1e-5, atol=1e-6)


def test_eval_exact_cdf_switches_the_decoder_term(tmp_path, capsys):
    # an RGB model: no digit-quality scores, only the bound
    torch.manual_seed(0)
    config = type(DIGITS_CONFIG)(**{**DIGITS_CONFIG.__dict__, "in_channels": 3, "out_channels": 3})
    save_pretrained(UNet2DModel(config), tmp_path / "rgb")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8))
    results = []
    for flag in ((), ("--exact-cdf",)):
        code, out, err = run(capsys, "eval", "--model", tmp_path / "rgb", "--data",
                             tmp_path / "x.npy", "--terms", 2, *flag)
        assert code == 0, err
        results.append(json.loads(out)["bits_per_dim"])
    tanh, erf = results
    assert tanh["kl"] == erf["kl"] and tanh["decoder"] != erf["decoder"]


def _torchrun_lines(text: str) -> list[list[str]]:
    """Every torchrun command in the code blocks of `text` (README) or in example text (the
    CLI's epilogs), continuation lines joined, comments dropped, as shell words."""
    import re
    import shlex

    text = re.sub(r"\\\\?\n\s*", " ", text)          # backslash continuations (also '\\' in .py)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("torchrun "):
            lines.append(shlex.split(line, comments=True))
    return lines


def test_readme_torchrun_lines_pass_every_flag_through_torchrun():
    # issue 15: torchrun's own parser took --num as an abbreviation of its --numa-binding
    import re
    from pathlib import Path

    from torch.distributed.run import get_args_parser

    readme = Path(__file__).resolve().parent.parent / "README.md"
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S))
    commands = _torchrun_lines(blocks) + _torchrun_lines("\n".join(cli.EXAMPLES.values()))
    assert len(commands) >= 4, commands              # README: train and sample; --help: both
    for words in commands:
        module_at = words.index("-m")
        script_args = words[module_at + 2:]
        args = get_args_parser().parse_args(words[1:])   # exits (SystemExit 2) on an ambiguity
        assert args.module and args.training_script == "ddpm_fast.cli"
        assert args.training_script_args == script_args, words
        parsed = cli.build_parser().parse_args(script_args)
        assert parsed.command in ("sample", "train")


def test_every_sample_flag_passes_through_torchrun():
    from torch.distributed.run import get_args_parser

    flags = [o for a in cli.build_parser()._subparsers._group_actions[0].choices["sample"]._actions
             for o in a.option_strings if a.help != "==SUPPRESS==" and o.startswith("--")]
    assert "--num-images" in flags and "--num" not in flags
    for flag in flags:
        argv = ["--standalone", "--nproc-per-node", "2", "-m", "ddpm_fast.cli", "sample", flag, "1"]
        assert get_args_parser().parse_args(argv).training_script_args == ["sample", flag, "1"]


def test_old_count_spellings_still_work_with_a_notice(capsys):
    args = cli.build_parser().parse_args(["sample", "--num", "3", "--out", "x.png"])
    assert args.num == 3
    assert capsys.readouterr().err == "ddpm-fast: note: --num is deprecated, use --num-images\n"
    args = cli.build_parser().parse_args(["eval", "--num", "5", "--samples", "7"])
    assert (args.num, args.samples) == (5, 7)
    assert capsys.readouterr().err.splitlines() == [
        "ddpm-fast: note: --num is deprecated, use --num-data",
        "ddpm-fast: note: --samples is deprecated, use --num-images"]


def test_sharded_run_refuses_an_edited_scheduler_config(tmp_path, capsys, model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    argv = ["sample", "--model", model, "--seeds", "0-1", "--steps", 2, "--batch-size", 2,
            "--dtype", "fp32", "--out", tmp_path / "s.npz"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    run_json = json.loads((tmp_path / "s.npz.parts" / "run.json").read_text())
    assert run_json["scheduler.clip_sample"] is True and run_json["scheduler.beta_end"] == 0.02
    code, _, err = run(capsys, *argv)                    # unchanged: resumes (nothing to do)
    assert code == 0, err
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["clip_sample"] = False
    config_file.write_text(json.dumps(config))
    code, _, err = run(capsys, *argv)
    assert code == 2 and "other settings (scheduler.clip_sample)" in err
