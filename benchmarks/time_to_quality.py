"""Time to quality (issue 21): seconds to N images at DDPM-1000 quality on the shipped digits
model, in one run: each few-step sampler in ddpm_fast's fast mode at the fewest steps whose
Fréchet distance (results/solver_quality_<device>.json, same images, same seed) is no worse than
DDPM's at 1000 steps, against diffusers' canonical loop with the same scheduler and steps, and
against DDPM-1000 itself in fast mode (its seconds from that JSON: same machine, same N).

    python benchmarks/time_to_quality.py [--images 512] [--samplers unipc dpm++]

Writes results/time_to_quality_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ddpm_fast.bench import device_name, environment, slug, write_json  # noqa: E402
from ddpm_fast.cli import default_model_path  # noqa: E402
from ddpm_fast.pipeline import DDPMPipeline  # noqa: E402
from ddpm_fast.solvers import BY_SAMPLER  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def fewest_steps(rows: list, sampler: str, target: float):
    ok = sorted(r["steps"] for r in rows if r["sampler"] == sampler and r["frechet"] <= target)
    return ok[0] if ok else None


def diffusers_seconds(sampler: str, steps: int, images: int, batch: int) -> float:
    """diffusers' canonical loop (set_timesteps, x_T · init_noise_sigma, scale_model_input,
    step) with the scheduler class of `sampler`, from the shipped folder's weights, fp32."""
    import inspect

    import diffusers

    unet = diffusers.UNet2DModel.from_pretrained(default_model_path(), subfolder="unet",
                                                 torch_dtype=torch.float32).eval()
    config = diffusers.DDPMScheduler.from_pretrained(default_model_path(),
                                                     subfolder="scheduler").config
    scheduler = getattr(diffusers, BY_SAMPLER[sampler].scheduler).from_config(config)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    c = unet.config
    with torch.no_grad():
        for first in range(0, images, batch):
            n = min(batch, images - first)
            scheduler.set_timesteps(steps)
            x = torch.randn((n, c.in_channels, c.sample_size, c.sample_size), generator=g)
            x = x * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                out = unet(scheduler.scale_model_input(x, t), t).sample
                kw = {"generator": g} if takes_generator else {}
                x = scheduler.step(out, t, x, **kw).prev_sample
    return time.perf_counter() - start


def ours_seconds(pipe: DDPMPipeline, sampler: str, steps: int, images: int, batch: int) -> float:
    pipe(batch_size=min(batch, images), seed=1, sampler=sampler, num_inference_steps=steps,
         output_type="pt")                                    # warm-up: graphs, compiles
    start = time.perf_counter()
    for first in range(0, images, batch):
        pipe(batch_size=min(batch, images - first), seed=0, first_image=first, sampler=sampler,
             num_inference_steps=steps, output_type="pt")
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--samplers", nargs="+", default=["unipc", "dpm++"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = slug(device_name(device))
    quality = json.loads((RESULTS / f"solver_quality_{name}.json").read_text())
    ddpm = next(r for r in quality["rows"] if r["sampler"] == "ddpm")
    if ddpm["images"] != args.images:
        raise SystemExit(f"the quality JSON scored {ddpm['images']} images, not {args.images}")
    pipe = DDPMPipeline.from_pretrained(default_model_path(), mode="fast", device=device)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for sampler in args.samplers:
        steps = fewest_steps(quality["rows"], sampler, ddpm["frechet"])
        if steps is None:
            print(f"{sampler}: no step count reached DDPM-{ddpm['steps']} quality")
            continue
        ours = ours_seconds(pipe, sampler, steps, args.images, args.batch)
        theirs = diffusers_seconds(sampler, steps, args.images, args.batch)
        row = {"sampler": sampler, "steps": steps, "images": args.images,
               "fast_s": ours, "diffusers_same_scheduler_s": theirs,
               "ddpm_1000_fast_s": ddpm["seconds"], "vs_diffusers": theirs / ours,
               "vs_ddpm_1000": ddpm["seconds"] / ours}
        rows.append(row)
        print(f"{sampler} {steps} steps, {args.images} images: fast {ours:.1f} s, diffusers "
              f"{theirs:.1f} s ({theirs / ours:.2f}x), DDPM-1000 fast {ddpm['seconds']:.1f} s "
              f"({ddpm['seconds'] / ours:.1f}x)", flush=True)
    out = RESULTS / f"time_to_quality_{name}.json"
    write_json(out, {"environment": environment(device), "dtype": str(pipe.dtype),
                     "ddpm_1000": ddpm, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
