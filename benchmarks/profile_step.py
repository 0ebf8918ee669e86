"""Where the time of one fast-mode sampling step goes: the torch profiler over a few steps, its
kernels grouped into convolutions, GEMMs, norms, attention, the sampler step and the rest.

    python benchmarks/profile_step.py --device cuda --batch 1 64 256
    python benchmarks/profile_step.py --device cpu --batch 8 --steps 3

On a GPU the time is the sum of device-kernel time per category against the wall time per step
(the gap is launch overhead and idle device); on the CPU it is operator self time. Writes JSON
next to the other results (device name in the file name).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.sample_throughput import environment, write_json  # noqa: E402
from ddpm_fast.pipeline import DDPMPipeline  # noqa: E402
from ddpm_fast.unet import PRESETS, UNet2DModel  # noqa: E402

CATEGORIES = [   # first match wins; names of aten ops, cuDNN/cuBLAS and Triton/Inductor kernels
    ("attention", ("attention", "flash", "fmha", "sdpa", "softmax")),
    ("sampler step", ("ddpm_step", "philox", "_sampler")),
    ("norm", ("group_norm", "groupnorm", "native_group_norm", "_gn_", "welford", "norm")),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "xmma", "winograd", "mkldnn_conv")),
    ("gemm", ("gemm", "addmm", "mm", "linear", "matmul", "cublas", "sm90_", "cutlass")),
]


def category(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(k in low for k in keys):
            return label
    return "elementwise / other"


def profile(pipe: DDPMPipeline, batch: int, steps: int, device: torch.device) -> dict:
    step = pipe.benchmark_step_fn(batch)
    for i in range(3):
        step(i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        sync()
        wall = (time.perf_counter() - t0) / steps
    per_cat: dict = defaultdict(float)
    for evt in prof.key_averages():
        if device.type == "cuda":
            us = getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0)
        else:
            us = evt.self_cpu_time_total
        if us > 0 and not evt.key.startswith(("ProfilerStep", "cudaGraphLaunch", "aten::copy_")):
            per_cat[category(evt.key)] += us / steps / 1e3
    busy = sum(per_cat.values())
    device_kernels = [e for e in prof.key_averages()
                      if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"batch": batch, "wall_ms_per_step": wall * 1e3,
            # the batch-1 step is a dependent chain: its length bounds the latency
            "kernels_per_step": (sum(e.count for e in device_kernels) / steps
                                 if device.type == "cuda" else None),
            "kernel_ms_per_step": {k: round(v, 4) for k, v in sorted(per_cat.items(),
                                                                      key=lambda kv: -kv[1])},
            "busy_fraction": busy / (wall * 1e3) if wall > 0 else None,
            "top_kernels": [(e.key[:90], round((getattr(e, "self_device_time_total", 0.0)
                                                if device.type == "cuda" else e.self_cpu_time_total)
                                               / steps / 1e3, 4))
                            for e in sorted(prof.key_averages(),
                                            key=lambda e: -(getattr(e, "self_device_time_total", 0.0)
                                                            if device.type == "cuda"
                                                            else e.self_cpu_time_total))[:15]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="cifar10", choices=sorted(PRESETS))
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--kernels", default=None, choices=["reference", "fused", "conv"],
                   help="the U-Net's kernel setting (default: the fast runner's choice)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batches = args.batch or ([1, 64, 256] if device.type == "cuda" else [8])
    torch.manual_seed(0)
    pipe = DDPMPipeline(UNet2DModel(PRESETS[args.config]).eval(), mode="fast", device=device,
                        kernels=args.kernels)
    env = environment(device)
    tag = f"_{args.kernels}" if args.kernels else ""
    out = Path(args.out or Path(__file__).parent / "results" /
               f"profile_{args.config}{tag}_{env['device'].replace(' ', '_').replace('/', '_')}.json")
    rows = []
    for batch in batches:
        rows.append(profile(pipe, batch, args.steps, device))
        r = rows[-1]
        print(f"batch {batch}: {r['wall_ms_per_step']:.3f} ms/step wall, kernels busy "
              f"{100 * (r['busy_fraction'] or 0):.0f}%, {r['kernels_per_step']} kernels/step")
        for cat, ms in r["kernel_ms_per_step"].items():
            print(f"  {cat:22} {ms:9.4f} ms")
        write_json(out, {"environment": env, "args": vars(args), "results": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
