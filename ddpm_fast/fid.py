"""Fréchet Inception Distance (FID) between a set of samples and a reference set.

    ddpm-fast fid SAMPLES --ref REF [--inception-weights FILE] [--save-ref-stats OUT.npz]

The features are the 2048-d pool3 activations of the TF-FID Inception-v3 ("inception-2015-12-05",
the network of Heusel et al.'s TTUR code, pytorch-fid and guided-diffusion's evaluator), as
torch-fidelity's FeatureExtractorInceptionV3 computes them from uint8 images (it resizes to
299×299 like TensorFlow 1.x), so the numbers compare with papers'. torch-fidelity is an optional
dependency (`pip install "ddpm_fast[fid]"`), imported only when features must be computed.
Everything else is here: reading inputs, the statistics (mean and covariance of the features, in
float64) and the distance itself.

SAMPLES and REF may each be
- an .npz of uint8 images [N, H, W, C] under "arr_0" (guided-diffusion's layout, and ours) or
  "images" (our older sample files), or an .npy of such images;
- a folder of PNG/JPEG/BMP/WebP images (not searched recursively), all of one size;
- saved statistics: an .npz with "mu" [D] and "sigma" [D, D] (ours from --save-ref-stats, and
  pytorch-fid's or guided-diffusion's reference batches, which hold these keys too).
Grayscale images (C = 1, or single-channel image files) are repeated to 3 channels, as the
Inception network needs RGB: our shipped digits model samples 1-channel images.

The feature extractor is any callable uint8 [N, 3, H, W] → float [N, D] (tests use a stand-in);
its `name` attribute, when it has one, is saved with the statistics, and statistics of two
different named extractors are never compared.
"""
from __future__ import annotations

import argparse
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

# torch-fidelity's TF-FID Inception weights: the file name (torch.hub's cache name) and its URL,
# as in torch_fidelity/feature_extractor_inceptionv3.py (torch-fidelity 0.4.0).
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_WEIGHTS)
INCEPTION_NAME = "inception-v3-compat:2048"     # torch-fidelity's extractor name : feature layer
FID_EXTRA = 'pip install "ddpm_fast[fid]"'
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


class FidError(ValueError):
    """Bad input or a missing dependency, with a one-line message for the command line."""


# ---------------------------------------------------------------------- the distance

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """‖mu1 − mu2‖² + Tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½), the Fréchet distance of two
    Gaussians, computed as pytorch-fid (and TTUR) do: scipy.linalg.sqrtm of the product; if that
    is not finite (a singular product), eps is added to both diagonals and it is retried; an
    imaginary part from rounding is dropped when the diagonal's is within 1e-3 of 0."""
    try:
        from scipy import linalg
    except ImportError:
        raise FidError(f"the Fréchet distance needs scipy: {FID_EXTRA}") from None

    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise FidError(f"the feature dimensions differ: {mu1.shape[0]} and {mu2.shape[0]}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise FidError(f"covariances {sigma1.shape} and {sigma2.shape} do not fit means of "
                       f"{mu1.shape[0]} features")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: the covariance product is singular; adding {eps} to the diagonals",
                      stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FidError(f"FID: the matrix square root has an imaginary component of "
                           f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------- statistics

@dataclass
class Statistics:
    """Mean [D] and covariance [D, D] (float64) of a set's features; `feature_extractor` names
    the network (None when a file does not say, as pytorch-fid's do not)."""
    mu: np.ndarray
    sigma: np.ndarray
    feature_extractor: str | None = None
    num_images: int | None = None


def save_statistics(path: Path, stats: Statistics) -> None:
    """An .npz with "mu", "sigma", "feature_extractor" (and "num_images"), written atomically."""
    from .images import save_npz

    arrays = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64),
              "feature_extractor": np.array(stats.feature_extractor or "")}
    if stats.num_images is not None:
        arrays["num_images"] = np.int64(stats.num_images)
    save_npz(Path(path), **arrays)


def load_statistics(path: Path) -> Statistics:
    """Statistics from an .npz with "mu" and "sigma" (ours, pytorch-fid's, guided-diffusion's)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise FidError(f"{path}: no FID statistics (expected keys mu and sigma, found "
                               f"{', '.join(z.files) or 'none'})")
            mu, sigma = z["mu"], z["sigma"]
            name = str(z["feature_extractor"]) if "feature_extractor" in z.files else ""
            count = int(z["num_images"]) if "num_images" in z.files else None
    except FidError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise FidError(f"{path}: not a readable .npz file ({e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or \
            not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise FidError(f"{path}: mu must be float [D] and sigma float [D, D], got "
                       f"{mu.dtype} {tuple(mu.shape)} and {sigma.dtype} {tuple(sigma.shape)}")
    return Statistics(mu.astype(np.float64), sigma.astype(np.float64), name or None, count)


class _RunningMoments:
    """Mean and covariance of rows fed in batches, in float64, shifted by the first batch's mean
    (so the one-pass sums lose no precision) without holding every feature vector."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        if self.shift is None:
            self.shift = x.mean(0)
            self.s1 = np.zeros_like(self.shift)
            self.s2 = np.zeros((x.shape[1], x.shape[1]))
        d = x - self.shift
        self.n += x.shape[0]
        self.s1 += d.sum(0)
        self.s2 += d.T @ d

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.s1 / self.n
        sigma = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return self.shift + m, (sigma + sigma.T) / 2


# ---------------------------------------------------------------------- inputs

class ImageSet:
    """uint8 images [N, H, W, C] (C = 1 or 3) read in batches: from an .npz member (streamed
    from the zip, so 50,000 images are never in memory at once), an .npy, or a folder."""

    def __init__(self, path: Path, count: int, shape: tuple, batches):
        self.path, self.count, self.shape, self._batches = path, count, shape, batches

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        return self._batches(batch_size)


def _check_images(path, dtype, shape) -> None:
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
        raise FidError(f"{path}: expected uint8 images [N, H, W, C] with C = 1 or 3, got "
                       f"{np.dtype(dtype)} {tuple(shape)}")
    if shape[0] == 0:
        raise FidError(f"{path}: holds no images")


def _npz_images(path: Path, key: str) -> ImageSet:
    zf = zipfile.ZipFile(path)
    try:
        with zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
    finally:
        zf.close()
    _check_images(f"{path} ({key})", dtype, shape)
    if fortran:                      # rare; np.load makes it C-ordered in memory
        with np.load(path, allow_pickle=False) as z:
            return _array_images(path, np.ascontiguousarray(z[key]))

    def batches(batch_size):
        start = 0
        try:
            with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)(f)
                for start in range(0, shape[0], batch_size):
                    out = np.empty((min(batch_size, shape[0] - start), *shape[1:]), np.uint8)
                    if f.readinto(memoryview(out).cast("B")) != out.size:
                        raise EOFError("the file ends early")
                    yield out
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            if isinstance(e, FidError):
                raise
            raise FidError(f"{path}: {key} is unreadable after {start} images ({e})") from None

    return ImageSet(path, shape[0], tuple(shape[1:]), batches)


def _array_images(path: Path, arr: np.ndarray) -> ImageSet:
    _check_images(path, arr.dtype, arr.shape)

    def batches(batch_size):
        for start in range(0, arr.shape[0], batch_size):
            yield np.ascontiguousarray(arr[start:start + batch_size])

    return ImageSet(path, arr.shape[0], tuple(arr.shape[1:]), batches)


def _folder_images(path: Path) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FidError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")

    def read(f):       # as torch-fidelity reads files: grey (and palette, alpha) made RGB
        try:
            with Image.open(f) as im:
                return np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise FidError(f"{f}: not a readable image ({e})") from None

    size = read(files[0]).shape

    def batches(batch_size):
        for start in range(0, len(files), batch_size):
            out = [read(f) for f in files[start:start + batch_size]]
            for f, a in zip(files[start:], out):
                if a.shape != size:
                    raise FidError(f"{f}: {a.shape[1]}×{a.shape[0]} pixels, but {files[0].name} "
                                   f"has {size[1]}×{size[0]}: all images must have one size")
            yield np.stack(out)

    return ImageSet(path, len(files), size, batches)


def open_input(path) -> ImageSet | Statistics:
    """What a SAMPLES or REF argument names: images, or saved statistics (an .npz with mu and
    sigma; these win when a file holds images too, as guided-diffusion's reference batches do)."""
    path = Path(path)
    if path.is_dir():
        return _folder_images(path)
    if not path.is_file():
        raise FidError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise FidError(f"{path}: not a readable .npy file ({e})") from None
        return _array_images(path, arr)
    try:
        with zipfile.ZipFile(path) as zf:
            files = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise FidError(f"{path}: not an .npz/.npy file or a folder of images ({e})") from None
    if "mu" in files and "sigma" in files:
        return load_statistics(path)
    from .images import samples_key

    try:
        key = samples_key(files)
    except ValueError as e:
        raise FidError(f"{path}: {e}") from None
    try:
        return _npz_images(path, key)
    except FidError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise FidError(f"{path}: {key} is not a readable array ({e})") from None


def _extractor_name(fn) -> str | None:
    return getattr(fn, "name", None)


def compute_statistics(images: ImageSet, feature_extractor: FeatureExtractor,
                       batch_size: int = 64, desc: str | None = None) -> Statistics:
    """Feature statistics of an image set: batches of uint8 [n, 3, H, W] (1 channel repeated to
    3) through `feature_extractor`, which returns [n, D]."""
    from tqdm import tqdm

    if images.count < 2:
        raise FidError(f"{images.path}: {images.count} image; a covariance needs at least 2")
    moments = _RunningMoments()
    with tqdm(total=images.count, desc=desc or str(images.path), unit="img", disable=None,
              file=sys.stderr) as bar:
        for batch in images.batches(batch_size):
            batch = batch if batch.flags.writeable else np.array(batch)    # .npy memory maps
            x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            with torch.inference_mode():
                f = feature_extractor(x.contiguous())
            f = f.detach().to("cpu", torch.float64).numpy() if torch.is_tensor(f) \
                else np.asarray(f, np.float64)
            if f.ndim != 2 or f.shape[0] != x.shape[0]:
                raise FidError(f"the feature extractor returned {tuple(f.shape)} for "
                               f"{x.shape[0]} images; expected [N, D]")
            moments.add(f)
            bar.update(x.shape[0])
    mu, sigma = moments.result()
    return Statistics(mu, sigma, _extractor_name(feature_extractor), images.count)


# ---------------------------------------------------------------------- Inception (torch-fidelity)

class InceptionFeatures:
    """torch-fidelity's TF-FID Inception-v3, pool3 (2048) features of uint8 [N, 3, H, W]."""
    name = INCEPTION_NAME

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device))[0]


def inception_weights_path(weights: Path | None) -> Path:
    """The weights file to load: the given one (which must exist), else torch.hub's cached copy
    of torch-fidelity's file, downloaded there if missing. One-line FidError when it cannot be."""
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise FidError(f"--inception-weights {weights}: no such file (torch-fidelity's "
                           f"{INCEPTION_WEIGHTS}, from {INCEPTION_URL})")
        return weights
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
        except Exception as e:        # no network, proxy, HTTP error: all one message
            raise FidError(f"the Inception weights {INCEPTION_WEIGHTS} are not in {cached.parent} "
                           f"and could not be downloaded ({type(e).__name__}: {e}); fetch "
                           f"{INCEPTION_URL} elsewhere and pass --inception-weights FILE") from None
    return cached


def inception_extractor(weights: Path | None = None, device="cpu") -> InceptionFeatures:
    """torch-fidelity's FeatureExtractorInceptionV3 (2048-d pool3) on `device`, loaded from
    `weights` (offline) or torch.hub's cache (downloaded once)."""
    if weights is not None:
        inception_weights_path(weights)          # a missing file is named before anything else
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as e:        # ImportError, or torchvision failing to load its operators
        raise FidError(f"Inception features need torch-fidelity ({type(e).__name__}: {e}): "
                       f"{FID_EXTRA}") from None
    path = inception_weights_path(weights)
    try:                    # torch-fidelity loads a given path with weights_only=False: refuse
        torch.load(path, map_location="cpu", weights_only=True)   # anything but plain tensors
    except Exception as e:
        raise FidError(f"{path}: not a plain PyTorch state dict of tensors ({e})".splitlines()[0]
                       ) from None
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(path))
    except Exception as e:
        raise FidError(f"{path}: not torch-fidelity's Inception weights ({e})".splitlines()[0]
                       ) from None
    return InceptionFeatures(model.to(device).eval(), torch.device(device))


# ---------------------------------------------------------------------- the command

def fid(samples, ref, feature_extractor: FeatureExtractor | None = None, *,
        inception_weights: Path | None = None, save_ref_stats: Path | None = None,
        batch_size: int = 64, device="cpu") -> float:
    """FID between two inputs (see the module docstring); the Inception extractor is built only
    when images must be read and no `feature_extractor` is given."""
    if batch_size < 1:
        raise FidError(f"--batch-size must be at least 1, got {batch_size}")
    sets = {"ref": open_input(ref), "samples": open_input(samples)}   # both checked first
    if feature_extractor is None and any(isinstance(s, ImageSet) for s in sets.values()):
        feature_extractor = inception_extractor(inception_weights, device)
    # features of another extractor are refused before minutes of feature extraction
    names = {str(label): s.feature_extractor for label, s in sets.items()
             if isinstance(s, Statistics) and s.feature_extractor}
    if feature_extractor is not None and any(isinstance(s, ImageSet) for s in sets.values()) \
            and _extractor_name(feature_extractor):
        names["images"] = _extractor_name(feature_extractor)
    if len(set(names.values())) > 1:
        raise FidError(f"features of different extractors are not comparable: {names}")
    stats = {}
    for label, s in sets.items():
        stats[label] = s if isinstance(s, Statistics) else \
            compute_statistics(s, feature_extractor, batch_size, desc=f"{label} features")
        if label == "ref" and save_ref_stats is not None:
            save_statistics(Path(save_ref_stats), stats["ref"])
    a, b = stats["samples"], stats["ref"]
    if a.mu.shape != b.mu.shape:
        raise FidError(f"the feature dimensions differ: {samples} has {a.mu.shape[0]}, "
                       f"{ref} has {b.mu.shape[0]}")
    if a.feature_extractor and b.feature_extractor and a.feature_extractor != b.feature_extractor:
        raise FidError(f"{samples} has features of {a.feature_extractor!r}, {ref} of "
                       f"{b.feature_extractor!r}: not comparable")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="ddpm-fast fid", description="Fréchet Inception Distance (TF-FID Inception-v3 pool3 "
        "features, via torch-fidelity) between samples and a reference set.")
    p.add_argument("samples", help="an .npz (uint8 NHWC under arr_0 or images), .npy, a folder "
                   "of PNG/JPEG images, or saved statistics (.npz with mu, sigma)")
    p.add_argument("--ref", required=True, help="the reference set, in any of the same forms")
    p.add_argument("--inception-weights", type=Path, default=None, metavar="FILE",
                   help=f"torch-fidelity's {INCEPTION_WEIGHTS} (offline machines); without it "
                   "torch.hub's cache is used and filled from the network")
    p.add_argument("--save-ref-stats", type=Path, default=None, metavar="OUT.npz",
                   help="save the reference statistics (mu, sigma) for reuse as --ref")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


def main(argv=None, *, feature_extractor: FeatureExtractor | None = None) -> int:
    """`python -m ddpm_fast.fid ...`: prints "FID: <value>" and returns 0, or prints one line
    "ddpm-fast fid: error: ..." and returns 2, as every ddpm-fast command does on bad input
    (argparse's usage errors: 2 too, --help: 0).
    `feature_extractor` replaces Inception (tests)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:          # --help (0) or a bad flag (2, one line already printed)
        return int(e.code or 0)
    try:
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise FidError(f"--device {args.device}: {e}".splitlines()[0]) from None
        value = fid(args.samples, args.ref, feature_extractor,
                    inception_weights=args.inception_weights,
                    save_ref_stats=args.save_ref_stats, batch_size=args.batch_size,
                    device=device)
    except FidError as e:
        print(f"ddpm-fast fid: error: {e}", file=sys.stderr)
        return 2
    print(f"FID: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
