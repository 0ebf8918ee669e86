"""Sample-quality gate for digit models: a classifier trained on the real digits scores samples.

Scores (higher is better except the distance):
  confident   fraction of samples the classifier labels with probability ≥ 0.9
  entropy     entropy (bits) of the predicted-label histogram: log2(10) ≈ 3.32 when all ten
              digits appear equally, 0 when every sample is the same digit
  frechet     Fréchet distance between Gaussians fitted to the classifier's logits of the samples
              and of the real digits (an FID analogue for 8×8 digits)
The real digits' own scores are the ceiling (`real_scores()`).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class QualityScores:
    confident: float
    entropy: float
    frechet: float

    def as_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def _classifier():
    try:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ValueError("the quality gate needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    x = digits.data / 16.0
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(x, digits.target)
    return clf, x


def _features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 8, 8(, 1)] or float [N, 64] in [0, 1] → classifier inputs [N, 64]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float64) / 255.0
    flat = images.reshape(images.shape[0], -1)
    if flat.shape[1] != 64:
        raise ValueError(f"digit samples must be 8×8 single-channel, got {images.shape[1:]}")
    return flat


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def score(images) -> QualityScores:
    clf, real = _classifier()
    x = _features(images)
    probs = clf.predict_proba(x)
    labels = probs.argmax(1)
    hist = np.bincount(labels, minlength=10) / len(labels)
    nz = hist[hist > 0]
    return QualityScores(
        confident=float((probs.max(1) >= 0.9).mean()),
        entropy=float(-(nz * np.log2(nz)).sum()),
        frechet=_frechet(clf.decision_function(x), clf.decision_function(real)),
    )


def real_scores(n: int = 512, seed: int = 0) -> QualityScores:
    """The ceiling: n real digits (a random subset) scored the same way."""
    clf, real = _classifier()
    idx = np.random.default_rng(seed).choice(len(real), size=n, replace=False)
    return score(real[idx])
