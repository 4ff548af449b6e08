"""Evaluation metrics for anomaly detection: AUROC, AP, F1-max and AUPRO.

Image-level numbers follow scikit-learn exactly (``roc_auc_score``,
``average_precision_score``, F1-max over ``precision_recall_curve``), so
results compare 1:1 with published tables. Pixel-level numbers pool every
pixel of a category, which is tens of millions of scores: all four pixel
metrics therefore come from a single descending sort and cumulative counts
instead of one scikit-learn call (and one sort) per metric.

Undefined metrics are ``nan`` rather than an exception, so a seed sweep can
still be summarised: AUROC and AUPRO need both normal and anomalous samples,
AP and F1-max need at least one anomalous sample.

Pixel scores are compared as float32 (the precision of every anomaly map the
scorer produces); that halves memory and makes the sort key fit in 64 bits.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from inspection_core.errors import ConfigError

__all__ = [
    "image_metrics",
    "pixel_metrics",
    "aupro_slow",
    "aupro_aprilgan",
    "f1_max",
    "summarise",
]

# 8-connectivity inside each image and none across images: one label call
# over the (N, H, W) stack then yields region ids that are unique per category.
_PLANAR_8 = np.zeros((3, 3, 3), dtype=bool)
_PLANAR_8[1] = True
_EIGHT = np.ones((3, 3), dtype=bool)
_CHUNK = 1 << 20  # curve points per step when walking a category-sized curve


# --------------------------------------------------------------------------
# validation


def _as_scores(values: object, name: str, dtype: type[np.floating]) -> np.ndarray:
    """Reject non-numeric or non-finite scores early: they make sorting meaningless."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a numeric array: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise ConfigError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ConfigError(f"{name} is empty; nothing to evaluate")
    arr = arr.astype(dtype, copy=False)
    if not np.isfinite(arr).all():
        raise ConfigError(f"{name} contains NaN or infinite values")
    return arr


def _as_binary(values: object, name: str) -> np.ndarray:
    """Accept bool or 0/1 labels (masks are often stored as uint8 or float)."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a binary array: {exc}") from exc
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ConfigError(f"{name} must be binary (bool or 0/1), got dtype {arr.dtype}")
    if arr.size == 0:
        raise ConfigError(f"{name} is empty; nothing to evaluate")
    # min/max first: cheap on big masks and catches most bad inputs.
    lo, hi = arr.min(), arr.max()
    if not (lo >= 0 and hi <= 1) or (arr.dtype.kind == "f" and not ((arr == 0) | (arr == 1)).all()):
        raise ConfigError(f"{name} must be binary (only 0 and 1), got values in [{lo}, {hi}]")
    return arr != 0


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ConfigError(f"{name_a} shape {tuple(a.shape)} does not match {name_b} shape {tuple(b.shape)}")


def _validate_pixels(
    maps: np.ndarray, masks: np.ndarray, dtype: type[np.floating] = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Shared checks so every AUPRO variant rejects the same inputs."""
    maps_arr = np.asarray(maps)
    masks_arr = np.asarray(masks)
    _check_same_shape(maps_arr, masks_arr, "maps", "masks")
    if maps_arr.ndim != 3:
        raise ConfigError(f"maps and masks must be (N, H, W), got shape {tuple(maps_arr.shape)}")
    return _as_scores(maps_arr, "maps", dtype), _as_binary(masks_arr, "masks")


def _check_limit(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be in (0, 1], got {value}")
    return value


# --------------------------------------------------------------------------
# shared curve arithmetic


def _ranking_metrics(tps: np.ndarray, n_pred: np.ndarray) -> tuple[float, float, float]:
    """AUROC, AP and F1-max from TP counts at each distinct threshold (descending).

    ``n_pred[k]`` is the number of samples scored >= the k-th threshold, so the
    last entry is the sample count. Integer counts keep the AUROC sum exact,
    which is why this matches sklearn to rounding even with heavy ties; the
    walk goes in chunks so a category-sized curve needs no full-size temporaries.
    """
    n_pos = int(tps[-1])
    n_neg = int(n_pred[-1]) - n_pos
    if n_pos == 0:
        return math.nan, math.nan, math.nan

    auc_num = 0  # sum of dFP * (TP_k + TP_{k-1}); at most 2PN < 2**63
    ap_sum = 0.0  # sum of dTP * precision
    f1 = 0.0
    prev_tp = prev_fp = 0
    for start in range(0, tps.size, _CHUNK):
        tp = tps[start : start + _CHUNK].astype(np.int64)
        pred = n_pred[start : start + _CHUNK].astype(np.int64)
        fp = pred - tp
        tp_prev = np.empty_like(tp)
        tp_prev[0] = prev_tp
        tp_prev[1:] = tp[:-1]
        d_fp = np.diff(fp, prepend=prev_fp)
        auc_num += int(np.dot(d_fp, tp + tp_prev))
        d_tp = tp - tp_prev
        step = np.flatnonzero(d_tp)
        ap_sum += float(np.dot(d_tp[step], tp[step] / pred[step]))
        # 2PR / (P + R) simplifies to 2 TP / (positives + predicted positives).
        f1 = max(f1, float(np.max(2.0 * tp / (n_pos + pred))))
        prev_tp, prev_fp = int(tp[-1]), int(fp[-1])

    auroc = auc_num / (2.0 * n_pos * n_neg) if n_neg else math.nan
    return auroc, ap_sum / n_pos, f1


def _trapezoid_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Normalised area under PRO up to ``limit``, as in the MVTec evaluation code.

    The curve is cut at exactly ``limit`` by linear interpolation so the value
    does not depend on where the nearest thresholds happen to fall.
    """
    ins = int(np.searchsorted(fpr, limit, side="right"))  # first point past the limit
    x = fpr[:ins]
    y = pro[:ins]
    area = 0.5 * float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])))
    if x[-1] < limit and ins < fpr.size:
        x0, y0, x1, y1 = fpr[ins - 1], pro[ins - 1], fpr[ins], pro[ins]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * float(y0 + y_lim) * float(limit - x0)
    return area / limit


def _close_curve(fpr: np.ndarray, pro: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anchor the curve at (0, 0) and (1, 1) and undo cumsum overshoot above 1."""
    one = np.ones(1)
    zero = np.zeros(1)
    fpr = np.clip(np.concatenate((zero, fpr, one)), None, 1.0)
    pro = np.clip(np.concatenate((zero, pro, one)), None, 1.0)
    return fpr, pro


def f1_max(precision: np.ndarray, recall: np.ndarray) -> float:
    """Best F1 over a PR curve; points with P + R = 0 carry no information and are dropped."""
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    _check_same_shape(p, r, "precision", "recall")
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2.0 * p * r / (p + r)
    f1 = f1[np.isfinite(f1)]
    return float(f1.max()) if f1.size else math.nan


# --------------------------------------------------------------------------
# image level


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image-level AUROC / AP / F1-max, numerically identical to scikit-learn.

    ``i_auroc`` is nan when only one class is present; ``i_ap`` and ``i_f1``
    are nan when there is no anomalous image.
    """
    s_arr = np.asarray(scores)
    y_arr = np.asarray(labels)
    _check_same_shape(s_arr, y_arr, "scores", "labels")
    s = _as_scores(s_arr, "scores", np.float64).ravel()
    y = _as_binary(y_arr, "labels").ravel()

    order = np.argsort(s, kind="stable")[::-1]
    s = s[order]
    ends = np.append(np.flatnonzero(np.diff(s)), s.size - 1)  # last index of each tie run
    tps = np.cumsum(y[order], dtype=np.int64)[ends]
    auroc, ap, f1 = _ranking_metrics(tps, ends + 1)
    return {"i_auroc": auroc, "i_ap": ap, "i_f1": f1}


# --------------------------------------------------------------------------
# pixel level


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected GT regions (8-connectivity per image), ids unique over the stack."""
    regions, n_regions = ndimage.label(masks, structure=_PLANAR_8)
    return regions, int(n_regions)


def _descending_key(scores: np.ndarray) -> np.ndarray:
    """uint64 keys, score in the high half, whose ascending order is descending score.

    Flipping the IEEE bits this way lets a plain unsigned sort (SIMD, no index
    array) order float32 scores several times faster than ``np.argsort``;
    the low half is left free for a payload.
    """
    key = scores.reshape(-1).view(np.uint32).astype(np.uint64)
    np.copyto(key, 0, where=key == 0x80000000)  # -0.0 ties with +0.0
    # Non-negative floats: reverse their order and keep them below all negatives;
    # negative floats already sort descending by raw bits (sign-magnitude).
    np.bitwise_xor(key, np.uint64(0x7FFFFFFF), out=key, where=key < 0x80000000)
    key <<= np.uint64(32)
    return key


def _pixel_curve(maps32: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP counts and predicted-positive counts at every distinct pixel score, and
    the running PRO sum over anomalous pixels in score order.

    One sort of a packed 64-bit key (score bits high, region id low) gives, in
    score order, both the label of each pixel (region id > 0) and the region it
    belongs to, so no permutation has to be gathered afterwards. PRO at
    threshold k is ``pro_cum[tps[k]]``.
    """
    regions, n_regions = _label_regions(masks)
    key = _descending_key(maps32)
    key |= regions.reshape(-1).view(np.uint32)
    del regions
    key.sort()

    halves = key.view(np.uint32).reshape(-1, 2)
    lo, hi = halves[:, 0], halves[:, 1]
    if sys.byteorder != "little":
        lo, hi = hi, lo
    n = key.size
    positive = lo != 0
    region_of_positive = lo[positive]  # region id of each anomalous pixel, score order
    run_end = np.empty(n, dtype=bool)  # last index of each run of equal scores
    np.not_equal(hi[1:], hi[:-1], out=run_end[:-1])
    run_end[-1] = True
    del key, halves, lo, hi
    ends = np.flatnonzero(run_end)
    del run_end

    count_dtype = np.int32 if n < 2**31 else np.int64
    tps = np.cumsum(positive, dtype=count_dtype)[ends]
    del positive
    ends += 1
    n_pred = ends.astype(count_dtype)
    del ends

    # PRO gains 1 / (n_regions * |region|) per covered region pixel.
    pro_cum = np.zeros(region_of_positive.size + 1)
    if n_regions:
        weight = np.zeros(n_regions + 1)
        sizes = np.bincount(region_of_positive, minlength=n_regions + 1)
        weight[1:] = 1.0 / (n_regions * sizes[1:])
        np.cumsum(weight[region_of_positive], out=pro_cum[1:])
    return tps, n_pred, pro_cum


def _first_above(n_pred: np.ndarray, tps: np.ndarray, target: float) -> int:
    """Index of the first threshold with FP > target (bisection: FP never falls)."""
    lo, hi = 0, tps.size
    while lo < hi:
        mid = (lo + hi) // 2
        if int(n_pred[mid]) - int(tps[mid]) > target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, *, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pooled pixel AUROC / AP / F1-max and AUPRO (integrated to ``fpr_limit``).

    All four share one sort, which is what keeps a 40M-pixel category in the
    seconds range. Every value is nan when no pixel is anomalous; ``p_auroc``
    and ``aupro`` are also nan when no pixel is normal.
    """
    limit = _check_limit(fpr_limit, "fpr_limit")
    maps32, masks_b = _validate_pixels(maps, masks)
    tps, n_pred, pro_cum = _pixel_curve(maps32, masks_b)
    auroc, ap, f1 = _ranking_metrics(tps, n_pred)

    n_pos = int(tps[-1])
    n_neg = int(n_pred[-1]) - n_pos
    if n_pos == 0 or n_neg == 0:
        aupro = math.nan
    else:
        # Only the curve up to the first point past the limit is integrated.
        # Integer search with one FP of slack, so float rounding of FP / N
        # cannot drop the point that closes the last segment.
        cut = _first_above(n_pred, tps, limit * n_neg + 1.0) + 1
        tp = tps[:cut].astype(np.int64)
        fpr = (n_pred[:cut] - tp) / n_neg
        pro = pro_cum[tp]
        fpr, pro = _close_curve(fpr, pro)
        aupro = _trapezoid_to(fpr, pro, limit)
    return {"p_auroc": auroc, "p_ap": ap, "p_f1": f1, "aupro": aupro}


def aupro_slow(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Direct AUPRO (one boolean pass per threshold) to cross-check the fast path.

    Only for small inputs in tests; same float32 comparison and nan rules as
    :func:`pixel_metrics`.
    """
    limit = _check_limit(fpr_limit, "fpr_limit")
    maps32, masks_b = _validate_pixels(maps, masks)
    region_masks: list[tuple[int, np.ndarray]] = []
    for i, mask in enumerate(masks_b):
        labelled, count = ndimage.label(mask, structure=_EIGHT)
        region_masks.extend((i, labelled == r) for r in range(1, count + 1))
    normal = ~masks_b
    n_normal = int(normal.sum())
    if not region_masks or n_normal == 0:
        return math.nan

    fprs = [0.0]
    pros = [0.0]
    for t in np.unique(maps32)[::-1]:
        pred = maps32 >= t
        fprs.append(int((pred & normal).sum()) / n_normal)
        overlaps = [int((pred[i] & reg).sum()) / int(reg.sum()) for i, reg in region_masks]
        pros.append(float(np.mean(overlaps)))
    fprs.append(1.0)
    pros.append(1.0)

    # Segment by segment, cutting the one that crosses the limit.
    area = 0.0
    for x0, y0, x1, y1 in zip(fprs[:-1], pros[:-1], fprs[1:], pros[1:], strict=True):
        y0, y1 = min(y0, 1.0), min(y1, 1.0)
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        elif x0 < limit:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_lim) * (limit - x0)
            break
        else:
            break
    return area / limit


def aupro_aprilgan(maps: np.ndarray, masks: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """AUPRO as April-GAN / AnomalyCLIP report it (``cal_pro_score`` from cflow-ad).

    Kept separate from :func:`pixel_metrics` because it is a different number:
    a coarse threshold grid (``score > th``), only points with FPR below
    ``expect_fpr``, and their FPRs min-max rescaled to [0, 1] before the
    trapezoid. Needed to compare against those papers' tables. Returns nan
    where the original would divide by zero (constant map, no region, no
    normal pixel, fewer than two distinct kept FPRs).
    """
    if int(max_step) != max_step or max_step < 1:
        raise ConfigError(f"max_step must be a positive integer, got {max_step}")
    expect = _check_limit(expect_fpr, "expect_fpr")
    maps_arr = np.asarray(maps)
    # Keep the caller's float precision: the threshold grid depends on it.
    dtype = maps_arr.dtype.type if maps_arr.dtype.kind == "f" else np.float64
    amaps, masks_b = _validate_pixels(maps_arr, masks, dtype)
    regions, n_regions = _label_regions(masks_b)
    n_normal = int(masks_b.size - np.count_nonzero(masks_b))
    min_th, max_th = amaps.min(), amaps.max()
    if n_regions == 0 or n_normal == 0 or not max_th > min_th:
        return math.nan
    delta = (max_th - min_th) / max_step
    ths = np.arange(min_th, max_th, delta)
    n_th = ths.size

    # hist[r, k]: pixels of region r (0 = normal) above exactly k thresholds;
    # searchsorted(side="left") counts thresholds strictly below the score,
    # i.e. the thresholds where `score > th` holds, like the original loop.
    hist = np.zeros((n_regions + 1) * (n_th + 1), dtype=np.int64)
    flat_maps = amaps.reshape(-1)
    flat_regions = regions.reshape(-1)
    chunk = 1 << 21
    for start in range(0, flat_maps.size, chunk):
        above = np.searchsorted(ths, flat_maps[start : start + chunk], side="left")
        above += flat_regions[start : start + chunk].astype(np.int64) * (n_th + 1)
        hist += np.bincount(above, minlength=hist.size)
    hist = hist.reshape(n_regions + 1, n_th + 1)
    # count_above[:, j] = pixels with score > ths[j]
    count_above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    sizes = hist.sum(axis=1)
    fprs = count_above[0] / n_normal
    pros = (count_above[1:] / sizes[1:, None]).mean(axis=0)

    keep = fprs < expect
    fprs = fprs[keep]
    if fprs.size < 2 or not fprs.max() > fprs.min():
        return math.nan
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    # sklearn.metrics.auc: FPR falls as the threshold rises, so the signed
    # trapezoid is negative and is flipped.
    return float(-np.trapezoid(pros[keep], fprs))


# --------------------------------------------------------------------------
def verdict_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """The verdict an MES acts on, at the head's own image threshold (``is_defect = score >= threshold``).

    ``v_far``: share of normal images flagged (the fit aims at ``image_far``); ``v_recall``: share of defective
    images flagged. AUROC and F1-max hide these: they rank, or pick the best threshold with the test labels.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    _check_same_shape(s, y, "scores", "labels")
    if not math.isfinite(threshold):
        return {"v_far": math.nan, "v_recall": math.nan}
    flagged = s >= threshold
    far = float(flagged[~y].mean()) if (~y).any() else math.nan
    recall = float(flagged[y].mean()) if y.any() else math.nan
    return {"v_far": far, "v_recall": recall}


# aggregation


def format_mean_std(mean: object, std: object) -> str:
    """``mean±std`` in percent for tables and plot labels; an en dash where the mean is undefined."""
    m = float(mean) if isinstance(mean, int | float) and math.isfinite(mean) else None
    s = float(std) if isinstance(std, int | float) and math.isfinite(std) else 0.0
    return "–" if m is None else f"{100 * m:.1f}±{100 * s:.1f}"


def summarise(
    values: Sequence[Mapping[str, float]],
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and population std per metric over seeds, ignoring nan runs.

    A metric missing from one run counts as nan for that run; a metric that is
    nan in every run stays nan instead of raising a warning.
    """
    if not values:
        raise ConfigError("summarise needs at least one result dict")
    keys: dict[str, None] = {}
    for run in values:
        keys.update(dict.fromkeys(run))
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for key in keys:
        arr = np.array([run.get(key, math.nan) for run in values], dtype=np.float64)
        if np.isnan(arr).all():
            mean[key] = std[key] = math.nan
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean[key] = float(np.nanmean(arr))
            std[key] = float(np.nanstd(arr, ddof=0))
    return mean, std
