"""Sampling throughput: ddpm_fast against diffusers and the best stock PyTorch, in one run.

Providers (each skipped with a note when it cannot run here):
  diffusers  diffusers DDPMPipeline, fp32 eager (the reference users run today)
  compile    stock PyTorch at its best: diffusers' UNet in bf16, channels_last, SDPA, the whole
             step (U-Net + sampler update) under torch.compile (CUDA graphs on GPU), cuDNN
             benchmark mode
  reference  ddpm_fast reference mode (fp32, torch ops)
  fast       ddpm_fast fast mode
  fast-eager ddpm_fast fast mode without torch.compile of the U-Net (eager bf16 inside our graph)
  fast-heuristic  fast mode with cuDNN's heuristic algorithm choice instead of benchmark mode
  fast-inductor  fast mode with kernels="inductor": the U-Net under torch.compile, cuDNN
             convolutions (today's CUDA default, so "fast" there); -pdl: with Inductor's PDL
  fast-conv  fast mode with kernels="conv": every convolution the fused conv2d op (Triton),
             norm and adds folded in; -pdl: with programmatic dependent launch
             (DDPM_FAST_PDL=1); -tuned: tiles timed per layer (DDPM_FAST_CONV_AUTOTUNE=1);
             -nosplit: without split-K in the small batch-1 layers (DDPM_FAST_CONV_SPLITK=0)

Every provider runs the same weights. A "step" is one U-Net forward plus one sampler update; per-step
latency is the median over timed steps after warm-up, and images/s for a full 1000-step sample is
extrapolated from it (the JSON says so). TFLOP/s counts 2 FLOP per MAC of the U-Net forward.

    ddpm-fast bench --device cuda --batch-size 1 64 256
    ddpm-fast bench --device cpu --batch-size 8 --steps 10
    python benchmarks/sample_throughput.py --device cpu --batch-size 8   # the same, in a checkout

It is part of the installed package (`ddpm-fast bench`); benchmarks/sample_throughput.py is its
entry point in a source checkout, which writes into benchmarks/results/ by default.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .cli_args import Parser, add_device, add_flag, add_seed, non_negative, positive
from .commands import UsageError, resolve_device

CONFIGS = {
    # google/ddpm-cifar10-32 (35,746,307 parameters)
    "cifar10": dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
        attention_head_dim=None,
    ),
    # google/ddpm-celebahq-256 / ddpm-church-256 / ddpm-bedroom-256
    "256": dict(
        sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
        attention_head_dim=None,
    ),
    # ddpm_fast's "tiny" test preset: a smoke run of the benchmark itself, not a measurement
    "tiny": dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
        attention_head_dim=None,
    ),
}
FULL_STEPS = 1000


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    """A file-name part without spaces, parentheses or slashes: runs of anything but letters,
    digits, '.', '-' and '_' become one '_' ("x86_64 (2 cores)" → "x86_64_2_cores")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unknown"


def results_name(device: str, day: datetime.date | None = None) -> str:
    """The default results file name: sample_throughput_<device>_<date>.json."""
    day = day or datetime.date.today()
    return f"sample_throughput_{slug(device)}_{day.isoformat()}.json"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def count_macs(model: torch.nn.Module, sample: torch.Tensor, t: torch.Tensor) -> int:
    """MACs of one forward, counted from conv/linear shapes and attention matmuls by hooks."""
    macs = 0

    def conv_hook(mod, inp, out):
        nonlocal macs
        k = mod.weight[0].numel()  # in/groups * kh * kw
        macs += out.numel() * k

    def linear_hook(mod, inp, out):
        nonlocal macs
        macs += out.numel() * mod.in_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    # attention: QK^T and PV, each L*L*C per image, counted from the attention modules' inputs
    attn_macs = 0

    def attn_hook(mod, inp, out):
        nonlocal attn_macs
        x = inp[0]
        b, c = x.shape[0], x.shape[1]
        length = x[0, 0].numel()
        attn_macs += 2 * b * length * length * c

    for name, mod in model.named_modules():
        if type(mod).__name__ == "Attention":
            handles.append(mod.register_forward_hook(attn_hook))
    with torch.no_grad():
        model(sample, t)
    for h in handles:
        h.remove()
    return macs + attn_macs


def time_steps(step_fn, n_warmup: int, n_timed: int, device: torch.device) -> list[float]:
    """Run step_fn(i) n_warmup times, then time n_timed calls one by one; seconds per call."""
    for i in range(n_warmup):
        step_fn(i)
    sync(device)
    times = []
    for i in range(n_timed):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step_fn(n_warmup + i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step_fn(n_warmup + i)
            times.append(time.perf_counter() - t0)
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- providers

class TorchUNet(torch.nn.Module):
    """diffusers' UNet2DModel's stand-in where diffusers is not installed (the lent GPU machine
    has none): ddpm_fast's U-Net on torch's own ops, the same architecture and parameter names,
    with diffusers' call surface (a dict config, `.sample` output) that the providers use."""

    class Config(dict):
        __getattr__ = dict.__getitem__

    def __init__(self, config: dict):
        super().__init__()
        from .unet import UNet2DModel

        self.model = UNet2DModel(dict(config)).set_kernels("reference")
        self.config = self.Config(self.model.config.to_dict())

    def forward(self, x, t):
        return SimpleNamespace(sample=self.model(x, t))

    def state_dict(self, *args, **kwargs):       # diffusers' names, without a wrapper prefix
        return self.model.state_dict(*args, **kwargs)


def stock_unet_source() -> str:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return "ddpm_fast.unet with torch ops (diffusers not installed)"
    return "diffusers.UNet2DModel"


def make_diffusers_unet(config: str, seed: int):
    """The stock U-Net the baselines run: diffusers' own, else TorchUNet (same weights layout)."""
    torch.manual_seed(seed)
    if stock_unet_source() != "diffusers.UNet2DModel":
        return TorchUNet(CONFIGS[config]).eval()
    from diffusers import UNet2DModel

    return UNet2DModel(**CONFIGS[config]).eval()


def scheduler_config() -> dict:
    # google/ddpm-cifar10-32's scheduler
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                variance_type="fixed_large", clip_sample=True)


def provider_diffusers(unet, batch, device, args):
    """diffusers' own loop: DDPMPipeline.__call__ body, one step per call (fp32 eager)."""
    from diffusers import DDPMScheduler

    unet = unet.to(device)
    sched = DDPMScheduler(**scheduler_config())
    sched.set_timesteps(FULL_STEPS)
    size = unet.config.sample_size
    gen = torch.Generator(device=device).manual_seed(0)
    state = {"x": torch.randn(batch, 3, size, size, generator=gen, device=device)}

    def step(i):
        t = sched.timesteps[i % FULL_STEPS]
        with torch.no_grad():
            eps = unet(state["x"], t).sample
            state["x"] = sched.step(eps, t, state["x"], generator=gen).prev_sample

    return step


def provider_compile(unet, batch, device, args):
    """Best stock PyTorch: bf16 + channels_last + SDPA + torch.compile of the whole step."""
    from .fast import cudnn_benchmark              # a scoped flag; nothing else of ours
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet = unet.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    betas = torch.linspace(1e-4, 0.02, FULL_STEPS, dtype=torch.float64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    tables = {
        "t": torch.arange(FULL_STEPS - 1, -1, -1, device=device),
        "sqrt_recip_abar": (1 / abar).sqrt(),
        "sqrt_recipm1_abar": (1 / abar - 1).sqrt(),
        "c0": abar_prev.sqrt() * betas / (1 - abar),
        "c1": alphas.sqrt() * (1 - abar_prev) / (1 - abar),
        "sigma": betas.sqrt() * (torch.arange(FULL_STEPS) > 0),  # fixed_large, no noise at t=0
    }
    tables = {k: (v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v)
              for k, v in tables.items()}

    def step_fn(x, i):
        # index_select keeps the step index on the device (no data-dependent host scalar)
        t = tables["t"].index_select(0, i)
        c = {k: v.index_select(0, t).view(1, 1, 1, 1) for k, v in tables.items() if k != "t"}
        eps = unet(x.to(dtype).contiguous(memory_format=torch.channels_last),
                   t.expand(x.shape[0])).sample.float()
        x0 = (c["sqrt_recip_abar"] * x - c["sqrt_recipm1_abar"] * eps).clamp(-1, 1)
        mean = c["c0"] * x0 + c["c1"] * x
        return mean + c["sigma"] * torch.randn_like(x)

    mode = args.compile_mode if device.type == "cuda" else "default"
    compiled = torch.compile(step_fn, mode=mode, fullgraph=True)
    size = unet.config.sample_size
    state = {"x": torch.randn(batch, 3, size, size, device=device)}
    index = [torch.tensor([i], device=device) for i in range(FULL_STEPS)]

    def step(i):
        # cuDNN benchmark mode too: the flag every tuning guide names for fixed shapes
        with torch.no_grad(), cudnn_benchmark(device.type == "cuda"):
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            state["x"] = compiled(state["x"], index[i % FULL_STEPS]).clone()

    return step


def provider_ours(mode, compile=None, autotune_convs=None, kernels=None):
    def build(unet, batch, device, args):
        from .pipeline import DDPMPipeline

        if autotune_convs is not None and device.type != "cuda":
            raise RuntimeError("cuDNN autotuning is a CUDA setting")
        pipe = DDPMPipeline.from_diffusers_unet(unet, scheduler_config(), mode=mode,
                                                device=device, compile=compile,
                                                autotune_convs=autotune_convs, kernels=kernels)
        return pipe.benchmark_step_fn(batch)

    return build


def provider_switched(build_steps, switch):
    """A provider built and captured (its first call) inside `switch`, a context manager that
    turns a setting on; restored for the providers after it."""
    def build(unet, batch, device, args):
        with switch():
            step = build_steps(unet, batch, device, args)
            step(0)                       # compile and capture now, while the switch is on
        return step

    return build


@contextlib.contextmanager
def env_switch(name: str, value: str = "1"):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def inductor_pdl():
    """Inductor's own programmatic dependent launch (torch._inductor.config.triton.enable_pdl)."""
    import torch._inductor.config as inductor

    if not hasattr(inductor.triton, "enable_pdl"):
        raise RuntimeError(f"torch {torch.__version__}'s Inductor has no PDL switch")
    with inductor.patch({"triton.enable_pdl": True}):
        yield


PROVIDERS = {
    "diffusers": provider_diffusers,
    "compile": provider_compile,
    "reference": provider_ours("reference"),
    "fast": provider_ours("fast"),                  # the kernel table's default for the device
    "fast-eager": provider_ours("fast", compile=False),   # eager U-Net inside our graph
    # cuDNN's heuristic algorithm choice instead of its benchmark mode (fast mode's default)
    "fast-heuristic": provider_ours("fast", autotune_convs=False),
    # Inductor + cuDNN U-Net (today's CUDA default), with and without Inductor's PDL
    "fast-inductor": provider_ours("fast", kernels="inductor"),
    "fast-inductor-pdl": provider_switched(provider_ours("fast", kernels="inductor"),
                                           inductor_pdl),
    # every convolution our fused conv2d (norm in, adds and statistics out), no Inductor
    "fast-conv": provider_ours("fast", kernels="conv"),
    "fast-conv-pdl": provider_switched(provider_ours("fast", kernels="conv"),
                                       lambda: env_switch("DDPM_FAST_PDL")),
    "fast-conv-tuned": provider_switched(provider_ours("fast", kernels="conv"),
                                         lambda: env_switch("DDPM_FAST_CONV_AUTOTUNE")),
    "fast-conv-nosplit": provider_switched(provider_ours("fast", kernels="conv"),
                                           lambda: env_switch("DDPM_FAST_CONV_SPLITK", "0")),
}


def run_one(name, config, batch, device, args, macs_per_image):
    unet = make_diffusers_unet(config, args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_build = time.perf_counter()
    step = PROVIDERS[name](unet, batch, device, args)
    step(0)  # first call compiles / captures
    sync(device)
    setup_s = time.perf_counter() - t_build
    times = time_steps(step, args.warmup, args.steps, device)
    per_step = statistics.median(times)
    flops = 2 * macs_per_image * batch / per_step
    return {
        "provider": name, "config": config, "batch": batch,
        "steps_timed": len(times), "setup_s": round(setup_s, 2),
        "step_ms_median": per_step * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "images_per_s_1000_steps": batch / (per_step * FULL_STEPS),
        "extrapolated_from_steps": len(times),
        "tflops": flops / 1e12,
        "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                         if device.type == "cuda" else None),
    }


def environment(device) -> dict:
    info = {
        "device": device_name(device), "device_type": device.type,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "git_commit": git_commit(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    info["stock_unet"] = stock_unet_source()
    for pkg in ("triton", "diffusers"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:
            info[pkg] = None
    from . import __version__, build_info

    info["ddpm_fast"] = __version__
    info["ddpm_fast_build"] = build_info()
    return info


def print_table(rows: list[dict]) -> None:
    by_key = {(r["config"], r["batch"], r["provider"]): r for r in rows if "step_ms_median" in r}
    print(f"{'config':8} {'batch':>5} {'provider':14} {'ms/step':>9} {'img/s@1000':>11} "
          f"{'TFLOP/s':>8} {'vs diffusers':>12} {'vs compile':>10}")
    for r in rows:
        if "step_ms_median" not in r:
            print(f"{r['config']:8} {r['batch']:>5} {r['provider']:14} skipped: {r['error']}")
            continue
        ratios = []
        for base in ("diffusers", "compile"):
            b = by_key.get((r["config"], r["batch"], base))
            ratios.append(f"{b['step_ms_median'] / r['step_ms_median']:.2f}x" if b else "-")
        print(f"{r['config']:8} {r['batch']:>5} {r['provider']:14} {r['step_ms_median']:9.3f} "
              f"{r['images_per_s_1000_steps']:11.3f} {r['tflops']:8.1f} {ratios[0]:>12} "
              f"{ratios[1]:>10}")


def build_parser(prog: str = "ddpm-fast bench") -> argparse.ArgumentParser:
    """The benchmark's flags, named as the other ddpm-fast commands name them (cli_args)."""
    p = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_device(p)
    add_flag(p, "--preset", old=("--config",), dest="config", nargs="+", default=None,
             choices=sorted(CONFIGS), help="U-Net architectures (default: cifar10 and 256 on a "
             "GPU, cifar10 on the CPU)")
    add_flag(p, "--batch-size", old=("--batch",), dest="batch", nargs="+",
             type=positive("--batch-size"), default=None, metavar="N",
             help="batch sizes measured (default: 1 16 64 256 on a GPU, 1 8 on the CPU)")
    p.add_argument("--providers", nargs="+", default=None, choices=list(PROVIDERS),
                   help="default: all (fast-heuristic on CUDA only)")
    p.add_argument("--steps", type=positive("--steps"), default=None,
                   help="sampling steps timed per measurement (default 30 on CUDA, 10 on the CPU)")
    p.add_argument("--warmup", type=non_negative("--warmup"), default=3,
                   help="untimed sampling steps before the timed ones (default 3)")
    add_seed(p, "random seed of the weights")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode of the stock baseline (max-autotune took >5 min on an H100)")
    p.add_argument("--out", default=None, help="JSON path (default: sample_throughput_<device>_"
                   "<date>.json in the current folder; in benchmarks/results/ when run as "
                   "benchmarks/sample_throughput.py)")
    return p


def main(argv=None, results_dir: Path | None = None, prog: str = "ddpm-fast bench") -> int:
    """Run the benchmark; the JSON goes to --out, else to results_dir (default: the current
    folder) under results_name(device)."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except UsageError as e:
        p.error(str(e))
    args.device = str(device)
    if args.config is None:
        args.config = ["cifar10", "256"] if device.type == "cuda" else ["cifar10"]
    if args.batch is None:
        args.batch = [1, 16, 64, 256] if device.type == "cuda" else [1, 8]
    if args.providers is None:
        args.providers = [p for p in PROVIDERS                # the CUDA-only settings
                          if device.type == "cuda" or not p.startswith(("fast-heuristic",
                                                                         "fast-conv",
                                                                         "fast-inductor-"))]
    if args.steps is None:
        args.steps = 30 if device.type == "cuda" else 10
    # torch's defaults are kept (what users get): cuDNN convs may use TF32, matmuls do not.
    env = environment(device)
    out = Path(args.out) if args.out else Path(results_dir or ".") / results_name(env["device"])
    try:                                    # before minutes of measuring, not after
        write_json(out, {"environment": env, "args": vars(args), "results": []})
    except OSError as e:
        p.error(f"--out {out}: {e.strerror or e}")
    print(json.dumps(env))
    rows = []
    for config in args.config:
        unet = make_diffusers_unet(config, args.seed)
        size = CONFIGS[config]["sample_size"]
        macs = count_macs(unet, torch.zeros(1, 3, size, size).normal_(), torch.tensor(10))
        print(f"# {config}: {sum(q.numel() for q in unet.parameters()):,} parameters, "
              f"{macs / 1e9:.3f} GMAC per image-step", flush=True)
        for batch in args.batch:
            for name in args.providers:
                try:
                    row = run_one(name, config, batch, device, args, macs)
                except Exception as e:  # a missing provider is a note, not a failed benchmark
                    row = {"provider": name, "config": config, "batch": batch,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                row["gmac_per_image_step"] = macs / 1e9
                rows.append(row)
                print(json.dumps(row), flush=True)
                # rewritten after every row, so a run cut short still leaves its numbers
                write_json(out, {"environment": env, "args": vars(args), "results": rows})
    print_table(rows)
    print(f"wrote {out}")
    return 0


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)  # atomic: readers see the old file or the new one


if __name__ == "__main__":
    sys.exit(main())
