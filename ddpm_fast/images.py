"""Pixels and image files: the one home of the conversions between model space [-1, 1], [0, 1]
and uint8, grids, and atomic PNG / NPZ / folder writes (sample outputs included).

Conversions (diffusers' arithmetic, so images match theirs byte for byte):
  model space [-1, 1] --model_to_unit--> [0, 1] --unit_to_uint8--> uint8 [B, H, W, C]
  uint8 [B, C, H, W] --to_model_space--> model space;  unit_to_model: [0, 1] → [-1, 1]
"""
from __future__ import annotations

import io
import itertools
import math
import zipfile
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch

from .atomic import atomic_dir, atomic_file, atomic_write_bytes, check_writable


def model_to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model-space images [-1, 1] → [0, 1], clamped (diffusers' `(x / 2 + 0.5).clamp(0, 1)`)."""
    return (x / 2 + 0.5).clamp(0, 1)


def unit_to_model(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] → model space [-1, 1]."""
    return x * 2 - 1


def unit_to_uint8(x) -> np.ndarray:
    """Images in [0, 1], torch [B, C, H, W] or numpy [B, H, W, C] → uint8 [B, H, W, C]
    (rounded to nearest, as diffusers' numpy_to_pil; values outside [0, 1] saturate)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-space [-1, 1] images [B, C, H, W] → uint8 [B, H, W, C] (as diffusers rounds them)."""
    return unit_to_uint8(model_to_unit(x.detach().float()))


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [N, C, H, W] → float32 in [-1, 1]; float images pass through unchanged."""
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, scale: int = 1
              ) -> np.ndarray:
    """uint8 [B, H, W, C] → one uint8 [rows·(H+pad)+pad, cols·(W+pad)+pad, C] image."""
    b, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(b):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: Path, image: np.ndarray) -> None:
    atomic_write_bytes(Path(path), png_bytes(image))


class StreamedArray(NamedTuple):
    """An array too large to hold at once, for save_npz: its full shape and dtype, and the
    pieces along the first axis in order (an iterable of arrays)."""
    shape: tuple
    dtype: np.dtype
    pieces: Iterable[np.ndarray]


def _write_streamed(member, a: StreamedArray, name: str) -> None:
    dtype = np.dtype(a.dtype)
    np.lib.format.write_array_header_1_0(member, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
        "shape": tuple(a.shape)})
    rows = 0
    for piece in a.pieces:
        if piece.dtype != dtype or piece.shape[1:] != tuple(a.shape[1:]):
            raise ValueError(f"{name}: a piece of shape {piece.shape} and dtype {piece.dtype} "
                             f"does not fit {tuple(a.shape)} {dtype}")
        rows += piece.shape[0]
        member.write(np.ascontiguousarray(piece).tobytes())
    if rows != a.shape[0]:
        raise ValueError(f"{name}: {rows} rows written, the header says {a.shape[0]}")


def save_npz(path: Path, **arrays) -> None:
    """np.savez's format (a zip of .npy members, stored uncompressed), written atomically.
    A StreamedArray is written piece by piece, so a 50,000-image merge never holds all of them
    in memory."""
    with atomic_file(Path(path)) as f, \
            zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                if isinstance(a, StreamedArray):
                    _write_streamed(member, a, name)
                else:
                    np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=False)


# Sample files (.npz): uint8 images [N, H, W, C] under "arr_0", the key np.savez gives a first
# positional array and the one npz-based evaluators read (guided-diffusion's evaluator.py), plus
# their "seeds". Files written before this layout hold the images under "images"; readers take both.
SAMPLES_KEY = "arr_0"
LEGACY_SAMPLES_KEY = "images"


def samples_key(files) -> str:
    """The key of the images in an .npz with these member names (np.load(...).files):
    "arr_0", else the older "images"; ValueError naming both when neither is there."""
    for key in (SAMPLES_KEY, LEGACY_SAMPLES_KEY):
        if key in files:
            return key
    raise ValueError(f"no images under {SAMPLES_KEY!r} or {LEGACY_SAMPLES_KEY!r} "
                   f"(keys: {', '.join(files) or 'none'})")


def save_folder(path: Path, images: Iterable[np.ndarray], names: Iterable[str]) -> None:
    """One PNG per image under the given file names, written into a temporary folder that is
    renamed into place. `images` may be any iterable of [H, W, C] arrays (a generator too)."""
    with atomic_dir(path) as tmp:
        for name, im in zip(names, images, strict=True):
            (tmp / name).write_bytes(png_bytes(im))


# ---------------------------------------------------------------------- sample outputs

SAMPLE_OUTPUTS = {".png": ".png (grid)", ".npz": ".npz (arrays)", "": "a folder name"}


def check_output(path: Path, overwrite: bool = False, suffixes=tuple(SAMPLE_OUTPUTS)) -> Path:
    """Before any work: ValueError if `path` is not one of the output kinds `suffixes` names or
    could not be written, FileExistsError if it exists and `overwrite` is False."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        kinds = [SAMPLE_OUTPUTS[s] for s in suffixes]
        raise ValueError(f"{path}: use {', '.join(kinds[:-1])}{' or ' if len(kinds) > 1 else ''}"
                         f"{kinds[-1]}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    check_writable(path.parent)
    return path


def save_samples(path: Path, pieces: Iterable[np.ndarray], seeds: list[int], scale: int = 4,
                 **scalars) -> None:
    """Sampled images, atomically, by the suffix of `path`: a PNG grid (pixels scaled by
    `scale`), an .npz (uint8 [N, H, W, C] under "arr_0", as FID tools read it, with "seeds" and
    the integer `scalars`), or a folder with one PNG per seed named by it. `pieces` yields uint8
    [n, H, W, C] arrays in seed order; only the grid needs them all in memory at once."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        save_png(path, make_grid(np.concatenate(list(pieces)), scale=scale))
    elif suffix == ".npz":
        pieces = iter(pieces)
        first = next(pieces)                  # its shape gives the header's image shape
        stream = StreamedArray((len(seeds), *first.shape[1:]), np.uint8,
                               itertools.chain([first], pieces))
        # arr_0 first: the key npz evaluators (guided-diffusion's) read, and data.load_array's
        save_npz(path, arr_0=stream, seeds=np.asarray(seeds, np.int64),
                 **{k: np.int64(v) for k, v in scalars.items()})
    else:
        save_folder(path, (im for piece in pieces for im in piece),
                    names=[f"{s:06d}.png" for s in seeds])
