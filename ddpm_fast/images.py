"""Image output: uint8 conversion, grids, and atomic PNG / NPZ / folder writes."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from .checkpoints import atomic_dir, atomic_write_bytes


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-space [-1, 1] images [B, C, H, W] → uint8 [B, H, W, C] (as diffusers rounds them)."""
    image = (x.detach().float().cpu() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (image * 255).round().astype(np.uint8)


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


def save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def save_folder(path: Path, images: np.ndarray, names=None) -> None:
    """One PNG per image (named 000000.png, … or by `names`), written into a temporary folder
    that is renamed into place."""
    names = names or [f"{i:06d}.png" for i in range(len(images))]
    with atomic_dir(path) as tmp:
        for name, im in zip(names, images):
            (tmp / name).write_bytes(png_bytes(im))
