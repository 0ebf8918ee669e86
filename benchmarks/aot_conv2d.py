"""Compile the fused-conv Triton kernel for a GPU without one (sm_90 by default) and report, per
U-Net layer kind (CIFAR-10's or the 256-px model's, benchmarks/conv2d_layers.py), what decides
its speed: registers, spills, shared memory (and the launcher's estimate of it), whether the
dot became wgmma. Run in a process *without* TRITON_INTERPRET.

The launcher runs as in sampling (same tile choice, same argument list) on meta tensors; its
kernel call is recorded and compiled ahead of time with the JIT's own specialisations (its
binder: integers equal to 1 become constants, multiples of 16 are marked divisible, floats fp32).

    python -m benchmarks.aot_conv2d [--arch 90] [--batch 1] [--layers cifar10|256] [--out aot.json]
    python -m benchmarks.aot_conv2d --arch 86 --tile 128 256 64 8 2 --split-k 4 --layer up.conv2
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

from benchmarks.conv2d_layers import LAYER_SETS, make_inputs  # noqa: E402
from ddpm_fast.kernels.triton import conv2d as conv_kernel  # noqa: E402
from ddpm_fast.ops.conv2d import conv_padding, output_size  # noqa: E402

class Recorder:
    """Stands in for the jitted kernel: `kernel[grid](*args, **kw)` records instead of launching."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


_BINDERS: dict = {}


def _binder(fn, arch: int):
    """(backend, the JIT's argument binder) of fn for sm_`arch`, made once."""
    if (id(fn), arch) not in _BINDERS:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[id(fn), arch] = (fn, backend, create_function_from_signature(
            fn.signature, fn.params, backend))
    return _BINDERS[id(fn), arch][1:]


_SOURCES: dict = {}


def specialise(fn, args, kw, arch: int = 90):
    """(ASTSource, options) of the kernel call fn[grid](*args, **kw) as the JIT would compile it
    for sm_`arch`: its own binder decides the signature and specialisations (integers equal to
    1 become constants, integers and pointers divisible by 16 are marked so, floats are fp32,
    bools i1); meta tensors stand in for device ones (a view's pointer keeps its offset).
    Options: what the call passes (num_warps, num_stages, launch_pdl), the rest defaults.
    Calls that specialise alike get the same ASTSource object."""
    backend, binder = _binder(fn, arch)
    bound, specialization, _ = binder(*args, **kw)
    options = {k: v for k, v in kw.items() if k in ("num_warps", "num_stages", "launch_pdl")}
    key = (id(fn), arch, tuple(specialization), tuple(sorted(options.items())))
    if key not in _SOURCES:
        # what JITFunction._pack_args makes of it (flat arguments: none of ours takes tuples)
        signature, constexprs, attrs = {}, {}, {}
        for i, (name, (kind, spec)) in enumerate(zip(fn.arg_names, specialization)):
            signature[name] = kind
            if kind == "constexpr":
                constexprs[(i,)] = bound[name]
                spec = ""
            if isinstance(spec, str):
                attrs[(i,)] = backend.parse_attr(spec)
        _SOURCES[key] = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return _SOURCES[key], options


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], check=True, capture_output=True,
                              text=True).stdout


def resource_usage(cubin: bytes) -> dict:
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)",
                             _cuobjdump(cubin, "--dump-resource-usage")))
    return {k.lower(): int(v) for k, v in fields.items()}


def sass_counts(cubin: bytes) -> dict:
    """Static counts of the SASS instructions that bound the prologue: MUFU (the special-
    function unit: ex2, rcp, tanh, rsq; 16 results per clock per SM against 2048 bf16 MACs)."""
    return {"mufu": len(re.findall(r"\bMUFU\.", _cuobjdump(cubin, "-sass")))}


def launcher_args(args: dict) -> dict:
    """The op's keyword arguments (benchmarks/conv2d_layers.make_inputs) as the launcher's, as
    the "conv" U-Net calls it: the norm from its producer's finished group statistics; y's group
    statistics finished for the next norm (32 groups; with the next skip's partials after an up
    ResBlock), except by conv_out and the upsampling (read raw)."""
    x, weight = args["x"], args["weight"]
    n, cout = x.shape[0], weight.shape[0]
    skip = args.get("skip")
    group_norm = None
    if "norm" in args:
        norm_w, norm_b, groups, eps = args["norm"]
        group_norm = (torch.empty(n, groups, 3, device=x.device), norm_w, norm_b, eps)
    shortcut = None
    if "shortcut" in args:
        sc_in, sc_w, sc_b = args["shortcut"]
        sc_x, sc_skip = (sc_in, None) if torch.is_tensor(sc_in) else sc_in
        shortcut = (sc_x, sc_skip, sc_w, sc_b)
    upsample = args.get("upsample", False)
    stats_cat = None
    if shortcut is not None and shortcut[1] is not None:  # an up ResBlock: read with the next skip
        stats_cat = torch.empty(n, 4, shortcut[1].shape[1], 3, device=x.device)
    return dict(x=x, weight=weight, bias=args.get("bias"), stride=args.get("stride", 1),
                pad=conv_padding(args.get("padding"), tuple(weight.shape[2:])),
                upsample=upsample, skip=skip, scale=None, shift=None,
                silu=args.get("silu", False), temb=args.get("temb"),
                residual=args.get("residual"), shortcut=shortcut, return_stats=True,
                group_norm=group_norm, stats_cat=stats_cat,
                stats_groups=32 if cout % 32 == 0 and not upsample else 0)


def compile_layer(layer, batch: int, arch: int, tile=None, splits=None,
                  dtype=torch.bfloat16) -> dict:
    """One layer's kernel as the launcher would launch it on `arch` (its tile choice under that
    arch's shared-memory limit), or with `tile` (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) and
    `splits` (split-K) forced: what the shared-memory estimate is calibrated against."""
    spec = launcher_args(make_inputs(layer, batch, "meta", dtype))
    x, weight = spec["x"], spec["weight"]
    ho, wo = output_size(x.shape[2], x.shape[3], weight.shape[2:], spec["stride"], spec["pad"],
                         spec["upsample"])
    y = torch.empty(x.shape[0], weight.shape[0], ho, wo, dtype=x.dtype, device="meta"
                    ).contiguous(memory_format=torch.channels_last)
    saved = conv_kernel._conv2d_kernel
    recorder = Recorder(saved)
    # the arch's limit decides the launcher's choice; a forced config is compiled as given
    limit = None if tile or splits else conv_kernel.SMEM_PER_BLOCK.get(arch)
    patches = dict(_conv2d_kernel=recorder, INTERPRET=False, smem_limit=lambda device: limit)
    if tile is not None:
        patches["tile_config"] = lambda *a: tuple(tile)
    if splits is not None:
        patches["split_k"] = lambda *a: splits
    undo = {name: getattr(conv_kernel, name) for name in patches}
    for name, value in patches.items():
        setattr(conv_kernel, name, value)
    try:
        conv_kernel.conv2d(y, **spec)
    finally:
        for name, value in undo.items():
            setattr(conv_kernel, name, value)
    grid, args, kw = recorder.calls[0]
    src, options = specialise(saved, args, kw, arch)
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    return {"grid": list(grid),
            "tile": [kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"],
                     kw["num_stages"]], "split_k": kw["SPLIT_K"],
            "compile_s": round(time.perf_counter() - start, 2),
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
            "griddepcontrol": ptx.count("griddepcontrol"),
            "tanh_approx": ptx.count("tanh.approx"),
            "shared_bytes": compiled.metadata.shared,
            "shared_estimate": conv_kernel.smem_needed(
                (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], kw["num_stages"]),
                x.element_size(), kw["SPLIT_K"]),
            **resource_usage(compiled.asm["cubin"]),
            **sass_counts(compiled.asm["cubin"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", choices=sorted(LAYER_SETS), default="cifar10",
                        help="the U-Net whose layer kinds are compiled")
    parser.add_argument("--layer", default="", help="only the layer kinds whose name has this")
    parser.add_argument("--tile", type=int, nargs=5, metavar=("BM", "BN", "BK", "WARPS", "STAGES"),
                        help="compile this tile config instead of the launcher's choice")
    parser.add_argument("--split-k", type=int, help="force this many reduction splits")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args(argv)
    rows = {}
    for name, layer in LAYER_SETS[a.layers].items():
        if a.layer not in name:
            continue
        rows[name] = compile_layer(layer, a.batch, a.arch, a.tile, a.split_k)
        r = rows[name]
        print(f"{name:42s} tile {r['tile']} split {r['split_k']} grid {r['grid']} "
              f"reg {r.get('reg')} stack {r.get('stack')} shared {r['shared_bytes']} "
              f"(estimate {r['shared_estimate']}) wgmma {r['wgmma']} mufu {r['mufu']} "
              f"({r['compile_s']} s)")
    if a.out:
        a.out.write_text(json.dumps({"arch": a.arch, "batch": a.batch, "triton": triton.__version__,
                                     "layer_set": a.layers, "layers": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
