"""Quality against U-Net calls for every sampler on the shipped digits model (issue 21): DDPM at
1000 steps, and DDIM and each few-step solver at 5, 10, 20 and 50 steps, N images each in fast
mode, scored by ddpm_fast/quality.py (confident / entropy / Fréchet of classifier logits), with
the seconds each run took on this machine.

    python benchmarks/solver_quality.py [--images 512] [--steps 5 10 20 50] [--plot]
    python benchmarks/solver_quality.py --samplers euler --ddpm-steps 0 --merge --plot

Writes results/solver_quality_<device>.json, and with --plot (matplotlib, the `plot` extra)
docs/solver_quality.png: Fréchet distance against U-Net calls, one line per sampler, DDPM-1000 and
the real digits as horizontal references.
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
from ddpm_fast.images import unit_to_uint8  # noqa: E402
from ddpm_fast.pipeline import DDPMPipeline, SAMPLERS  # noqa: E402
from ddpm_fast.quality import real_scores, score  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(pipe: DDPMPipeline, sampler: str, steps: int, images: int, batch: int) -> dict:
    start = time.perf_counter()
    parts = [pipe(batch_size=min(batch, images - first), seed=0, first_image=first,
                  sampler=sampler, num_inference_steps=steps, output_type="pt").images
             for first in range(0, images, batch)]
    seconds = time.perf_counter() - start
    scores = score(unit_to_uint8(torch.cat(parts).permute(0, 2, 3, 1).numpy()))
    # U-Net calls: the steps, but 2n − 1 for Heun (two calls a level but the last)
    calls = steps if sampler in ("ddpm", "ddim") else \
        len(pipe.solver_plan(sampler, steps).timesteps)
    row = {"sampler": sampler, "steps": steps, "calls": calls, "images": images,
           "seconds": seconds, **scores.as_dict()}
    print(f"{sampler:6s} {steps:5d} steps ({calls} calls): confident {row['confident']:.3f}  "
          f"entropy {row['entropy']:.3f}  Fréchet {row['frechet']:.3f}  ({seconds:.1f} s)", flush=True)
    return row


def plot(rows: list, real: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ddpm = [r for r in rows if r["sampler"] == "ddpm"]
    for sampler in dict.fromkeys(r["sampler"] for r in rows if r["sampler"] != "ddpm"):
        mine = sorted((r.get("calls", r["steps"]), r["frechet"]) for r in rows
                      if r["sampler"] == sampler)
        ax.plot(*zip(*mine), marker="o", label=sampler)
    for r in ddpm:
        ax.axhline(r["frechet"], color="grey", linestyle="--",
                   label=f"ddpm, {r['steps']} steps")
    ax.axhline(real["frechet"], color="black", linestyle=":", label="real digits")
    ax.set_xscale("log")
    ax.set_yscale("log")
    steps = sorted({r["steps"] for r in rows if r["sampler"] != "ddpm"
                    and r.get("calls", r["steps"]) == r["steps"]})
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_yticks([0.5, 1, 2, 4], ["0.5", "1", "2", "4"])
    ax.minorticks_off()
    ax.set_xlabel("U-Net calls")
    ax.set_ylabel("Fréchet distance of classifier logits")
    ax.set_title("Shipped digits model, fast mode")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--samplers", nargs="*", default=[s for s in SAMPLERS if s != "ddpm"],
                        help="few-step samplers to score (none: the DDPM run alone)")
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="0: no DDPM run")
    parser.add_argument("--merge", action="store_true",
                        help="add to the existing JSON, replacing the rows this run redoes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plot from the existing JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = ROOT / "benchmarks" / "results" / f"solver_quality_{slug(device_name(device))}.json"
    if args.replot:
        saved = json.loads(out.read_text())
        plot(saved["rows"], saved["real"], ROOT / "docs" / "solver_quality.png")
        return 0
    pipe = DDPMPipeline.from_pretrained(default_model_path(), mode="fast", device=device)
    pipe.set_progress_bar_config(disable=True)
    real = real_scores(args.images).as_dict()
    rows = [run(pipe, "ddpm", args.ddpm_steps, args.images, args.batch)] \
        if args.ddpm_steps else []
    for sampler in args.samplers:
        for steps in args.steps:
            rows.append(run(pipe, sampler, steps, args.images, args.batch))
    if args.merge and out.is_file():          # keep the rows of samplers this run did not redo
        old = json.loads(out.read_text())
        done = {(r["sampler"], r["steps"]) for r in rows}
        rows = [r for r in old["rows"] if (r["sampler"], r["steps"]) not in done] + rows
    write_json(out, {"environment": environment(device), "model": "shipped digits",
                     "mode": "fast", "dtype": str(pipe.dtype), "seed": 0, "real": real,
                     "rows": rows})
    print(f"wrote {out}")
    if args.plot:
        plot(rows, real, ROOT / "docs" / "solver_quality.png")
    best = min((r for r in rows if r["sampler"] != "ddpm"), key=lambda r: r["frechet"])
    print(f"lowest Fréchet: {best['sampler']} at {best['steps']} steps ({best['frechet']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
