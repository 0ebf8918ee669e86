"""The `ddpm-fast` command line. Bad input ends with one line on stderr and exit status 2, before
any work is done; outputs are written atomically, so a failed run leaves nothing half-written."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

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


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage dump), exit status 2."""

    def error(self, message):
        self.exit(2, f"ddpm-fast: error: {message}\n")


def default_model_path() -> Path:
    return Path(__file__).parent / "assets" / "digits"


def positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value}")
        return value
    return parse


def dtype_named(name: str):
    """The torch dtype of a --dtype choice (fp32, bf16, fp16)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def batch_size_arg(text):
    """--batch-size: a positive integer, or "auto" (the largest that fits in memory)."""
    return "auto" if text == "auto" else positive("--batch-size")(text)


def check_output(path: Path, overwrite: bool, suffixes=(".png", ".npz", "")) -> Path:
    """--out's checks, before any work (images.check_output), as one-line usage errors."""
    from .images import check_output as check

    try:
        return check(path, overwrite, suffixes)
    except FileExistsError:
        raise UsageError(f"--out {path} exists (pass --overwrite to replace it)") from None
    except ValueError as e:
        raise UsageError(f"--out {e}") from None


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (use cpu, cuda, cuda:1 or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        visible = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise UsageError(f"--device {name}: there is no such GPU ({count} visible, {visible})")
    return device


def load_pipeline(args, device, mode: str):
    from .checkpoints import CheckpointError
    from .pipeline import DDPMPipeline

    path = Path(args.model) if args.model else default_model_path()
    name = getattr(args, "precision", "auto")
    dtype = None if name == "auto" else dtype_named(name)
    try:
        autotune = False if getattr(args, "no_autotune", False) else None   # None: the default
        return DDPMPipeline.from_pretrained(path, mode=mode, device=device, dtype=dtype,
                                            autotune_convs=autotune)
    except CheckpointError as e:
        raise UsageError(str(e))
    except ValueError as e:          # a scheduler setting the chosen mode does not honour
        raise UsageError(f"{path}: {e}")

# ---------------------------------------------------------------------- subcommands

def cmd_sample(args) -> int:
    from . import distributed

    out = Path(args.out)
    try:
        seeds = (distributed.parse_seeds(args.image_ids) if args.image_ids
                 else list(range(args.num)))
    except ValueError as e:          # parse_seeds names the part: "seeds: 'x' is not …"
        raise UsageError(f"--image-ids: {str(e).removeprefix('seeds: ')}")
    # resumable shards for explicit seed lists and multi-process runs; plain runs stay in memory
    resumable = args.image_ids is not None or distributed.launched_by_torchrun()
    resuming = resumable and out.with_name(out.name + ".parts").joinpath("run.json").is_file()
    check_output(out, args.overwrite or resuming)
    device = resolve_device(args.device)
    if resumable:     # under torchrun: join the group, so "cuda" is this rank's GPU when loading
        distributed.init_from_env(device)
    pipe = load_pipeline(args, device, args.mode)
    if args.batch_size == "auto":
        args.batch_size = pipe.max_batch_size()
        print(f"--batch-size auto: {args.batch_size}", file=sys.stderr)
    run = distributed.sample_to_file(       # None: the scheduler's sampler, default_steps
        pipe, seeds, out, batch_size=args.batch_size, shard_size=args.shard_size, seed=args.seed,
        num_inference_steps=args.steps, sampler=args.sampler, eta=args.eta,
        variance=args.variance, resumable=resumable, overwrite=args.overwrite, scale=args.scale)
    if run.wrote:
        kind = "GPU memory" if device.type == "cuda" else "resident memory of the process"
        peak = f"; peak {kind} {run.peak_memory / 2**30:.2f} GiB" if run.peak_memory else ""
        shards = f" (shards in {run.parts})" if run.parts else ""
        print(f"wrote {len(seeds)} images to {out}{shards}{peak}")
    return 0


def figure_setup(args):
    """Checks and loads shared by the figure commands: (PNG path, reference pipeline)."""
    out = check_output(Path(args.out), args.overwrite, (".png",))
    return out, load_pipeline(args, resolve_device(args.device), "reference")


def check_timesteps(pipe, ts) -> None:
    from .figures import check_timesteps

    try:
        check_timesteps(pipe, ts)
    except ValueError as e:
        raise UsageError(f"--t: {e}")


def save_figure(out: Path, table, args, what: str) -> int:
    from . import figures
    from .images import save_png

    save_png(out, figures.grid(table, scale=args.scale))
    print(f"wrote {out}: {what}")
    return 0


def real_images(args, pipe, count: int):
    """The first `count` real images of --data in model space, shaped for the model: held-out
    digits, an .npz/.npy of uint8, or a folder (load_dataset checks size and channels)."""
    from .data import load_dataset, to_model_space

    c = pipe.unet.config
    try:
        data = load_dataset(args.data, c.sample_size, c.in_channels, split="test",
                            as_uint8=True)[:count]
    except ValueError as e:
        raise UsageError(f"--data: {e}")
    if data.shape[0] < count:
        raise UsageError(f"--data: need {count} images, found {data.shape[0]}")
    return to_model_space(data).to(pipe.device)


def cmd_progressive(args) -> int:
    from .figures import progressive

    out, pipe = figure_setup(args)
    table = progressive(pipe, args.num, args.every, args.seed)
    return save_figure(out, table, args, f"{args.num} samples × {table.shape[1] // 2} times "
                       "(x̂0 | x_t)")


def cmd_from_t(args) -> int:
    from .figures import from_t

    out, pipe = figure_setup(args)
    check_timesteps(pipe, args.t)
    table = from_t(pipe, real_images(args, pipe, args.num), args.t, args.seed)
    return save_figure(out, table, args, "rows are images; columns: the original, then "
                       f"denoised from t = {args.t}")


def cmd_interpolate(args) -> int:
    from .figures import interpolate

    if args.frames < 2:
        raise UsageError(f"--frames must be at least 2 (λ = 0 and 1), got {args.frames}")
    out, pipe = figure_setup(args)
    check_timesteps(pipe, [args.t])
    table = interpolate(pipe, real_images(args, pipe, 2), args.t, args.frames, args.seed)
    return save_figure(out, table, args, "linear (top) and spherical (bottom) interpolation "
                       f"at t = {args.t}")


def cmd_train(args) -> int:
    from .checkpoints import load_scheduler_config, save_pretrained
    from .data import load_dataset
    from .training import DIGITS_CONFIG, TrainConfig, train
    from .unet import PRESETS, UNet2DModel

    out = Path(args.out)
    if out.exists() and not (args.resume or args.overwrite):
        raise UsageError(f"--out {out} exists (pass --resume to continue or --overwrite)")
    try:
        data = load_dataset(args.data, args.image_size, args.channels, split="train",
                            as_uint8=True)      # converted a batch at a time by train()
    except ValueError as e:
        raise UsageError(f"--data: {e}")
    base = PRESETS[args.preset] if args.preset else DIGITS_CONFIG
    config = type(base)(**{**base.__dict__, "sample_size": data.shape[2], "dropout": args.dropout,
                           "in_channels": data.shape[1], "out_channels": data.shape[1]})
    if data.shape[2] % config.downsampling:
        raise UsageError(f"image size {data.shape[2]} is not divisible by {config.downsampling}, "
                         "the model's total downsampling")
    from . import distributed

    device = resolve_device(args.device)
    distributed.init_from_env(device)        # under torchrun: one process per GPU / CPU worker
    cfg = TrainConfig(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, ema_decay=args.ema_decay, warmup=args.warmup,
                      checkpoint_every=args.checkpoint_every, hflip=args.hflip,
                      precision=args.precision)
    ema, _ = train(UNet2DModel(config), data, cfg, out_dir=out / "checkpoint",
                   resume=args.resume, device=device)
    if distributed.is_main():
        # with the schedule the run trained with (checkpoint/…/state.json records it)
        save_pretrained(ema, out / "pipeline", load_scheduler_config(out / "checkpoint"))
        print(f"wrote the EMA model to {out / 'pipeline'} (load it with --model {out / 'pipeline'})")
    return 0


def scheduler_settings(path) -> dict:
    """The scheduler class (_class_name: DDPMScheduler or DDIMScheduler) and every setting a
    model folder's scheduler config gives (defaults filled in), or {"error": why it is refused}."""
    from .checkpoints import ASSUMED_SCHEDULER, CheckpointError, load_scheduler_config
    from .schedulers import describe

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            name, settings, _ = describe(load_scheduler_config(path))
    except CheckpointError as e:
        return {"error": str(e)}
    assumed = {"assumed": str(w.message) for w in caught if ASSUMED_SCHEDULER in str(w.message)}
    return {**assumed, "_class_name": name, **settings}


def non_default_settings(config: dict) -> str:
    from .schedulers import describe

    return describe(config)[2]      # the class and the settings that are not its defaults


def cmd_convert(args) -> int:
    from .atomic import atomic_dir
    from .checkpoints import CheckpointError, load_scheduler_config, load_unet, save_pretrained

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists (pass --overwrite to replace it)")
    try:
        unet = load_unet(args.source, sample_size=args.sample_size,
                         weights="raw" if args.raw_weights else "ema")
        scheduler = load_scheduler_config(args.source)
    except CheckpointError as e:
        raise UsageError(str(e))
    dtype = dtype_named(args.weights_dtype)
    with atomic_dir(out) as tmp:             # the whole folder appears at once, or not at all
        save_pretrained(unet, tmp, scheduler, dtype=dtype)
    c = unet.config
    print(f"wrote {out}: UNet2DModel {c.in_channels}×{c.sample_size}², channels "
          f"{list(c.block_out_channels)}, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M "
          f"parameters ({args.weights_dtype}), scheduler: {non_default_settings(scheduler)}")
    print(f"weights: {unet.loaded_weights}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from .data import load_dataset, to_model_space
    from .likelihood import mean_bits_per_dim

    device = resolve_device(args.device)
    pipe = load_pipeline(args, device, "reference")
    c = pipe.unet.config
    digit_model = (c.in_channels, c.sample_size) == (1, 8)
    spec = args.data or ("digits" if digit_model else None)
    if spec is None:
        raise UsageError(f"--data is needed for this {c.in_channels}×{c.sample_size}² model: held-out "
                         "images as an .npz/.npy of uint8 [N,H,W,C] or a folder")
    try:     # the digits' held-out split; other data is used as given (keep it held out)
        data = to_model_space(load_dataset(spec, c.sample_size, c.in_channels, split="test",
                                           as_uint8=True)[:args.num_data])
    except ValueError as e:
        raise UsageError(f"--data: {e}")
    g = torch.Generator(device).manual_seed(args.seed)
    result = mean_bits_per_dim(pipe.unet, pipe.schedule, data, args.batch_size,
                               variance=pipe.variance, num_terms=args.terms, generator=g,
                               exact_cdf=args.exact_cdf)
    if digit_model:
        from .images import unit_to_uint8
        from .quality import real_scores, score

        x = pipe(batch_size=args.num_images, seed=args.seed, num_inference_steps=args.steps,
                 output_type="pt").images
        result["quality"] = score(unit_to_uint8(x)).as_dict()
        result["quality_real_digits"] = real_scores().as_dict()
    print(json.dumps({"bits_per_dim": result}, indent=1))
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    from . import __version__, _native
    from .fast import default_dtype

    info = {"ddpm_fast": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "native": _native.build_info(), "default_model": str(default_model_path()),
            "fast_mode_dtype": {"cpu": str(default_dtype(torch.device("cpu"))).split(".")[-1],
                                "cuda": "bfloat16"}}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["kernels"] = kernel_report()
    info["settings"] = {k: v for k, v in sorted(os.environ.items())
                        if k.startswith("DDPM_FAST_") or k == "TRITON_INTERPRET"}
    model = Path(args.model) if getattr(args, "model", None) else default_model_path()
    info["model"] = str(model)
    info["scheduler"] = scheduler_settings(model)
    print(json.dumps(info, indent=1))
    return 0


def kernel_report() -> dict:
    """What each op and the fast runner's U-Net run on each device type here (after the
    DDPM_FAST_BACKEND override and what is built), beside the kernel table with its evidence."""
    import torch

    from .ops import backend

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    running = {}
    for dev in devices:
        device = torch.device(dev)
        row = {}
        for op in backend.IMPLEMENTATIONS:
            try:
                row[op] = backend.select(op, device)
            except (RuntimeError, ValueError) as e:        # an override that cannot run here
                row[op] = f"error: {e}"
        row["unet"] = backend.unet_setting(device)          # any batch size
        limits = [c.max_batch for c in backend.UNET_TABLE.get(dev, ()) if c.max_batch]
        if limits:                                          # smaller batches' own settings
            row["unet_up_to_batch"] = {n: backend.unet_setting(device, n) for n in limits}
        running[dev] = row
    return {"running": running, "table": backend.table_report()}


def cmd_bench(argv) -> int:
    """The throughput benchmark (ddpm_fast/bench.py), its arguments passed through."""
    from .bench import main as bench_main

    return bench_main(argv)


# ---------------------------------------------------------------------- parser
# One name per meaning, the same in every subcommand (old spellings stay as hidden aliases
# with a one-line notice; README "Command-line flags" has the table):
#   --seed           the Philox key: image i depends on (seed, i) (train: its random seed)
#   --image-ids      which images, as indices under --seed, e.g. 0-49999   (was sample --seeds)
#   --num-images     how many images a command outputs   (was --num; eval --samples)
#   --num-data       how many held-out images eval scores                  (was eval --num)
#   --steps          sampling steps (sample, eval)
#   --train-steps    optimiser steps                                       (was train --steps)
#   --frames         interpolation frames                            (was interpolate --steps)
#   --precision      the U-Net's compute precision                        (was sample --dtype)
#   --weights-dtype  the dtype of the weights written                    (was convert --dtype)
#   --data           real images                         (was from-t / interpolate --images)
# No flag is a prefix of a torchrun option, so every one passes through torchrun (tested).

class DeprecatedFlag(argparse.Action):
    """An old spelling that still works, with a one-line notice on stderr naming the new one."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"ddpm-fast: note: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_flag(q, flag: str, *, old=(), **kwargs) -> argparse.Action:
    """Option `flag` (add_argument's keywords), plus its `old` spellings: hidden, parsed the
    same way into the same attribute, each with a deprecation notice."""
    action = q.add_argument(flag, **kwargs)
    for spelling in old:
        q.add_argument(spelling, dest=action.dest, type=action.type, choices=action.choices,
                       action=DeprecatedFlag, new=flag, help=argparse.SUPPRESS)
    return action


def add_count(q, flag: str, dest: str, default: int, help_text: str, old: str = "--num"):
    """A positive count: --num-images (images a command outputs) or --num-data (held-out data)."""
    add_flag(q, flag, old=(old,), dest=dest, type=positive(flag), default=default, metavar="N",
             help=help_text)


FIGURE_MODE = ("Runs in reference mode (the reference sampling loop, float32 torch ops): a figure "
               "needs intermediate states and start points that fast mode does not expose.")
EVAL_MODE = ("Runs in reference mode (float32 torch ops), the bound and the quality samples "
             "alike, so that its numbers do not depend on the machine's fast-mode precision.")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import SAMPLERS

    p = Parser(prog="ddpm-fast", description="Fast DDPM sampling and training.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_text, description=None):
        import textwrap

        text = textwrap.fill(f"{help_text}. {description}", 90) if description else None
        return sub.add_parser(name, help=help_text, epilog=EXAMPLES.get(name), description=text,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def model_args(q, out_help=".png grid, .npz arrays, or a folder of PNGs"):
        q.add_argument("--model", help="diffusers model folder (default: the shipped digits model)")
        q.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
        q.add_argument("--seed", type=int, default=0,
                       help="Philox key: image i depends on (seed, i)")
        q.add_argument("--out", required=True, help=out_help)
        q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        q.add_argument("--scale", type=positive("--scale"), default=4, help="PNG pixel scale")

    def real_data(q):
        add_flag(q, "--data", old=("--images",), default="digits",
                 help="'digits' (held-out ones), an .npz/.npy of uint8 [N,H,W,C], or a folder")

    s = add("sample", "generate images")
    model_args(s)
    add_count(s, "--num-images", "num", 64, "images to generate, ids 0..N-1 (default 64)")
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
                   help="ddpm (ancestral), ddim, or a few-step solver: dpm++ (diffusers' "
                   "DPMSolverMultistepScheduler; the folder's settings when it has one, else "
                   "from_config of its scheduler) (default: the model's scheduler's)")
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
    s.add_argument("--no-autotune", action="store_true",
                   help="on CUDA, keep cuDNN's heuristic convolution algorithms instead of timing "
                   "them per run: slower, but every process picks the same ones (reproducible "
                   "bytes across processes)")
    s.set_defaults(func=cmd_sample)

    g = add("progressive", "figure of x̂0 and x_t along sampling",
            FIGURE_MODE)
    model_args(g, ".png figure")
    add_count(g, "--num-images", "num", 4, "images to generate (default 4)")
    g.add_argument("--every", type=positive("--every"), default=100,
                   help="record x̂0 and x_t every this many steps (default 100)")
    g.set_defaults(func=cmd_progressive)

    f = add("from-t", "encode real images to x_t and denoise back, for several t",
            FIGURE_MODE)
    model_args(f, ".png figure")
    real_data(f)
    add_count(f, "--num-images", "num", 4, "images to encode and denoise (default 4)")
    f.add_argument("--t", type=int, nargs="+", default=[250, 500, 750, 999])
    f.set_defaults(func=cmd_from_t)

    i = add("interpolate", "interpolate two real images in x_t and denoise",
            FIGURE_MODE)
    model_args(i, ".png figure")
    real_data(i)
    i.add_argument("--t", type=int, default=500, help="timestep of the interpolation")
    add_flag(i, "--frames", old=("--steps",), type=positive("--frames"), default=7,
             help="λ values from 0 to 1 (default 7)")
    i.set_defaults(func=cmd_interpolate)

    t = add("train", "train a model with L_simple")
    t.add_argument("--data", default="digits",
                   help="'digits', an .npz/.npy of uint8 [N,H,W,C], or a folder of PNG/JPEG images")
    t.add_argument("--image-size", type=positive("--image-size"), default=None,
                   help="resize folder images to this (default 32; arrays must match it if given)")
    t.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 (grey) or 3 (RGB) for folder images (default 3)")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype for the U-Net (fp16 uses a gradient scaler)")
    t.add_argument("--hflip", action="store_true", help="random horizontal flips")
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    t.add_argument("--out", required=True, help="run folder (checkpoint/ and pipeline/)")
    add_flag(t, "--train-steps", old=("--steps",), type=positive("--train-steps"), default=10000,
             help="optimiser steps (default 10000)")
    t.add_argument("--batch-size", type=positive("--batch-size"), default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--checkpoint-every", type=positive("--checkpoint-every"), default=1000)
    t.add_argument("--preset", choices=("tiny", "cifar10", "256"), default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=cmd_train)

    e = add("eval", "bits/dim (the variational bound) on held-out images; quality scores for "
            "digit models", EVAL_MODE)
    e.add_argument("--model", help="model folder or checkpoint (default: the shipped model)")
    e.add_argument("--data", default=None,
                   help="held-out images: .npz/.npy of uint8 [N,H,W,C] or a folder (default: "
                   "the held-out digits, for digit models)")
    e.add_argument("--device", default="auto")
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
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_eval)

    c = add("convert", "write any supported checkpoint as a diffusers-format pipeline folder")
    c.add_argument("source", help="an original DDPM checkpoint file (.ckpt/.pt/.pth/.safetensors), "
                   "a training run folder, or a diffusers folder")
    c.add_argument("--out", required=True, help="pipeline folder to write")
    c.add_argument("--sample-size", type=positive("--sample-size"), default=None,
                   help="image size written to the config (default: the source's; an original "
                   "checkpoint's is guessed from its depth)")
    add_flag(c, "--weights-dtype", old=("--dtype",), choices=("fp32", "fp16"), default="fp32",
             help="dtype of the weights written (default fp32)")
    c.add_argument("--raw-weights", action="store_true",
                   help="take the trained weights, not the EMA weights, from a checkpoint that "
                   "holds both (a DDIM-repository list [model, optimizer, epoch, step, ema], a "
                   "training run); the default is the EMA weights, which those repositories "
                   "sample with")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_convert)

    i = add("info", "versions, devices, which kernels are built and a model's scheduler settings")
    i.add_argument("--model", help="model folder whose scheduler settings to show "
                   "(default: the shipped digits model)")
    i.set_defaults(func=cmd_info)
    add("bench", "sampling throughput against diffusers and stock PyTorch (arguments: "
        "ddpm-fast bench --help)")
    add("fid", 'FID of samples against a reference set (needs: pip install "ddpm_fast[fid]"; '
               "arguments: ddpm-fast fid --help)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["fid"]:
            from .fid import main as fid_main

            return fid_main(argv[1:])
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
    except SystemExit as e:          # --help (0) or a bad flag (2, one line already printed)
        return int(e.code or 0)
    if getattr(args, "seed", 0) < 0:
        print("ddpm-fast: error: --seed must be non-negative", file=sys.stderr)
        return 2
    from .sampling import NonFiniteError
    from .training import TrainingDivergedError

    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"ddpm-fast: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, TrainingDivergedError, OSError) as e:   # not bad input: exit 1
        print(f"ddpm-fast: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
