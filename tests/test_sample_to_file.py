"""ddpm_fast.distributed.sample_to_file: resumable sharded sampling as a library call. Images
depend only on (seed, image seed), never on batch size, shards or processes; a killed run leaves
only whole shards and no output; a rerun samples only what is missing; another run's shards are
refused by name; under torchrun the ranks share the shards and rank 0 merges them."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_fast
from ddpm_fast import cli, distributed
from ddpm_fast.checkpoints import save_pretrained
from ddpm_fast.distributed import ShardStore, contiguous_runs, parse_seeds, sample_to_file
from ddpm_fast.pipeline import DDPMPipeline
from ddpm_fast.unet import UNet2DModel, UNetConfig

ROOT = Path(ddpm_fast.__file__).resolve().parent.parent
STEPS = 2
# a 4×4 grey U-Net with one attention level: a sampler call costs a few milliseconds
SMALL = UNetConfig(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                   layers_per_block=1, norm_num_groups=4,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    save_pretrained(UNet2DModel(SMALL), path)
    return path


def load(model_dir):
    # fp32: the CPU convolutions round the same at any batch size, so images are byte-identical
    return DDPMPipeline.from_pretrained(model_dir, mode="fast", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load(model_dir)


def sample(pipe, seeds, out, **kw):
    kw = {"batch_size": 3, "shard_size": 2, "num_inference_steps": STEPS, "progress": False, **kw}
    return sample_to_file(pipe, seeds, out, **kw)


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    """Seeds 0-5 sampled in memory, one batch: what every other way of running must give."""
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    run = sample(pipe, "0-5", out, batch_size=6, resumable=False)
    assert run.wrote and run.parts is None and run.sampled == 6
    assert not out.with_name("ref.npz.parts").exists()
    return np.load(out)["arr_0"]


def test_shards_give_the_in_memory_images_in_any_output_kind(tmp_path, pipe, reference):
    run = sample(pipe, "0-5", tmp_path / "s.npz")
    assert (run.wrote, run.sampled, run.parts) == (True, 6, tmp_path / "s.npz.parts")
    assert len(list(run.parts.glob("shard-*.npz"))) == 3          # 6 seeds in shards of 2
    with np.load(tmp_path / "s.npz") as z:
        assert np.array_equal(z["arr_0"], reference) and list(z["seeds"]) == list(range(6))
        assert (int(z["seed"]), int(z["steps"])) == (0, STEPS)
    # any seed order, gaps included: a folder holds one PNG per seed, named by it
    sample(pipe, [5, 2, 3], tmp_path / "pngs", batch_size=2)
    files = sorted((tmp_path / "pngs").iterdir())
    assert [f.name for f in files] == ["000002.png", "000003.png", "000005.png"]
    assert np.array_equal(np.array(Image.open(files[2]))[..., None], reference[5])
    steps = []                                                    # progress: steps finished
    grid = sample(pipe, range(4), tmp_path / "g.png", resumable=False, scale=1,
                  progress=steps.append)
    assert grid.wrote and Image.open(tmp_path / "g.png").size == (2 * 6 + 2, 2 * 6 + 2)
    assert sum(steps) == 2 * STEPS                                # two batches of ≤ 3 images


def test_killed_run_leaves_whole_shards_and_the_rerun_does_only_the_rest(
        tmp_path, pipe, reference, monkeypatch):
    write, written = ShardStore.write, []

    def write_then_crash(self, seeds, images):
        if len(written) == 2:
            raise KeyboardInterrupt           # the process stops between two shards
        written.append(write(self, seeds, images))
        return written[-1]

    monkeypatch.setattr(ShardStore, "write", write_then_crash)
    out = tmp_path / "s.npz"
    with pytest.raises(KeyboardInterrupt):
        sample(pipe, "0-5", out)
    monkeypatch.undo()
    parts = tmp_path / "s.npz.parts"
    assert not out.exists()                                       # no output from a broken run
    assert sorted(p.name for p in parts.iterdir()) == sorted(
        ["run.json"] + [f"shard-{s:010d}-000002.{x}" for s in (0, 2) for x in ("npz", "json")])
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("shard-*")}
    run = sample(pipe, "0-5", out, batch_size=1)                  # another batch size is fine
    assert run.sampled == 2 and np.array_equal(np.load(out)["arr_0"], reference)
    for name, mtime in before.items():                            # finished shards not redone
        assert (parts / name).stat().st_mtime_ns == mtime
    assert sample(pipe, "0-5", out).sampled == 0                  # all done: merges again


def test_another_runs_shards_are_refused_by_name(tmp_path, model_dir, pipe):
    out = tmp_path / "s.npz"
    sample(pipe, "0-3", out, shard_size=4, batch_size=4)
    written = out.read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(sampler\)"):
        sample(pipe, "0-3", out, sampler="ddim")
    with pytest.raises(ValueError, match=r"other settings \(eta, num_inference_steps, sampler\)"):
        sample(pipe, "0-3", out, sampler="ddim", eta=0.5, num_inference_steps=1)
    # the run's identity comes from the pipeline: its weights, however it was loaded
    other = load(model_dir)
    with torch.no_grad():
        other.unet.conv_in.bias.add_(1e-3)
    with pytest.raises(ValueError, match=r"other settings \(weights\)"):
        sample(other, "0-3", out)
    reference_mode = DDPMPipeline.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"other settings \(mode, numerics\)"):
        sample(reference_mode, "0-3", out)
    assert out.read_bytes() == written                            # nothing touched
    assert sample(other, "0-3", out, overwrite=True, shard_size=4, batch_size=4).sampled == 4


@pytest.mark.parametrize("seeds, kwargs, error, message", [
    ("0-4,2", {}, ValueError, "overlaps"),
    ([1, 1], {}, ValueError, "appears twice"),
    ([-1], {}, ValueError, "outside"),
    ([0, 1.5], {}, ValueError, "1.5 is not an integer"),
    ([], {}, ValueError, "no seeds"),
    ("0-3", {"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
    ("0-3", {"shard_size": 0}, ValueError, "shard_size must be a positive integer"),
    ("0-3", {"num_inference_steps": 1001}, ValueError, "exceeds the model's 1000 timesteps"),
    ("0-3", {"variance": "small"}, ValueError, "variance must be one of"),
    ("0-3", {"eta": 2.0}, ValueError, "eta must be in"),
    ("0-3", {"seed": -1}, ValueError, "seed must be a non-negative integer"),
    ("0-3", {"sampler": "lms"}, ValueError, "sampler must be"),
    ("0-3", {"out": "x.jpg"}, ValueError, "use .png"),
    ("0-3", {"out": "exists.npz"}, FileExistsError, "overwrite=True"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, pipe, seeds, kwargs, error, message):
    (tmp_path / "exists.npz").write_bytes(b"keep me")
    out = tmp_path / kwargs.pop("out", "x.npz")
    with pytest.raises(error, match=message):
        sample(pipe, seeds, out, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.npz"]
    assert (tmp_path / "exists.npz").read_bytes() == b"keep me"


def test_a_call_the_pipeline_refuses_leaves_nothing_behind(tmp_path, pipe, monkeypatch):
    def refuse(self, **kwargs):
        raise ValueError("refused by the pipeline's own checks")

    monkeypatch.setattr(DDPMPipeline, "__call__", refuse)
    with pytest.raises(ValueError, match="refused by the pipeline"):
        sample(pipe, "0-3", tmp_path / "x.npz")
    assert list(tmp_path.iterdir()) == []         # no OUT.parts/run.json to refuse a rerun


def test_in_memory_runs_are_refused_under_torchrun(tmp_path, pipe, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")       # the ranks could only share work through shards
    with pytest.raises(ValueError, match="resumable=False samples in one process"):
        sample(pipe, "0-3", tmp_path / "x.npz", resumable=False)
    assert list(tmp_path.iterdir()) == []


def test_parse_seeds_and_runs():
    assert parse_seeds(" 0-2,10,5 - 6") == [0, 1, 2, 10, 5, 6]
    assert parse_seeds("4294967295") == [2 ** 32 - 1]
    for text, message in [("0-9,9-12", "overlaps"), ("a-3", "not an integer"),
                          ("5-2", "backwards"), ("0-4294967296", "outside"), ("", "not an integer")]:
        with pytest.raises(ValueError, match=message):
            parse_seeds(text)
    assert contiguous_runs([0, 1, 2, 3, 4, 9, 10, 3], 2) == [(0, 2), (2, 2), (4, 1), (9, 2), (3, 1)]


def test_ranks_share_the_unfinished_shards_in_turn(tmp_path, monkeypatch):
    store = ShardStore(tmp_path / "parts", {"run": 1})
    store.create()
    store.write([1, 2], np.zeros((2, 1, 1, 1), np.uint8))
    told = []                             # what rank 0 broadcasts: the unfinished seeds
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: told.append(obj) or told[0])
    mine = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        mine.append(distributed.my_shards(list(range(6)), store, 2))
    assert told[0] == [0, 3, 4, 5]
    assert mine == [[[0, 3]], [[4, 5]], []]          # uneven: rank 2 has nothing to do


def _worker(nproc, model_dir, out, kill_after=None):
    """tests/sample_worker.py under torchrun: seeds 0-5, one image per shard and batch."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(ROOT / "tests" / "sample_worker.py"), str(model_dir),
           str(out), "--seeds", "0-5", "--steps", str(STEPS), "--batch-size", "1",
           "--shard-size", "1"] + (["--kill-after", str(kill_after)] if kill_after else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_killed_rank_of_two_then_resumed_by_the_library_and_by_the_cli(
        tmp_path, model_dir, reference):
    out = tmp_path / "run.npz"
    killed = _worker(2, model_dir, out, kill_after=1)
    assert killed.returncode != 0                     # rank 1 died by SIGKILL after one shard
    assert not out.exists()
    parts = tmp_path / "run.npz.parts"
    finished = sorted(parts.glob("shard-*.json"))
    assert 1 <= len(finished) < 6                     # rank 1 had 3 of the 6 shards
    for npz in parts.glob("shard-*.npz"):             # whole, or absent
        with np.load(npz) as z:
            assert z["arr_0"].shape[0] == z["seeds"].shape[0]
    before = {p.name: p.stat().st_mtime_ns for p in finished}
    # the same call in one process (the worker's loading): shards of two ranks, finished by one
    run = sample_to_file(load(model_dir), "0-5", out, batch_size=1, shard_size=1,
                         num_inference_steps=STEPS, progress=False)
    assert run.sampled == 6 - len(finished)
    assert np.array_equal(np.load(out)["arr_0"], reference)      # = one process, in memory
    for name, mtime in before.items():
        assert (parts / name).stat().st_mtime_ns == mtime
    assert not [p for p in parts.iterdir() if p.name.endswith(".tmp")]   # the kill's, dropped
    # the CLI's pipeline has the same identity: it resumes (nothing left) and merges again
    out.unlink()
    code = cli.main(["sample", "--model", str(model_dir), "--image-ids", "0-5", "--steps",
                     str(STEPS), "--shard-size", "1", "--mode", "fast", "--precision", "fp32",
                     "--device", "cpu", "--out", str(out)])
    assert code == 0 and np.array_equal(np.load(out)["arr_0"], reference)
