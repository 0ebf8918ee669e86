"""Per-op timings of ddpm_fast's kernels against the torch equivalent on the same inputs.

    python benchmarks/kernels.py                 # CPU: native C++ vs torch
    python benchmarks/kernels.py --device cuda   # GPU: CUDA and Triton vs torch (eager)

GroupNorm shapes are the CIFAR-10 U-Net's (C, H×W, groups 32) at the given batch sizes; every
op is checked against the reference before it is timed. Prints ratios and saves JSON with the
device name under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.sample_throughput import environment, write_json  # noqa: E402
from ddpm_fast.fast import default_dtype  # noqa: E402
from ddpm_fast.ops import attention, attention_reference, ddpm_step, group_norm  # noqa: E402
from ddpm_fast.ops.backend import native_available, triton_available, use_backend  # noqa: E402
from ddpm_fast.ops.philox import key_tensor  # noqa: E402
from ddpm_fast.schedule import Schedule  # noqa: E402

GN_SHAPES = [(128, 32), (256, 16), (256, 8), (256, 4), (512, 16)]   # (C, H=W) of the CIFAR U-Net
# (D = C, H=W) of the attention layers: CIFAR 16×16 and mid 4×4; the 256-px model's 16×16 at C=512
ATTN_SHAPES = [(256, 16), (256, 4), (512, 16), (512, 8)]


def bench(fn, device, reps):
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()             # time replays: launch overhead out
        with torch.cuda.graph(graph):
            fn()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            graph.replay()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def bench_group_norm(x, w, b, add, dtype, providers, device, reps) -> list[dict]:
    """GroupNorm(+add)+SiLU: each provider against torch's ops on the same input."""
    wd, bd = w.to(dtype), b.to(dtype)
    addd = None if add is None else add.to(dtype)[:, :, None, None]

    def torch_fn():
        return F.silu(F.group_norm(x if addd is None else x + addd, 32, wd, bd, 1e-6))

    t_torch = bench(torch_fn, device, reps)
    rows = []
    for prov in providers:
        with use_backend(prov):
            got = group_norm(x, w, b, 32, 1e-6, True, add)
            err = (got.float() - torch_fn().float()).abs().max().item()
            t = bench(lambda: group_norm(x, w, b, 32, 1e-6, True, add), device, reps)
        rows.append({"op": "group_norm_silu" + ("_add" if add is not None else ""),
                     "batch": x.shape[0], "C": x.shape[1], "HW": x.shape[2], "dtype": str(dtype),
                     "provider": prov, "ms": t * 1e3, "torch_ms": t_torch * 1e3,
                     "speedup": t_torch / t, "max_abs_diff_vs_torch": err})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--layout", default="channels_last", choices=["channels_last", "contiguous"],
                   help="GroupNorm input layout (fast mode runs channels_last on every device)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batches = args.batch or ([1, 64, 256] if device.type == "cuda" else [1, 8])
    # default: fast mode's dtype on this device (bf16 on GPUs and on CPUs with native bf16)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    reps = args.reps or 100
    providers = [b for b in ("native", "triton") if
                 (native_available(device) if b == "native" else
                  device.type == "cuda" and triton_available(device))]
    env = environment(device)
    out = Path(args.out or Path(__file__).parent / "results" /
               f"kernels_{env['device'].replace(' ', '_').replace('/', '_')}.json")
    rows = []
    for batch in batches:
        for c, hw in GN_SHAPES:
            x = torch.randn(batch, c, hw, hw, device=device).to(dtype)
            x = x.contiguous(memory_format=LAYOUTS[args.layout])
            w, b = torch.randn(c, device=device), torch.randn(c, device=device)
            # GroupNorm's native kernel is C++ only (the CUDA one lost to Triton and was deleted)
            gn_providers = [p for p in providers if p != "native" or device.type == "cpu"]
            for add in (torch.randn(batch, c, device=device), None):
                rows += bench_group_norm(x, w, b, add, dtype, gn_providers, device, reps)
        # attention: the Triton kernel against torch's SDPA (GPU only: interpreting is not timing)
        for d, hw in ATTN_SHAPES if "triton" in providers else []:
            q, k, v = (torch.randn(batch, hw * hw, d, device=device).to(dtype) for _ in range(3))

            def sdpa():
                return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])

            t_torch = bench(sdpa, device, reps)
            with use_backend("triton"):
                got = attention(q, k, v, d ** -0.5)
                t = bench(lambda: attention(q, k, v, d ** -0.5), device, reps)
            err = (got.float() - attention_reference(q, k, v, d ** -0.5).float()).abs().max().item()
            rows.append({"op": "attention", "batch": batch, "C": d, "HW": hw, "dtype": str(dtype),
                         "provider": "triton", "ms": t * 1e3, "torch_ms": t_torch * 1e3,
                         "speedup": t_torch / t, "max_abs_diff_vs_fp32": err})
            print(json.dumps(rows[-1]), flush=True)
        # sampler step: x̂0, clip, mean, + σ·Philox noise (torch: the same math as separate ops)
        s = Schedule.linear()
        table = s.step_table(s.timesteps(), "fixed_large", device)
        xs = torch.randn(batch, 3, 32, 32, device=device)
        eps = torch.randn(batch, 3, 32, 32, device=device).to(dtype)
        key, step = key_tensor(0, 0, device), torch.tensor([10], device=device)
        row = table[10]

        def torch_step():
            x0 = ((xs - row[0] * eps.float()) / row[1]).clamp(-1, 1)
            return row[2] * x0 + row[3] * xs + row[5] * torch.randn_like(xs)

        t_torch = bench(torch_step, device, reps)
        for prov in providers:
            with use_backend(prov):
                t = bench(lambda: ddpm_step(xs, eps, table, step, key, None, True), device, reps)
            rows.append({"op": "ddpm_step_philox", "batch": batch, "dtype": str(dtype),
                         "provider": prov, "ms": t * 1e3, "torch_ms": t_torch * 1e3,
                         "speedup": t_torch / t})
            print(json.dumps(rows[-1]), flush=True)
        write_json(out, {"environment": env, "args": vars(args), "results": rows})
    print(f"\n{'op':22} {'batch':>5} {'shape':>10} {'provider':8} {'ms':>8} {'torch ms':>9} {'speedup':>8}")
    for r in rows:
        shape = f"{r.get('C', 3)}x{r.get('HW', 32)}²"
        print(f"{r['op']:22} {r['batch']:>5} {shape:>10} {r['provider']:8} {r['ms']:8.4f} "
              f"{r['torch_ms']:9.4f} {r['speedup']:7.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
