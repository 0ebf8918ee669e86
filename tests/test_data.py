"""Data loaders: the digits split, arrays and image folders, and one-line errors for bad data."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import DIGITS_HELD_OUT, digits_dataset, load_dataset, to_model_space

pytest.importorskip("sklearn")


def test_digits_split_is_disjoint_and_complete():
    train, test, full = (digits_dataset(8, s) for s in ("train", "test", "all"))
    assert test.shape[0] == DIGITS_HELD_OUT and train.shape[0] + test.shape[0] == 1797
    assert torch.equal(torch.cat([train, test]), full)
    assert full.min() >= -1 and full.max() <= 1 and digits_dataset(16).shape[2:] == (16, 16)


def test_npz_roundtrip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=images)
    x = load_dataset(str(tmp_path / "x.npz"), size=8, channels=3)
    assert x.shape == (5, 3, 8, 8)
    back = ((x + 1) * 127.5).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert np.array_equal(back, images)



@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_uint8_storage_converts_to_the_float_load(tmp_path, kind):
    """as_uint8 keeps the pixels (a quarter of float32's memory, for training on large sets);
    to_model_space gives exactly what the float loader gives."""
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    if kind == "npz":
        np.savez(tmp_path / "x.npz", images=images)
        spec = str(tmp_path / "x.npz")
    else:
        for i, im in enumerate(images):
            Image.fromarray(im).save(tmp_path / f"{i}.png")
        spec = str(tmp_path)
    stored = load_dataset(spec, size=8, channels=3, as_uint8=True)
    assert stored.dtype == torch.uint8 and stored.shape == (4, 3, 8, 8)
    assert torch.equal(to_model_space(stored), load_dataset(spec, size=8, channels=3))
    digits = digits_dataset(8, "test")
    assert to_model_space(digits) is digits                       # float passes through


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 8, 8, 3), np.float32), "expected uint8 images"),
    (np.zeros((8, 8, 3), np.uint8), "expected uint8 images"),
    (np.zeros((2, 8, 8, 2), np.uint8), "C = 1 or 3"),
])
def test_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(ValueError, match=message):
        load_dataset(str(tmp_path / "a.npy"))


def test_array_size_mismatch(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="images are 8×8, expected 16×16"):
        load_dataset(str(tmp_path / "a.npy"), size=16)


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a readable"):
        load_dataset(str(tmp_path / "a.npy"))


def test_image_folder_crops_and_resizes(tmp_path):
    im = np.zeros((20, 40, 3), np.uint8)
    im[:, 10:30] = 255                       # a white centre square on a wide black image
    Image.fromarray(im).save(tmp_path / "wide.png")
    Image.fromarray(np.full((9, 9), 128, np.uint8)).save(tmp_path / "grey.jpg", quality=100)
    x = load_dataset(str(tmp_path), size=8, channels=1)
    assert x.shape == (2, 1, 8, 8)
    grey, wide = x                           # sorted by name: grey.jpg, wide.png
    assert wide.min() > 0.9                  # the centre crop is all white
    assert abs(grey.mean().item()) < 0.05


def test_unreadable_image(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        load_dataset(str(tmp_path), size=8)
