"""The `ddpm-fast` commands as Python functions, one per command, each with the command's
arguments as keywords (cli.py's parser is their table of flags):

    sample, progressive, from_t, interpolate, train, evaluate, convert, info, fid

Each checks all of its input first and raises UsageError (a ValueError: the command line prints
it as one line and exits with status 2) before any work is done; it then does the work, writes
its output atomically, prints a one-line summary (evaluate, info: a JSON report) and returns
what it made. Failures while running (NonFiniteError, TrainingDivergedError, OSError) pass
through. A file given as input that is not what its name says is refused naming the file and
what it is (ddpm_fast.filetypes)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .filetypes import expect_array_file, expect_weights_file
from .report import default_model_path, environment_report

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


# ---------------------------------------------------------------------- resolving the options

def dtype_named(name: str):
    """The torch dtype of a precision name (fp32, bf16, fp16)."""
    import torch

    return getattr(torch, PRECISIONS[name])


def resolve_device(name: str):
    """"auto" (cuda when a GPU is visible, else cpu), or a device that exists here."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (use cpu, cuda, cuda:1 or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        visible = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise UsageError(f"--device {name}: there is no such GPU ({count} visible, {visible})")
    return device


def check_output(path, overwrite: bool, suffixes=(".png", ".npz", "")) -> Path:
    """`out`'s checks before any work (images.check_output), as usage errors."""
    from .images import check_output as check

    try:
        return check(Path(path), overwrite, suffixes)
    except FileExistsError:
        raise UsageError(f"--out {path} exists (pass --overwrite to replace it)") from None
    except ValueError as e:
        raise UsageError(f"--out {e}") from None


def check_new_folder(path, overwrite: bool, also: str = "") -> Path:
    """A folder to be written: refused if it exists, unless `overwrite` (or `also`'s flag)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"--out {path} exists (pass {also}--overwrite to replace it)")
    return path


def load_pipeline(model, device, mode: str, precision: str = "auto", autotune: bool = True):
    """The DDPMPipeline of `model` (default: the shipped digits model) on `device`; precision:
    the fast mode's U-Net dtype (auto: the device's default); autotune=False keeps cuDNN's
    heuristic convolution algorithms."""
    from .checkpoints import CheckpointError
    from .pipeline import DDPMPipeline

    path = Path(model) if model else default_model_path()
    if path.is_file():
        expect_weights_file(path)
    dtype = None if precision == "auto" else dtype_named(precision)
    try:
        return DDPMPipeline.from_pretrained(path, mode=mode, device=device, dtype=dtype,
                                            autotune_convs=None if autotune else False)
    except CheckpointError as e:
        raise UsageError(str(e))
    except ValueError as e:          # a scheduler setting the chosen mode does not honour
        raise UsageError(f"{path}: {e}")


def load_images(data: str, size, channels, split: str, count=None):
    """uint8 images [N, C, H, W] of --data ('digits', an .npz/.npy of uint8 [N, H, W, C] or a
    folder), at most `count`, as data.load_dataset checks them."""
    from .data import load_dataset

    if data != "digits":
        expect_array_file(data)
    try:
        images = load_dataset(data, size, channels, split=split, as_uint8=True)
    except ValueError as e:
        raise UsageError(f"--data: {e}")
    return images if count is None else images[:count]


def real_images(pipe, data: str, count: int):
    """The first `count` held-out images of --data in model space, shaped for the model."""
    from .data import to_model_space

    c = pipe.unet.config
    images = load_images(data, c.sample_size, c.in_channels, "test", count)
    if images.shape[0] < count:
        raise UsageError(f"--data: need {count} images, found {images.shape[0]}")
    return to_model_space(images).to(pipe.device)


def check_timesteps(pipe, ts) -> None:
    from .figures import check_timesteps as check

    try:
        check(pipe, ts)
    except ValueError as e:
        raise UsageError(f"--t: {e}")


# ---------------------------------------------------------------------- sampling

def sample(out, *, model=None, device="auto", seed=0, num_images=64, image_ids=None,
           batch_size=64, shard_size=256, steps=None, sampler=None, eta=None, variance=None,
           mode="fast", precision="auto", autotune=True, overwrite=False, scale=4):
    """Sample images to `out`: a .png grid (pixels × `scale`), an .npz (uint8 "arr_0") or a
    folder of PNGs. Images 0..num_images-1, or the indices `image_ids` names ("0-49999",
    "0-9,20"), image i depending only on (seed, i). With image_ids, and under torchrun, the run
    is resumable: shards go to OUT.parts/ and a rerun samples only what is missing.
    batch_size="auto": the largest that fits. steps, sampler, eta, variance: the pipeline
    call's (defaults: the model's scheduler's). Returns distributed.sample_to_file's result."""
    from . import distributed

    out = Path(out)
    try:
        seeds = (distributed.parse_seeds(image_ids) if image_ids
                 else list(range(num_images)))
    except ValueError as e:          # parse_seeds names the part: "seeds: 'x' is not …"
        raise UsageError(f"--image-ids: {str(e).removeprefix('seeds: ')}")
    # resumable shards for explicit seed lists and multi-process runs; plain runs stay in memory
    resumable = image_ids is not None or distributed.launched_by_torchrun()
    resuming = resumable and out.with_name(out.name + ".parts").joinpath("run.json").is_file()
    check_output(out, overwrite or resuming)
    device = resolve_device(device)
    if resumable:     # under torchrun: join the group, so "cuda" is this rank's GPU when loading
        distributed.init_from_env(device)
    pipe = load_pipeline(model, device, mode, precision, autotune)
    if batch_size == "auto":
        batch_size = pipe.max_batch_size()
        print(f"--batch-size auto: {batch_size}", file=sys.stderr)
    run = distributed.sample_to_file(       # None: the scheduler's sampler, default_steps
        pipe, seeds, out, batch_size=batch_size, shard_size=shard_size, seed=seed,
        num_inference_steps=steps, sampler=sampler, eta=eta, variance=variance,
        resumable=resumable, overwrite=overwrite, scale=scale)
    if run.wrote:
        kind = "GPU memory" if device.type == "cuda" else "resident memory of the process"
        peak = f"; peak {kind} {run.peak_memory / 2**30:.2f} GiB" if run.peak_memory else ""
        shards = f" (shards in {run.parts})" if run.parts else ""
        print(f"wrote {len(seeds)} images to {out}{shards}{peak}")
    return run


# ---------------------------------------------------------------------- the paper's figures
# In reference mode: a figure needs intermediate states and start points that fast mode does
# not expose (ddpm_fast.figures makes them).

def _figure(out, model, device, overwrite):
    out = check_output(out, overwrite, (".png",))
    return out, load_pipeline(model, resolve_device(device), "reference")


def _save_figure(out: Path, table, scale: int, what: str) -> Path:
    from . import figures
    from .images import save_png

    save_png(out, figures.grid(table, scale=scale))
    print(f"wrote {out}: {what}")
    return out


def progressive(out, *, model=None, device="auto", seed=0, num_images=4, every=100,
                overwrite=False, scale=4) -> Path:
    """A .png of x̂0 and x_t along sampling, every `every` steps, for `num_images` samples."""
    from .figures import progressive as make

    out, pipe = _figure(out, model, device, overwrite)
    table = make(pipe, num_images, every, seed)
    return _save_figure(out, table, scale, f"{num_images} samples × {table.shape[1] // 2} times "
                        "(x̂0 | x_t)")


def from_t(out, *, model=None, device="auto", seed=0, data="digits", num_images=4,
           t=(250, 500, 750, 999), overwrite=False, scale=4) -> Path:
    """A .png of `num_images` real images of `data`, each encoded to x_t and denoised back,
    for every timestep in `t`."""
    from .figures import from_t as make

    out, pipe = _figure(out, model, device, overwrite)
    t = list(t)
    check_timesteps(pipe, t)
    table = make(pipe, real_images(pipe, data, num_images), t, seed)
    return _save_figure(out, table, scale, "rows are images; columns: the original, then "
                        f"denoised from t = {t}")


def interpolate(out, *, model=None, device="auto", seed=0, data="digits", t=500, frames=7,
                overwrite=False, scale=4) -> Path:
    """A .png of two real images of `data` interpolated in x_t (linearly, then spherically)
    at `frames` values of λ from 0 to 1, and denoised."""
    from .figures import interpolate as make

    if frames < 2:
        raise UsageError(f"--frames must be at least 2 (λ = 0 and 1), got {frames}")
    out, pipe = _figure(out, model, device, overwrite)
    check_timesteps(pipe, [t])
    table = make(pipe, real_images(pipe, data, 2), t, frames, seed)
    return _save_figure(out, table, scale, "linear (top) and spherical (bottom) interpolation "
                        f"at t = {t}")


# ---------------------------------------------------------------------- training

def train(out, *, data="digits", image_size=None, channels=None, preset=None, dropout=0.1,
          train_steps=10000, batch_size=64, lr=5e-4, lr_warmup=200, ema_decay=0.999,
          checkpoint_every=1000, precision="fp32", hflip=False, seed=0, device="auto",
          resume=False, overwrite=False) -> Path:
    """Train a U-Net (the digits model's shape, or `preset`'s) on `data` with L_simple into the
    run folder `out`: checkpoints in out/checkpoint (resume=True continues them), then the EMA
    model as a diffusers folder in out/pipeline, which it returns. Under torchrun, one process
    per GPU / CPU worker (DDP)."""
    from . import distributed
    from .checkpoints import load_scheduler_config, save_pretrained
    from .training import DIGITS_CONFIG, TrainConfig, train as train_unet
    from .unet import PRESETS, UNet2DModel

    out = check_new_folder(out, resume or overwrite, also="--resume to continue or ")
    images = load_images(data, image_size, channels, "train")  # uint8: train() converts batches
    base = PRESETS[preset] if preset else DIGITS_CONFIG
    config = type(base)(**{**base.__dict__, "sample_size": images.shape[2], "dropout": dropout,
                           "in_channels": images.shape[1], "out_channels": images.shape[1]})
    if images.shape[2] % config.downsampling:
        raise UsageError(f"image size {images.shape[2]} is not divisible by "
                         f"{config.downsampling}, the model's total downsampling")
    device = resolve_device(device)
    distributed.init_from_env(device)        # under torchrun: one process per GPU / CPU worker
    cfg = TrainConfig(steps=train_steps, batch_size=batch_size, lr=lr, seed=seed,
                      ema_decay=ema_decay, warmup=lr_warmup, checkpoint_every=checkpoint_every,
                      hflip=hflip, precision=precision)
    ema, _ = train_unet(UNet2DModel(config), images, cfg, out_dir=out / "checkpoint",
                        resume=resume, device=device)
    if distributed.is_main():
        # with the schedule the run trained with (checkpoint/…/state.json records it)
        save_pretrained(ema, out / "pipeline", load_scheduler_config(out / "checkpoint"))
        print(f"wrote the EMA model to {out / 'pipeline'} (load it with --model "
              f"{out / 'pipeline'})")
    return out / "pipeline"


# ---------------------------------------------------------------------- evaluation

def evaluate(*, model=None, data=None, device="auto", seed=0, num_data=256, batch_size=256,
             terms=100, exact_cdf=False, num_images=256, steps=None) -> dict:
    """Bits/dim (the variational bound, likelihood.mean_bits_per_dim, with `terms` of its KL
    terms; 1000 = exact) on `num_data` held-out images of `data` (default: the held-out digits,
    for digit models), in reference mode; for digit models also the quality scores of
    `num_images` samples of `steps` steps. Prints and returns {"bits_per_dim": {…}}."""
    import torch

    from .data import to_model_space
    from .likelihood import mean_bits_per_dim

    device = resolve_device(device)
    pipe = load_pipeline(model, device, "reference")
    c = pipe.unet.config
    digit_model = (c.in_channels, c.sample_size) == (1, 8)
    data = data or ("digits" if digit_model else None)
    if data is None:
        raise UsageError(f"--data is needed for this {c.in_channels}×{c.sample_size}² model: "
                         "held-out images as an .npz/.npy of uint8 [N,H,W,C] or a folder")
    # the digits' held-out split; other data is used as given (keep it held out)
    x = to_model_space(load_images(data, c.sample_size, c.in_channels, "test", num_data))
    g = torch.Generator(device).manual_seed(seed)
    result = mean_bits_per_dim(pipe.unet, pipe.schedule, x, batch_size, variance=pipe.variance,
                               num_terms=terms, generator=g, exact_cdf=exact_cdf)
    if digit_model:
        from .images import unit_to_uint8
        from .quality import real_scores, score

        samples = pipe(batch_size=num_images, seed=seed, num_inference_steps=steps,
                       output_type="pt").images
        result["quality"] = score(unit_to_uint8(samples)).as_dict()
        result["quality_real_digits"] = real_scores().as_dict()
    report = {"bits_per_dim": result}
    print(json.dumps(report, indent=1))
    return report


def fid(samples, *, ref, inception_weights=None, save_ref_stats=None, batch_size=64,
        device="auto") -> float:
    """The FID of `samples` against `ref` (ddpm_fast.fid: image arrays, image folders or saved
    statistics); prints "FID: <value>" and returns it."""
    from .fid import fid as frechet_inception_distance

    for path in (samples, ref):
        expect_array_file(path)
    if inception_weights is not None:
        expect_weights_file(inception_weights)
    value = frechet_inception_distance(samples, ref, inception_weights=inception_weights,
                                       save_ref_stats=save_ref_stats, batch_size=batch_size,
                                       device=resolve_device(device))
    print(f"FID: {value:.4f}")
    return value


# ---------------------------------------------------------------------- model folders

def convert(source, *, out, image_size=None, weights_dtype="fp32", raw_weights=False,
            overwrite=False) -> Path:
    """Write `source` (an original DDPM checkpoint file, a DDIM-repository checkpoint, a
    training run or a diffusers folder) as a diffusers pipeline folder `out`, atomically, with
    weights in `weights_dtype`; image_size sets the config's sample_size (an original
    checkpoint's is otherwise guessed from its depth); raw_weights takes the trained weights
    instead of the EMA ones where a checkpoint holds both."""
    from .atomic import atomic_dir
    from .checkpoints import CheckpointError, load_scheduler_config, load_unet, save_pretrained
    from .schedulers import describe

    out = check_new_folder(out, overwrite)
    if Path(source).is_file():
        expect_weights_file(source)
    try:
        unet = load_unet(source, sample_size=image_size, weights="raw" if raw_weights else "ema")
        scheduler = load_scheduler_config(source)
    except CheckpointError as e:
        raise UsageError(str(e))
    with atomic_dir(out) as tmp:             # the whole folder appears at once, or not at all
        save_pretrained(unet, tmp, scheduler, dtype=dtype_named(weights_dtype))
    c = unet.config
    print(f"wrote {out}: UNet2DModel {c.in_channels}×{c.sample_size}², channels "
          f"{list(c.block_out_channels)}, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M "
          f"parameters ({weights_dtype}), scheduler: {describe(scheduler)[2]}")
    print(f"weights: {unet.loaded_weights}")
    return out


def info(*, model=None) -> dict:
    """Print and return report.environment_report(model): versions, devices, built kernels and
    what each op runs here, and `model`'s scheduler settings."""
    if model is not None:
        if not Path(model).exists():
            raise UsageError(f"--model {model} does not exist")
        if Path(model).is_file():
            expect_weights_file(model)
    report = environment_report(model)
    print(json.dumps(report, indent=1))
    return report
