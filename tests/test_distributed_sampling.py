"""Resumable, sharded sampling with per-image seeds, under torchrun with gloo on CPU: outputs do
not depend on the number of processes, a killed rank loses nothing, and a rerun resumes."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ddpm_fast
from ddpm_fast.distributed import contiguous_runs, parse_seeds

ROOT = Path(ddpm_fast.__file__).resolve().parent.parent
COMMON = ["--steps", "12", "--mode", "fast", "--device", "cpu", "--shard-size", "3"]


@pytest.mark.parametrize("text, seeds", [
    ("0-4", [0, 1, 2, 3, 4]), ("7", [7]), ("0-2,10,5-6", [0, 1, 2, 10, 5, 6]),
    (" 3 - 4 ", [3, 4]), ("4294967295", [2 ** 32 - 1]),
])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, message", [
    ("0-9,5", "overlaps"), ("0-9,9-12", "overlaps"), ("a-3", "not an integer"), ("1.5", "not an integer"),
    ("5-2", "backwards"), ("-1", "not an integer"), ("0-4294967296", "outside"), ("", "not an integer"),
])
def test_bad_seeds(text, message):
    with pytest.raises(ValueError, match=message):
        parse_seeds(text)


def test_contiguous_runs_split_at_gaps_and_limit():
    assert contiguous_runs([0, 1, 2, 3, 4, 9, 10, 3], 2) == [(0, 2), (2, 2), (4, 1), (9, 2), (3, 1)]


def _launch(nproc, out, seeds, batch, extra_env=None, check=True, extra_args=()):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", **(extra_env or {})}
    cli = ["-m", "ddpm_fast.cli", "sample", "--seeds", seeds, "--batch-size", str(batch),
           "--out", str(out), *COMMON, *extra_args]
    if nproc == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *cli]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _shards_are_whole(parts: Path):
    for npz in parts.glob("shard-*.npz"):
        with np.load(npz) as z:           # loads completely: no half-written shard
            assert z["arr_0"].shape[0] == z["seeds"].shape[0]
    assert not [p for p in parts.iterdir() if p.name.startswith(".") and "tmp" not in p.name]


def test_one_vs_two_processes_identical(tmp_path):
    _launch(1, tmp_path / "one.npz", "0-10,20", 2)
    _launch(2, tmp_path / "two.npz", "0-10,20", 2)
    _launch(2, tmp_path / "two_png", "0-10,20", 2)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["arr_0"].shape == (12, 8, 8, 1)
    assert np.array_equal(one["arr_0"], two["arr_0"])            # byte-identical
    assert list(two["seeds"]) == list(range(11)) + [20]
    files = sorted(p.name for p in (tmp_path / "two_png").iterdir())
    assert files == [f"{s:06d}.png" for s in list(range(11)) + [20]]   # one file per seed
    png = np.array(Image.open(tmp_path / "two_png" / "000020.png"))
    assert np.array_equal(png, one["arr_0"][-1, ..., 0])


@pytest.mark.parametrize("dtype, max_levels", [("fp32", 0), ("bf16", 8)])
def test_batch_size_does_not_change_images(tmp_path, dtype, max_levels):
    _launch(1, tmp_path / "b8.npz", "0-127", 8, extra_args=["--dtype", dtype])
    _launch(1, tmp_path / "b64.npz", "0-127", 64, extra_args=["--dtype", dtype])
    a, b = np.load(tmp_path / "b8.npz")["arr_0"], np.load(tmp_path / "b64.npz")["arr_0"]
    # the same noise per image: in fp32 the CPU convolutions round the same at any batch size
    # (byte-identical); bf16 convolutions pick kernels by batch shape, so a few levels move
    assert np.abs(a.astype(int) - b.astype(int)).max() <= max_levels


def test_killed_rank_then_rerun_equals_uninterrupted(tmp_path):
    _launch(1, tmp_path / "ref.npz", "0-17", 3)
    out = tmp_path / "run.npz"
    killed = _launch(2, out, "0-17", 3, {"DDPM_FAST_TEST_KILL_AFTER_SHARDS": "1"}, check=False)
    assert killed.returncode != 0                       # rank 1 died by SIGKILL after one shard
    assert not out.exists()                             # no final output from a broken run
    parts = tmp_path / "run.npz.parts"
    assert 1 <= len(list(parts.glob("shard-*.json"))) < 6
    _shards_are_whole(parts)
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("shard-*.json")}
    _launch(2, out, "0-17", 3)                          # the same command again
    assert np.array_equal(np.load(out)["arr_0"], np.load(tmp_path / "ref.npz")["arr_0"])
    for name, mtime in before.items():                  # finished shards were not redone
        assert (parts / name).stat().st_mtime_ns == mtime


def test_uneven_split_three_ranks(tmp_path):
    # 4 seeds in shards of 3: two shards for three ranks, one rank has nothing to do
    _launch(3, tmp_path / "u.npz", "100-103", 2)
    assert list(np.load(tmp_path / "u.npz")["seeds"]) == [100, 101, 102, 103]


def test_rerun_with_other_settings_is_refused(tmp_path):
    _launch(1, tmp_path / "a.npz", "0-2", 3)
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_fast.cli", "sample", "--seeds", "0-2", "--sampler", "ddim",
         "--out", str(tmp_path / "a.npz"), *COMMON],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "a run with other settings (sampler)" in proc.stderr
