"""Each subcommand end to end on a small model (few steps), and one-line errors for bad input."""
import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast import cli
from ddpm_fast.checkpoints import save_pretrained
from ddpm_fast.cli_args import DeprecatedFlag
from ddpm_fast.training import DIGITS_CONFIG
from ddpm_fast.unet import UNet2DModel


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    save_pretrained(UNet2DModel(DIGITS_CONFIG), path)
    return path


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory):
    """A model whose schedule has 20 timesteps: whole sampling runs in a fraction of a second."""
    from ddpm_fast.checkpoints import DEFAULT_SCHEDULER

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("short")
    save_pretrained(UNet2DModel(DIGITS_CONFIG), path,
                    {**DEFAULT_SCHEDULER, "num_train_timesteps": 20})
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
                       "--steps", 4, "--out", tmp_path / "s.npz", "--precision", "fp32")
    assert code == 0, err
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    code, _, err = run(capsys, "sample", "--model", model_dir, "--num-images", 5, "--batch-size", 5,
                       "--steps", 4, "--out", tmp_path / "folder", "--precision", "fp32")
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


def test_progressive(tmp_path, capsys, short_model_dir):
    code, out, err = run(capsys, "progressive", "--model", short_model_dir, "--num-images", 2,
                         "--every", 5, "--out", tmp_path / "p.png", "--scale", 1)
    assert code == 0, err
    # 20 steps recorded at steps 0, 5, 10, 15 and the last: 5 columns of x̂0, then 5 of x_t
    assert Image.open(tmp_path / "p.png").size == (10 * 10 + 2, 2 * 10 + 2)
    assert "2 samples × 5 times" in out


def test_figures_interpolate_keeps_the_ends_and_noise(short_model_dir):
    from ddpm_fast import figures
    from ddpm_fast.images import to_uint8
    from ddpm_fast.pipeline import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(short_model_dir)
    pair = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    table = figures.interpolate(pipe, pair, t=2, frames=3, seed=0)
    assert table.shape == (2, 5, 8, 8, 1) and table.dtype == np.uint8
    assert (table[:, 0] == to_uint8(pair[:1])).all() and (table[:, -1] == to_uint8(pair[1:])).all()
    # λ = 0 and 1: linear and spherical agree (the same x_t, the same reverse noise); λ = ½ not
    for col in (1, 3):
        assert np.abs(table[0, col].astype(int) - table[1, col]).max() <= 1
    assert not np.array_equal(table[0, 2], table[1, 2])
    with pytest.raises(ValueError, match=r"timesteps \[20\] lie outside \[0, 20\)"):
        figures.from_t(pipe, pair, [3, 20])


def test_info(capsys, monkeypatch):
    """info: the build, and what each op runs here with the kernel table behind it, and the
    DDPM_FAST_* settings in force (an override that cannot run here is shown, not raised)."""
    from ddpm_fast.ops.backend import IMPLEMENTATIONS, UNET_SETTINGS

    code, out, _ = run(capsys, "info")
    info = json.loads(out)
    assert code == 0 and info["native"]["native"] is True
    running = info["kernels"]["running"]["cpu"]
    assert all(running[op] in impls for op, impls in IMPLEMENTATIONS.items())
    assert running["unet"] in UNET_SETTINGS
    assert all(row["evidence"] for row in info["kernels"]["table"])
    monkeypatch.setenv("DDPM_FAST_BACKEND", "torch")
    monkeypatch.setenv("DDPM_FAST_CONV_SPLITK", "0")
    code, out, _ = run(capsys, "info")
    info = json.loads(out)
    assert set(info["kernels"]["running"]["cpu"].values()) == {"torch", running["unet"]}
    assert info["settings"]["DDPM_FAST_CONV_SPLITK"] == "0"
    from ddpm_fast.ops.backend import UNET_TABLE, Choice

    monkeypatch.setitem(UNET_TABLE, "cpu", (Choice("conv", "test", 4), Choice("fused", "test")))
    code, out, _ = run(capsys, "info")
    running = json.loads(out)["kernels"]["running"]["cpu"]
    assert running["unet"] == "fused" and running["unet_up_to_batch"] == {"4": "conv"}


def test_info_names_each_gpu_architecture(monkeypatch):
    """On a GPU, info names its architecture and limits and what the native module has for it
    (devices faked here: an H100, an RTX 4090 and a future sm_120 card against a build for
    80;86;89;90, and against a CPU-only build)."""
    import types

    from ddpm_fast.report import gpu_report

    cards = [("NVIDIA H100 80GB HBM3", 9, 0, 132, 232448), ("RTX 4090", 8, 9, 128, 101376),
             ("Future", 12, 0, 160, 101376)]

    def props(i):
        name, major, minor, sms, smem = cards[i]
        return types.SimpleNamespace(name=name, major=major, minor=minor,
                                     multi_processor_count=sms, total_memory=80 * 2 ** 30,
                                     shared_memory_per_block=49152,
                                     shared_memory_per_block_optin=smem)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    gpus = gpu_report({"cuda": True, "cuda_archs": "80,86,89,90"})
    assert [g["arch"] for g in gpus] == ["sm_90", "sm_89", "sm_120"]
    assert gpus[0]["sms"] == 132 and gpus[0]["shared_memory_per_block"] == 232448
    assert [g["native_kernels"] for g in gpus] == [
        "SASS for sm_90", "SASS for sm_89", "PTX of sm_90, compiled by the driver at first use"]
    assert all(g["native_kernels"].startswith("none")
               for g in gpu_report({"cuda": False, "cuda_archs": ""}))


def test_train_then_sample(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--out", tmp_path / "run", "--train-steps", 3,
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
                       "--preset", "tiny", "--precision", "bf16", "--hflip", "--train-steps", 2,
                       "--batch-size", 2, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "pipeline" / "unet" / "config.json").read_text())
    assert (config["sample_size"], config["in_channels"]) == (16, 3)


def test_convert_original_checkpoint_then_sample(tmp_path, capsys):
    from original_ddpm import Model

    torch.manual_seed(0)
    torch.save(Model(ch=32, ch_mult=(1, 2), in_ch=1).state_dict(), tmp_path / "orig.ckpt")
    code, out, err = run(capsys, "convert", tmp_path / "orig.ckpt", "--sample-size", 8,
                         "--out", tmp_path / "conv", "--weights-dtype", "fp16")
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
    (["from-t", "--data", "{tmp}/missing.npz", "--out", "{tmp}/a.png"], "--data: "),
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
    code, _, err = run(capsys, "interpolate", "--t", 10, "--frames", 3, "--out",
                       tmp_path / "i.png", "--scale", 1)
    assert code == 0, err
    assert Image.open(tmp_path / "i.png").size == (5 * 10 + 2, 2 * 10 + 2)
    code, _, err = run(capsys, "from-t", "--t", 5000, "--out", tmp_path / "g.png")
    assert code == 2 and "--t: timesteps [5000] lie outside [0, 1000)" in err
    assert not (tmp_path / "g.png").exists()


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
    from ddpm_fast.commands import load_pipeline

    assert load_pipeline(model_dir, torch.device("cpu"), "fast", autotune=False
                         ).runner.autotune_convs is False
    assert cli.build_parser().parse_args(["sample", "--no-autotune", "--out", "a.png"]
                                         ).autotune is False
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


def _subcommands() -> dict:
    return cli.build_parser()._subparsers._group_actions[0].choices


def _flags(parser, hidden: bool = False) -> list[str]:
    """The long options of a subcommand: those --help shows, or the hidden old spellings."""
    return [o for a in parser._actions for o in a.option_strings
            if o.startswith("--") and (a.help == argparse.SUPPRESS) == hidden]


def test_every_flag_passes_through_torchrun():
    # torchrun's parser takes any abbreviation of its own options as one (--num: --numa-binding)
    from torch.distributed.run import get_args_parser

    assert "--num-images" in _flags(_subcommands()["sample"])
    for name, parser in _command_parsers().items():
        for flag in _flags(parser) + [f for f in _flags(parser, hidden=True) if f != "--num"]:
            argv = ["--standalone", "--nproc-per-node", "2", "-m", "ddpm_fast.cli", name, flag, "1"]
            script_args = get_args_parser().parse_args(argv).training_script_args
            assert script_args == [name, flag, "1"], (name, flag)


# old spelling → new: the same attribute, one notice line on stderr (issue 15)
OLD_SPELLINGS = [
    (["sample", "--seeds", "0-9", "--out", "x.png"], "--seeds", "--image-ids", "image_ids", "0-9"),
    (["sample", "--dtype", "fp32", "--out", "x.png"], "--dtype", "--precision", "precision",
     "fp32"),
    (["sample", "--num", "3", "--out", "x.png"], "--num", "--num-images", "num_images", 3),
    (["progressive", "--num", "3", "--out", "p.png"], "--num", "--num-images", "num_images", 3),
    (["from-t", "--num", "3", "--out", "f.png"], "--num", "--num-images", "num_images", 3),
    (["train", "--steps", "5", "--out", "r"], "--steps", "--train-steps", "train_steps", 5),
    (["interpolate", "--steps", "9", "--out", "i.png"], "--steps", "--frames", "frames", 9),
    (["interpolate", "--images", "a.npz", "--out", "i.png"], "--images", "--data", "data", "a.npz"),
    (["from-t", "--images", "a.npz", "--out", "f.png"], "--images", "--data", "data", "a.npz"),
    (["convert", "src", "--dtype", "fp16", "--out", "c"], "--dtype", "--weights-dtype",
     "weights_dtype", "fp16"),
    (["eval", "--num", "5"], "--num", "--num-data", "num_data", 5),
    (["eval", "--samples", "7"], "--samples", "--num-images", "num_images", 7),
    (["train", "--warmup", "9", "--out", "r"], "--warmup", "--lr-warmup", "lr_warmup", 9),
    (["convert", "src", "--sample-size", "16", "--out", "c"], "--sample-size", "--image-size",
     "image_size", 16),
]


@pytest.mark.parametrize("argv, old, new, attribute, value", OLD_SPELLINGS)
def test_old_spellings_still_work_with_a_one_line_notice(capsys, argv, old, new, attribute,
                                                         value):
    args = cli.build_parser().parse_args(argv)
    assert capsys.readouterr().err == f"ddpm-fast: note: {old} is deprecated, use {new}\n"
    renamed = cli.build_parser().parse_args([new if a == old else a for a in argv])
    assert getattr(args, attribute) == getattr(renamed, attribute) == value
    assert capsys.readouterr().err == ""
    parser = _subcommands()[argv[0]]
    assert old in _flags(parser, hidden=True) and old not in _flags(parser)   # not in --help


def test_old_spelling_is_checked_as_the_new_one(capsys):
    code, _, err = run(capsys, "interpolate", "--steps", "0", "--out", "never.png")
    assert code == 2 and err.strip().splitlines() == [
        "ddpm-fast: error: argument --steps: --frames must be a positive integer, got 0"]
    code, _, err = run(capsys, "interpolate", "--frames", "1", "--out", "never.png")
    assert code == 2 and "--frames must be at least 2" in err
    code, _, err = run(capsys, "sample", "--dtype", "fp64", "--out", "never.png")
    assert code == 2 and "invalid choice: 'fp64'" in err


@pytest.mark.parametrize("command", ["progressive", "from-t", "interpolate", "eval"])
def test_reference_mode_commands_say_so_in_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    text = " ".join(out.split())                        # the description is wrapped
    assert code == 0 and "Runs in reference mode" in text and not re.search(r"--mode\b", out)


def test_default_steps_are_the_same_in_the_api_and_the_cli(tmp_path, capsys, model_dir,
                                                            short_model_dir):
    from ddpm_fast.pipeline import DEFAULT_STEPS, DDPMPipeline

    assert (DEFAULT_STEPS["ddpm"], DEFAULT_STEPS["ddim"]) == (1000, 50)  # diffusers' pipelines
    for model, sampler, want in ((model_dir, "ddim", 50), (short_model_dir, "ddpm", 20),
                                 (short_model_dir, "ddim", 20)):   # capped at the timesteps
        pipe = DDPMPipeline.from_pretrained(model)
        steps = []
        pipe(batch_size=1, seed=0, sampler=sampler, output_type="pt", progress=steps.append)
        assert sum(steps) == want, (model, sampler)
        out = tmp_path / f"{sampler}{want}.npz"
        code, _, err = run(capsys, "sample", "--model", model, "--sampler", sampler,
                           "--num-images", 1, "--mode", "reference", "--out", out)
        assert code == 0, err
        assert int(np.load(out)["steps"]) == want, (model, sampler)


def test_bench_results_file_names_are_plain():
    import datetime

    from ddpm_fast.bench import results_name, slug

    assert slug("x86_64 (2 cores)") == "x86_64_2_cores"
    assert slug("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert (results_name("AMD EPYC 9654 96-Core / (2 cores)", datetime.date(2026, 11, 26))
            == "sample_throughput_AMD_EPYC_9654_96-Core_2_cores_2026-11-26.json")


def test_sharded_run_refuses_an_edited_scheduler_config(tmp_path, capsys, model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    argv = ["sample", "--model", model, "--image-ids", "0-1", "--steps", 2, "--batch-size", 2,
            "--precision", "fp32", "--out", tmp_path / "s.npz"]
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


def test_bench_old_spellings_and_device_auto(capsys):
    from ddpm_fast.bench import build_parser

    for old, new, attribute, value in (("--batch", "--batch-size", "batch", [1, 8]),
                                       ("--config", "--preset", "config", ["tiny"])):
        args = build_parser().parse_args([old, *map(str, value)])
        assert capsys.readouterr().err == f"ddpm-fast: note: {old} is deprecated, use {new}\n"
        assert getattr(args, attribute) == value
        assert getattr(build_parser().parse_args([new, *map(str, value)]), attribute) == value
    assert build_parser().parse_args([]).device == "auto"


# ---------------------------------------------------------------------- the flag table

def _command_parsers() -> dict:
    """Every command's parser, as `ddpm-fast <command> --help` shows it (bench and fid have
    their own)."""
    parsers = dict(_subcommands())
    parsers["bench"], parsers["fid"] = cli.bench_parser(), cli.fid_parser()
    return parsers


def _help_flags(capsys, command: str) -> set[str]:
    """The options in the usage lines of `ddpm-fast <command> --help` (help texts mention
    other flags, the usage lists only the command's own)."""
    assert cli.main([command, "--help"]) == 0
    usage = capsys.readouterr().out.split("\n\n")[0]
    return set(re.findall(r"\[(--[a-z0-9-]+)", usage)) - {"--help"} | \
        set(re.findall(r"(?:^|\s)(--[a-z0-9-]+)", usage)) - {"--help"}


# flags that only one command has: described by its --help, not by the README table
COMMAND_SPECIFIC = {
    "sample": {"--shard-size", "--sampler", "--eta", "--variance", "--mode", "--no-autotune"},
    "progressive": {"--every"},
    "from-t": set(),
    "interpolate": set(),
    "train": {"--channels", "--hflip", "--dropout", "--lr", "--ema-decay", "--checkpoint-every",
              "--resume"},
    "eval": {"--terms", "--exact-cdf"},
    "convert": {"--raw-weights"},
    "info": set(),
    "bench": {"--providers", "--warmup", "--compile-mode"},
    "fid": {"--ref", "--inception-weights", "--save-ref-stats"},
}


def _readme_flag_table() -> dict:
    """README "Command-line flags": flag → (commands, {old spelling: commands})."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Command-line flags: one name per meaning", 1)[1]
    rows = {}
    for line in section.split("\n#", 1)[0].splitlines():     # to the next heading
        if not line.startswith("| `--"):
            continue
        flag, commands, _, old = [c.strip() for c in line.strip("|").split("|")]
        olds = {o: set(re.findall(r"`([a-z-]+)`", cmds))
                for o, cmds in re.findall(r"`(--[a-z0-9-]+)` \(([^)]*)\)", old)}
        assert old.count("`--") == len(olds), f"{flag}: old spellings as `--old` (`command`, …)"
        rows[flag.strip("`")] = (set(re.findall(r"`([a-z-]+)`", commands)), olds)
    assert len(rows) >= 15, rows
    return rows


def test_readme_flag_table_matches_every_commands_help(capsys):
    table, parsers = _readme_flag_table(), _command_parsers()
    assert set(COMMAND_SPECIFIC) == set(parsers)
    shown = {name: _help_flags(capsys, name) for name in parsers}
    for flag, (commands, olds) in table.items():
        assert commands <= set(parsers), (flag, commands - set(parsers))
        for name in commands:
            assert flag in shown[name], f"README: {name} has {flag}, its --help does not"
        for name in set(parsers) - commands:
            assert flag not in shown[name], f"{name} has {flag}: add it to the README row"
        for old, where in olds.items():
            for name in where:
                assert old in _flags(parsers[name], hidden=True), (flag, old, name)
    for name, flags in shown.items():
        assert flags == _flags_of(parsers[name]), name          # the usage shows them all
        specific = COMMAND_SPECIFIC[name]
        assert specific <= flags, (name, specific - flags)
        assert not specific & set(table), (name, specific & set(table))
        assert flags - specific <= set(table), f"{name}: {flags - specific - set(table)} are " \
            "neither in the README table nor command-specific"
        for other, theirs in COMMAND_SPECIFIC.items():      # specific: no other command has it
            assert other == name or not specific & shown[other], (name, other)
    # every old spelling of every command is in its new flag's row, naming the command
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, DeprecatedFlag):
                old, = action.option_strings
                assert name in table[action.new][1].get(old, ()), (name, old, action.new)


def _flags_of(parser) -> set[str]:
    return set(_flags(parser)) - {"--help"}


def test_parser_defaults_are_the_command_functions_defaults():
    """Each command's flags are its function's keywords (the CLI calls it with them), with the
    same defaults: the CLI and ddpm_fast.commands cannot drift apart."""
    import inspect

    for name, parser in _command_parsers().items():
        if name == "bench":                             # bench.main parses its own flags
            continue
        func = parser.get_default("func")
        params = inspect.signature(func).parameters
        dests = {a.dest: a.default for a in parser._actions
                 if a.dest not in ("help", "command") and a.help != argparse.SUPPRESS}
        assert set(dests) == set(params), (name, set(dests) ^ set(params))
        for dest, default in dests.items():
            default = parser.get_default(dest)
            want = params[dest].default
            if want is inspect.Parameter.empty:         # required: a positional or --out
                continue
            assert (list(default) if isinstance(default, (list, tuple)) else default) == \
                (list(want) if isinstance(want, (list, tuple)) else want), (name, dest)


# ---------------------------------------------------------------------- no import circle

def _import_graph() -> dict:
    """ddpm_fast's module-level imports: module → the package modules it imports when it is
    imported (`from .x import`, `from . import x`, `import ddpm_fast.x`, `from ddpm_fast.x
    import`; at the top level, in `if` / `try` blocks and class bodies, not inside functions
    nor under `if TYPE_CHECKING`)."""
    import ast
    from pathlib import Path

    root = Path(cli.__file__).resolve().parent
    files = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def defined(module: str) -> set[str]:     # names a package's __init__ binds at top level
        tree = ast.parse(files[module].read_text())
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        return names

    def top_level(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from top_level(node.orelse)
                continue
            yield node
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from top_level(inner)

    graph = {}
    for module, f in files.items():
        package = module if f.name == "__init__.py" else module.rpartition(".")[0]
        deps = set()
        for node in top_level(ast.parse(f.read_text()).body):
            targets = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [(base, a.name) for a in node.names]
            for base, name in targets:
                if name and f"{base}.{name}" in files:          # a submodule
                    deps.add(f"{base}.{name}")
                elif base in files and (name is None or name in defined(base)):
                    deps.add(base)        # not a name the package binds: a compiled extension
        graph[module] = deps - {module}
    return graph


def test_every_module_imports_and_the_import_graph_has_no_cycle():
    import importlib

    graph = _import_graph()
    for module in sorted(graph):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:                # an optional dependency (triton)
            assert not (e.name or "").startswith("ddpm_fast"), (module, e)
    # the graph sees each import form
    assert {"ddpm_fast.commands", "ddpm_fast.cli_args"} <= graph["ddpm_fast.cli"]
    assert {"ddpm_fast.cli_args", "ddpm_fast.commands"} <= graph["ddpm_fast.bench"]
    assert "ddpm_fast.bench" not in graph["ddpm_fast.cli"]      # imported inside main()
    assert "ddpm_fast.cli" not in graph["ddpm_fast.bench"]
    import ast
    from pathlib import Path

    bench = ast.parse(Path(cli.__file__).with_name("bench.py").read_text())
    assert not [n for n in ast.walk(bench) if isinstance(n, ast.ImportFrom)        # not even in
                and n.level == 1 and n.module == "cli"]                          # a function
    assert "ddpm_fast._native" in graph["ddpm_fast"] and "ddpm_fast" not in graph[
        "ddpm_fast._native"]                                    # `from . import _C`: compiled
    state, path = {}, []                                        # depth-first: 1 open, 2 done

    def visit(module):
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join(path[path.index(dep):]
                                                                   + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
