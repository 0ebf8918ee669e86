"""FID (ddpm_fast.fid): the Fréchet distance against its closed form, statistics from every input
layout through a stand-in feature extractor, saved statistics, and main()'s one-line errors.
Real Inception features need torch-fidelity (not installable beside the CPU torch here): its
plumbing is checked with a fake torch_fidelity module."""
import hashlib
import json
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast import fid as F
from ddpm_fast.distributed import ShardStore

D = 6


class StandIn:
    """uint8 [N, 3, H, W] → [N, D]: a fixed random projection of the pixels, squashed."""
    name = "stand-in"

    def __init__(self, seed=0):
        self.seed, self.w = seed, None

    def __call__(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        flat = x.flatten(1).double() / 255
        if self.w is None:
            g = torch.Generator().manual_seed(self.seed)
            self.w = torch.randn(flat.shape[1], D, generator=g, dtype=torch.float64)
        return torch.tanh(flat @ self.w / flat.shape[1] ** 0.5)


def _images(seed, n=40, c=3, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, c), dtype=np.uint8)


def _run(capsys, *argv, extractor=None):
    code = F.main([str(a) for a in argv], feature_extractor=extractor)
    out, err = capsys.readouterr()
    return code, out, err


def _error(capsys, *argv, extractor=None):
    code, out, err = _run(capsys, *argv, extractor=extractor)
    assert code == 2 and out == "", (out, err)
    assert err.startswith("ddpm-fast fid: error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------------- the distance

@pytest.mark.filterwarnings("ignore:Matrix is singular")     # scipy's, for the zero variances
def test_frechet_distance_matches_the_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    s1, s2 = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = F.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)
    # rotating both Gaussians by one orthogonal matrix leaves the distance unchanged
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    rotated = F.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)
    # singular covariances (a zero variance) still give the closed form
    s1[0] = s2[1] = 0
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = F.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, abs=1e-6)


def test_frechet_distance_refuses_other_dimensions():
    with pytest.raises(F.FidError, match="feature dimensions differ: 3 and 4"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_identical_sets_give_zero(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", arr_0=_images(1))
    code, out, err = _run(capsys, tmp_path / "a.npz", "--ref", tmp_path / "a.npz",
                          extractor=StandIn())
    assert code == 0, err
    assert out.startswith("FID: ") and abs(float(out.split()[1])) <= 1e-6
    stats = F.compute_statistics(F.open_input(tmp_path / "a.npz"), StandIn(), batch_size=7)
    assert abs(F.frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)) <= 1e-6


# ---------------------------------------------------------------------- inputs and statistics

def test_statistics_equal_numpy_mean_and_cov_in_any_batching(tmp_path):
    images = _images(2, n=50)
    np.savez(tmp_path / "a.npz", arr_0=images, seeds=np.arange(50))
    feats = StandIn()(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    for batch in (1, 7, 64):
        s = F.compute_statistics(F.open_input(tmp_path / "a.npz"), StandIn(), batch_size=batch)
        assert s.num_images == 50 and s.feature_extractor == "stand-in"
        np.testing.assert_allclose(s.mu, feats.mean(0), rtol=0, atol=1e-13)
        np.testing.assert_allclose(s.sigma, np.cov(feats, rowvar=False), rtol=0, atol=1e-13)


def test_every_layout_gives_the_same_fid(tmp_path, capsys):
    samples, ref = _images(3), _images(4)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "new.npz", arr_0=samples, seeds=np.arange(40))   # ours, guided-diffusion
    np.savez(tmp_path / "old.npz", images=samples, seeds=np.arange(40))  # our older layout
    np.savez_compressed(tmp_path / "zipped.npz", arr_0=samples)
    np.save(tmp_path / "plain.npy", samples)
    (tmp_path / "png").mkdir()
    for i, im in enumerate(samples):
        Image.fromarray(im).save(tmp_path / "png" / f"{i:06d}.png")
    values = set()
    for name in ("new.npz", "old.npz", "zipped.npz", "plain.npy", "png"):
        code, out, err = _run(capsys, tmp_path / name, "--ref", tmp_path / "ref.npz",
                              "--batch-size", 16, extractor=StandIn())
        assert code == 0, err
        values.add(out)
    assert len(values) == 1 and float(values.pop().split()[1]) > 0


def test_grey_images_are_repeated_to_three_channels(tmp_path):
    grey = _images(5, c=1)
    np.savez(tmp_path / "grey.npz", arr_0=grey)
    np.savez(tmp_path / "rgb.npz", arr_0=np.repeat(grey, 3, axis=3))
    (tmp_path / "png").mkdir()
    for i, im in enumerate(grey):
        Image.fromarray(im[..., 0], mode="L").save(tmp_path / "png" / f"{i:03d}.png")
    a, b, c = (F.compute_statistics(F.open_input(tmp_path / p), StandIn())
               for p in ("grey.npz", "rgb.npz", "png"))
    assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma)
    assert np.array_equal(a.mu, c.mu) and np.array_equal(a.sigma, c.sigma)


def test_saved_reference_statistics_round_trip_and_reuse(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=_images(6))
    np.savez(tmp_path / "ref.npz", arr_0=_images(7))
    code, first, err = _run(capsys, tmp_path / "s.npz", "--ref", tmp_path / "ref.npz",
                            "--save-ref-stats", tmp_path / "stats" / "ref-stats.npz",
                            extractor=StandIn())
    assert code == 0, err
    saved = F.load_statistics(tmp_path / "stats" / "ref-stats.npz")
    direct = F.compute_statistics(F.open_input(tmp_path / "ref.npz"), StandIn())
    assert saved.mu.dtype == saved.sigma.dtype == np.float64
    assert saved.sigma.shape == (D, D) and saved.feature_extractor == "stand-in"
    assert np.array_equal(saved.mu, direct.mu) and np.array_equal(saved.sigma, direct.sigma)
    with np.load(tmp_path / "stats" / "ref-stats.npz") as z:
        assert {"mu", "sigma", "feature_extractor"} <= set(z.files)
    code, again, err = _run(capsys, tmp_path / "s.npz", "--ref",
                            tmp_path / "stats" / "ref-stats.npz", extractor=StandIn())
    assert code == 0 and again == first
    # stats on both sides need no feature extractor at all
    F.save_statistics(tmp_path / "s-stats.npz",
                      F.compute_statistics(F.open_input(tmp_path / "s.npz"), StandIn()))
    code, both, err = _run(capsys, tmp_path / "s-stats.npz", "--ref",
                           tmp_path / "stats" / "ref-stats.npz")
    assert code == 0 and both == first


# ---------------------------------------------------------------------- main()'s errors

def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    np.savez(tmp_path / "ok.npz", arr_0=_images(8))
    ok = tmp_path / "ok.npz"
    (tmp_path / "empty").mkdir()
    assert "no such file or folder" in _error(capsys, tmp_path / "nope.npz", "--ref", ok,
                                              extractor=StandIn())
    assert "empty: no images" in _error(capsys, ok, "--ref", tmp_path / "empty",
                                        extractor=StandIn())
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8))
    err = _error(capsys, tmp_path / "nchw.npz", "--ref", ok, extractor=StandIn())
    assert "expected uint8 images [N, H, W, C] with C = 1 or 3, got uint8 (4, 3, 8, 8)" in err
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 8, 8, 3), np.float32))
    assert "got float32 (4, 8, 8, 3)" in _error(capsys, tmp_path / "float.npz", "--ref", ok,
                                                extractor=StandIn())
    np.savez(tmp_path / "none.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    assert "holds no images" in _error(capsys, tmp_path / "none.npz", "--ref", ok,
                                       extractor=StandIn())
    np.savez(tmp_path / "other.npz", x=np.zeros((4, 8, 8, 3), np.uint8))
    assert "no images under 'arr_0' or 'images' (keys: x)" in _error(
        capsys, tmp_path / "other.npz", "--ref", ok, extractor=StandIn())
    (tmp_path / "text.npz").write_text("hello")
    assert "not an .npz/.npy file" in _error(capsys, tmp_path / "text.npz", "--ref", ok,
                                             extractor=StandIn())
    np.savez(tmp_path / "one.npz", arr_0=_images(9, n=1))
    assert "a covariance needs at least 2" in _error(capsys, tmp_path / "one.npz", "--ref", ok,
                                                     extractor=StandIn())
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "mixed" / "b.png")
    assert "b.png: 9×8 pixels, but a.png has 8×8" in _error(
        capsys, tmp_path / "mixed", "--ref", ok, extractor=StandIn())


def test_usage_errors_return_2(tmp_path, capsys):
    code, out, err = _run(capsys, tmp_path / "s.npz")
    assert code == 2 and "the following arguments are required: --ref" in err


def test_statistics_that_do_not_compare(tmp_path, capsys):
    F.save_statistics(tmp_path / "d6.npz", F.Statistics(np.zeros(6), np.eye(6), "x"))
    F.save_statistics(tmp_path / "d4.npz", F.Statistics(np.zeros(4), np.eye(4), "x"))
    F.save_statistics(tmp_path / "y6.npz", F.Statistics(np.zeros(6), np.eye(6), "y"))
    err = _error(capsys, tmp_path / "d6.npz", "--ref", tmp_path / "d4.npz")
    assert "the feature dimensions differ" in err and "has 6" in err and "has 4" in err
    assert "not comparable" in _error(capsys, tmp_path / "d6.npz", "--ref", tmp_path / "y6.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(6), sigma=np.eye(5))
    assert "mu must be float [D] and sigma float [D, D]" in _error(
        capsys, tmp_path / "d6.npz", "--ref", tmp_path / "bad.npz")


def test_missing_weights_file_is_named(tmp_path, capsys):
    np.savez(tmp_path / "ok.npz", arr_0=_images(10))
    err = _error(capsys, tmp_path / "ok.npz", "--ref", tmp_path / "ok.npz",
                 "--inception-weights", tmp_path / "nowhere.pth")
    assert "nowhere.pth: no such file" in err and F.INCEPTION_WEIGHTS in err


def test_missing_torch_fidelity_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)      # import fails as if absent
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    np.savez(tmp_path / "ok.npz", arr_0=_images(11))
    err = _error(capsys, tmp_path / "ok.npz", "--ref", tmp_path / "ok.npz")
    assert "need torch-fidelity" in err and 'pip install "ddpm_fast[fid]"' in err


class FakeInception(torch.nn.Module):
    """Stands for torch_fidelity's FeatureExtractorInceptionV3: same constructor and output."""
    calls = []

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        FakeInception.calls.append((name, features_list, feature_extractor_weights_path))
        state = torch.load(feature_extractor_weights_path, weights_only=True)
        self.w = torch.nn.Parameter(state["w"])

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return (torch.tanh(x.flatten(1).float() / 255 @ self.w),)


@pytest.fixture
def fake_torch_fidelity(monkeypatch, tmp_path):
    pkg = types.ModuleType("torch_fidelity")
    mod = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    mod.FeatureExtractorInceptionV3 = FakeInception
    pkg.feature_extractor_inceptionv3 = mod
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", mod)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    FakeInception.calls.clear()


def test_no_weights_and_no_network_names_the_weights_file(tmp_path, capsys, monkeypatch,
                                                          fake_torch_fidelity):
    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    np.savez(tmp_path / "ok.npz", arr_0=_images(12))
    err = _error(capsys, tmp_path / "ok.npz", "--ref", tmp_path / "ok.npz")
    assert F.INCEPTION_WEIGHTS in err and "could not be downloaded" in err
    assert "--inception-weights FILE" in err and F.INCEPTION_URL in err


def test_inception_plumbing_with_local_weights(tmp_path, capsys, fake_torch_fidelity):
    weights = tmp_path / "w.pth"
    torch.save({"w": torch.randn(8 * 8 * 3, D, generator=torch.Generator().manual_seed(0))},
               weights)
    np.savez(tmp_path / "s.npz", arr_0=_images(13))
    np.savez(tmp_path / "r.npz", arr_0=_images(14))
    code, out, err = _run(capsys, tmp_path / "s.npz", "--ref", tmp_path / "r.npz",
                          "--inception-weights", weights, "--device", "cpu",
                          "--save-ref-stats", tmp_path / "ref-stats.npz")
    assert code == 0, err
    assert FakeInception.calls == [("inception-v3-compat", ["2048"], str(weights))]
    assert F.load_statistics(tmp_path / "ref-stats.npz").feature_extractor == F.INCEPTION_NAME
    # a cached copy in torch.hub's folder is used without --inception-weights
    cached = tmp_path / "hub" / "checkpoints" / F.INCEPTION_WEIGHTS
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights.read_bytes())
    code, again, err = _run(capsys, tmp_path / "s.npz", "--ref", tmp_path / "ref-stats.npz")
    assert code == 0 and again == out, err
    # statistics of another extractor are refused against Inception statistics
    F.save_statistics(tmp_path / "other.npz", F.Statistics(np.zeros(D), np.eye(D), "stand-in"))
    assert "not comparable" in _error(capsys, tmp_path / "s.npz", "--ref", tmp_path / "other.npz")


def test_weights_that_are_not_plain_tensors_are_refused(tmp_path, capsys, fake_torch_fidelity):
    weights = tmp_path / "evil.pth"
    torch.save({"w": types.SimpleNamespace(a=1)}, weights)     # needs a pickle global to load
    np.savez(tmp_path / "ok.npz", arr_0=_images(15))
    err = _error(capsys, tmp_path / "ok.npz", "--ref", tmp_path / "ok.npz",
                 "--inception-weights", weights)
    assert "evil.pth: not a plain PyTorch state dict of tensors" in err
    assert FakeInception.calls == []


# ---------------------------------------------------------------------- the sample file layout

def test_shard_merge_reads_new_and_old_shards(tmp_path):
    """Shards are written under arr_0; a resumed run still reads shards written under images."""
    store = ShardStore(tmp_path / "parts", {"run": 1})
    store.create()
    new = store.write([0, 1], np.full((2, 2, 2, 1), 7, np.uint8))
    with np.load(new) as z:
        assert z.files[0] == "arr_0" and z["arr_0"].shape == (2, 2, 2, 1)
    import io

    buf = io.BytesIO()
    np.savez(buf, images=np.full((2, 2, 2, 1), 9, np.uint8), seeds=np.array([2, 3], np.int64))
    old = tmp_path / "parts" / "shard-0000000002-000002.npz"
    old.write_bytes(buf.getvalue())
    old.with_suffix(".json").write_text(json.dumps(
        {"seeds": [2, 3], "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}))
    merged = np.concatenate(list(store.iter_images([0, 1, 2, 3])))
    assert [int(im[0, 0, 0]) for im in merged] == [7, 7, 9, 9]
