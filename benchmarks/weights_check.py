"""What fast mode's stale-weights check costs per pipeline call (issue 24, case 1): the
WeightsWatch of pipe.unet that `DDPMPipeline.runner` asks before every call, against one
whole fast-mode call at batch 1 with few steps, on the shipped model and the CIFAR-10 U-Net.

    python benchmarks/weights_check.py --steps 10

Writes results/weights_check_<device>.json.
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
from ddpm_fast.fast import WeightsWatch  # noqa: E402
from ddpm_fast.pipeline import DDPMPipeline  # noqa: E402
from ddpm_fast.unet import PRESETS, UNet2DModel  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, pipe: DDPMPipeline, steps: int, repeats: int) -> dict:
    pipe.set_progress_bar_config(disable=True)
    call = lambda: pipe(batch_size=1, seed=0, num_inference_steps=steps, output_type="pt")  # noqa
    call()                                               # builds the runner
    watch = WeightsWatch(pipe.unet)
    check = median_seconds(lambda: watch.unchanged(pipe.unet), 200)
    torch.nn.Linear(1, 1)                        # a registration anywhere: the tree is walked
    walk = median_seconds(lambda: WeightsWatch(pipe.unet).unchanged(pipe.unet), 200)
    whole = median_seconds(call, repeats)
    row = {"model": name, "steps": steps, "check_ms": check * 1e3, "walk_ms": walk * 1e3,
           "call_ms": whole * 1e3, "check_share": check / whole}
    print(f"{name:8s} check {check * 1e3:.3f} ms (after a registration: {walk * 1e3:.3f} ms), "
          f"a {steps}-step batch-1 call {whole * 1e3:.1f} ms: {100 * check / whole:.3f} %")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure("digits", DDPMPipeline.from_pretrained(default_model_path(), mode="fast",
                                                           device=device),
                    args.steps, args.repeats),
            measure("cifar10", DDPMPipeline(UNet2DModel(PRESETS["cifar10"]), mode="fast",
                                            device=device), args.steps, args.repeats)]
    out = Path(__file__).parent / "results" / f"weights_check_{slug(device_name(device))}.json"
    write_json(out, {"environment": environment(device), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
