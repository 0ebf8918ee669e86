"""The fused conv2d's tile configs against the device's shared memory per block (issue #23):
the launcher and its autotune candidates only take configs whose estimate (smem_needed) fits
the limit the device reports, the estimate bounds what Triton really compiles, and CPU tensors
(the interpreter) keep the choice they always had. Driven without a GPU: the launcher runs on
meta tensors with its kernel call recorded and the limit function patched, as on a device with
that limit."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
from ddpm_fast.kernels.triton import conv2d as triton_conv  # noqa: E402
from ddpm_fast.kernels.triton.conv2d import (fits, smem_limit, smem_needed,  # noqa: E402
                                             tile_candidates, tile_config)

ROOT = Path(__file__).resolve().parents[1]
LIMITS = [101376, 166912, 232448]       # sm_86/89 (99 KB), sm_80 (163 KB), sm_90 (227 KB)
TINY = 8192                             # no pipelined tile fits: only the fallback
WIDE = (128, 256, 64, 8, 2)             # the ≥ 256-channel autotune candidate
# (batch, Cin, Cout, H = W): the CIFAR and 256-px U-Nets' layer kinds at both ends of the batch
# sizes (batch 1: small tiles and split-K; batch 64: the 128×128 tiles)
LAYERS = [(b, cin, cout, size) for b in (1, 64) for cin, cout, size in [
    (128, 128, 32), (128, 256, 16), (256, 256, 8), (256, 256, 4), (128, 3, 32),
    (128, 128, 256), (512, 512, 16), (512, 512, 8)]]
DTYPES = [torch.bfloat16, torch.float32]

# Shared memory Triton compiled (metadata.shared, bytes) for sm_80, sm_86 and sm_90, by
# ((BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), element bytes, splits): the larger of two layer
# kinds where both ran (CIFAR's "up.conv2 256 @8 +shortcut256+256", with the concatenation's
# group statistics, and "up.conv1 256+256 @8 +temb", with the skip input and the norm). Triton
# 3.6 and 3.9 compiled the same sizes; sm_80 and sm_86 too (mma.sync), sm_90 more (wgmma).
# benchmarks/aot_conv2d.py --arch A --tile BM BN BK W S --split-k K --layer up.conv2 measures one.
MEASURED = {
    ((128, 256, 64, 8, 2), 2, 1): (66560, 66560, 99328),
    ((128, 256, 64, 8, 3), 2, 1): (116736, 116736, 149504),
    ((128, 256, 64, 8, 2), 2, 4): (66560, 66560, 131072),
    ((128, 128, 64, 8, 4), 2, 1): (117760, 117760, 134144),
    ((128, 128, 64, 8, 3), 2, 1): (83968, 83968, 100352),
    ((128, 128, 64, 8, 3), 2, 4): (83968, 83968, 100352),
    ((128, 64, 64, 4, 3), 2, 1): (67584, 67584, 73728),
    ((64, 64, 64, 4, 3), 2, 1): (43008, 43008, 51200),
    ((64, 32, 64, 4, 3), 2, 1): (34816, 34816, 38912),
    ((32, 32, 16, 4, 1), 2, 1): (2048, 2048, 2048),
    ((32, 32, 64, 4, 3), 2, 1): (22528, 22528, 22528),
    ((32, 32, 16, 4, 1), 2, 8): (4096, 4096, 4096),
    ((32, 32, 64, 4, 3), 2, 8): (22528, 22528, 22528),
    ((128, 128, 32, 8, 3), 4, 1): (82944, 82944, 82944),
    ((128, 128, 32, 8, 3), 4, 4): (82944, 82944, 82944),
    ((64, 64, 32, 4, 3), 4, 1): (41984, 41984, 41984),
    ((32, 32, 32, 4, 3), 4, 1): (21504, 21504, 21504),
    ((32, 32, 16, 4, 1), 4, 8): (4096, 4096, 4096),
}
ARCHS = (80, 86, 90)


class _Record:
    """Stands in for the jitted kernel: records each launch's keyword arguments."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append(kw)


def _launch(monkeypatch, batch, cin, cout, size, dtype, limit=None, device="meta"):
    """The launcher's (config, splits) for a 3×3 conv with a norm and statistics (the U-Net's
    ResBlock conv), as on a GPU whose limit is `limit` (meta tensors), or on CPU tensors with
    the real limit function (device="cpu")."""
    record = _Record()
    monkeypatch.setattr(triton_conv, "_conv2d_kernel", record)
    monkeypatch.setattr(triton_conv, "_TICKETS", {})     # no meta buffers left behind
    if device == "meta":
        monkeypatch.setattr(triton_conv, "INTERPRET", False)
        monkeypatch.setattr(triton_conv, "smem_limit", lambda dev: limit)
    x = torch.empty(batch, cin, size, size, dtype=dtype, device=device)
    w = torch.empty(cout, cin, 3, 3, dtype=dtype, device=device)
    y = torch.empty(batch, cout, size, size, dtype=dtype, device=device)
    scale = torch.empty(batch, cin, dtype=torch.float32, device=device)
    triton_conv.conv2d(y, x, w, None, stride=1, pad=(1, 1, 1, 1), upsample=False, skip=None,
                       scale=scale, shift=scale, silu=True, temb=None, residual=None,
                       shortcut=None, return_stats=True)
    kw = record.calls[-1]
    cfg = tuple(kw[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
    return cfg, kw["SPLIT_K"]


@pytest.mark.parametrize("limit", LIMITS + [TINY])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_launched_config_fits_the_limit(monkeypatch, limit, dtype):
    """Each layer's launched config and split, and every autotune candidate, fit the limit;
    the real GPUs' limits change no default tile (the largest, 128×128×64 in 3 stages, is
    estimated at 99 KB: 101376 bytes, exactly sm_86's limit; it compiles to 82 KB there)."""
    for batch, cin, cout, size in LAYERS:
        cfg, splits = _launch(monkeypatch, batch, cin, cout, size, dtype, limit)
        assert fits(cfg, dtype, limit, splits), (batch, cin, cout, size, cfg, splits)
        pixels = size * size
        cands = tile_candidates(batch, pixels, cout, cin, dtype, limit)
        assert cands[0] == cfg and all(fits(c, dtype, limit) for c in cands)
        unlimited = tile_config(batch, pixels, cout, cin, dtype, False)
        if limit == TINY:       # only the unpipelined fallback fits
            assert cfg[2:] == (16, 4, 1) and cands == [cfg]
        else:
            assert cfg == unlimited
            assert cands == tile_candidates(batch, pixels, cout, cin, dtype)


def test_wide_candidate_fits_99kb_but_not_its_split(monkeypatch):
    """128×256 in two stages fits 99 KB (estimated 100352 bytes; compiled 66560 on sm_86 and
    99328 on sm_90), so sm_86/89 keep it as a candidate; a limit under its estimate drops it.
    Split-K's fp32 partial tile (128 KB, sm_90) does not fit 99 KB: there that tile launches
    unsplit, on sm_90 split."""
    args = (4, 256, 256, 256, torch.bfloat16)
    assert WIDE in tile_candidates(*args, 101376)
    assert WIDE not in tile_candidates(*args, smem_needed(WIDE, 2) - 1)
    monkeypatch.setattr(triton_conv, "tile_config", lambda *a: WIDE)
    assert _launch(monkeypatch, 1, 256, 256, 16, torch.bfloat16, 101376) == (WIDE, 1)
    cfg, splits = _launch(monkeypatch, 1, 256, 256, 16, torch.bfloat16, 232448)
    assert cfg == WIDE and splits == 8           # 2 tiles × 36 steps (9 taps × 4 chunks)


def test_no_fitting_config_is_a_clear_error():
    """Below the unpipelined fallback's needs the launcher refuses, naming the layer and the
    limit, instead of Triton's OutOfResources at launch."""
    with pytest.raises(RuntimeError, match=r"2048 bytes of shared memory .*Cout=256, Cin=128"):
        tile_config(1, 256, 256, 128, torch.bfloat16, False, 2048)


def test_cpu_choice_is_unchanged(monkeypatch):
    """CPU tensors (the interpreter) have no limit and keep the choice made before limits were
    read (the values below are that code's), as does the GPU heuristic given no limit."""
    assert smem_limit(torch.device("cpu")) is None
    assert _launch(monkeypatch, 2, 128, 128, 16, torch.float32, device="cpu") == (
        (128, 128, 64, 4, 1), 1)
    assert tile_config(1, 35, 40, 24, torch.float32, True) == (64, 64, 32, 4, 1)
    assert tile_config(64, 1024, 128, 128, torch.bfloat16, False) == (128, 128, 64, 8, 3)
    assert tile_config(1, 256, 256, 256, torch.bfloat16, False) == (32, 32, 64, 4, 3)
    assert tile_config(4, 256, 512, 512, torch.float32, False) == (64, 32, 32, 4, 3)
    assert tile_config(1, 1024, 3, 128, torch.bfloat16, False) == (32, 16, 64, 4, 3)
    assert tile_candidates(4, 256, 256, 256, torch.bfloat16) == [
        (32, 32, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 3),
        (64, 32, 64, 4, 3), WIDE]


def test_limit_is_read_once_per_device(monkeypatch):
    """The limit comes from the device's properties (opt-in per-block shared memory), read once
    per device index; the interpreter has none."""
    props = {i: SimpleNamespace(shared_memory_per_block_optin=v, shared_memory_per_block=49152)
             for i, v in ((0, 101376), (1, 232448))}
    reads = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: reads.append(i) or props[i])
    triton_conv._device_smem.cache_clear()
    try:
        monkeypatch.setattr(triton_conv, "INTERPRET", True)
        assert smem_limit(torch.device("cuda", 0)) is None
        monkeypatch.setattr(triton_conv, "INTERPRET", False)
        assert [smem_limit(torch.device("cuda", i)) for i in (1, 0, 1, 0)] == [
            232448, 101376, 232448, 101376]
        assert reads == [1, 0]
    finally:
        triton_conv._device_smem.cache_clear()      # no fake devices left for other tests


def test_estimate_bounds_the_measured_table():
    """smem_needed is an upper bound of every measured compile, and a tight one where it
    decides: within 2 KB of sm_90's 128×128×64 three-stage default (1 KB over: the tile sm_86's
    99 KB must keep) and of the 128×256 split's fp32 tile (2 KB over)."""
    for (cfg, elem_bytes, splits), measured in MEASURED.items():
        estimate = smem_needed(cfg, elem_bytes, splits)
        for arch, shared in zip(ARCHS, measured):
            assert shared <= estimate, (arch, cfg, elem_bytes, splits, shared, estimate)
    for key in [((128, 128, 64, 8, 3), 2, 1), (WIDE, 2, 4)]:
        assert smem_needed(*key) - MEASURED[key][2] <= 2048


# where the estimate decides: sm_86's default tile (99 KB must keep it) and sm_90's 128×256 split
# (the fp32 partial tile, 2 KB under the estimate); about 5 s of compiling each
LIVE = [(86, (128, 128, 64, 8, 3), 1), (90, WIDE, 4)]
LIVE_SCRIPT = """
import json, sys
from benchmarks import aot_conv2d as aot
from benchmarks.conv2d_layers import CIFAR_LAYERS
aot.resource_usage = aot.sass_counts = lambda cubin: {}     # registers are not asked here
layer = CIFAR_LAYERS["up.conv2 256 @8 +shortcut256+256"]
for arch, tile, splits in json.loads(sys.argv[1]):
    r = aot.compile_layer(layer, 1, arch, tile, splits)
    print(json.dumps([arch, r["tile"], r["split_k"], r["shared_bytes"], r["shared_estimate"]]))
"""


def test_estimate_bounds_a_live_compile():
    """The installed Triton, compiling for sm_86 and sm_90 without a GPU (a process without
    TRITON_INTERPRET, as benchmarks/aot_conv2d.py), needs no more than the estimate."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", LIVE_SCRIPT, json.dumps(LIVE)], cwd=ROOT,
                         env=env, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(a, tuple(t), s) for a, t, s, _, _ in rows] == LIVE
    for arch, tile, splits, shared, estimate in rows:
        assert 0 < shared <= estimate, (arch, tile, splits, shared, estimate)


def test_autotune_skips_a_candidate_the_device_cannot_hold(monkeypatch):
    """Where the compiled kernel needs more than the device has after all (Triton's
    OutOfResources at launch: the real size, not the estimate), autotune times the others."""
    import triton.testing
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: fn())
    monkeypatch.setattr(triton_conv, "_TUNED", {})
    small = (64, 64, 64, 4, 3)

    def launch(cfg):
        if cfg == WIDE:
            raise OutOfResources(133120, 101376, "shared memory")
        return 1.0
    assert triton_conv._tuned("layer", [WIDE, small], launch) == small
    with pytest.raises(RuntimeError, match="no candidate"):
        triton_conv._tuned("other layer", [WIDE], launch)
