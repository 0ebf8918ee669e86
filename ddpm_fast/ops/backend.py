"""The one kernel-choice table: which implementation each op runs on each device, and why.

Implementations: "native" (C++ on CPU, CUDA on GPU), "triton", "torch" (the reference). Every op
and the fast runner read their choice here (`select`, `unet_setting`); nothing else decides.
DDPM_FAST_BACKEND=torch|native|triton|auto overrides the table for a whole process (tests and
benchmarks force each path with it) and `use_backend(...)` inside a block. An op without the
requested implementation runs its torch reference for "native" (torch's kernels are the native
ones there: attention's SDPA, conv2d's cuDNN) and refuses "triton" by name.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import torch

from .. import _native

BACKENDS = ("auto", "torch", "native", "triton")
_override: list[str] = []


class Choice(NamedTuple):
    impl: str
    evidence: str        # the measurement that chose it (results JSON under benchmarks/)
    max_batch: Optional[int] = None     # UNET_TABLE: the largest batch it serves (None: any)


H100_KERNELS = "benchmarks/results/kernels_NVIDIA_H100_80GB_HBM3_2026-11-25.json"
H100_THROUGHPUT = "benchmarks/results/sample_throughput_NVIDIA_H100_80GB_HBM3_2026-11-25_run2.json"
CPU_KERNELS = "benchmarks/results/kernels_cpu_2core.json"
CPU_THROUGHPUT = "benchmarks/results/sample_throughput_cpu_2core.json"

# op → implementations it has (GroupNorm's "native" is the C++ one: there is no CUDA GroupNorm,
# it lost to the Triton kernel, or both lost to torch, at every shape measured on the H100)
IMPLEMENTATIONS = {
    "group_norm": ("torch", "native", "triton"),
    "attention": ("torch", "triton"),
    "ddpm_step": ("torch", "native", "triton"),
    "solver_step": ("torch", "native", "triton"),
    "philox_normal": ("torch", "native", "triton"),
    "conv2d": ("torch", "triton"),
}

# (op, device type) → the implementation "auto" runs
TABLE = {
    ("group_norm", "cuda"): Choice("triton", f"H100 bf16: 1.6-5.2x torch on the CIFAR shapes but "
                                             f"4x4 maps (0.4-0.8x); our former CUDA kernel "
                                             f"0.5-1.6x, ahead of Triton only where both lost "
                                             f"to torch, so it was deleted ({H100_KERNELS})"),
    ("group_norm", "cpu"): Choice("native", f"2-core Zen 4, bf16 channels_last: 0.8-4.2x torch; a "
                                            f"step 1.06x faster at batch 8 ({CPU_KERNELS})"),
    ("attention", "cuda"): Choice("torch", "SDPA; the Triton kernel has not been timed against "
                                           "it on a GPU"),
    ("attention", "cpu"): Choice("torch", "SDPA; the interpreter is for tests only"),
    ("ddpm_step", "cuda"): Choice("native", f"H100, step + Philox: CUDA 3.6x torch at batch 1 "
                                            f"(Triton 2.2x), both 2.6-3.6x at 64 and 256 "
                                            f"({H100_KERNELS})"),
    ("ddpm_step", "cpu"): Choice("native", "OpenMP C++; torch's ops make ~10 passes"),
    ("solver_step", "cuda"): Choice("native", "not yet timed on a GPU: the CUDA kernel has "
                                              "ddpm_step's structure (one thread per Philox "
                                              "group), which measured fastest there"),
    ("solver_step", "cpu"): Choice("native", "OpenMP C++, one pass; torch's ops make ~12"),
    ("philox_normal", "cuda"): Choice("native", "the same generator as ddpm_step's"),
    ("philox_normal", "cpu"): Choice("native", "OpenMP C++ against torch int64 emulation"),
    ("conv2d", "cuda"): Choice("triton", "our only GPU implementation of the fused op; per-shape "
                                         "timing against cuDNN: benchmarks/conv2d_layers.py"),
    ("conv2d", "cpu"): Choice("torch", "oneDNN convolutions; the interpreter is for tests only"),
}

# device type → the fast runner's U-Net setting (see UNET_SETTINGS) by batch size: the first
# entry whose max_batch covers the batch, the last serving any (a setting that wins at batch 1
# can lose at 256: each batch's CUDA graph then runs its own variant of the model)
UNET_TABLE = {
    "cuda": (Choice("inductor", f"H100: 2.05x / 1.40x / 1.44x stock torch.compile at batch "
                                f"1 / 64 / 256, eager fused kernels 1.7-2.5x slower "
                                f"({H100_THROUGHPUT}); 'conv' not yet measured"),),
    "cpu": (Choice("fused-norms", f"2-core Zen 4: C++ GroupNorm in the ResBlocks 1.06x per step "
                                  f"at batch 8, fused attention 1.07x slower at batch 1 "
                                  f"({CPU_THROUGHPUT})"),),
}
# setting → (U-Net kernels, attention kernels, torch.compile)
UNET_SETTINGS = {
    "inductor": ("reference", "reference", True),    # Inductor fuses the torch ops
    "fused": ("fused", "fused", False),              # our GroupNorm and attention ops, eager
    "fused-norms": ("fused", "reference", False),    # our GroupNorm in the ResBlocks only
    "conv": ("conv", "fused", False),                # every convolution our fused conv2d
    "reference": ("reference", "reference", False),  # torch ops, eager
}


def requested() -> str:
    name = _override[-1] if _override else os.environ.get("DDPM_FAST_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"DDPM_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def native_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return _native.available()
    if device.type == "cuda":
        return _native.has_cuda()
    return False


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


NO_NATIVE_ON = {("group_norm", "cuda")}      # ops whose native code is CPU-only


def runs(impl: str, device: torch.device, op: str = "") -> bool:
    return (impl == "torch"
            or (impl == "native" and native_available(device)
                and (op, device.type) not in NO_NATIVE_ON)
            or (impl == "triton" and triton_available(device)))


def fallbacks(op: str, device: torch.device, first: str | None = None) -> list[str]:
    """Implementations of `op` in the order "auto" tries them on `device`: `first` (the table's
    choice), then our compiled kernels, then the torch reference. Triton is a fallback on GPUs
    only: on the CPU it is the interpreter, for tests."""
    order = [first] if first else []
    order += ["native"] + (["triton"] if device.type == "cuda" else []) + ["torch"]
    return [impl for impl in dict.fromkeys(order) if impl in IMPLEMENTATIONS[op]]


def select(op: str, device: torch.device) -> str:
    """The implementation `op` runs on `device`: the table's, else the next one that is built
    and importable here (`fallbacks`), or the requested backend. An explicit request that
    cannot run is an error."""
    impls = IMPLEMENTATIONS[op]
    name = requested()
    if name == "auto":
        choice = TABLE.get((op, device.type))
        return next(impl for impl in fallbacks(op, device, choice and choice.impl)
                    if runs(impl, device, op))
    if name == "native" and ("native" not in impls or (op, device.type) in NO_NATIVE_ON):
        return "torch"
    if name == "triton" and "triton" not in impls:
        raise RuntimeError(f"backend 'triton' requested but {op} has no Triton kernel")
    if not runs(name, device, op):
        raise RuntimeError(f"backend {name!r} requested for {op} but unavailable on "
                           f"{device.type} ({_native.build_info()}; Triton needs "
                           "TRITON_INTERPRET=1 on CPU)")
    return name


def unet_choice(device_type: str, batch: Optional[int] = None) -> Choice:
    """UNET_TABLE's entry for a batch size (None: the entry serving any batch)."""
    rules = UNET_TABLE.get(device_type, (Choice("reference", "no measurement"),))
    return next((c for c in rules if batch is not None and c.max_batch is not None
                 and batch <= c.max_batch), rules[-1])


def unet_setting(device: torch.device, batch: Optional[int] = None) -> str:
    """The fast runner's default U-Net setting on `device` for `batch` images (a key of
    UNET_SETTINGS), with the fallbacks when the table's choice cannot run here: no Triton →
    our eager fused kernels, no native module → torch's ops."""
    setting = unet_choice(device.type, batch).impl
    if setting == "inductor" and not triton_available(device):
        setting = "fused"
    if setting == "conv" and not triton_available(device):
        setting = "fused"
    if setting.startswith("fused") and not native_available(device) and \
            not triton_available(device):
        setting = "reference"
    return setting


def table_report() -> list[dict]:
    """Every entry with its evidence, for `ddpm-fast info` and the docs."""
    rows = [{"op": op, "device": dev, "impl": c.impl, "evidence": c.evidence}
            for (op, dev), c in TABLE.items()]
    rows += [{"op": "unet", "device": dev, "impl": c.impl, "evidence": c.evidence,
              "max_batch": c.max_batch} for dev, rules in UNET_TABLE.items() for c in rules]
    return rows
