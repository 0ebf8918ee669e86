"""Image outputs: the streamed .npz writer and the shard merge that feeds it."""
import numpy as np
import pytest
import torch

from ddpm_fast.distributed import ShardStore
from ddpm_fast.images import (StreamedArray, model_to_unit, save_folder, save_npz, to_model_space,
                              to_uint8, unit_to_model, unit_to_uint8)


def test_pixel_conversions_round_trip_every_level():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_space(u8)
    assert (x.min(), x.max()) == (-1, 1)
    assert np.array_equal(to_uint8(x), u8.permute(0, 2, 3, 1).numpy())     # uint8 NHWC again
    assert np.array_equal(unit_to_uint8(model_to_unit(x)), to_uint8(x))     # the same path
    assert torch.allclose(unit_to_model(model_to_unit(x)), x, rtol=0, atol=1e-6)
    assert to_uint8(torch.tensor([-3.0, 3.0]).reshape(1, 1, 1, 2)).ravel().tolist() == [0, 255]


def _pieces(images, size):
    return (images[i:i + size] for i in range(0, len(images), size))


def test_streamed_npz_reads_like_np_savez(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
    seeds = np.arange(100, 110, dtype=np.int64)
    save_npz(tmp_path / "s.npz", images=StreamedArray(images.shape, np.uint8, _pieces(images, 3)),
             seeds=seeds, seed=np.int64(7))
    np.savez(tmp_path / "ref.npz", images=images, seeds=seeds, seed=np.int64(7))
    with np.load(tmp_path / "s.npz") as got, np.load(tmp_path / "ref.npz") as ref:
        assert sorted(got.files) == sorted(ref.files)
        for name in ref.files:
            assert got[name].dtype == ref[name].dtype and np.array_equal(got[name], ref[name])


@pytest.mark.parametrize("rows, shape, message", [
    (9, (4, 5, 3), "9 rows written, the header says 10"),
    (10, (4, 5, 1), "does not fit"),
])
def test_streamed_npz_that_does_not_fit_leaves_nothing(tmp_path, rows, shape, message):
    images = np.zeros((rows, *shape), np.uint8)
    with pytest.raises(ValueError, match=message):
        save_npz(tmp_path / "s.npz",
                 images=StreamedArray((10, 4, 5, 3), np.uint8, _pieces(images, 4)))
    assert list(tmp_path.iterdir()) == []


def test_folder_from_a_generator_needs_one_name_per_image(tmp_path):
    images = np.zeros((3, 2, 2, 3), np.uint8)
    save_folder(tmp_path / "ok", iter(images), ["a.png", "b.png", "c.png"])
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["a.png", "b.png", "c.png"]
    with pytest.raises(ValueError):
        save_folder(tmp_path / "bad", iter(images), ["a.png", "b.png"])
    assert not (tmp_path / "bad").exists()


def test_shard_merge_streams_in_seed_order(tmp_path, monkeypatch):
    """iter_images yields the requested order in pieces and holds one shard at a time."""
    store = ShardStore(tmp_path / "parts", {"run": 1})
    store.create()
    images = {s: np.full((2, 2, 1), s, np.uint8) for s in range(10)}
    for shard in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9]):
        store.write(shard, np.stack([images[s] for s in shard]))
    loads = []
    original_load = np.load
    monkeypatch.setattr(np, "load", lambda f, *a, **k: loads.append(f) or original_load(f, *a, **k))
    order = [9, 8, 0, 1, 2, 3, 4, 5]
    pieces = list(store.iter_images(order, piece=3))
    assert [len(p) for p in pieces] == [3, 3, 2]
    assert [int(im[0, 0, 0]) for p in pieces for im in p] == order
    assert len(loads) == 3                     # each shard read once, in turn
    with pytest.raises(ValueError, match="no finished shard"):
        store.iter_images([0, 10])
