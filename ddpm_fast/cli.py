"""The `ddpm-fast` command line: each command's flags, and one call of the function in
ddpm_fast.commands that does its work (a flag's attribute is that function's keyword). Bad input
ends with one line on stderr and exit status 2, before any work is done; outputs are written
atomically, so a failed run leaves nothing half-written."""
from __future__ import annotations

import argparse
import sys
import textwrap

from . import commands
from .cli_args import (Parser, add_count, add_device, add_flag, add_seed, batch_size_arg,
                       positive)
# re-exported: tests and the benchmark scripts import these from here
from .commands import UsageError, resolve_device  # noqa: F401
from .report import default_model_path, scheduler_settings  # noqa: F401

EXAMPLES = {
    "sample": """examples:
  ddpm-fast sample --out digits.png                      # 64 digits from the shipped model
  ddpm-fast sample --model ./ddpm-cifar10-32 --num-images 16 --out grid.png --device cuda
  ddpm-fast sample --num-images 1000 --batch-size 250 --out samples.npz --mode fast --seed 1
  ddpm-fast sample --sampler ddim --out ddim.png         # 50 steps: DDIM's default
  torchrun --nproc-per-node 8 -m ddpm_fast.cli sample --model ./ddpm-cifar10-32 \\
      --image-ids 0-49999 --batch-size 256 --out cifar50k.npz --device cuda   # rerun to resume""",
    "progressive": """examples:
  ddpm-fast progressive --out progressive.png --num-images 4 --every 100""",
    "from-t": """examples:
  ddpm-fast from-t --out from_t.png --t 250 500 750 999
  ddpm-fast from-t --model ./ddpm-cifar10-32 --data cifar10-test.npz --out from_t.png""",
    "interpolate": """examples:
  ddpm-fast interpolate --out interp.png --t 500 --frames 9""",
    "train": """examples:
  ddpm-fast train --data digits --out runs/digits --train-steps 10000
  ddpm-fast train --data images.npz --out runs/mine --train-steps 50000 --resume
  ddpm-fast train --data ./photos --image-size 64 --preset 256 --out runs/photos --precision bf16
  torchrun --nproc-per-node 8 -m ddpm_fast.cli train --data images.npz --out runs/big --device cuda""",
    "info": "examples:\n  ddpm-fast info",
    "convert": """examples:
  ddpm-fast convert diffusion_cifar10_model/model-790000.ckpt --out ddpm-cifar10-32
  ddpm-fast convert runs/digits --out digits-pipeline --weights-dtype fp16
  ddpm-fast convert ddim-run/ckpt.pth --out ddim-pipeline --raw-weights   # not the EMA""",
    "eval": """examples:
  ddpm-fast eval --terms 1000            # the exact bound, as in the DDPM paper
  ddpm-fast eval --model ./ddpm-cifar10-32 --data cifar10-test.npz --num-data 10000 --device cuda""",
}


FIGURE_MODE = ("Runs in reference mode (the reference sampling loop, float32 torch ops): a figure "
               "needs intermediate states and start points that fast mode does not expose.")
EVAL_MODE = ("Runs in reference mode (float32 torch ops), the bound and the quality samples "
             "alike, so that its numbers do not depend on the machine's fast-mode precision.")
FID_HELP = ('FID of samples against a reference set (needs: pip install "ddpm_fast[fid]"; '
            "arguments: ddpm-fast fid --help)")
BENCH_HELP = ("sampling throughput against diffusers and stock PyTorch (arguments: "
              "ddpm-fast bench --help)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command but bench and fid (bench_parser, fid_parser): one name per
    meaning across commands (README "Command-line flags"), old spellings hidden with a notice.
    Each command's `func` is called with the parsed flags as keywords."""
    from .pipeline import SAMPLERS

    p = Parser(prog="ddpm-fast", description="Fast DDPM sampling and training.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_text, func, description=None):
        text = textwrap.fill(f"{help_text}. {description}", 90) if description else None
        q = sub.add_parser(name, help=help_text, epilog=EXAMPLES.get(name), description=text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        q.set_defaults(func=func)
        return q

    def model(q, text="diffusers model folder, training run or checkpoint file (default: the "
              "shipped digits model)"):
        q.add_argument("--model", help=text)

    def output(q, text=".png grid, .npz arrays, or a folder of PNGs", scale=True):
        q.add_argument("--out", required=True, help=text)
        q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        if scale:
            q.add_argument("--scale", type=positive("--scale"), default=4, help="PNG pixel scale")

    def sampling(q, text=".png figure"):
        model(q)
        add_device(q)
        add_seed(q)
        output(q, text)

    def real_data(q, default="digits", old=("--images",), text="'digits' (held-out ones), an "
                  ".npz/.npy of uint8 [N,H,W,C], or a folder"):
        add_flag(q, "--data", old=old, default=default, help=text)

    s = add("sample", "generate images", commands.sample)
    sampling(s, ".png grid, .npz arrays, or a folder of PNGs")
    add_count(s, "--num-images", "num_images", 64, "images to generate, ids 0..N-1 (default 64)")
    add_flag(s, "--image-ids", old=("--seeds",), default=None, metavar="IDS",
             help="image indices like 0-49999 or 0-9,20 (instead of --num-images): resumable, "
             "written in shards to OUT.parts/ and merged at the end")
    s.add_argument("--batch-size", type=batch_size_arg, default=64,
                   help="images per sampler call, or 'auto': the largest that fits in memory")
    s.add_argument("--shard-size", type=positive("--shard-size"), default=256,
                   help="images per shard file with --image-ids / under torchrun (default 256)")
    s.add_argument("--steps", type=positive("--steps"), default=None,
                   help="sampling steps (default: 1000 for ddpm, 50 for ddim, as the Python API "
                   "and diffusers' pipelines; at most the model's timesteps)")
    s.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm (ancestral), ddim, or a few-step solver: dpm++, unipc, euler, "
                   "euler-ancestral, deis (diffusers' DPMSolverMultistep, UniPCMultistep, "
                   "EulerDiscrete, EulerAncestralDiscrete, DEISMultistep schedulers: the "
                   "folder's settings when it has that class, else from_config of its scheduler;"
                   " default: the model's scheduler's)")
    s.add_argument("--eta", type=float, default=None,
                   help="DDIM η in [0, 1] (default 0; refused with --sampler ddpm)")
    s.add_argument("--variance", choices=("fixed_small", "fixed_large"), default=None,
                   help="σ²: β̃_t or β_t (default: the model's scheduler config; refused "
                   "with --sampler ddim)")
    s.add_argument("--mode", choices=("fast", "reference"), default="fast")
    add_flag(s, "--precision", old=("--dtype",), choices=("auto", "fp32", "bf16", "fp16"),
             default="auto", help="fast mode's U-Net precision (auto: bf16 on GPUs and on CPUs "
             "with native bf16 convolutions, else fp32; fp32 makes images bit-identical across "
             "batch sizes on the CPU)")
    s.add_argument("--no-autotune", dest="autotune", action="store_false",
                   help="on CUDA, keep cuDNN's heuristic convolution algorithms instead of timing "
                   "them per run: slower, but every process picks the same ones (reproducible "
                   "bytes across processes)")

    g = add("progressive", "figure of x̂0 and x_t along sampling", commands.progressive,
            FIGURE_MODE)
    sampling(g)
    add_count(g, "--num-images", "num_images", 4, "images to generate (default 4)")
    g.add_argument("--every", type=positive("--every"), default=100,
                   help="record x̂0 and x_t every this many steps (default 100)")

    f = add("from-t", "encode real images to x_t and denoise back, for several t",
            commands.from_t, FIGURE_MODE)
    sampling(f)
    real_data(f)
    add_count(f, "--num-images", "num_images", 4, "images to encode and denoise (default 4)")
    f.add_argument("--t", type=int, nargs="+", default=[250, 500, 750, 999],
                   help="timesteps to encode to (default 250 500 750 999)")

    i = add("interpolate", "interpolate two real images in x_t and denoise",
            commands.interpolate, FIGURE_MODE)
    sampling(i)
    real_data(i)
    i.add_argument("--t", type=int, default=500, help="timestep of the interpolation")
    add_flag(i, "--frames", old=("--steps",), type=positive("--frames"), default=7,
             help="λ values from 0 to 1 (default 7)")

    t = add("train", "train a model with L_simple", commands.train)
    real_data(t, old=(), text="'digits', an .npz/.npy of uint8 [N,H,W,C], or a folder of "
              "PNG/JPEG images")
    t.add_argument("--image-size", type=positive("--image-size"), default=None,
                   help="resize folder images to this (default 32; arrays must match it if given)")
    t.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 (grey) or 3 (RGB) for folder images (default 3)")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype for the U-Net (fp16 uses a gradient scaler)")
    t.add_argument("--hflip", action="store_true", help="random horizontal flips")
    t.add_argument("--dropout", type=float, default=0.1)
    add_flag(t, "--lr-warmup", old=("--warmup",), type=int, default=200,
             help="linear learning-rate warm-up steps (default 200)")
    output(t, "run folder (checkpoint/ and pipeline/)", scale=False)
    add_flag(t, "--train-steps", old=("--steps",), type=positive("--train-steps"), default=10000,
             help="optimiser steps (default 10000)")
    t.add_argument("--batch-size", type=positive("--batch-size"), default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--checkpoint-every", type=positive("--checkpoint-every"), default=1000)
    t.add_argument("--preset", choices=("tiny", "cifar10", "256"), default=None,
                   help="U-Net architecture (default: the shipped digits model's)")
    add_seed(t, "random seed of the weights, the data order and the noise")
    add_device(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")

    e = add("eval", "bits/dim (the variational bound) on held-out images; quality scores for "
            "digit models", commands.evaluate, EVAL_MODE)
    model(e)
    real_data(e, default=None, old=(), text="held-out images: .npz/.npy of uint8 [N,H,W,C] or a "
              "folder (default: the held-out digits, for digit models)")
    add_device(e)
    add_count(e, "--num-data", "num_data", 256, "held-out images to score (default 256)")
    e.add_argument("--batch-size", type=positive("--batch-size"), default=256)
    e.add_argument("--terms", type=positive("--terms"), default=100,
                   help="KL terms evaluated (1000 = exact bound; fewer = an estimate)")
    e.add_argument("--exact-cdf", action="store_true",
                   help="the decoder term L_0 with the exact (erf) normal CDF instead of the "
                   "original DDPM code's tanh approximation (the default, as in the paper's "
                   "implementation)")
    add_count(e, "--num-images", "num_images", 256, "images to generate for the quality scores "
              "(digit models; default 256)", old="--samples")
    e.add_argument("--steps", type=positive("--steps"), default=None,
                   help="sampling steps of those images (default 1000, as sample's)")
    add_seed(e, "Philox key of the bound's noise and of the generated images")

    c = add("convert", "write any supported checkpoint as a diffusers-format pipeline folder",
            commands.convert)
    c.add_argument("source", help="an original DDPM checkpoint file (.ckpt/.pt/.pth/.safetensors), "
                   "a training run folder, or a diffusers folder")
    output(c, "pipeline folder to write", scale=False)
    add_flag(c, "--image-size", old=("--sample-size",), type=positive("--image-size"),
             default=None, help="the model's image size, written to the config as sample_size "
             "(default: the source's; an original checkpoint's is guessed from its depth)")
    add_flag(c, "--weights-dtype", old=("--dtype",), choices=("fp32", "fp16"), default="fp32",
             help="dtype of the weights written (default fp32)")
    c.add_argument("--raw-weights", action="store_true",
                   help="take the trained weights, not the EMA weights, from a checkpoint that "
                   "holds both (a DDIM-repository list [model, optimizer, epoch, step, ema], a "
                   "training run); the default is the EMA weights, which those repositories "
                   "sample with")

    i = add("info", "versions, devices, which kernels are built and a model's scheduler settings",
            commands.info)
    model(i, "model folder or checkpoint whose scheduler settings to show (default: the "
          "shipped digits model)")
    sub.add_parser("bench", help=BENCH_HELP)        # parsed by bench_parser()
    sub.add_parser("fid", help=FID_HELP)            # parsed by fid_parser()
    return p


def bench_parser(prog="ddpm-fast bench") -> argparse.ArgumentParser:
    from .bench import build_parser

    return build_parser(prog)


def fid_parser() -> argparse.ArgumentParser:
    """fid's own flags (ddpm_fast.fid.build_parser) with the CLI's one-line errors and
    --device auto."""
    from .fid import build_parser

    p = build_parser(Parser(prog="ddpm-fast fid", description=FID_HELP.split(" (")[0] + "."))
    p.set_defaults(func=commands.fid, device="auto")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:            # the benchmark's own options and output
            from .bench import main as bench_main

            return bench_main(argv[1:])
        parser = fid_parser() if argv[:1] == ["fid"] else build_parser()
        args = vars(parser.parse_args(argv[1:] if argv[:1] == ["fid"] else argv))
    except SystemExit as e:          # --help (0) or a bad flag (2, one line already printed)
        return int(e.code or 0)
    from .sampling import NonFiniteError
    from .training import TrainingDivergedError

    run = args.pop("func")
    args.pop("command", None)
    try:
        run(**args)
        return 0
    except (ValueError, FileNotFoundError) as e:       # UsageError and every check's error
        print(f"ddpm-fast: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, TrainingDivergedError, OSError) as e:   # not bad input: exit 1
        print(f"ddpm-fast: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
