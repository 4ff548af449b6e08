"""ROC and precision-recall curves for the evaluation plots (numpy only; the figures are in ``scorer.plots``).

Image-level curves are exact: one point per distinct score. Pixel-level curves come from a
:class:`ScoreHistogram`, because a category pools tens of millions of pixel scores over every
method, K and seed and the maps of one run are dropped before the next is scored. The
histogram keeps two arrays of bin counts per run instead, so a curve has at most ``bins``
points and ties within a bin are treated as one threshold. The reported metrics never come
from here: ``scorer.metrics`` computes them exactly from the full maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inspection_core.errors import ConfigError

__all__ = ["Curves", "ScoreHistogram", "image_curves", "PIXEL_BINS"]

PIXEL_BINS = 2048  # bins over a run's observed pixel-score range: smooth curves, 32 KiB per run
_CHUNK = 1 << 22  # pixels binned per step, so the temporaries stay small on big splits


@dataclass(frozen=True)
class Curves:
    """ROC and PR points; a curve is ``None`` where it is undefined (ROC: one class only, PR: no positive)."""

    fpr: np.ndarray | None
    tpr: np.ndarray | None
    recall: np.ndarray | None
    precision: np.ndarray | None


def curves_from_counts(pos: np.ndarray, neg: np.ndarray) -> Curves:
    """Curves from positive / negative counts at each threshold, highest threshold first.

    ROC starts at (0, 0); PR starts at recall 0 with precision 1, as scikit-learn's does.
    """
    pos = np.asarray(pos, dtype=np.int64)
    neg = np.asarray(neg, dtype=np.int64)
    keep = (pos + neg) > 0  # empty bins add no point
    tp = np.cumsum(pos[keep])
    fp = np.cumsum(neg[keep])
    n_pos = int(tp[-1]) if tp.size else 0
    n_neg = int(fp[-1]) if fp.size else 0
    fpr = tpr = recall = precision = None
    if n_pos and n_neg:
        fpr = np.concatenate(([0.0], fp / n_neg))
        tpr = np.concatenate(([0.0], tp / n_pos))
    if n_pos:
        recall = np.concatenate(([0.0], tp / n_pos))
        precision = np.concatenate(([1.0], tp / (tp + fp)))
    return Curves(fpr, tpr, recall, precision)


def image_curves(scores: np.ndarray, labels: np.ndarray) -> Curves:
    """Exact curves, one point per distinct image score."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape or s.size == 0:
        raise ConfigError(f"scores {s.shape} and labels {y.shape} must be the same non-empty shape")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    starts = np.flatnonzero(np.r_[True, np.diff(s) != 0])  # first index of each tie run
    pos = np.add.reduceat(y.astype(np.int64), starts)
    neg = np.diff(np.r_[starts, s.size]) - pos
    return curves_from_counts(pos, neg)


@dataclass(frozen=True)
class ScoreHistogram:
    """Counts of normal and anomalous pixels in ``bins`` equal bins over ``[lo, hi]`` (the observed range)."""

    lo: float
    hi: float
    normal: np.ndarray  # (bins,) int64
    anomalous: np.ndarray  # (bins,) int64

    @classmethod
    def of(cls, maps: np.ndarray, masks: np.ndarray, bins: int = PIXEL_BINS) -> ScoreHistogram:
        """Bin every pixel in chunks; memory is O(bins), whatever the split size."""
        if bins < 1:
            raise ConfigError(f"bins must be >= 1, got {bins}")
        m = np.asarray(maps).reshape(-1)
        g = np.asarray(masks).reshape(-1)
        if m.shape != g.shape or m.size == 0:
            raise ConfigError(f"maps {np.shape(maps)} and masks {np.shape(masks)} must be the same non-empty shape")
        lo, hi = float(m.min()), float(m.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ConfigError("maps contain NaN or infinite values")
        scale = bins / (hi - lo) if hi > lo else 0.0
        counts = np.zeros(2 * bins, dtype=np.int64)
        for start in range(0, m.size, _CHUNK):
            chunk = m[start : start + _CHUNK].astype(np.float64)
            idx = np.minimum(((chunk - lo) * scale).astype(np.int64), bins - 1)
            idx += g[start : start + _CHUNK].astype(bool) * bins
            counts += np.bincount(idx, minlength=2 * bins)
        return cls(lo, hi, counts[:bins], counts[bins:])

    def curves(self) -> Curves:
        """Thresholds at the bins' lower edges, highest first."""
        return curves_from_counts(self.anomalous[::-1], self.normal[::-1])
