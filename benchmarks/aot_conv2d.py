"""Compile the fused-conv Triton kernel for a GPU without one (sm_90 by default) and report, per
CIFAR-10 U-Net layer kind, what decides its speed: registers, spills, shared memory, whether the
dot became wgmma. Run in a process *without* TRITON_INTERPRET.

The launcher runs as in sampling (same tile choice, same argument list) on meta tensors; its
kernel call is recorded and compiled ahead of time with the JIT's own specialisations (integers
equal to 1 become constants, multiples of 16 are marked divisible, pointers 16-byte aligned).

    python benchmarks/aot_conv2d.py [--arch 90] [--batch 1] [--out results/aot_conv2d_sm90.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("aot_conv2d: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ddpm_fast.kernels.triton import conv2d as conv_kernel  # noqa: E402
from ddpm_fast.ops.conv2d import conv_padding  # noqa: E402

TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cifar_layers(batch: int, dtype=torch.bfloat16):
    """One call per distinct kind of convolution in the CIFAR-10 U-Net (channels_last)."""
    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta").contiguous(
            memory_format=torch.channels_last) if len(shape) == 4 else \
            torch.empty(*shape, dtype=dt, device="meta")

    def w(cout, cin, k=3):   # the fast runner's [KH, KW, Cin, Cout] memory
        return torch.empty(k, k, cin, cout, dtype=dtype, device="meta").permute(3, 2, 0, 1)

    f32 = torch.float32
    norm = lambda c: dict(scale=t(batch, c, dt=f32), shift=t(batch, c, dt=f32))  # noqa: E731
    yield "conv1 128@32² +norm+silu+temb+stats", dict(
        x=t(batch, 128, 32, 32), weight=w(128, 128), out=(128, 32, 32), **norm(128), silu=True,
        temb=t(batch, 128), stats=True)
    yield "conv2 128@32² +norm+silu+residual+stats", dict(
        x=t(batch, 128, 32, 32), weight=w(128, 128), out=(128, 32, 32), **norm(128), silu=True,
        residual=t(batch, 128, 32, 32), stats=True)
    yield "conv2 256@16² +shortcut 128", dict(
        x=t(batch, 256, 16, 16), weight=w(256, 256), out=(256, 16, 16), **norm(256), silu=True,
        shortcut=(t(batch, 128, 16, 16), None, w(256, 128, 1), t(256)), stats=True)
    yield "up conv1 (256+256)@8² skip", dict(
        x=t(batch, 256, 8, 8), skip=t(batch, 256, 8, 8), weight=w(256, 512), out=(256, 8, 8),
        **norm(512), silu=True, temb=t(batch, 256), stats=True)
    yield "downsample 128@32² s2", dict(
        x=t(batch, 128, 32, 32), weight=w(128, 128), out=(128, 16, 16), stride=2,
        pad=(0, 1, 0, 1), stats=True)
    yield "upsample 256@8²→16²", dict(
        x=t(batch, 256, 8, 8), weight=w(256, 256), out=(256, 16, 16), upsample=True, stats=True)


class Recorder:
    """Stands in for the jitted kernel: `kernel[grid](*args, **kw)` records instead of launching."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


def specialise(fn, args, kw):
    signature, constexprs, attrs = {}, {}, {}
    names = fn.arg_names
    for i, name in enumerate(names):
        value = args[i] if i < len(args) else kw[name]
        param = fn.params[i]
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif value == 1:                              # the JIT makes 1 a constant
            signature[name], constexprs[(i,)] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in kw.items() if k in ("num_warps", "num_stages")}
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), options


def resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in fields.items()}


def compile_layer(spec: dict, arch: int) -> dict:
    recorder = Recorder(conv_kernel._conv2d_kernel)
    saved, conv_kernel._conv2d_kernel = conv_kernel._conv2d_kernel, recorder
    saved_interp, conv_kernel.INTERPRET = conv_kernel.INTERPRET, False
    try:
        x = spec["x"]
        cout, ho, wo = spec["out"]
        y = torch.empty(x.shape[0], cout, ho, wo, dtype=x.dtype, device="meta").contiguous(
            memory_format=torch.channels_last)
        conv_kernel.conv2d(
            y, x, spec["weight"], torch.empty(cout, dtype=x.dtype, device="meta"),
            stride=spec.get("stride", 1), pad=spec.get("pad", conv_padding(None, (3, 3))),
            upsample=spec.get("upsample", False), skip=spec.get("skip"),
            scale=spec.get("scale"), shift=spec.get("shift"), silu=spec.get("silu", False),
            temb=spec.get("temb"), residual=spec.get("residual"), shortcut=spec.get("shortcut"),
            return_stats=spec.get("stats", False))
    finally:
        conv_kernel._conv2d_kernel, conv_kernel.INTERPRET = saved, saved_interp
    grid, args, kw = recorder.calls[0]
    src, options = specialise(saved, args, kw)
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    return {"grid": list(grid),
            "tile": [kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"],
                     kw["num_stages"]],
            "compile_s": round(time.perf_counter() - start, 2),
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
            "shared_bytes": compiled.metadata.shared, **resource_usage(compiled.asm["cubin"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path)
    a = parser.parse_args(argv)
    rows = {}
    for name, spec in cifar_layers(a.batch):
        rows[name] = compile_layer(spec, a.arch)
        r = rows[name]
        print(f"{name:42s} tile {r['tile']} grid {r['grid']} reg {r.get('reg')} "
              f"stack {r.get('stack')} shared {r['shared_bytes']} wgmma {r['wgmma']} "
              f"({r['compile_s']} s)")
    if a.out:
        a.out.write_text(json.dumps({"arch": a.arch, "batch": a.batch, "triton": triton.__version__,
                                     "layers": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
