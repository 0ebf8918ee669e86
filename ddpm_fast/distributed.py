"""Multi-process work under torchrun: process groups, per-image seeds, and sample_to_file, the
resumable sharded sampling of many images into one file that `ddpm-fast sample` calls.

`torchrun --nproc-per-node N -m ddpm_fast.cli train ...` sets RANK / WORLD_SIZE / MASTER_ADDR;
`init_from_env` joins the group (NCCL on GPU, gloo on CPU). Without those variables everything
runs as a single process (rank 0 of 1).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist

from .atomic import atomic_write_bytes


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes; False when not launched by torchrun."""
    if not launched_by_torchrun() or dist.is_initialized():
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
                         ": write to another output, or overwrite to start over")

    def create(self, overwrite: bool = False) -> None:
        """Rank 0 only: remove another run's folder if `overwrite` allows it, and temporaries of
        killed writers. The folder and run.json appear with the first shard, so a run refused at
        its first batch (the pipeline's own checks) leaves nothing to trip over on a rerun."""
        import shutil

        if not self.check(overwrite):
            shutil.rmtree(self.folder)
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def finished(self) -> dict[int, Path]:
        """seed → shard file, for every shard whose manifest matches its bytes."""
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
        import io

        import numpy as np

        run = self.folder / "run.json"
        if not run.is_file():      # before any shard; ranks racing here write the same bytes
            atomic_write_bytes(run, json.dumps(self.settings, indent=1, sort_keys=True).encode())
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


def check_seeds(seeds: Union[str, Iterable[int]]) -> list[int]:
    """Image seeds as a list: a string is parse_seeds'; a sequence must hold distinct integers in
    [0, 2**32) (ValueError naming the first bad one)."""
    if isinstance(seeds, str):
        return parse_seeds(seeds)
    seeds, seen = list(seeds), set()
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) and not hasattr(s, "__index__"):
            raise ValueError(f"seeds: {s!r} is not an integer")
        if not 0 <= int(s) <= MAX_SEED:
            raise ValueError(f"seeds: {s} is outside [0, {MAX_SEED}]")
        if int(s) in seen:
            raise ValueError(f"seeds: {s} appears twice")
        seen.add(int(s))
    if not seeds:
        raise ValueError("seeds: no seeds given")
    if len(seeds) > MAX_IMAGES:
        raise ValueError(f"seeds: more than {MAX_IMAGES} images in one run")
    return [int(s) for s in seeds]


def sample_to_shards(sample_batch, shards: list[list[int]], store: ShardStore,
                     batch_size: int) -> None:
    """Sample and write each shard; `sample_batch(first, count)` returns uint8 images for seeds
    first..first+count-1. Which shard or rank an image lands in never changes the image."""
    import numpy as np

    for shard in shards:
        images = [sample_batch(first, count) for first, count in contiguous_runs(shard, batch_size)]
        store.write(shard, np.concatenate(images))


# ---------------------------------------------------------------------- sampling to a file

def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes): the same weights, however
    they were loaded, give the same digest."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def run_settings(pipe, call: dict) -> dict:
    """Everything that decides a run's images, read from the pipeline itself (its weights, mode,
    U-Net dtype, numerics and every scheduler setting, defaults filled in) and the pipeline call's
    arguments `call`. Shards of runs whose settings differ are never mixed."""
    from .schedulers import read_scheduler

    kind, scheduler = read_scheduler(pipe.scheduler)
    c = pipe.unet.config
    settings = {"weights": weights_digest(pipe.unet), "mode": pipe.mode, "dtype": str(pipe.dtype),
                "numerics": pipe.numerics, "image": [c.in_channels, c.sample_size, c.sample_size],
                "scheduler": kind, **call, "variance": call["variance"] or pipe.variance,
                "eta": call["eta"] or 0.0}     # 0.0: what runs recorded before eta could be None
    # one key per scheduler setting: a refusal names the setting that changed
    settings.update({f"scheduler.{k}": v for k, v in scheduler.items()})
    return settings


@dataclass
class SampleResult:
    """What sample_to_file did in this process."""
    out: Path                 # the output file or folder (rank 0 writes it)
    seeds: list               # the image seeds, in the output's order
    sampled: int              # images this process sampled (finished shards are not redone)
    parts: Optional[Path]     # the shard folder, kept so that a rerun resumes (None: in memory)
    wrote: bool               # this process wrote `out` (rank 0; other ranks return earlier)
    peak_memory: Optional[int] = None   # bytes, the largest pipe.last_peak_memory of the calls


def progress_bar(total_steps: int, images: int, desc: str):
    """A tqdm bar over sampler steps that also shows images per second; (bar, update)."""
    from tqdm import tqdm

    bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)
    start = time.perf_counter()

    def update(n):
        bar.update(n)
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{images * bar.n / max(bar.total, 1) / max(elapsed, 1e-9):.2f} img/s",
                            refresh=False)
    return bar, update


def pipeline_call(pipe, seed: int, num_inference_steps: Optional[int], sampler: Optional[str],
                  eta: Optional[float], variance: Optional[str], clip: Optional[bool]) -> dict:
    """The pipeline call's sampling arguments, checked before any work (ValueError naming the bad
    one), with the defaults resolved: the scheduler's sampler; pipeline.default_steps."""
    from .pipeline import SAMPLERS, check_sampler_arguments, default_steps, positive_int, sampler_of
    from .schedule import VARIANCE_TYPES
    from .schedulers import read_scheduler

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    sampler = sampler or sampler_of(read_scheduler(pipe.scheduler)[0])
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    total = pipe.schedule.num_timesteps
    steps = num_inference_steps or default_steps(sampler, total)
    if positive_int(steps, "num_inference_steps") > total:
        raise ValueError(f"num_inference_steps {steps} exceeds the model's {total} timesteps")
    if variance is not None and variance not in VARIANCE_TYPES:
        raise ValueError(f"variance must be one of {VARIANCE_TYPES}, got {variance!r}")
    if eta is not None and not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    check_sampler_arguments(sampler, eta, variance)
    return dict(seed=seed, num_inference_steps=steps, sampler=sampler, eta=eta,
                variance=variance, clip=clip)


def unet_calls(pipe, call: dict) -> int:
    """The U-Net calls (progress steps) of one pipeline call: its steps, or the rows of a few-step
    solver's plan (Heun: 2n − 1 for n steps), which is also checked here, before any work."""
    from .solvers import BY_SAMPLER

    if call["sampler"] not in BY_SAMPLER:
        return call["num_inference_steps"]
    return len(pipe.solver_plan(call["sampler"], call["num_inference_steps"]).timesteps)


def open_run(parts: Path, settings: dict, seeds: list[int], shard_size: int, overwrite: bool,
             device: torch.device) -> tuple[ShardStore, list[list[int]]]:
    """The shard folder of a run, and this rank's shards still to sample. Collective under
    torchrun (the process group is joined here); another run's folder is refused on every rank
    before any work, or started over with `overwrite`."""
    store = ShardStore(parts, settings)
    store.check(overwrite)
    init_from_env(device)
    if is_main():
        store.create(overwrite)
    barrier()
    return store, my_shards(seeds, store, shard_size)


def step_progress(progress, total_steps: int, images: int):
    """(bar or None, update(n)) for sample_to_file's `progress` (None: a tqdm bar, False:
    nothing, a callable: itself)."""
    if callable(progress):
        return None, progress
    if progress is False:
        return None, lambda n: None
    rank, size = world()
    return progress_bar(total_steps, images,
                        "sampling" if size == 1 else f"sampling (rank {rank}/{size})")


def sample_to_file(pipe, seeds: Union[str, Iterable[int]], out, *, batch_size: Union[int, str] = 64,
                   shard_size: int = 256, seed: int = 0, num_inference_steps: Optional[int] = None,
                   sampler: Optional[str] = None, eta: Optional[float] = None,
                   variance: Optional[str] = None,
                   clip: Optional[bool] = None, resumable: bool = True, overwrite: bool = False,
                   scale: int = 4, progress: Union[None, bool, Callable[[int], None]] = None
                   ) -> SampleResult:
    """Sample image `s` for every seed `s` of `seeds` with `pipe` and write them to `out`: a .png
    grid (pixels scaled by `scale`), an .npz (uint8 "arr_0" [N, H, W, C] and "seeds") or a
    folder of PNGs named by seed. Image s depends only on (`seed`, s), never on the batch size,
    the shard or the number of processes.

    resumable=True: finished shards of `shard_size` images go to OUT.parts/ (each written
    atomically with a checksummed manifest), a rerun with the same settings samples only what is
    missing, and rank 0 merges the shards into `out` at the end (the folder is kept). A folder of
    a run with other settings (weights, mode, dtype, sampler, num_inference_steps, eta,
    variance, clip, seed, any scheduler setting) is refused naming them; overwrite=True starts
    it over. Under torchrun (WORLD_SIZE > 1) the process group is joined here and the shards are
    shared by the ranks; load the pipeline on the rank's own device (cuda:LOCAL_RANK).
    resumable=False: one process samples in memory and writes `out`, nothing else.

    The other arguments are the pipeline call's: num_inference_steps (default: every timestep
    for ddpm, 50 for ddim), sampler (default: the scheduler's), eta, variance, clip.
    batch_size="auto": the largest batch that fits (pipe.max_batch_size()). progress: None shows
    a tqdm bar, False nothing, a callable is given the number of steps finished.
    Bad arguments raise ValueError (an existing `out`, FileExistsError) before any work; `out`
    appears whole or not at all."""
    from .images import check_output, save_samples, unit_to_uint8
    from .pipeline import positive_int

    seeds, out = check_seeds(seeds), Path(out)
    parts = out.with_name(out.name + ".parts")
    check_output(out, overwrite or (resumable and (parts / "run.json").is_file()))
    if not resumable and launched_by_torchrun():
        raise ValueError("resumable=False samples in one process; under torchrun the ranks "
                         "share the work through the shards (resumable=True)")
    if batch_size == "auto":
        batch_size = pipe.max_batch_size()
    batch_size = positive_int(batch_size, "batch_size")
    shard_size = positive_int(shard_size, "shard_size")
    call = pipeline_call(pipe, seed, num_inference_steps, sampler, eta, variance, clip)

    store, work = None, [seeds]
    if resumable:
        store, work = open_run(parts, run_settings(pipe, call), seeds, shard_size, overwrite,
                               pipe.device)
    runs = sum(len(contiguous_runs(w, batch_size)) for w in work)
    bar, update = step_progress(progress, unet_calls(pipe, call) * runs, sum(map(len, work)))
    peak = []

    def sample_batch(first: int, count: int):
        x = pipe(batch_size=count, first_image=first, output_type="pt", progress=update,
                 **call).images
        peak.append(pipe.last_peak_memory or 0)
        return unit_to_uint8(x)

    try:
        if store is None:
            pieces = [sample_batch(f, n) for f, n in contiguous_runs(seeds, batch_size)]
        else:
            sample_to_shards(sample_batch, work, store, batch_size)
    finally:
        if bar is not None:
            bar.close()
    result = SampleResult(out, seeds, sum(map(len, work)), parts if store else None, False,
                          max(peak, default=0) or None)
    if store is not None:
        barrier()
        if not is_main():
            return result
        pieces = store.iter_images(seeds)
    save_samples(out, pieces, seeds, scale=scale, seed=seed, steps=call["num_inference_steps"])
    result.wrote = True
    return result
