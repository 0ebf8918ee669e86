"""Per-step time of every sampler in fast mode against the DDPM step, same model, same machine,
one process (issue 21: a solver's step should cost what a DDPM step costs, within 5 %), and the
time to the first images of a fresh pipeline (cold start: from_pretrained to the first 10-step
images, compile and graph capture included).

    python benchmarks/solver_steps.py --device cuda --batch 1 256 [--config cifar10]
    python benchmarks/solver_steps.py --device cpu --batch 8 --steps 10

Each sampler runs `--steps` steps per call (DDPM: the last `--steps` of its 1000), timed over
`--repeats` calls after a warm-up call; the per-step figure is the median call over the steps.
Writes results/solver_steps_<config>_<device>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ddpm_fast.bench import device_name, environment, slug, write_json  # noqa: E402
from ddpm_fast.cli import default_model_path  # noqa: E402
from ddpm_fast.pipeline import SAMPLERS, DDPMPipeline  # noqa: E402
from ddpm_fast.unet import PRESETS, UNet2DModel  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_pipeline(config: str, device: torch.device) -> DDPMPipeline:
    if config == "digits":
        return DDPMPipeline.from_pretrained(default_model_path(), mode="fast", device=device)
    torch.manual_seed(0)
    return DDPMPipeline(UNet2DModel(PRESETS[config]), mode="fast", device=device)


def per_step_ms(pipe: DDPMPipeline, sampler: str, batch: int, steps: int, repeats: int,
                device: torch.device) -> float:
    """Median over `repeats` timed runs of `steps` steps, per step, after one warm-up run. A
    solver run is a whole pipeline call (its per-call work included: plan, x_T, time table);
    DDPM's is `steps` replays of its step (benchmark_step_fn: the fused DDPM kernel)."""
    if sampler == "ddpm":
        fn = pipe.benchmark_step_fn(batch)

        def run():
            for k in range(steps):
                fn(k)
    else:
        def run():
            pipe(batch_size=batch, seed=0, sampler=sampler, num_inference_steps=steps,
                 output_type="pt")
    times = []
    for i in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        if i:                                     # the first run warms up (capture, compile)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / steps


def cold_start(config: str, sampler: str, batch: int, device: torch.device) -> float:
    """Seconds from a new pipeline to its first 10-step images (in this process: Inductor's and
    Triton's on-disk caches as they are)."""
    sync(device)
    start = time.perf_counter()
    pipe = make_pipeline(config, device)
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=batch, seed=0, sampler=sampler, num_inference_steps=10, output_type="pt")
    sync(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="cifar10", choices=("digits", *PRESETS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = (Path(__file__).parent / "results" /
           f"solver_steps_{args.config}_{slug(device_name(device))}.json")
    payload = {"environment": environment(device), "config": args.config,
               "steps_per_call": args.steps, "cold_start_s": {}, "rows": []}
    cold = args.samplers[1] if len(args.samplers) > 1 else args.samplers[0]
    for batch in args.batch:          # first: a cold pipeline (before this process compiled)
        payload["cold_start_s"][f"{cold} batch {batch}"] = cold_start(args.config, cold, batch,
                                                                      device)
    pipe = make_pipeline(args.config, device)
    pipe.set_progress_bar_config(disable=True)
    for batch in args.batch:
        base = None
        for sampler in args.samplers:
            ms = per_step_ms(pipe, sampler, batch, args.steps, args.repeats, device)
            base = ms if sampler == "ddpm" else base
            row = {"sampler": sampler, "batch": batch, "ms_per_step": ms,
                   "vs_ddpm_step": None if base is None else ms / base}
            payload["rows"].append(row)
            ratio = "" if base is None else f"  ({ms / base:.3f}x the DDPM step)"
            print(f"batch {batch:4d} {sampler:16s} {ms:8.3f} ms/step{ratio}", flush=True)
            write_json(out, payload)              # a cut-short run keeps its rows
    print(f"cold start: {payload['cold_start_s']}")
    write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
