"""Training and evaluation data: the built-in digits, `.npz`/`.npy` arrays and folders of images.

Every loader returns a float32 tensor [N, C, H, W] in model space [-1, 1], or with
as_uint8=True (arrays and folders) the uint8 pixels [N, C, H, W], a quarter of the memory, for
to_model_space to convert a batch at a time; each raises ValueError with one line naming the
file and the problem before any work is done.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .images import to_model_space, unit_to_model

# The last DIGITS_HELD_OUT of scikit-learn's 1,797 digits are never trained on: bits/dim and the
# figures' "real images" come from them, so reported likelihoods are held-out numbers.
DIGITS_HELD_OUT = 297
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def digits_dataset(size: int = 8, split: str = "all") -> torch.Tensor:
    """scikit-learn's 1,797 real 8×8 handwritten digits in [-1, 1], resized: [N, 1, size, size].
    split: "train" (the first 1,500), "test" (the held-out last 297) or "all"."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be train, test or all, got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("the digits data set needs scikit-learn: pip install scikit-learn") from None

    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    if split == "train":
        x = x[:-DIGITS_HELD_OUT]
    elif split == "test":
        x = x[-DIGITS_HELD_OUT:]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return unit_to_model(x.clamp(0, 1)).contiguous()


def from_nhwc_uint8(images: np.ndarray, as_uint8: bool = False) -> torch.Tensor:
    """uint8 [N, H, W, C] → [N, C, H, W]: uint8 pixels, or float32 in model space."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.contiguous() if as_uint8 else to_model_space(x)


def load_array(path: Path, as_uint8: bool = False) -> torch.Tensor:
    """uint8 images [N, H, W, C] from an .npy or the first array of an .npz (the layout FID tools
    and our own `sample --out x.npz` use)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz/.npy array file ({e})") from None
    if hasattr(arr, "files"):
        if not arr.files:
            raise ValueError(f"{path}: the .npz holds no arrays")
        arr = arr[arr.files[0]]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] not in (1, 3):
        raise ValueError(f"{path}: expected uint8 images [N, H, W, C] with C = 1 or 3, got "
                         f"{arr.dtype} {tuple(arr.shape)}")
    return from_nhwc_uint8(arr, as_uint8)


def _square(image, size: int):
    """Centre-crop to a square, then resize to size×size (Lanczos when shrinking)."""
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS if side > size
                             else Image.Resampling.BICUBIC)
    return image


def load_image_folder(path: Path, size: int, channels: int = 3, as_uint8: bool = False
                      ) -> torch.Tensor:
    """Every PNG/JPEG/BMP/WebP under `path` (recursively, sorted by name), centre-cropped and
    resized to size×size, as grey (channels=1) or RGB (channels=3)."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    out = np.empty((len(files), size, size, channels), np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = _square(im.convert("L" if channels == 1 else "RGB"), size)
                out[i] = np.asarray(im).reshape(size, size, channels)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{f}: not a readable image ({e})") from None
    return from_nhwc_uint8(out, as_uint8)


def load_dataset(spec: str, size: int | None = None, channels: int | None = None,
                 split: str = "all", as_uint8: bool = False) -> torch.Tensor:
    """'digits' (split applies), an .npz/.npy of uint8 images, or a folder of images (resized to
    `size`, default 32, with `channels`, default 3). Arrays and the digits must already have the
    `channels` asked for, and arrays the `size`. as_uint8 keeps arrays and folders as uint8
    pixels (the digits, 17 grey levels scaled, are always float)."""
    if spec == "digits":
        if channels not in (None, 1):
            raise ValueError(f"the digits are single-channel, expected {channels} channels")
        return digits_dataset(size or 8, split)
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path, size or 32, channels or 3, as_uint8)
    if not path.is_file():
        raise ValueError(f"data {spec!r}: not 'digits', an existing .npz/.npy file or a folder")
    if path.suffix.lower() not in (".npz", ".npy"):
        raise ValueError(f"{path}: expected an .npz/.npy array file or a folder of images")
    data = load_array(path, as_uint8)
    if size is not None and data.shape[2:] != (size, size):
        raise ValueError(f"{path}: images are {data.shape[2]}×{data.shape[3]}, expected "
                         f"{size}×{size}")
    if channels is not None and data.shape[1] != channels:
        raise ValueError(f"{path}: images have {data.shape[1]} channels, expected {channels}")
    return data
