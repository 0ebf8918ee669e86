"""Loading and saving models: diffusers-format folders (no diffusers needed) and our own.

A diffusers pipeline folder holds model_index.json, unet/{config.json, diffusion_pytorch_model.
safetensors} and scheduler/scheduler_config.json; a bare model folder holds the unet files
directly. Weights are read with safetensors, or with torch.load(weights_only=True) for .bin files:
never by unpickling arbitrary objects. Every problem is raised as CheckpointError with one line
that names the file and what is wrong, before any work is done.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .atomic import atomic_write_bytes
from .unet import UNet2DModel, UNetConfig

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin")
DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000,
                     "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                     "variance_type": "fixed_small", "clip_sample": True,
                     "prediction_type": "epsilon"}
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# The original DDPM models were sampled with σ² = β_t (the paper's CIFAR-10 setting) and x̂0 clipping;
# diffusers' converted google/ddpm-* folders say the same.
ORIGINAL_SCHEDULER = {**DEFAULT_SCHEDULER, "variance_type": "fixed_large"}


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
    raise CheckpointError(f"no config.json in {p} or {p / 'unet'}: not a diffusers model folder, "
                          "a training run or a checkpoint file")


def find_training_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder that `latest` names in a training run (`run/` or `run/checkpoint/`)."""
    for folder in (path, path / "checkpoint"):
        latest = folder / "latest"
        if latest.is_file():
            ckpt = folder / latest.read_text().strip()
            if not (ckpt / "state.json").is_file():
                raise CheckpointError(f"{latest} names {ckpt.name}, which has no state.json")
            return ckpt
    return None


WEIGHT_CHOICES = ("ema", "raw")


def load_state_dict(path: Path, weights: str = "ema") -> dict:
    """Tensors from a .safetensors file, or from a torch-saved file through the weights-only
    unpickler (which refuses anything that is not tensors and plain containers). `weights`:
    "ema" takes a checkpoint's EMA weights where it holds both (load_weights)."""
    return load_weights(path, weights)[0]


def load_weights(path: Path, weights: str = "ema") -> tuple[dict, str]:
    """(state dict, which weights were taken, in words) from one weights file; see
    load_state_dict."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(len(LFS_POINTER))
    if head == LFS_POINTER:
        raise CheckpointError(f"{path} is a git-lfs pointer, not the weights: fetch them with "
                              "`git lfs pull` (or download the file itself)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), "the file's only weights"
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None
    import pickle
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused: it holds pickled objects other than tensors, "
                              f"and unpickling them could run code ({reason[:160]}); "
                              "save the weights as safetensors") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable weights file ({type(e).__name__}: "
                              f"{str(e).strip()[:200]})") from None
    return _unwrap_state_dict(sd, path, weights)


def _tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(sd: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _unwrap_state_dict(obj, path, weights: str = "ema") -> tuple[dict, str]:
    """(the tensor dict inside the usual wrappers, which one was taken): {"state_dict": …},
    {"model": …}, DistributedDataParallel's "module." prefixes, and the DDIM repository's
    training checkpoints [model, optimizer, epoch, step] + [ema] when trained with EMA
    (ermongroup/ddim's runners sample with that last element, the EMA helper's shadow of the
    parameters, loaded over element 0; weights="raw" takes element 0 alone)."""
    taken = "the file's only weights"
    for _ in range(3):
        if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], dict):
            n = len(obj)
            if n > 1 and _tensor_dict(obj[0]) and _tensor_dict(obj[-1]):
                if weights == "ema":
                    # as the DDIM repository's ema_helper.ema(model): the shadow's parameters
                    # over the raw state dict (which keeps any buffers the shadow lacks)
                    obj = {**_strip(obj[0]), **_strip(obj[-1])}
                    taken = (f"EMA weights (the last element of a {n}-element DDIM-style "
                             "checkpoint list; the raw weights are element 0)")
                else:
                    obj = obj[0]
                    taken = (f"raw weights (element 0 of a {n}-element DDIM-style checkpoint "
                             "list; its EMA weights, the last element, were not taken)")
                break
            obj = obj[0]
            taken = (f"element 0 of a {n}-element checkpoint list (no EMA weights in it)"
                     if n > 1 else "element 0 of a checkpoint list")
        elif isinstance(obj, dict) and not _tensor_dict(obj):
            has_ema = _tensor_dict(obj.get("ema"))
            keys = ("ema", "state_dict", "model", "net") if weights == "ema" and has_ema \
                else ("state_dict", "model", "ema", "net")
            key = next((k for k in keys if k in obj), None)
            if key is None:
                break
            if key == "ema" and weights == "raw":
                raise CheckpointError(f"{path}: weights='raw' asks for the trained weights, but "
                                      "it holds only EMA weights (an 'ema' entry, no 'state_dict'"
                                      "/'model'/'net'); load it with weights='ema'")
            raw_key = next((k for k in ("state_dict", "model", "net") if k in obj), None)
            if has_ema and raw_key is not None:
                taken = (f"EMA weights (its {key!r} entry; the raw weights are {raw_key!r})"
                         if key == "ema" else
                         f"raw weights (its {key!r} entry; its EMA weights, 'ema', were not taken)")
            else:
                taken = f"its {key!r} entry"
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    tensors = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors, taken


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
    not_float = sorted(k for k in expected if not sd[k].is_floating_point())
    if not_float:
        k = not_float[0]
        raise CheckpointError(f"{source}: weight {k} has dtype {sd[k].dtype}, expected a "
                              "floating-point type")
    bad = [k for k, v in sd.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: non-finite values in {few(bad)}")


def _build_unet(config: dict, source) -> UNet2DModel:
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise CheckpointError(f"{source}: model class {cls!r} is not UNet2DModel")
    try:
        return UNet2DModel(UNetConfig.from_dict(config))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def read_unet_weights(path: str | os.PathLike, sample_size: int | None = None,
                      weights: str = "ema") -> tuple[dict, dict, Path]:
    """(config dict, state dict in diffusers names, weights file) from any supported source:
    a diffusers folder (pipeline or model), one of our training runs, or an original DDPM
    checkpoint file (converted). `sample_size` replaces the source's image size (an original
    checkpoint's is guessed from its depth; a folder's config.json may lack it). `weights`:
    "ema" (default) takes the EMA weights where the source holds both (a training run of ours,
    a DDIM-repository checkpoint list), "raw" the trained weights themselves. See
    read_unet_weights_info for which were taken."""
    config, sd, source, _ = read_unet_weights_info(path, sample_size, weights)
    return config, sd, source


def read_unet_weights_info(path: str | os.PathLike, sample_size: int | None = None,
                           weights: str = "ema") -> tuple[dict, dict, Path, str]:
    """read_unet_weights, plus which weights were taken, in words."""
    config, sd, source, taken = _read_unet_weights_info(path, sample_size, weights)
    if sample_size is not None:      # the U-Net is convolutional: any multiple of its downsampling
        config = {**config, "sample_size": sample_size}
    return config, sd, source, taken


def _read_unet_weights_info(path, sample_size, weights):
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model path does not exist: {p}")
    if p.is_file():
        sd, taken = load_weights(p, weights)
        config, sd = original_to_diffusers(sd, p, sample_size)
        return config, sd, p, taken
    ckpt = find_training_checkpoint(p)
    if ckpt is not None:
        config = _read_json(ckpt / "state.json").get("unet_config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{ckpt / 'state.json'}: no unet_config")
        name = "ema.safetensors" if weights == "ema" else "model.safetensors"
        taken = ("EMA weights (the training run's ema.safetensors)" if weights == "ema" else
                 "raw weights (the training run's model.safetensors, not its EMA)")
        return config, load_state_dict(ckpt / name), ckpt / name, taken
    folder = find_unet_folder(p)
    config = _read_json(folder / "config.json")
    weights_file = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights_file is None:
        raise CheckpointError(f"no weights in {folder} (looked for {', '.join(WEIGHT_NAMES)})")
    sd, taken = load_weights(weights_file, weights)
    return config, sd, weights_file, taken


def load_unet(path: str | os.PathLike, device="cpu", dtype=torch.float32,
              sample_size: int | None = None, weights: str = "ema") -> UNet2DModel:
    """The U-Net at `path` (see read_unet_weights), checked against its config, in eval mode.
    weights="ema" (default) takes the EMA weights where the source holds both, "raw" the
    trained ones; `model.loaded_weights` says which were taken, and from which file."""
    config, sd, source, taken = read_unet_weights_info(path, sample_size, weights)
    model = _build_unet(config, source)
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.loaded_weights = f"{source}: {taken}"
    return model


# What a folder without any scheduler config (a bare U-Net folder, as diffusers' save_pretrained
# writes unet/) is sampled with, said in the warning and by `ddpm-fast info`.
ASSUMED_SCHEDULER = ("no scheduler config here (no scheduler/scheduler_config.json, no "
                     "model_index.json naming one): assuming DDPMScheduler's defaults (1000 linear "
                     "betas 1e-4 to 0.02, fixed_small variance, epsilon prediction, clip_sample); "
                     "put the model's scheduler_config.json beside config.json if it was trained "
                     "otherwise")


def load_scheduler_config(path: str | os.PathLike) -> dict:
    """scheduler/scheduler_config.json of a pipeline folder (or scheduler_config.json beside
    the U-Net's files). A folder whose model_index.json names a scheduler without its config is
    refused (diffusers refuses it); a bare U-Net folder gets DDPMScheduler's defaults, with a
    warning that says so (ASSUMED_SCHEDULER). The scheduler class is the one model_index.json names (diffusers builds that class from the
    config), else the config's _class_name: a DDPMScheduler or a DDIMScheduler, written into the
    returned config's _class_name. Every setting is honoured or refused here
    (schedulers.read_config)."""
    from .schedule import check_scheduler_config
    from .schedulers import SCHEDULER_CLASSES, read_config, unsupported_class

    p = Path(path)
    if p.is_file():                  # an original DDPM checkpoint
        return dict(ORIGINAL_SCHEDULER)
    ckpt = find_training_checkpoint(p) if p.is_dir() else None
    if ckpt is not None:             # one of our training runs: the schedule it was trained with
        state_file = ckpt / "state.json"
        config = _read_json(state_file).get("scheduler_config")
        if config is None:           # written before runs recorded it: they trained the default
            return dict(DEFAULT_SCHEDULER)
        try:
            check_scheduler_config(config)
        except ValueError as e:
            raise CheckpointError(f"{state_file}: {e}") from None
        return config
    index = p / "model_index.json"
    index_class = None
    if index.is_file():
        entry = _read_json(index).get("scheduler")
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None:
            index_class = entry[1]
            if index_class not in SCHEDULER_CLASSES:
                raise CheckpointError(f"{index}: {unsupported_class(index_class)}")
    source, config = None, None
    for candidate in (p / "scheduler" / "scheduler_config.json", p / "scheduler_config.json"):
        if candidate.is_file():
            source, config = candidate, _read_json(candidate)
            break
    if config is None:
        if index_class is not None:  # diffusers fails to load this folder too
            raise CheckpointError(f"{index} names the scheduler {index_class}, but "
                                  f"{p / 'scheduler' / 'scheduler_config.json'} is missing (an "
                                  "incomplete download or copy?)")
        warnings.warn(f"{p}: {ASSUMED_SCHEDULER}", stacklevel=2)
        return dict(DEFAULT_SCHEDULER)
    if index_class is not None and isinstance(config, dict):
        config = {**config, "_class_name": index_class}
    try:
        read_config(config)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return config


# ------------------------------------------------------------------ original DDPM checkpoints

# Names in the widely used PyTorch port of the original TensorFlow DDPM code (pytorch_diffusion,
# also the DDIM repository): temb.dense.{0,1}, down.{i}.block.{j}, down.{i}.attn.{j} with q/k/v/
# proj_out as 1×1 convolutions, mid.block_1/attn_1/block_2, and up.{i} indexed by resolution level
# (0 = the highest), where diffusers' up_blocks run from the lowest resolution.
_RESNET_NAMES = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"}
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# resolution by number of levels: CIFAR-10 (1,2,2,2) → 32; CelebA 64 (1,2,2,2,4); LSUN/CelebA-HQ → 256
_GUESSED_SIZE = {4: 32, 5: 64, 6: 256}


def _original_name(key: str, levels: int) -> str | None:
    """The diffusers name for one original parameter name (None if it is not one)."""
    parts = key.split(".")
    fixed = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
             "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    head, leaf = ".".join(parts[:-1]), parts[-1]
    if head in fixed:
        return f"{fixed[head]}.{leaf}"

    def block(kind: str, rest: list[str]) -> str | None:
        table = _RESNET_NAMES if kind == "resnets" else _ATTN_NAMES
        if len(rest) != 2:
            return None
        name = table.get(rest[0], rest[0] if kind == "resnets" else None)
        return None if name is None else f"{name}.{rest[1]}"

    if parts[0] == "mid" and len(parts) == 4:
        where = {"block_1": ("resnets", 0), "attn_1": ("attentions", 0), "block_2": ("resnets", 1)}
        if parts[1] not in where:
            return None
        kind, j = where[parts[1]]
        inner = block(kind, parts[2:])
        return inner and f"mid_block.{kind}.{j}.{inner}"
    if parts[0] in ("down", "up") and len(parts) >= 4 and parts[1].isdigit():
        level = int(parts[1])
        prefix = (f"down_blocks.{level}" if parts[0] == "down"
                  else f"up_blocks.{levels - 1 - level}")
        if parts[2] in ("downsample", "upsample") and parts[3] == "conv" and len(parts) == 5:
            return f"{prefix}.{parts[2]}rs.0.conv.{leaf}"
        if parts[2] in ("block", "attn") and parts[3].isdigit():
            kind = "resnets" if parts[2] == "block" else "attentions"
            inner = block(kind, parts[4:])
            return inner and f"{prefix}.{kind}.{parts[3]}.{inner}"
    return None


def original_to_diffusers(sd: dict, source, sample_size: int | None = None) -> tuple[dict, dict]:
    """(diffusers UNet2DModel config, renamed state dict) for an original DDPM state dict; the
    architecture (channels, blocks per level, attention levels) is read from the weights."""
    if "conv_in.weight" not in sd or not any(k.startswith("down.0.block.0.") for k in sd):
        sample = ", ".join(sorted(sd)[:3])
        raise CheckpointError(f"{source}: not an original DDPM checkpoint (no conv_in / down.0.block "
                              f"weights; it has {sample}, …)")
    levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down."))
    blocks = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down.0.block."))
    channels = [int(sd[f"down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
    attn = [f"down.{i}.attn.0.q.weight" in sd for i in range(levels)]
    if sample_size is None:
        sample_size = _GUESSED_SIZE.get(levels, 32)
    config = {
        "_class_name": "UNet2DModel", "sample_size": sample_size,
        "in_channels": int(sd["conv_in.weight"].shape[1]),
        "out_channels": int(sd["conv_out.weight"].shape[0]),
        "block_out_channels": channels, "layers_per_block": blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "norm_num_groups": 32, "norm_eps": 1e-6, "freq_shift": 1, "flip_sin_to_cos": False,
        "downsample_padding": 0, "attention_head_dim": None, "add_attention": "mid.attn_1.q.weight" in sd,
    }
    out, unknown = {}, []
    for key, value in sd.items():
        name = _original_name(key, levels)
        if name is None:
            unknown.append(key)
            continue
        if ".attentions." in name and value.ndim == 4 and "group_norm" not in name:
            value = value[:, :, 0, 0]          # 1×1 convolution → linear layer
        out[name] = value
    if unknown:
        raise CheckpointError(f"{source}: unexpected weights {', '.join(sorted(unknown)[:3])}"
                              + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""))
    return config, out


# ------------------------------------------------------------------ writing

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
    # the class diffusers builds the scheduler as: the config's (DDPMScheduler or DDIMScheduler)
    scheduler_class = (scheduler_config or DEFAULT_SCHEDULER).get("_class_name", "DDPMScheduler")
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", scheduler_class]}
    atomic_write_bytes(root / "model_index.json", json.dumps(index, indent=2).encode())
    return root
