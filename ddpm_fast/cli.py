"""The `ddpm-fast` command line. Bad input ends with one line on stderr and exit status 2, before
any work is done; outputs are written atomically, so a failed run leaves nothing half-written."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = {
    "sample": """examples:
  ddpm-fast sample --out digits.png                      # 64 digits from the shipped model
  ddpm-fast sample --model ./ddpm-cifar10-32 --num-images 16 --out grid.png --device cuda
  ddpm-fast sample --num-images 1000 --batch-size 250 --out samples.npz --mode fast --seed 1
  ddpm-fast sample --sampler ddim --steps 50 --out ddim.png
  torchrun --nproc-per-node 8 -m ddpm_fast.cli sample --model ./ddpm-cifar10-32 \\
      --seeds 0-49999 --batch-size 256 --out cifar50k.npz --device cuda   # rerun to resume""",
    "progressive": """examples:
  ddpm-fast progressive --out progressive.png --num-images 4 --every 100""",
    "from-t": """examples:
  ddpm-fast from-t --out from_t.png --t 250 500 750 999""",
    "interpolate": """examples:
  ddpm-fast interpolate --out interp.png --t 500 --steps 9""",
    "train": """examples:
  ddpm-fast train --data digits --out runs/digits --steps 10000
  ddpm-fast train --data images.npz --out runs/mine --steps 50000 --resume
  ddpm-fast train --data ./photos --image-size 64 --preset 256 --out runs/photos --precision bf16
  torchrun --nproc-per-node 8 -m ddpm_fast.cli train --data images.npz --out runs/big --device cuda""",
    "info": "examples:\n  ddpm-fast info",
    "convert": """examples:
  ddpm-fast convert diffusion_cifar10_model/model-790000.ckpt --out ddpm-cifar10-32
  ddpm-fast convert runs/digits --out digits-pipeline --dtype fp16
  ddpm-fast convert ddim-run/ckpt.pth --out ddim-pipeline --raw-weights   # not the EMA""",
    "eval": """examples:
  ddpm-fast eval --terms 1000            # the exact bound, as in the DDPM paper
  ddpm-fast eval --model ./ddpm-cifar10-32 --data cifar10-test.npz --num-data 10000 --device cuda""",
    "bench": "examples:\n  ddpm-fast bench --device cpu --batch 8 --steps 10",
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


def load_pipeline(args, device):
    from .checkpoints import CheckpointError
    from .pipeline import DDPMPipeline

    path = Path(args.model) if args.model else default_model_path()
    name = getattr(args, "dtype", "auto")
    dtype = None if name == "auto" else dtype_named(name)
    try:
        autotune = False if getattr(args, "no_autotune", False) else None   # None: the default
        return DDPMPipeline.from_pretrained(path, mode=args.mode, device=device, dtype=dtype,
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
        seeds = distributed.parse_seeds(args.seeds) if args.seeds else list(range(args.num))
    except ValueError as e:
        raise UsageError(f"--{e}")
    # resumable shards for explicit seed lists and multi-process runs; plain runs stay in memory
    resumable = args.seeds is not None or distributed.launched_by_torchrun()
    resuming = resumable and out.with_name(out.name + ".parts").joinpath("run.json").is_file()
    check_output(out, args.overwrite or resuming)
    device = resolve_device(args.device)
    if resumable:     # under torchrun: join the group, so "cuda" is this rank's GPU when loading
        distributed.init_from_env(device)
    pipe = load_pipeline(args, device)
    if args.batch_size == "auto":
        args.batch_size = pipe.max_batch_size()
        print(f"--batch-size auto: {args.batch_size}", file=sys.stderr)
    run = distributed.sample_to_file(
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
    """Checks and loads shared by the figure commands: (PNG path, device, reference pipeline)."""
    out = check_output(Path(args.out), args.overwrite, (".png",))
    device = resolve_device(args.device)
    args.mode = "reference"
    return out, device, load_pipeline(args, device)


def cmd_progressive(args) -> int:
    import torch

    from . import images as io
    from .sampling import ddpm_sample

    out, device, pipe = figure_setup(args)
    c = pipe.unet.config
    res = ddpm_sample(pipe.unet, pipe.schedule, (args.num, c.in_channels, c.sample_size,
                                                 c.sample_size), seed=args.seed,
                      variance=pipe.variance, clip=pipe.clip, device=device,
                      intermediates_every=args.every)
    # rows: one per sample; columns: x̂0 over time, then x_t over time
    cols = [x0 for _, _, x0 in res.intermediates] + [xt for _, xt, _ in res.intermediates]
    grid = torch.stack(cols, dim=1).reshape(-1, c.in_channels, c.sample_size, c.sample_size)
    io.save_png(out, io.make_grid(io.to_uint8(grid), ncols=len(cols), scale=args.scale))
    print(f"wrote {out}: {args.num} samples × {len(res.intermediates)} times (x̂0 | x_t)")
    return 0


def real_images(args, pipe, count: int):
    """The first `count` real images in model space, shaped for the model: held-out digits, an
    .npz/.npy of uint8, or a folder (load_dataset checks size and channels)."""
    from .data import load_dataset, to_model_space

    c = pipe.unet.config
    try:
        data = load_dataset(args.images, c.sample_size, c.in_channels, split="test",
                            as_uint8=True)[:count]
    except ValueError as e:
        raise UsageError(f"--images: {e}")
    if data.shape[0] < count:
        raise UsageError(f"need {count} images, found {data.shape[0]}")
    return to_model_space(data).to(pipe.device)


def cmd_from_t(args) -> int:
    import torch

    from . import images as io
    from .sampling import denoise_from, q_sample

    out, device, pipe = figure_setup(args)
    x0 = real_images(args, pipe, args.num)
    ts = [t for t in args.t if 0 <= t < pipe.schedule.num_timesteps]
    if len(ts) != len(args.t):
        raise UsageError(f"--t values must lie in [0, {pipe.schedule.num_timesteps})")
    cols = [x0]
    g = torch.Generator(device=device).manual_seed(args.seed)
    for t in ts:
        noise = torch.randn(x0.shape, generator=g, device=device)
        x_t = q_sample(pipe.schedule, x0, torch.full((x0.shape[0],), t, device=device), noise)
        cols.append(denoise_from(pipe.unet, pipe.schedule, x_t, t, seed=args.seed,
                                 variance=pipe.variance, clip=pipe.clip))
    grid = torch.stack(cols, dim=1).flatten(0, 1)
    io.save_png(out, io.make_grid(io.to_uint8(grid), ncols=len(cols), scale=args.scale))
    print(f"wrote {out}: rows are images; columns: the original, then denoised from t = {ts}")
    return 0


def cmd_interpolate(args) -> int:
    import torch

    from . import images as io
    from .sampling import denoise_from, q_sample, slerp

    out, device, pipe = figure_setup(args)
    if not 0 <= args.t < pipe.schedule.num_timesteps:
        raise UsageError(f"--t must lie in [0, {pipe.schedule.num_timesteps})")
    pair = real_images(args, pipe, 2)
    g = torch.Generator(device=device).manual_seed(args.seed)
    noise = torch.randn(pair.shape, generator=g, device=device)
    x_t = q_sample(pipe.schedule, pair, torch.full((2,), args.t, device=device), noise)
    lams = [i / (args.steps - 1) for i in range(args.steps)]
    rows = []
    for interp in (lambda a, b, lam: (1 - lam) * a + lam * b, slerp):   # linear, spherical
        lat = torch.cat([interp(x_t[:1], x_t[1:], lam) for lam in lams])
        # the same reverse-process noise for every λ (image index 0), as in the DDPM paper
        rows.append(torch.cat([denoise_from(pipe.unet, pipe.schedule, lat[i:i + 1], args.t,
                                            seed=args.seed, variance=pipe.variance,
                                            clip=pipe.clip) for i in range(len(lams))]))
    grid = torch.cat([torch.cat([pair[:1], r, pair[1:]]) for r in rows])
    io.save_png(out, io.make_grid(io.to_uint8(grid), ncols=len(lams) + 2, scale=args.scale))
    print(f"wrote {out}: linear (top) and spherical (bottom) interpolation at t = {args.t}")
    return 0


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
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every,
                      hflip=args.hflip, precision=args.precision, warmup=args.warmup)
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
    from .checkpoints import CheckpointError, load_scheduler_config
    from .schedulers import describe

    try:
        name, settings, _ = describe(load_scheduler_config(path))
    except CheckpointError as e:
        return {"error": str(e)}
    return {"_class_name": name, **settings}


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
    dtype = dtype_named(args.dtype)
    with atomic_dir(out) as tmp:             # the whole folder appears at once, or not at all
        save_pretrained(unet, tmp, scheduler, dtype=dtype)
    c = unet.config
    print(f"wrote {out}: UNet2DModel {c.in_channels}×{c.sample_size}², channels "
          f"{list(c.block_out_channels)}, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M "
          f"parameters ({args.dtype}), scheduler: {non_default_settings(scheduler)}")
    print(f"weights: {unet.loaded_weights}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from .data import load_dataset, to_model_space
    from .training import bits_per_dim

    device = resolve_device(args.device)
    args.mode = "reference"
    pipe = load_pipeline(args, device)
    c = pipe.unet.config
    digit_model = (c.in_channels, c.sample_size) == (1, 8)
    spec = args.data or ("digits" if digit_model else None)
    if spec is None:
        raise UsageError(f"--data is needed for this {c.in_channels}×{c.sample_size}² model: held-out "
                         "images as an .npz/.npy of uint8 [N,H,W,C] or a folder")
    try:     # the digits' held-out split; other data is used as given (keep it held out)
        data = to_model_space(load_dataset(spec, c.sample_size, c.in_channels, split="test",
                                           as_uint8=True)[:args.num])
    except ValueError as e:
        raise UsageError(f"--data: {e}")
    data = ((data + 1) * 127.5).round() / 127.5 - 1       # 8-bit data for the discrete decoder
    g = torch.Generator(device).manual_seed(args.seed)
    parts = [bits_per_dim(pipe.unet, pipe.schedule, chunk.to(device), variance=pipe.variance,
                          num_terms=args.terms, generator=g, exact_cdf=args.exact_cdf)
             for chunk in data.split(args.batch_size)]
    result = {k: float(torch.cat([p[k] for p in parts]).mean())
              for k in ("total", "prior", "decoder", "kl")}
    result["images"] = int(data.shape[0])
    if digit_model:
        from .images import unit_to_uint8
        from .quality import real_scores, score

        x = pipe(batch_size=args.samples, seed=args.seed, num_inference_steps=args.steps,
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
    model = Path(args.model) if getattr(args, "model", None) else default_model_path()
    info["model"] = str(model)
    info["scheduler"] = scheduler_settings(model)
    print(json.dumps(info, indent=1))
    return 0


def cmd_bench(args, rest) -> int:
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "sample_throughput.py"
    if not bench.is_file():
        raise UsageError(f"benchmark script not found at {bench} (run from a source checkout)")
    import runpy
    sys.argv = [str(bench), *rest]
    runpy.run_path(str(bench), run_name="__main__")
    return 0


# ---------------------------------------------------------------------- parser

class DeprecatedFlag(argparse.Action):
    """An old spelling that still works, with a one-line notice on stderr naming the new one."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"ddpm-fast: note: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_count(q, flag: str, dest: str, default: int, help_text: str, old: str = "--num"):
    """A positive count option `flag`, plus its old spelling `old` (hidden, deprecated). One name
    per meaning across subcommands: --num-images counts generated (or shown) images, --num-data
    held-out data; none is a prefix of a torchrun option, so each passes through torchrun."""
    q.add_argument(flag, dest=dest, type=positive(flag), default=default, metavar="N",
                   help=help_text)
    q.add_argument(old, dest=dest, type=positive(flag), action=DeprecatedFlag, new=flag,
                   help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ddpm-fast", description="Fast DDPM sampling and training.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, help_text):
        return sub.add_parser(name, help=help_text, epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def model_args(q):
        q.add_argument("--model", help="diffusers model folder (default: the shipped digits model)")
        q.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
        q.add_argument("--seed", type=int, default=0, help="Philox seed: image i depends on (seed, i)")
        q.add_argument("--out", required=True, help=".png grid, .npz arrays, or a folder of PNGs")
        q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        q.add_argument("--scale", type=positive("--scale"), default=4, help="PNG pixel scale")

    s = add("sample", "generate images")
    model_args(s)
    add_count(s, "--num-images", "num", 64, "images to generate, with seeds 0..N-1 (default 64)")
    s.add_argument("--seeds", default=None,
                   help="per-image seeds like 0-49999 or 0-9,20 (instead of --num-images): resumable, "
                   "written in shards to OUT.parts/ and merged at the end")
    s.add_argument("--batch-size", type=batch_size_arg, default=64,
                   help="images per sampler call, or 'auto': the largest that fits in memory")
    s.add_argument("--shard-size", type=positive("--shard-size"), default=256,
                   help="images per shard file with --seeds / under torchrun (default 256)")
    s.add_argument("--steps", type=positive("--steps"), default=None,
                   help="sampling steps (default: all timesteps for ddpm, 50 for ddim)")
    s.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM η in [0, 1]")
    s.add_argument("--variance", choices=("fixed_small", "fixed_large"), default=None,
                   help="σ²: β̃_t or β_t (default: the model's scheduler config)")
    s.add_argument("--mode", choices=("fast", "reference"), default="fast")
    s.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="fast mode's U-Net precision (auto: bf16 on GPUs and on CPUs with native "
                   "bf16 convolutions, else fp32; fp32 makes images bit-identical across batch "
                   "sizes on the CPU)")
    s.add_argument("--no-autotune", action="store_true",
                   help="on CUDA, keep cuDNN's heuristic convolution algorithms instead of timing "
                   "them per run: slower, but every process picks the same ones (reproducible "
                   "bytes across processes)")
    s.set_defaults(func=cmd_sample)

    g = add("progressive", "figure of x̂0 and x_t along sampling")
    model_args(g)
    add_count(g, "--num-images", "num", 4, "images to generate (default 4)")
    g.add_argument("--every", type=positive("--every"), default=100)
    g.set_defaults(func=cmd_progressive)

    f = add("from-t", "encode real images to x_t and denoise back, for several t")
    model_args(f)
    f.add_argument("--images", default="digits", help="'digits' (held-out ones), an .npz/.npy of uint8 [N,H,W,C], or a folder of images")
    add_count(f, "--num-images", "num", 4, "images to encode and denoise (default 4)")
    f.add_argument("--t", type=int, nargs="+", default=[250, 500, 750, 999])
    f.set_defaults(func=cmd_from_t)

    i = add("interpolate", "interpolate two real images in x_t and denoise")
    model_args(i)
    i.add_argument("--images", default="digits", help="'digits' (held-out ones), an .npz/.npy of uint8 [N,H,W,C], or a folder of images")
    i.add_argument("--t", type=int, default=500, help="timestep of the interpolation")
    i.add_argument("--steps", type=positive("--steps"), default=7, help="λ values from 0 to 1")
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
    t.add_argument("--steps", type=positive("--steps"), default=10000)
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
            "digit models")
    e.add_argument("--model", help="model folder or checkpoint (default: the shipped model)")
    e.add_argument("--data", default=None,
                   help="held-out images: .npz/.npy of uint8 [N,H,W,C] or a folder (default: "
                   "the held-out digits, for digit models)")
    e.add_argument("--device", default="auto")
    add_count(e, "--num-data", "num", 256, "held-out images to score (default 256)",
              old="--num")
    e.add_argument("--batch-size", type=positive("--batch-size"), default=256)
    e.add_argument("--terms", type=positive("--terms"), default=100,
                   help="KL terms evaluated (1000 = exact bound; fewer = an estimate)")
    e.add_argument("--exact-cdf", action="store_true",
                   help="the decoder term L_0 with the exact (erf) normal CDF instead of the "
                   "original DDPM code's tanh approximation (the default, as in the paper's "
                   "implementation)")
    add_count(e, "--num-images", "samples", 256, "images to generate for the quality scores "
              "(digit models; default 256)", old="--samples")
    e.add_argument("--steps", type=positive("--steps"), default=1000)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_eval)

    c = add("convert", "write any supported checkpoint as a diffusers-format pipeline folder")
    c.add_argument("source", help="an original DDPM checkpoint file (.ckpt/.pt/.pth/.safetensors), "
                   "a training run folder, or a diffusers folder")
    c.add_argument("--out", required=True, help="pipeline folder to write")
    c.add_argument("--sample-size", type=positive("--sample-size"), default=None,
                   help="image size for original checkpoints (default: guessed from the depth)")
    c.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
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
    add("bench", "run benchmarks/sample_throughput.py (arguments pass through)")
    add("fid", 'FID of samples against a reference set (needs: pip install "ddpm_fast[fid]"; '
               "arguments: ddpm-fast fid --help)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["fid"]:
        from .fid import main as fid_main

        return fid_main(argv[1:])
    if argv[:1] == ["bench"]:
        try:
            return cmd_bench(None, argv[1:])
        except UsageError as e:
            print(f"ddpm-fast: error: {e}", file=sys.stderr)
            return 2
    try:
        args = parser.parse_args(argv)
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
