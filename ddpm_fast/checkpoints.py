"""Loading and saving models: diffusers-format folders (no diffusers needed) and our own.

A diffusers pipeline folder holds model_index.json, unet/{config.json, diffusion_pytorch_model.
safetensors} and scheduler/scheduler_config.json; a bare model folder holds the unet files
directly. Weights are read with safetensors, or with torch.load(weights_only=True) for .bin files:
never by unpickling arbitrary objects. Every problem is raised as CheckpointError with one line
that names the file and what is wrong, before any work is done.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .unet import UNet2DModel, UNetConfig

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin")
DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000,
                     "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                     "variance_type": "fixed_small", "clip_sample": True,
                     "prediction_type": "epsilon"}


class CheckpointError(ValueError):
    """A model folder or file that cannot be loaded; the message names the file and the problem."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def find_unet_folder(path: str | os.PathLike) -> Path:
    """The folder holding the U-Net's config.json: `path` itself or `path`/unet."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model path does not exist: {p}")
    if p.is_file():
        raise CheckpointError(f"expected a model folder, got a file: {p}")
    for candidate in (p, p / "unet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"no config.json in {p} or {p / 'unet'}: not a diffusers model folder")


def load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load weights safely ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def check_state_dict(model: torch.nn.Module, sd: dict, source) -> None:
    """Raise CheckpointError naming missing, unexpected or mis-shaped weights."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape))

    def few(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    if missing:
        raise CheckpointError(f"{source}: missing weights for {few(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected weights {few(unexpected)}")
    if shapes:
        k = shapes[0]
        raise CheckpointError(f"{source}: weight {k} has shape {tuple(sd[k].shape)}, the config "
                              f"needs {tuple(expected[k].shape)}" +
                              (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""))
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: non-finite values in {few(bad)}")


def load_unet(path: str | os.PathLike, device="cpu", dtype=torch.float32) -> UNet2DModel:
    folder = find_unet_folder(path)
    config = _read_json(folder / "config.json")
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise CheckpointError(f"{folder / 'config.json'}: model class {cls!r} is not UNet2DModel")
    try:
        model = UNet2DModel(UNetConfig.from_dict(config))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"no weights in {folder} (looked for {', '.join(WEIGHT_NAMES)})")
    sd = load_state_dict(weights)
    check_state_dict(model, sd, weights)
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def load_scheduler_config(path: str | os.PathLike) -> dict:
    """scheduler/scheduler_config.json of a pipeline folder, or the DDPM defaults if absent."""
    p = Path(path)
    for candidate in (p / "scheduler" / "scheduler_config.json", p / "scheduler_config.json"):
        if candidate.is_file():
            config = _read_json(candidate)
            kind = config.get("prediction_type", "epsilon")
            if kind != "epsilon":
                raise CheckpointError(f"{candidate}: prediction_type {kind!r} is not supported "
                                      "(only 'epsilon')")
            if config.get("thresholding"):
                raise CheckpointError(f"{candidate}: dynamic thresholding is not supported")
            return config
    return dict(DEFAULT_SCHEDULER)


# ------------------------------------------------------------------ writing

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary sibling folder to fill; on success it replaces `path` by a rename, on
    failure it is removed. Readers see the old folder or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(unet: UNet2DModel, path: str | os.PathLike,
                    scheduler_config: dict | None = None, dtype=torch.float32) -> Path:
    """Write a diffusers-format pipeline folder (loadable by diffusers' DDPMPipeline too).
    Weights are stored in `dtype` (fp16 halves the size) and loaded back as float32."""
    from safetensors.torch import save

    root = Path(path)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet.state_dict().items()}
    atomic_write_bytes(root / "unet" / "diffusion_pytorch_model.safetensors", save(sd))
    atomic_write_bytes(root / "unet" / "config.json",
                       json.dumps(unet.config.to_dict(), indent=2).encode())
    atomic_write_bytes(root / "scheduler" / "scheduler_config.json",
                       json.dumps(scheduler_config or DEFAULT_SCHEDULER, indent=2).encode())
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    atomic_write_bytes(root / "model_index.json", json.dumps(index, indent=2).encode())
    return root
