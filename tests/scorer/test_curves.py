"""ROC / PR curves behind the eval plots: exact at image level, binned (bounded memory) at pixel level."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_curve

from inspection_core.errors import ConfigError
from scorer.curves import ScoreHistogram, image_curves
from scorer.metrics import pixel_metrics


def test_image_curves_match_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: many ties
    c = image_curves(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert np.allclose(c.fpr, fpr) and np.allclose(c.tpr, tpr)
    precision, recall, _ = precision_recall_curve(labels, scores)
    # scikit-learn lists PR from the lowest threshold up; ours from recall 0
    assert np.allclose(c.recall, recall[::-1]) and np.allclose(c.precision, precision[::-1])


def test_one_class_leaves_the_roc_undefined() -> None:
    c = image_curves(np.array([0.1, 0.5, 0.9]), np.array([1, 1, 1]))
    assert c.fpr is None and c.tpr is None
    assert c.recall is not None and c.precision is not None
    c = image_curves(np.array([0.1, 0.5]), np.array([0, 0]))
    assert c.fpr is None and c.recall is None and c.precision is None


def test_histogram_curve_is_close_to_the_exact_pixel_auroc() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 64, 64), dtype=bool)
    masks[:3, 20:40, 10:30] = True
    maps = rng.normal(0, 1, masks.shape).astype(np.float32) + masks * 1.5
    h = ScoreHistogram.of(maps, masks, bins=1024)
    assert h.normal.shape == h.anomalous.shape == (1024,)
    assert int(h.anomalous.sum()) == int(masks.sum()) and int(h.normal.sum()) == int((~masks).sum())
    assert (h.lo, h.hi) == (float(maps.min()), float(maps.max()))
    c = h.curves()
    binned = float(np.trapezoid(c.tpr, c.fpr))
    assert binned == pytest.approx(pixel_metrics(maps, masks)["p_auroc"], abs=2e-3)
    assert c.fpr[0] == c.tpr[0] == 0.0 and c.fpr[-1] == pytest.approx(1.0) and c.tpr[-1] == pytest.approx(1.0)


def test_histogram_bins_in_chunks_whatever_the_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts do not depend on the chunking, so big splits are binned piece by piece."""
    import scorer.curves as curves

    rng = np.random.default_rng(2)
    maps = rng.random((3, 50, 50)).astype(np.float32)
    masks = rng.random((3, 50, 50)) > 0.9
    whole = ScoreHistogram.of(maps, masks, bins=64)
    monkeypatch.setattr(curves, "_CHUNK", 97)
    chunked = ScoreHistogram.of(maps, masks, bins=64)
    assert np.array_equal(whole.normal, chunked.normal) and np.array_equal(whole.anomalous, chunked.anomalous)


def test_histogram_without_anomalous_pixels_has_no_curves_and_bad_input_is_refused() -> None:
    maps = np.linspace(0, 1, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    c = ScoreHistogram.of(maps, np.zeros(maps.shape, dtype=bool)).curves()
    assert c.fpr is None and c.recall is None
    flat = ScoreHistogram.of(np.ones((1, 4, 4), np.float32), np.eye(4, dtype=bool)[None])  # constant map: one bin
    assert flat.anomalous.sum() == 4 and flat.normal.sum() == 12
    with pytest.raises(ConfigError, match="NaN"):
        ScoreHistogram.of(np.full((1, 2, 2), np.nan, np.float32), np.zeros((1, 2, 2), bool))
    with pytest.raises(ConfigError, match="same non-empty shape"):
        ScoreHistogram.of(maps, np.zeros((2, 8, 7), bool))
