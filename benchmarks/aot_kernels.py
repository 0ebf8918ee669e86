"""Compile every Triton kernel of ours for GPUs without one (sm_80, sm_86, sm_89, sm_90 by
default) at the launches the fast runner makes, and check each compile: no register spills
(cuobjdump's STACK and LOCAL are 0) and shared memory within the architecture's per-block limit
(kernels/triton/conv2d.py SMEM_PER_BLOCK). Run in a process *without* TRITON_INTERPRET.

    python -m benchmarks.aot_kernels --arch 80 86 89 90 [--out aot_kernels.json] [--jobs 2]
    python -m benchmarks.aot_kernels --dry-run          # count the specialisations only
    python -m benchmarks.aot_kernels --no-autotune --keep   # after a kernel change: commit
                                                        # results/aot_kernels_usage.json

Launches: the fast runner (ddpm_fast/fast.py) is built on meta tensors for the CIFAR-10 U-Net
(unet.PRESETS["cifar10"]) at batch 1 and 64 and for the 256-px one at batch 4, and runs one
step each way it can (DDPM with and without clipping; the solver step with CORRECTOR and
STOCHASTIC on and off) under the "conv" U-Net setting (every convolution the fused conv kernel)
and the "fused" one (GroupNorm and attention kernels), with the Triton implementation of every
op and each kernel call recorded instead of launched. (On CUDA the kernel table runs SDPA for
attention and the CUDA sampler kernels: there the Triton ones are the fallbacks.) The model is
bf16 (the fast path on GPUs), the sampler state fp32; `--unet-dtype bf16 fp32` adds the fp32
model (the runner's dtype=torch.float32). The layer kinds of benchmarks/conv2d_layers.py
LAYER_SETS are launched too (as aot_conv2d launches them), at the same batch sizes.

Configs: the conv launcher's choice under each architecture's shared-memory limit (tile and
split-K), every autotune candidate (tile_candidates: DDPM_FAST_CONV_AUTOTUNE=1), and each of
them with split-K off (DDPM_FAST_CONV_SPLITK=0) where the launcher splits; `--pdl` adds the
DDPM_FAST_PDL=1 launches on sm_90+. The GroupNorm finalizer (_norm_affine_kernel), which the
conv U-Net never launches (each producer finishes its consumer's groups), at the shapes of the
conv op called without that finishing.

Each distinct specialisation (the JIT's own: signature, constexprs, divisibility attributes,
options; aot_conv2d.specialise) is compiled once per architecture, in `--jobs` processes. The
result of each compile (registers, spills, shared memory) is kept beside Triton's cache under
Triton's cache key (usage_cache_dir), so a warm run compiles nothing. Exit status 1 when any
compile spills or needs more shared memory than its architecture has: the output and the JSON
list both, and which spills are in configs the launcher picks by default (`default_spills`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("aot_kernels: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from benchmarks.aot_conv2d import Recorder, launcher_args, resource_usage, specialise  # noqa: E402
from benchmarks.conv2d_layers import LAYER_SETS, make_inputs  # noqa: E402
from ddpm_fast.kernels.triton import attention as attention_kernels  # noqa: E402
from ddpm_fast.kernels.triton import conv2d as conv_kernels  # noqa: E402
from ddpm_fast.kernels.triton import group_norm as gn_kernels  # noqa: E402
from ddpm_fast.kernels.triton import sampler as sampler_kernels  # noqa: E402
from ddpm_fast.ops.conv2d import output_size  # noqa: E402

ARCHS = (80, 86, 89, 90)
RUNS = (("cifar10", 1), ("cifar10", 64), ("256", 4))     # (U-Net preset, batch)
STEP_ROWS = 1000            # rows of the step table (a full DDPM run)
KERNELS = {                 # short name → (module, JIT function)
    "conv2d": (conv_kernels, "_conv2d_kernel"),
    "norm_affine": (conv_kernels, "_norm_affine_kernel"),
    "gn_partial": (gn_kernels, "_gn_partial_kernel"),
    "gn_apply": (gn_kernels, "_gn_apply_kernel"),
    "attention": (attention_kernels, "_attention_kernel"),
    "ddpm_step": (sampler_kernels, "_ddpm_step_kernel"),
    "solver_step": (sampler_kernels, "_solver_step_kernel"),
    "philox_normal": (sampler_kernels, "_philox_normal_kernel"),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
USAGE_VERSION = 1           # of the files in usage_cache_dir


# ------------------------------------------------------------------ recording
class Call(NamedTuple):
    """One recorded kernel launch: the kernel, the arch whose limits chose its config (0: the
    same on every arch), where it comes from, its config (conv: default / autotune / split-K
    off / PDL; else "launch") and whether the launcher picks it by default, its arguments."""
    kernel: str
    arch: int
    where: str
    config: str
    default: bool
    args: tuple
    kw: dict


@contextlib.contextmanager
def patched(obj, **attrs):
    saved = {name: getattr(obj, name) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


@contextlib.contextmanager
def environ(**values):
    """Environment variables set (None: unset) inside, restored after."""
    saved = {k: os.environ.get(k) for k in values}

    def put(items):
        for k, v in items:
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        put(values.items())
        yield
    finally:
        put(saved.items())


def jit_fn(name: str):
    fn = getattr(*KERNELS[name])
    return fn.fn if isinstance(fn, Recorder) else fn


class KernelRecorder(Recorder):
    """Stands in for one of our JIT kernels: its calls go to `sink` as (kernel name, args, kw)."""

    def __init__(self, name, sink):
        super().__init__(jit_fn(name))
        self.name, self.sink = name, sink

    def __getitem__(self, grid):
        return lambda *args, **kw: self.sink.append((self.name, args, kw))


def weight_names(model) -> dict:
    """id(tensor) → the module path of the conv or projection whose weight it is (also by the
    id of a view's base: the attention blocks pass views of their weights)."""
    names = {}
    for mod_name, module in model.named_modules():
        tensors = dict(module.named_parameters(recurse=False))
        tensors.update(module.named_buffers(recurse=False))
        for t_name, t in tensors.items():
            if t is None:
                continue
            label = mod_name if t_name == "weight" else f"{mod_name}.{t_name}"
            names[id(t)] = label
            if t._base is not None:
                names.setdefault(id(t._base), label)
    return names


def describe(x, y, weight, kw) -> str:
    """A conv layer in conv2d_layers' words: '3x3 256+256→256 @8 norm temb'."""
    cx, cs = x.shape[1], 0 if kw.get("skip") is None else kw["skip"].shape[1]
    parts = [f"{weight.shape[2]}x{weight.shape[3]}",
             f"{cx}{f'+{cs}' if cs else ''}→{weight.shape[0]}", f"@{x.shape[2]}"]
    if kw.get("stride", 1) == 2:
        parts.append("s2")
    if kw.get("upsample"):
        parts.append(f"up→{y.shape[2]}")
    if kw.get("group_norm") is not None or kw.get("scale") is not None:
        parts.append("norm")
    parts += [key for key in ("temb", "residual", "shortcut") if kw.get(key) is not None]
    return " ".join(parts)


def _arg_key(value):
    if isinstance(value, torch.Tensor):
        return ("T", value.dtype, tuple(value.shape), tuple(value.stride()),
                value.storage_offset())
    return value


def _launch_key(name, args, kw):
    return (name, repr([_arg_key(v) for v in args]),
            repr(sorted((k, _arg_key(v)) for k, v in kw.items())))


def record_runner(preset: str, batch: int, dtype: torch.dtype):
    """The fast runner's steps on meta tensors (module doc), every kernel call recorded.
    Returns (the launches of the kernels other than the conv, the conv launcher's calls as
    (where, args, kw) to launch again per arch and config)."""
    from ddpm_fast import fast
    from ddpm_fast.schedule import COEF_COLS
    from ddpm_fast.solvers import COLS
    from ddpm_fast.unet import PRESETS, UNet2DModel

    # the modules (ddpm_fast.ops exports functions of the same names)
    attention_op, backend, conv_op, step_op, solver_op = (
        importlib.import_module(f"ddpm_fast.ops.{m}")
        for m in ("attention", "backend", "conv2d", "ddpm_step", "solver_step"))
    meta = torch.device("meta")
    with meta:
        unet = UNet2DModel(PRESETS[preset]).eval()
    tag = f"{preset} b{batch}" + ("" if dtype == torch.bfloat16 else " fp32")
    config = PRESETS[preset]
    key = torch.empty(2, dtype=torch.int64, device=meta)
    calls, conv_calls, seen, runners = [], {}, set(), {}

    def attention(q, k, v, scale):          # the op's Triton branch (its custom op is fake)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        attention_kernels.attention(out, q, k, v, scale)
        return out

    def conv2d_op(x, weight, bias, stride, pad, *rest):     # the op's body, not its fake
        return conv_op._impl(x, weight, bias, stride, tuple(pad), *rest)

    finishing_conv2d = conv_op.conv2d

    def conv2d_unfinished(*args, stats_groups=0, next_skip_stats=None, **kw):
        return finishing_conv2d(*args, **kw)    # no finishing: every norm takes norm_affine

    launcher = conv_kernels.conv2d
    rules = [("ddpm", clip, (None, None)) for clip in (True, False)]
    rules += [("solver", False, ("solver", corrector, stochastic, None, None))
              for corrector in (False, True) for stochastic in (False, True)]
    # "conv": the U-Net of issue #23; "fused": the GroupNorm and attention kernels;
    # "unfinished": the conv op without its producers finishing the norms (norm_affine)
    for setting, kernels in (("conv", "conv"), ("fused", "fused"), ("unfinished", "conv")):
        if kernels not in runners:
            runners[kernels] = fast.FastRunner(unet, meta, dtype=dtype, use_graphs=False,
                                               compile=False, kernels=kernels,
                                               autotune_convs=False)
        runner = runners[kernels]
        names = weight_names(runner.unet)
        sink, outputs = [], {}

        def conv_launcher(y, x, weight, bias, **kw):
            label = names.get(id(weight)) or names.get(id(weight._base), "?")
            where = f"{tag} {label} ({describe(x, y, weight, kw)})"
            if setting == "conv" and where not in conv_calls:
                conv_calls[where] = (where, (y, x, weight, bias), kw)
            with patched(conv_kernels, _conv2d_kernel=Recorder(None)):
                return launcher(y, x, weight, bias, **kw)

        def unet_once(x, temb, variant, real=runner._unet):
            # every step runs the same U-Net launches: run it once per setting
            if x.shape not in outputs:
                outputs[x.shape] = real(x, temb, variant)
            return outputs[x.shape]

        width = sum(b.time_emb_proj.out_features for b in runner.unet.resnets())
        temb = torch.empty(STEP_ROWS, width, dtype=dtype, device=meta)
        with contextlib.ExitStack() as stack:
            enter = stack.enter_context
            enter(patched(backend, select=lambda op, device: "triton"))
            enter(patched(conv_op, conv2d_op=conv2d_op))
            enter(patched(attention_op, attention=attention))
            enter(patched(fast, ddpm_step_out=step_op._run_triton,
                          solver_step_=solver_op._run_triton))
            enter(patched(runner, _unet=unet_once))
            if setting == "unfinished":
                enter(patched(conv_op, conv2d=conv2d_unfinished))
            for module in {m for m, _ in KERNELS.values()}:
                enter(patched(module, **{fn: KernelRecorder(name, sink)
                                         for name, (m, fn) in KERNELS.items() if m is module}))
            enter(patched(conv_kernels, conv2d=conv_launcher))
            for kind, clip, rule in rules[:1] if setting == "unfinished" else rules:
                coef = torch.empty(STEP_ROWS, COLS if kind == "solver" else COEF_COLS,
                                   dtype=torch.float32, device=meta)
                state = runner._state(batch, coef, temb, key, clip, rule)
                step = (f"clip={int(clip)}" if kind == "ddpm" else
                        f"corrector={int(rule[1])} stochastic={int(rule[2])}")
                before = len(sink)
                with torch.no_grad():
                    runner._step(state)
                for name, args, kw in sink[before:]:
                    if setting == "unfinished" and name != "norm_affine":
                        continue
                    k = _launch_key(name, args, kw)
                    if k not in seen:
                        seen.add(k)
                        where = f"{tag} {setting} " + (step if name in (
                            "ddpm_step", "solver_step") else "U-Net")
                        calls.append(Call(name, 0, where, "launch", True, args, kw))
    # the runner's initial noise x_T (philox_normal)
    sink = []
    out = torch.empty(batch, config.in_channels * config.sample_size ** 2, device=meta)
    with patched(sampler_kernels, _philox_normal_kernel=KernelRecorder("philox_normal", sink)):
        sampler_kernels.philox_normal(out, key, torch.empty(1, dtype=torch.int64, device=meta))
    calls += [Call(n, 0, f"{tag} x_T", "launch", True, a, k) for n, a, k in sink]
    return calls, list(conv_calls.values())


def record_layer_sets(preset: str, batch: int, dtype) -> list:
    """conv2d_layers' layer kinds of the preset as aot_conv2d launches them: (where, args, kw)."""
    tag = f"{preset} b{batch}" + ("" if dtype == torch.bfloat16 else " fp32")
    out = []
    def randn(*shape, generator=None):     # values do not matter: no CPU tensors made
        return torch.empty(*shape, device="meta")

    for name, layer in LAYER_SETS[preset].items():
        with patched(torch, randn=randn):
            spec = launcher_args(make_inputs(layer, batch, "meta", dtype))
        x, weight, bias = spec.pop("x"), spec.pop("weight"), spec.pop("bias")
        ho, wo = output_size(x.shape[2], x.shape[3], weight.shape[2:], spec["stride"],
                             spec["pad"], spec["upsample"])
        y = torch.empty(x.shape[0], weight.shape[0], ho, wo, dtype=x.dtype, device="meta"
                        ).contiguous(memory_format=torch.channels_last)
        out.append((f"{tag} LAYER_SETS {name}", (y, x, weight, bias), spec))
    return out


def conv_configs(call, arch: int, autotune: bool = True, pdl: bool = False) -> list[Call]:
    """One conv layer's launches on `arch`: the launcher's choice under the arch's shared-memory
    limit, each autotune candidate, each with split-K off where it splits (and with PDL)."""
    where, args, kw = call
    limit = conv_kernels.SMEM_PER_BLOCK[arch]
    launcher, real_tile_config = conv_kernels.conv2d, conv_kernels.tile_config

    def launch(tile=None, splitk_off=False, pdl_on=False):
        sink, asked = [], []

        def tile_config(*a):
            asked.append(a)
            return tuple(tile) if tile is not None else real_tile_config(*a)
        with patched(conv_kernels, _conv2d_kernel=KernelRecorder("conv2d", sink),
                     smem_limit=lambda device: limit, tile_config=tile_config), \
                environ(DDPM_FAST_CONV_SPLITK="0" if splitk_off else None,
                        DDPM_FAST_PDL="1" if pdl_on else None, DDPM_FAST_CONV_AUTOTUNE=None):
            launcher(*args, **kw)
        (_, a, k), = sink
        return a, k, asked[0]

    a, k, asked = launch()
    out = {_cfg(k): Call("conv2d", arch, where, "default", True, a, k)}
    if autotune:
        batch, pixels, cout, cin, dtype, _, smem = asked
        candidates = conv_kernels.tile_candidates(batch, pixels, cout, cin, dtype, smem)
        if candidates[0] != _cfg(k)[:5]:
            raise RuntimeError(f"{where}: the launcher's {_cfg(k)[:5]} is not the first "
                               f"autotune candidate {candidates[0]}")
        for cand in candidates[1:]:
            a2, k2, _ = launch(cand)
            out.setdefault(_cfg(k2), Call("conv2d", arch, where, "autotune", False, a2, k2))
    for c in list(out.values()):
        if c.kw["SPLIT_K"] > 1:
            a2, k2, _ = launch(_cfg(c.kw)[:5], splitk_off=True)
            out.setdefault(_cfg(k2), Call("conv2d", arch, where, f"{c.config}, split-K off",
                                          c.default, a2, k2))
    if pdl and arch >= 90:
        for c in list(out.values()):
            a2, k2, _ = launch(_cfg(c.kw)[:5], splitk_off="split-K off" in c.config,
                               pdl_on=True)
            out.setdefault(_cfg(k2), Call("conv2d", arch, where, f"{c.config}, PDL", False,
                                          a2, k2))
    return list(out.values())


def _cfg(kw) -> tuple:
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], kw["num_stages"],
            kw["SPLIT_K"], kw.get("PDL", False))


def record(archs, unet_dtypes=("bf16",), autotune=True, layer_sets=True, pdl=False, conv=True):
    """Every launch: the arch-independent ones for each arch, the conv layers' per arch
    (unless not `conv`)."""
    calls, conv_calls = [], []
    for dtype_name in unet_dtypes:
        for preset, batch in RUNS:
            runner_calls, runner_convs = record_runner(preset, batch, DTYPES[dtype_name])
            calls += runner_calls
            conv_calls += runner_convs
            if layer_sets:
                conv_calls += record_layer_sets(preset, batch, DTYPES[dtype_name])
    out = [c._replace(arch=arch) for arch in archs for c in calls]
    for arch in archs if conv else ():
        for conv_call in conv_calls:
            out += conv_configs(conv_call, arch, autotune, pdl)
    return out


# ------------------------------------------------------------------ compiling
def usage_cache_dir() -> Path:
    """Results of earlier compiles (registers, spills, shared), beside Triton's own cache."""
    return Path(triton.knobs.cache.dir) / "ddpm_fast_aot_usage"


def make_job(name, arch, args, kw):
    """(what compile_job needs, picklable: the kernel and its specialisation for sm_`arch`;
    a key equal for calls that specialise alike)."""
    fn = jit_fn(name)
    src, options = specialise(fn, args, kw, arch)
    key = (name, arch, id(src), tuple(sorted(options.items())))
    return {"kernel": name, "fn": (KERNELS[name][0].__name__, KERNELS[name][1]), "arch": arch,
            "signature": src.signature, "constexprs": src.constants, "attrs": src.attrs,
            "options": options, "arg_names": list(fn.arg_names)}, key


def _source(job) -> ASTSource:
    module, name = job["fn"]
    fn = getattr(importlib.import_module(module), name)
    fn = fn.fn if isinstance(fn, Recorder) else fn
    return ASTSource(fn, job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])


@functools.lru_cache(maxsize=None)
def _target_key(arch: int, options: tuple) -> str:
    """The parts of Triton's cache key (triton.runtime.cache.get_cache_key) besides the
    source's: Triton itself, the backend (ptxas version, arch), the options, the environment."""
    from triton.compiler.compiler import get_cache_invalidating_env_vars
    from triton.runtime.cache import triton_key

    backend = make_backend(GPUTarget("cuda", arch, 32))
    env = get_cache_invalidating_env_vars()
    return (f"{triton_key()}-{backend.hash()}-{backend.parse_options(dict(options)).hash()}-"
            f"{sorted(env.items())}")


def usage_key(job) -> str:
    """A digest of what Triton's cache key of the compile is made of (source and its callees,
    specialisation, options, target, Triton, environment): equal on any machine with the same
    Triton wheel, for the same kernel source."""
    key = f"{_source(job).hash()}-{_target_key(job['arch'], tuple(sorted(job['options'].items())))}"
    return f"{hashlib.sha256(key.encode()).hexdigest()}.v{USAGE_VERSION}"


def usage_path(job) -> Path:
    """Where the job's result is kept beside Triton's cache."""
    return usage_cache_dir() / f"{usage_key(job)}.json"


# Results of the launcher-config run (--no-autotune) kept in the repository under their
# usage_key, so that a machine whose Triton cache is cold (CI) compiles only what changed since
# (`--keep` rewrites the file). A changed kernel's source changes its keys: nothing stale is read.
KEPT_RESULTS = Path(__file__).resolve().parent / "results" / "aot_kernels_usage.json"


@functools.lru_cache(maxsize=None)
def kept_results() -> dict:
    try:
        return json.loads(KEPT_RESULTS.read_text())
    except (OSError, ValueError):
        return {}


def keep_results(jobs: list, results: list) -> int:
    """Write this run's results into KEPT_RESULTS (atomically; the keys of this Triton and
    these kernel sources only). Returns how many it holds."""
    kept = {usage_key(job): {k: r[k] for k in sorted(RESULT_FIELDS)}
            for job, r in zip(jobs, results)}
    tmp = KEPT_RESULTS.with_name(f"{KEPT_RESULTS.name}.{os.getpid()}.tmp")
    lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(kept.items())]
    tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n")      # a line a compile
    os.replace(tmp, KEPT_RESULTS)
    return len(kept)


RESULT_FIELDS = {"reg", "stack", "local", "ptxas_reg", "stack_frame", "spill_stores",
                 "spill_loads", "callees", "shared", "wgmma", "mma_sync", "tanh_approx",
                 "compile_s"}


def cached_result(job):
    """An earlier compile's result, if complete: the repository's (KEPT_RESULTS), else one kept
    beside this machine's Triton cache."""
    result = kept_results().get(usage_key(job))
    if result is None:
        try:
            result = json.loads(usage_path(job).read_text())
        except (OSError, ValueError):
            return None
    return dict(result, cached=True) if RESULT_FIELDS <= result.keys() else None


def ptxas_report(log: str) -> dict:
    """ptxas -v's words on the entry function and its callees: registers, stack frame, and the
    register spills proper (spill stores and loads). A stack frame alone is not a spill: the
    fp64 sin/cos of the Philox kernels' Box–Muller keep their argument reduction's array there
    (__internal_trig_reduction_slowpathd: 40 bytes, no spill stores or loads)."""
    frames = re.findall(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes "
                        r"spill stores, (\d+) bytes spill loads", log)
    used = re.search(r"Used (\d+) registers", log)
    if not frames or used is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return {"ptxas_reg": int(used.group(1)), "stack_frame": int(frames[0][1]),
            "spill_stores": sum(int(f[2]) for f in frames),
            "spill_loads": sum(int(f[3]) for f in frames),
            "callees": [f[0] for f in frames[1:]]}


def compile_job(job) -> dict:
    """Compile one specialisation for one arch (or read its earlier result): cuobjdump's
    resource usage (registers, STACK, LOCAL), ptxas's spill stores and loads, Triton's shared
    memory, and counts of the instructions aot_conv2d checks (wgmma, mma.sync, tanh.approx)."""
    result = cached_result(job)
    if result is not None:
        return result
    start = time.perf_counter()
    log = io.StringIO()
    # compiled here even where Triton's cache has it: ptxas's log is only printed then
    with patched(triton.knobs.nvidia, dump_ptxas_log=True), \
            patched(triton.knobs.compilation, always_compile=True), \
            contextlib.redirect_stdout(log):
        compiled = triton.compile(_source(job), target=GPUTarget("cuda", job["arch"], 32),
                                  options=job["options"])
    ptx = compiled.asm["ptx"]
    usage = resource_usage(compiled.asm["cubin"])
    result = {"reg": usage.get("reg", 0), "stack": usage.get("stack", 0),
              "local": usage.get("local", 0), **ptxas_report(log.getvalue()),
              "shared": compiled.metadata.shared,
              "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
              "tanh_approx": ptx.count("tanh.approx"),
              "compile_s": round(time.perf_counter() - start, 2)}
    path = usage_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return dict(result, cached=False)


def compile_all(jobs: list, processes: int) -> list:
    """compile_job of each job, the uncached ones in `processes` worker processes (largest
    tiles first: they take longest)."""
    results = [cached_result(job) for job in jobs]
    todo = [i for i, r in enumerate(results) if r is None]
    todo.sort(key=lambda i: -_size(jobs[i]))
    if processes > 1 and len(todo) > 1:
        import multiprocessing

        with ProcessPoolExecutor(min(processes, len(todo)),
                                 mp_context=multiprocessing.get_context("fork")) as pool:
            for i, r in zip(todo, pool.map(compile_job, [jobs[i] for i in todo])):
                results[i] = r
    else:
        for i in todo:
            results[i] = compile_job(jobs[i])
    return results


def _size(job) -> int:
    c = {job["arg_names"][i[0]]: v for i, v in job["constexprs"].items()}
    return c.get("BLOCK_M", 1) * c.get("BLOCK_N", 1) * c.get("BLOCK_K", 1)


# ------------------------------------------------------------------ report
def label(job) -> str:
    """The specialisation in a few words (the JSON has all of it)."""
    c = {job["arg_names"][i[0]]: v for i, v in job["constexprs"].items()}
    sig, opts = job["signature"], job["options"]
    if job["kernel"] == "conv2d":
        flags = [k.lower() for k in ("UPSAMPLE", "HAS_SKIP", "HAS_NORM", "NORM_FROM_GROUPS",
                                     "SILU", "HAS_TEMB", "HAS_RES", "HAS_SC", "SC_HAS_SKIP",
                                     "STATS", "GROUP_STATS", "GROUP_STATS_CAT", "PDL")
                 if c.get(k)]
        return (f"{sig['x_ptr'][1:]} {c['KH']}x{c['KW']}{'/2' if c['STRIDE'] == 2 else ''} "
                f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{opts['num_warps']} "
                f"st{opts['num_stages']} splitK{c['SPLIT_K']} {'+'.join(flags)}")
    consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c.items()
                      if k.isupper())
    ptrs = ",".join(v[1:] for v in sig.values() if v.startswith("*"))
    return f"{ptrs} {consts} w{opts.get('num_warps', 4)}"


TRIG_FRAME = "__internal_trig_reduction_slowpathd"


def report(specs: list, results: list) -> list:
    """One row per compile. `spill`: ptxas's spill stores (bytes), the register spills;
    `stack`, `local`: cuobjdump's STACK and LOCAL. `spills` is true for spill stores or loads,
    LOCAL, or a STACK that the fp64 trig reduction's frame does not account for."""
    rows = []
    for s, r in zip(specs, results):
        job = s["job"]
        limit = conv_kernels.SMEM_PER_BLOCK[job["arch"]]
        trig_frame = (TRIG_FRAME in r["callees"] and r["stack"] == r["stack_frame"])
        rows.append({
            "kernel": job["kernel"], "specialisation": label(job), "arch": job["arch"],
            "reg": r["reg"], "stack": r["stack"], "local": r["local"],
            "spill": r["spill_stores"], "spill_loads": r["spill_loads"],
            "stack_frame": r["stack_frame"], "callees": r["callees"],
            "spills": bool(r["spill_stores"] or r["spill_loads"] or r["local"]
                           or (r["stack"] and not trig_frame)),
            "shared": r["shared"], "limit": limit, "shared_estimate": s["estimate"],
            "over_limit": r["shared"] > limit, "default": s["default"],
            "configs": sorted(s["configs"]), "tile": s["tile"], "wgmma": r["wgmma"],
            "mma_sync": r["mma_sync"], "tanh_approx": r["tanh_approx"],
            "compile_s": r["compile_s"], "cached": r["cached"], "uses": s["uses"],
            "options": job["options"],
            "constexprs": {job["arg_names"][i[0]]: v for i, v in job["constexprs"].items()},
            "signature": {k: v for k, v in job["signature"].items() if v != "constexpr"},
            "divisible": [job["arg_names"][i[0]] for i, a in job["attrs"].items() if a]})
    rows.sort(key=lambda r: (r["arch"], r["kernel"], r["specialisation"]))
    return rows


def summarise(rows: list) -> dict:
    summary: dict = {}
    for r in rows:
        e = summary.setdefault(r["kernel"], {}).setdefault(str(r["arch"]), {
            "specialisations": 0, "max_reg": 0, "max_spill": 0, "spilling": 0,
            "max_stack": 0, "max_shared": 0, "limit": r["limit"], "over_limit": 0})
        e["specialisations"] += 1
        e["max_reg"] = max(e["max_reg"], r["reg"])
        e["max_spill"] = max(e["max_spill"], r["spill"])
        e["spilling"] += r["spills"]
        e["max_stack"] = max(e["max_stack"], r["stack"] + r["local"])
        e["max_shared"] = max(e["max_shared"], r["shared"])
        e["over_limit"] += r["over_limit"]
    return summary


def _brief(r) -> dict:
    return {k: r[k] for k in ("kernel", "specialisation", "arch", "reg", "spill",
                              "spill_loads", "stack", "local", "shared", "limit", "tile",
                              "configs", "default", "uses")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--unet-dtype", nargs="+", choices=sorted(DTYPES), default=["bf16"],
                        help="the U-Net's dtypes (bf16: the fast path on GPUs)")
    parser.add_argument("--no-autotune", action="store_true",
                        help="the launcher's conv configs only, not the autotune candidates")
    parser.add_argument("--no-layer-sets", action="store_true",
                        help="the runner's launches only, not conv2d_layers' layer kinds")
    parser.add_argument("--pdl", action="store_true", help="also the DDPM_FAST_PDL=1 launches")
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=sorted(KERNELS),
                        help="only these kernels")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiling processes (default: one per CPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="count the distinct specialisations, compile nothing")
    parser.add_argument("--quiet", action="store_true",
                        help="the summary and the problems only, not every compile")
    parser.add_argument("--out", type=Path, help="write everything as JSON")
    parser.add_argument("--keep", action="store_true",
                        help="write the results into benchmarks/results/aot_kernels_usage.json "
                             "(commit it after a kernel change: CI then compiles nothing)")
    a = parser.parse_args(argv)
    unknown = [arch for arch in a.arch if arch not in conv_kernels.SMEM_PER_BLOCK]
    if unknown:
        parser.error(f"no shared-memory limit known for sm_{unknown} (SMEM_PER_BLOCK)")
    start = time.perf_counter()

    # 1. every launch, and its distinct specialisations per arch
    specs: dict = {}
    for call in record(a.arch, a.unet_dtype, not a.no_autotune, not a.no_layer_sets, a.pdl,
                       "conv2d" in a.kernels):
        if call.kernel not in a.kernels:
            continue
        job, key = make_job(call.kernel, call.arch, call.args, call.kw)
        s = specs.setdefault(key, {"job": job, "uses": [], "configs": set(),
                                            "default": False, "estimate": None, "tile": None})
        s["uses"].append(call.where + ("" if call.config == "launch" else f" [{call.config}]"))
        s["configs"].add(call.config)
        s["default"] |= call.default
        if call.kernel == "conv2d":
            s["tile"] = list(_cfg(call.kw)[:6])
            s["estimate"] = conv_kernels.smem_needed(_cfg(call.kw)[:5],
                                                     call.args[1].element_size(),
                                                     call.kw["SPLIT_K"])
    specs = list(specs.values())
    record_s = time.perf_counter() - start
    if a.dry_run:
        counts: dict = {}
        for s in specs:
            k = (s["job"]["kernel"], s["job"]["arch"])
            counts[k] = counts.get(k, 0) + 1
        for (kernel, arch), n in sorted(counts.items()):
            print(f"{kernel:14s} sm_{arch}: {n} specialisations")
        cached = sum(cached_result(s["job"]) is not None for s in specs)
        print(f"{len(specs)} in all, {cached} compiled before; recording {record_s:.1f} s")
        return 0

    # 2. compile (or read earlier results)
    compile_start = time.perf_counter()
    results = compile_all([s["job"] for s in specs], a.jobs)
    compile_s = time.perf_counter() - compile_start

    # 3. report
    rows = report(specs, results)
    summary = summarise(rows)
    spills = [r for r in rows if r["spills"]]
    default_spills = [r for r in spills if r["default"]]
    over = [r for r in rows if r["over_limit"]]
    if not a.quiet:
        print(f"{'kernel':13s} {'specialisation':72s} {'arch':>4s} {'reg':>4s} {'spill':>5s} "
              f"{'stack':>5s} {'shared':>7s} {'limit':>7s}  uses")
        for r in rows:
            flags = ("" if r["default"] else " (autotune/options only)") + (
                " SPILLS" if r["spills"] else "") + (" OVER LIMIT" if r["over_limit"] else "")
            print(f"{r['kernel']:13s} {r['specialisation'][:72]:72s} {r['arch']:4d} "
                  f"{r['reg']:4d} {r['spill']:5d} {r['stack'] + r['local']:5d} "
                  f"{r['shared']:7d} {r['limit']:7d}  {len(r['uses'])}{flags}")
        print()
    print("spill: ptxas's spill stores (bytes); stack: cuobjdump's STACK + LOCAL (the Philox "
          "kernels' 40: the fp64 sin/cos reduction's frame, not a spill)")
    print(f"{'kernel':13s} {'arch':>4s} {'specs':>5s} {'max reg':>7s} {'max spill':>9s} "
          f"{'spilling':>8s} {'max stack':>9s} {'max shared':>10s} {'limit':>7s}")
    for kernel, by_arch in summary.items():
        for arch, e in by_arch.items():
            print(f"{kernel:13s} {arch:>4s} {e['specialisations']:5d} {e['max_reg']:7d} "
                  f"{e['max_spill']:9d} {e['spilling']:8d} {e['max_stack']:9d} "
                  f"{e['max_shared']:10d} {e['limit']:7d}")
    for title, bad in (("SPILLS IN CONFIGS THE LAUNCHER PICKS BY DEFAULT", default_spills),
                       ("spills in autotune candidates and option-only configs",
                        [r for r in spills if not r["default"]]),
                       ("SHARED MEMORY OVER THE ARCH'S LIMIT", over)):
        if bad:
            print(f"\n{title} ({len(bad)}):")
            for r in bad:
                print(f"  sm_{r['arch']} {r['kernel']} {r['specialisation']}: {r['reg']} "
                      f"registers, spill stores {r['spill']} B, loads {r['spill_loads']} B, "
                      f"STACK {r['stack']} B, LOCAL {r['local']} B, shared {r['shared']} B; "
                      f"{len(r['uses'])} uses, e.g. {r['uses'][0]}")
    cached = sum(r["cached"] for r in rows)
    if a.keep:
        print(f"kept {keep_results([s['job'] for s in specs], results)} results in "
              f"{KEPT_RESULTS}")
    total_s = time.perf_counter() - start
    print(f"\n{len(rows)} specialisations ({len(rows) - cached} compiled now, {cached} earlier) "
          f"for sm_{', sm_'.join(map(str, a.arch))}: recording {record_s:.1f} s, compiling "
          f"{compile_s:.1f} s in {a.jobs} processes, {total_s:.1f} s in all")
    if a.out:
        a.out.write_text(json.dumps({
            "triton": triton.__version__, "archs": a.arch, "runs": RUNS,
            "unet_dtypes": a.unet_dtype, "autotune": not a.no_autotune, "pdl": a.pdl,
            "layer_sets": not a.no_layer_sets,
            "seconds": {"record": round(record_s, 2), "compile": round(compile_s, 2),
                        "total": round(total_s, 2)},
            "compiled_now": len(rows) - cached, "compiled_earlier": cached,
            "summary": summary, "spills": [_brief(r) for r in spills],
            "default_spills": [_brief(r) for r in default_spills],
            "over_limit": [_brief(r) for r in over], "kernels": rows}, indent=1) + "\n")
    return 1 if spills or over else 0


if __name__ == "__main__":
    sys.exit(main())
