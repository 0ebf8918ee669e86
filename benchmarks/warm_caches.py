"""Fill the on-disk compile caches for the throughput runs, several processes at once.

A fused-conv provider compiles ≈ 15-30 Triton kernel variants per batch size (tile and flags
differ per layer and batch), and each torch.compile'd provider spends 25-65 s in Inductor per
shape (H100 JSON of 2026-11-25), one after another in the benchmark's single process: minutes of
a lent GPU's time. Compiled here in parallel (one spawned process per job), the benchmark then
finds them in the caches (Triton's ~/.triton/cache, Inductor's FX graph cache) and mostly
captures its graphs.

    python benchmarks/warm_caches.py --device cuda --jobs fast-conv:cifar10:1 \
        fast-conv-pdl:cifar10:64 compile:cifar10:256 fast-inductor:256:4

A job is PROVIDER:CONFIG:BATCH (a provider of benchmarks/sample_throughput.py). Each builds the
provider as the benchmark does and runs one step (compile + capture).
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's ddpm_fast


def parse_job(text: str) -> tuple[str, str, int]:
    parts = text.split(":")
    if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) <= 0:
        raise argparse.ArgumentTypeError(f"job {text!r} is not PROVIDER:CONFIG:BATCH")
    return parts[0], parts[1], int(parts[2])


def warm(job: tuple[str, str, int], device: str, compile_mode: str) -> str:
    import torch

    from ddpm_fast.bench import PROVIDERS, make_diffusers_unet

    provider, config, batch = job
    start = time.perf_counter()
    step = PROVIDERS[provider](make_diffusers_unet(config, 0), batch, torch.device(device),
                               argparse.Namespace(compile_mode=compile_mode))
    step(0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return f"{':'.join(map(str, job))} {time.perf_counter() - start:.1f} s"


def main(argv=None) -> int:
    from ddpm_fast.bench import CONFIGS, PROVIDERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--jobs", nargs="+", type=parse_job, required=True)
    p.add_argument("--workers", type=int, default=None, help="default: one per job")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="as sample_throughput.py's (the compile provider's cache key)")
    args = p.parse_args(argv)
    for provider, config, _ in args.jobs:
        if provider not in PROVIDERS:
            p.error(f"unknown provider {provider!r} (one of {', '.join(PROVIDERS)})")
        if config not in CONFIGS:
            p.error(f"unknown config {config!r} (one of {', '.join(sorted(CONFIGS))})")
    spawn = multiprocessing.get_context("spawn")          # CUDA does not survive fork
    failed = 0
    with ProcessPoolExecutor(args.workers or len(args.jobs), mp_context=spawn) as pool:
        futures = [pool.submit(warm, job, args.device, args.compile_mode) for job in args.jobs]
        for job, future in zip(args.jobs, futures):
            try:
                print("warmed", future.result(), flush=True)
            except Exception as exc:                       # report, keep the others
                failed += 1
                print(f"failed {job}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
