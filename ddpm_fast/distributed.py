"""Multi-process work under torchrun: process groups, per-image seeds, resumable sharded output.

`torchrun --nproc-per-node N -m ddpm_fast.cli train ...` sets RANK / WORLD_SIZE / MASTER_ADDR;
`init_from_env` joins the group (NCCL on GPU, gloo on CPU). Without those variables everything
runs as a single process (rank 0 of 1).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes; False when not launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (the object itself in a single process)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------- per-image seeds

MAX_SEED = 2 ** 32 - 1           # a seed is the image index word of the Philox key
MAX_IMAGES = 10 ** 8


def parse_seeds(text: str) -> list[int]:
    """'0-49999' or '0-9,20' → the seeds in the order given; overlaps, non-integers, reversed
    ranges and values outside [0, 2**32) are errors (ValueError naming the part)."""
    seeds, spans = [], []
    for part in str(text).split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            a, b = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise ValueError(f"seeds: {part!r} is not an integer or a range like 0-99") from None
        if a > b:
            raise ValueError(f"seeds: range {part!r} runs backwards")
        if a < 0 or b > MAX_SEED:
            raise ValueError(f"seeds: {part!r} is outside [0, {MAX_SEED}]")
        if any(a <= d and c <= b for c, d in spans):
            raise ValueError(f"seeds: {part!r} overlaps an earlier part")
        if len(seeds) + b - a + 1 > MAX_IMAGES:
            raise ValueError(f"seeds: more than {MAX_IMAGES} images in one run")
        spans.append((a, b))
        seeds.extend(range(a, b + 1))
    return seeds


def contiguous_runs(seeds: list[int], limit: int) -> list[tuple[int, int]]:
    """(first seed, count) batches of consecutive seeds, each at most `limit` long: a batch of
    images first..first+count-1 is one call of the sampler (image index = seed)."""
    runs = []
    for s in seeds:
        if runs and s == runs[-1][0] + runs[-1][1] and runs[-1][1] < limit:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs


# ---------------------------------------------------------------------- resumable shards

class ShardStore:
    """A folder of finished shards: shard-<first>-<count>.npz (uint8 images [N, H, W, C] under
    "arr_0" and their seeds; older runs' shards, under "images", are read too) plus a .json
    manifest with the npz's SHA-256, written after the npz. Both are written to temporary names,
    fsynced and renamed, so a shard is either whole and listed or absent. run.json pins the
    settings: shards of a different run are never mixed in."""

    def __init__(self, folder: Path, settings: dict):
        # as run.json holds them (tuples as lists, …), so that the same settings compare equal
        self.folder, self.settings = Path(folder), json.loads(json.dumps(settings))

    def check(self, overwrite: bool = False) -> bool:
        """Every rank: False if the folder holds another run's shards and --overwrite allows
        starting over; raises ValueError if it does and --overwrite was not given."""
        run = self.folder / "run.json"
        if not run.is_file():
            return True
        try:
            old = json.loads(run.read_text())
        except ValueError:
            old = {}
        if old == self.settings:
            return True
        if overwrite:
            return False
        diff = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
        raise ValueError(f"{self.folder} holds shards of a run with other settings ({', '.join(diff)})"
                         ": use another --out, or --overwrite to start over")

    def create(self, overwrite: bool = False) -> None:
        """Rank 0 only: (re)create the folder and run.json, drop temporaries of killed writers."""
        import shutil

        from .checkpoints import atomic_write_bytes

        if not self.check(overwrite):
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        run = self.folder / "run.json"
        if not run.is_file():
            atomic_write_bytes(run, json.dumps(self.settings, indent=1, sort_keys=True).encode())

    def finished(self) -> dict[int, Path]:
        """seed → shard file, for every shard whose manifest matches its bytes."""
        import hashlib

        done = {}
        for manifest in sorted(self.folder.glob("shard-*.json")):
            npz = manifest.with_suffix(".npz")
            try:
                meta = json.loads(manifest.read_text())
                ok = hashlib.sha256(npz.read_bytes()).hexdigest() == meta["sha256"]
            except (OSError, ValueError, KeyError):
                ok = False
            if ok:
                done.update((s, npz) for s in meta["seeds"])
        return done

    def write(self, seeds: list[int], images) -> Path:
        import hashlib
        import io

        import numpy as np

        from .checkpoints import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, arr_0=images, seeds=np.asarray(seeds, np.int64))   # images.SAMPLES_KEY
        data = buf.getvalue()
        npz = self.folder / f"shard-{seeds[0]:010d}-{len(seeds):06d}.npz"
        atomic_write_bytes(npz, data)
        meta = {"seeds": list(map(int, seeds)), "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_bytes(npz.with_suffix(".json"), json.dumps(meta).encode())
        return npz

    def iter_images(self, seeds: list[int], piece: int = 256):
        """uint8 images in the order of `seeds`, as arrays [≤ piece, H, W, C], holding one shard
        in memory at a time; every seed must be finished (checked before the first yield)."""
        import numpy as np

        from .images import samples_key

        where = self.finished()
        missing = [s for s in seeds if s not in where]
        if missing:
            raise ValueError(f"{len(missing)} seeds have no finished shard (first: {missing[0]})")

        def images():
            loaded, out = None, []
            for s in seeds:
                if loaded is None or loaded[0] != where[s]:
                    with np.load(where[s]) as z:
                        ims = z[samples_key(z.files)]
                        loaded = (where[s], {int(k): im for k, im in zip(z["seeds"], ims)})
                out.append(loaded[1][s])
                if len(out) == piece:
                    yield np.stack(out)
                    out = []
            if out:
                yield np.stack(out)

        return images()


def my_shards(seeds: list[int], store: ShardStore, shard_size: int) -> list[list[int]]:
    """This rank's share of the seeds without a finished shard: those seeds cut in order into
    shards of `shard_size`, and rank r takes shards r, r + W, … (W = world size). Collective:
    rank 0 decides what is finished and tells the others, so every rank cuts the same list even
    if another rank has already written a new shard."""
    rank, size = world()
    todo = None
    if rank == 0:
        done = store.finished()
        todo = [s for s in seeds if s not in done]
    todo = broadcast_object(todo)
    return [todo[i:i + shard_size] for i in range(0, len(todo), shard_size)][rank::size]


def sample_to_shards(sample_batch, shards: list[list[int]], store: ShardStore, batch_size: int,
                     fault_after: int | None = None) -> None:
    """Sample and write each shard; `sample_batch(first, count)` returns uint8 images for seeds
    first..first+count-1. Which shard or rank an image lands in never changes the image."""
    import numpy as np

    for written, shard in enumerate(shards, 1):
        images = [sample_batch(first, count) for first, count in contiguous_runs(shard, batch_size)]
        store.write(shard, np.concatenate(images))
        if fault_after is not None and written >= fault_after:   # test hook: die like kill -9
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
