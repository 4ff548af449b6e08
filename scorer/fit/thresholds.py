"""Threshold setting: image and pixel thresholds from the held-out set, or from a line's known-good frames.

(Not the CFF affine weights, which ``scorer.fit.learned`` trains, nor the calibrator service, which runs fits.)
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from inspection_core.errors import ConfigError, HeadError
from scorer.backbones.base import BackboneOutput
from scorer.fit.heldout import HeldOut, HeldOutSearch, held_out_quality, held_out_scores
from scorer.fit.options import FitOptions
from scorer.head import Head, search_dtype


def image_threshold_from_normals(scores: Sequence[float] | np.ndarray, image_far: float) -> float:
    """``max(max, mean + z * std)`` of good images' scores, z for the target false-alarm rate.

    The std is floored at 5 % of the mean, since there are few scores (the fit's held-out normals, or a line's
    known-good frames).
    """
    sc = np.asarray(scores, dtype=np.float64).ravel()
    if sc.size == 0 or not np.isfinite(sc).all():
        raise ConfigError(f"need finite scores of good images to set an image threshold, got {sc.tolist()[:8]}")
    if not 0 < image_far < 0.5:
        raise ConfigError(f"image_far must be in (0, 0.5), got {image_far}")
    z = NormalDist().inv_cdf(1 - image_far)
    mu = float(sc.mean())
    sd = max(float(sc.std()), 0.05 * abs(mu))
    return max(float(sc.max()), mu + z * sd)


MIN_GOOD_FRAMES = 2


def threshold_from_good(head: Head, images: Sequence[np.ndarray], *, image_far: float = 0.01) -> Head:
    """The head with its image threshold set from known-good images of the line instead of its held-out set.

    A fit sees only its references; with K <= 2 that cannot show how other good parts differ, and its threshold
    is off (BENCHMARKS.md: at K = 1 it flagged 64-99 % of good images). Known-good frames are that evidence. The
    pixel threshold is kept; the scores and the rule are recorded in ``meta["threshold_from_good"]``.
    """
    if len(images) < MIN_GOOD_FRAMES:
        raise ConfigError(f"need at least {MIN_GOOD_FRAMES} known-good images to see their spread, got {len(images)}")
    scores = head.score(list(images)).image_scores.astype(np.float64)
    t = image_threshold_from_normals(scores, image_far)
    out = head.with_thresholds(image=t)
    out.meta = {
        **head.meta,
        "threshold_from_good": {
            "n": len(scores),
            "image_far": image_far,
            "scores": [float(x) for x in scores],
            "previous_image_threshold": head.image_threshold,
            "rule": "max(max, mean + z * max(std, 0.05 * mean)) of the good images' scores",
        },
    }
    return out


def set_thresholds(
    head: Head,
    ref_feats: BackboneOutput,
    held: HeldOut,
    opts: FitOptions,
    *,
    meta: dict | None = None,
    search: HeldOutSearch | None = None,
) -> Head:
    """Image and pixel thresholds, and the head's held-out quality, from the held-out set.

    Image: ``max(max normal, mean + z * std)`` of the held-out normal scores, z for the target false-alarm
    rate (std floored at 5 % of the mean, since K is tiny). Pixel: the F1-best threshold on the held-out
    synthetic anomalies, but never below the (1 - pixel_far) quantile of held-out normal pixels.
    """
    if search is not None and not search.serves(head):
        raise HeadError(
            f"the held-out search covers taps {search.taps} of banks of {search.bank_rows} rows; the head weights "
            f"taps {head.weighted_taps()} of banks of {tuple(b.shape[0] for b in head.bank)} rows"
        )
    n_grids, a_grids = (None, None) if search is None else (search.normals, search.anomalies)
    n_scores, n_maps, _ = held_out_scores(head, ref_feats, held.normals, held.normal_src, grids=n_grids)
    a_scores, a_maps, _ = held_out_scores(head, ref_feats, held.anomalies, held.anomaly_src, grids=a_grids)
    image_t = image_threshold_from_normals(n_scores, opts.thresholds.image_far)
    normal_q = float(np.quantile(n_maps.astype(np.float32), 1 - opts.thresholds.pixel_far))
    flat, lab = a_maps.ravel(), held.masks.ravel()
    # F1 at each candidate from one sort: pixels >= t are the tail of the sorted values from t's left index
    order = np.argsort(flat, kind="stable")
    sorted_vals = flat[order]
    lab_before = np.r_[0, np.cumsum(lab[order], dtype=np.int64)]  # positives among the i smallest
    qs = np.quantile(sorted_vals, np.linspace(0.5, 0.9995, 120))
    left = np.searchsorted(sorted_vals, qs, side="left")
    n_pos = float(lab_before[-1])
    tps = n_pos - lab_before[left]
    f1s = 2 * tps / np.maximum(1.0, (flat.size - left) + n_pos)
    best = int(np.argmax(f1s))  # the first of equal F1s, as a scan from the lowest candidate keeps
    best_f1, best_t = float(f1s[best]), float(qs[best])
    pixel_t = max(normal_q, best_t)
    pred = flat >= pixel_t
    tp = float((pred & lab).sum())
    fit_metrics: dict = {
        "held_out": held.how,
        "normal_scores": [float(x) for x in n_scores],
        "normal_pixel_quantile": normal_q,
        "synthetic_detection_rate": float((a_scores >= image_t).mean()),
        "synthetic_pixel_f1_at_threshold": 2 * tp / max(1.0, float(pred.sum()) + float(lab.sum())),
        "synthetic_pixel_f1_best": best_f1,
        "normal_false_alarm_rate": float((n_scores >= image_t).mean()),
        "search_dtype": search_dtype(head),
        "held_out_quality": held_out_quality(n_scores, a_scores, a_maps, held.masks),
    }
    out = head.with_thresholds(image=image_t, pixel=pixel_t)
    out.meta = {**head.meta, **(meta or {}), "fit_metrics": fit_metrics}
    return out
