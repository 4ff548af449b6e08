"""Tests for scorer.metrics: sklearn as the oracle for AUROC/AP/F1, a direct
loop for AUPRO, and hand-computed curves for the integration rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from inspection_core.errors import ConfigError
from scorer import metrics
from scorer.metrics import (
    aupro_aprilgan,
    aupro_slow,
    f1_max,
    format_mean_std,
    image_metrics,
    pixel_metrics,
    summarise,
    verdict_metrics,
)

TOL = 1e-6


# --------------------------------------------------------------------------
# helpers


def sk_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.max(f1[np.isfinite(f1)]))


def random_masks(
    rng: np.random.Generator, n: int, h: int, w: int, max_boxes: int = 3, p_empty: float = 0.3
) -> np.ndarray:
    """Rectangles (possibly touching/overlapping), some images left defect-free."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if rng.random() < p_empty:
            continue
        for _ in range(rng.integers(1, max_boxes + 1)):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            dy, dx = rng.integers(1, max(2, h // 3)), rng.integers(1, max(2, w // 3))
            masks[i, y0 : y0 + dy, x0 : x0 + dx] = True
    if not masks.any():
        masks[0, 0, 0] = True
    if masks.all():
        masks[-1, -1, -1] = False
    return masks


def random_maps(rng: np.random.Generator, masks: np.ndarray, decimals: int | None, shift: float = 0.3) -> np.ndarray:
    maps = rng.random(masks.shape) + shift * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps.astype(np.float32)


def cal_pro_score_reference(
    masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3
) -> float:
    """Near-literal port of April-GAN's cal_pro_score (skimage.label -> scipy, 8-conn)."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks, strict=True):
            labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
            for r in range(1, count + 1):
                coords = np.argwhere(labelled == r)
                tp_pixels = binary_amap[coords[:, 0], coords[:, 1]].sum()
                pro.append(tp_pixels / len(coords))
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fprs.append(fp_pixels / inverse_masks.sum())
        pros.append(np.array(pro).mean())
    pros_a, fprs_a = np.array(pros), np.array(fprs)
    idxes = fprs_a < expect_fpr
    fprs_a = fprs_a[idxes]
    fprs_a = (fprs_a - fprs_a.min()) / (fprs_a.max() - fprs_a.min())
    return float(auc(fprs_a, pros_a[idxes]))


# --------------------------------------------------------------------------
# image level vs sklearn


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [1, 2, None])
def test_image_metrics_match_sklearn(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    labels = rng.random(n) < 0.4
    labels[0], labels[1] = True, False
    scores = rng.normal(size=n) + labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    out = image_metrics(scores, labels)
    assert set(out) == {"i_auroc", "i_ap", "i_f1"}
    assert out["i_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert out["i_ap"] == pytest.approx(average_precision_score(labels, scores), abs=TOL)
    assert out["i_f1"] == pytest.approx(sk_f1_max(labels, scores), abs=TOL)


def test_image_metrics_all_tied_and_int_labels() -> None:
    labels = np.array([0, 1, 0, 1, 1])
    scores = np.full(5, 0.7)
    out = image_metrics(scores, labels)
    assert out["i_auroc"] == pytest.approx(0.5)
    assert out["i_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert out["i_f1"] == pytest.approx(sk_f1_max(labels, scores))


def test_image_metrics_perfect_and_inverted() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    perfect = image_metrics(labels * 2.0 + 0.1, labels)
    assert perfect == pytest.approx({"i_auroc": 1.0, "i_ap": 1.0, "i_f1": 1.0})
    inverted = image_metrics(-labels.astype(float), labels)
    assert inverted["i_auroc"] == pytest.approx(0.0)


def test_image_metrics_single_class_is_nan() -> None:
    out = image_metrics(np.array([0.1, 0.5, 0.2]), np.zeros(3))
    assert all(math.isnan(v) for v in out.values())
    out = image_metrics(np.array([0.1, 0.5, 0.2]), np.ones(3, dtype=bool))
    assert math.isnan(out["i_auroc"])
    assert out["i_ap"] == pytest.approx(1.0)
    assert out["i_f1"] == pytest.approx(1.0)


# --------------------------------------------------------------------------
# pixel level vs sklearn


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [1, 3, None])
def test_pixel_metrics_match_sklearn(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(100 + seed)
    masks = random_masks(rng, 5, 20, 24)
    maps = random_maps(rng, masks, decimals)
    out = pixel_metrics(maps, masks)
    y, s = masks.ravel(), maps.ravel()
    assert set(out) == {"p_auroc", "p_ap", "p_f1", "aupro"}
    assert out["p_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert out["p_ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert out["p_f1"] == pytest.approx(sk_f1_max(y, s), abs=TOL)
    assert 0.0 <= out["aupro"] <= 1.0


def test_pixel_metrics_negative_scores_and_signed_zero() -> None:
    """The packed sort key must order negatives, +-0.0 (a tie) and extremes correctly."""
    rng = np.random.default_rng(7)
    masks = random_masks(rng, 4, 12, 12)
    values = np.array(
        [-3.0e38, -1e5, -2.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, 7.0, 3.0e38],
        dtype=np.float32,
    )
    maps = rng.choice(values, size=masks.shape).astype(np.float32)
    maps[masks] = rng.choice(values[4:], size=int(masks.sum()))
    out = pixel_metrics(maps, masks)
    # float64 for the oracle only: sklearn's finiteness check overflows a float32 sum.
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    assert out["p_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert out["p_ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert out["p_f1"] == pytest.approx(sk_f1_max(y, s), abs=TOL)
    assert out["aupro"] == pytest.approx(aupro_slow(maps, masks), abs=1e-9)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_curve_walk_matches_sklearn(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Category-sized curves are walked in chunks; the carry across chunk edges must be exact."""
    monkeypatch.setattr(metrics, "_CHUNK", chunk)
    rng = np.random.default_rng(21)
    masks = random_masks(rng, 3, 10, 12)
    maps = random_maps(rng, masks, 2)
    out = pixel_metrics(maps, masks)
    y, s = masks.ravel(), maps.ravel()
    assert out["p_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert out["p_ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert out["p_f1"] == pytest.approx(sk_f1_max(y, s), abs=TOL)
    labels = rng.random(50) < 0.5
    scores = np.round(rng.random(50), 1)
    img = image_metrics(scores, labels)
    assert img["i_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert img["i_ap"] == pytest.approx(average_precision_score(labels, scores), abs=TOL)


def test_pixel_metrics_memory_layout_does_not_matter() -> None:
    rng = np.random.default_rng(4)
    masks = random_masks(rng, 3, 10, 14)
    maps = random_maps(rng, masks, None)
    ref = pixel_metrics(maps, masks)
    assert pixel_metrics(np.asfortranarray(maps), np.asfortranarray(masks)) == pytest.approx(ref)
    wide = np.repeat(maps, 2, axis=2)
    assert pixel_metrics(wide[:, :, ::2], masks) == pytest.approx(ref)


def test_pixel_metrics_accepts_uint8_float_masks_and_float64_maps() -> None:
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 3, 10, 10)
    maps = random_maps(rng, masks, 2)
    ref = pixel_metrics(maps, masks)
    assert pixel_metrics(maps.astype(np.float64), masks.astype(np.uint8)) == pytest.approx(ref)
    assert pixel_metrics(maps, masks.astype(np.float32)) == pytest.approx(ref)


# --------------------------------------------------------------------------
# AUPRO: fast vs direct


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.1, 1.0])
def test_fast_aupro_matches_slow(seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(200 + seed)
    decimals = [1, 2, None][seed % 3]
    masks = random_masks(rng, 4, 14, 16, max_boxes=4, p_empty=0.35)
    maps = random_maps(rng, masks, decimals, shift=rng.uniform(0.0, 0.8))
    fast = pixel_metrics(maps, masks, fpr_limit=fpr_limit)["aupro"]
    slow = aupro_slow(maps, masks, fpr_limit=fpr_limit)
    assert fast == pytest.approx(slow, abs=1e-9)
    assert 0.0 <= fast <= 1.0


def test_fast_aupro_matches_slow_many_small_regions() -> None:
    rng = np.random.default_rng(11)
    masks = rng.random((3, 12, 12)) < 0.12  # scattered pixels: many regions, diagonal links
    masks[2] = False
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 1).astype(np.float32)
    for limit in (0.05, 0.3):
        fast = pixel_metrics(maps, masks, fpr_limit=limit)["aupro"]
        assert fast == pytest.approx(aupro_slow(maps, masks, fpr_limit=limit), abs=1e-9)


def test_perfect_map_scores_one() -> None:
    rng = np.random.default_rng(5)
    masks = random_masks(rng, 4, 16, 16)
    maps = np.where(masks, 0.6 + 0.4 * rng.random(masks.shape), 0.5 * rng.random(masks.shape))
    out = pixel_metrics(maps, masks)
    assert out == pytest.approx({"p_auroc": 1.0, "p_ap": 1.0, "p_f1": 1.0, "aupro": 1.0})
    assert aupro_slow(maps, masks) == pytest.approx(1.0)
    binary = pixel_metrics(masks.astype(np.float32), masks, fpr_limit=0.1)
    assert binary == pytest.approx({"p_auroc": 1.0, "p_ap": 1.0, "p_f1": 1.0, "aupro": 1.0})


def test_constant_map() -> None:
    rng = np.random.default_rng(6)
    masks = random_masks(rng, 3, 10, 10)
    out = pixel_metrics(np.full(masks.shape, 0.25, dtype=np.float32), masks)
    prevalence = masks.mean()
    assert out["p_auroc"] == pytest.approx(0.5)
    assert out["p_ap"] == pytest.approx(prevalence)
    assert out["p_f1"] == pytest.approx(2 * prevalence / (1 + prevalence))
    # Only the diagonal (0,0)-(1,1): area under y = x up to 0.3, divided by 0.3.
    assert out["aupro"] == pytest.approx(0.15)


def test_aupro_hand_computed_with_interpolation() -> None:
    """Two regions of 2 pixels, 10 normal pixels; curve worked out by hand.

    Thresholds 0.9 -> (FPR 0, PRO 0.5), 0.85 -> (0.1, 0.5), 0.8 -> (0.1, 0.75),
    0.0 -> (1, 1). The limit 0.3 falls inside the last segment.
    """
    mask = np.zeros((1, 3, 5), dtype=bool)
    mask[0, 0, 0:2] = True  # region A
    mask[0, 2, 3:5] = True  # region B (not touching A)
    maps = np.zeros((1, 3, 5), dtype=np.float32)
    maps[0, 0, 0:2] = 0.9
    maps[0, 2, 3] = 0.8
    maps[0, 2, 4] = 0.0
    maps[0, 1, 2] = 0.85  # the one confident normal pixel
    n_normal = int((~mask).sum())
    assert n_normal == 11

    fpr1 = 1 / n_normal
    y_lim = 0.75 + 0.25 * (0.3 - fpr1) / (1.0 - fpr1)
    expected = (0.5 * fpr1 + 0.5 * (0.75 + y_lim) * (0.3 - fpr1)) / 0.3
    assert pixel_metrics(maps, mask)["aupro"] == pytest.approx(expected, abs=1e-12)
    assert aupro_slow(maps, mask) == pytest.approx(expected, abs=1e-12)

    expected_full = 0.5 * fpr1 + 0.5 * (0.75 + 1.0) * (1.0 - fpr1)
    assert pixel_metrics(maps, mask, fpr_limit=1.0)["aupro"] == pytest.approx(expected_full)
    # Limit before the first FPR step: PRO is flat at 0.5 there.
    assert pixel_metrics(maps, mask, fpr_limit=0.05)["aupro"] == pytest.approx(0.5)


def test_aupro_uses_eight_connectivity() -> None:
    """A diagonal chain is one region of 3 pixels (PRO 1/3), not two regions (PRO 1/2)."""
    mask = np.zeros((1, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True
    maps = np.full((1, 3, 3), 0.5, dtype=np.float32)
    maps[0, 0, 0] = 1.0
    maps[0, 1, 1] = maps[0, 1, 2] = 0.0
    assert pixel_metrics(maps, mask)["aupro"] == pytest.approx(1 / 3)
    assert aupro_slow(maps, mask) == pytest.approx(1 / 3)


def test_regions_are_averaged_over_all_images() -> None:
    """PRO is a mean over regions pooled across images, not a mean of per-image means."""
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = True  # region of 1 px, found
    masks[1, 0:2, 0:2] = True  # region of 4 px, missed
    masks[1, 3, 3] = True  # region of 1 px, missed
    maps = np.full(masks.shape, 0.5, dtype=np.float32)
    maps[0, 0, 0] = 1.0
    maps[1][masks[1]] = 0.0
    # Curve: (0, 1/3) until every normal pixel fires at 0.5.
    assert pixel_metrics(maps, masks)["aupro"] == pytest.approx(1 / 3)
    assert aupro_slow(maps, masks) == pytest.approx(1 / 3)


def test_no_anomalous_or_no_normal_pixels() -> None:
    maps = np.random.default_rng(0).random((2, 5, 5)).astype(np.float32)
    none = pixel_metrics(maps, np.zeros(maps.shape, dtype=bool))
    assert all(math.isnan(v) for v in none.values())
    assert math.isnan(aupro_slow(maps, np.zeros(maps.shape)))
    assert math.isnan(aupro_aprilgan(maps, np.zeros(maps.shape)))
    full = pixel_metrics(maps, np.ones(maps.shape, dtype=bool))
    assert math.isnan(full["p_auroc"]) and math.isnan(full["aupro"])
    assert full["p_ap"] == pytest.approx(1.0) and full["p_f1"] == pytest.approx(1.0)


# --------------------------------------------------------------------------
# April-GAN variant


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aprilgan_matches_reference_loop(seed: int, dtype: type[np.floating]) -> None:
    rng = np.random.default_rng(300 + seed)
    masks = random_masks(rng, 3, 16, 16, max_boxes=3, p_empty=0.3)
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(dtype)
    if seed == 2:
        maps = np.round(maps, 1).astype(dtype)
    ours = aupro_aprilgan(maps, masks)
    ref = cal_pro_score_reference(masks.astype(np.uint8), maps)
    assert ours == pytest.approx(ref, abs=1e-9)
    assert 0.0 < ours < 1.0
    ours_50 = aupro_aprilgan(maps, masks, max_step=50, expect_fpr=0.1)
    ref_50 = cal_pro_score_reference(masks.astype(np.uint8), maps, 50, 0.1)
    assert ours_50 == pytest.approx(ref_50, abs=1e-9)


def test_aprilgan_perfect_map_is_one_and_differs_from_standard() -> None:
    rng = np.random.default_rng(8)
    masks = random_masks(rng, 3, 16, 16)
    perfect = np.where(masks, 0.5 + 0.5 * rng.random(masks.shape), 0.5 * rng.random(masks.shape))
    assert aupro_aprilgan(perfect, masks) == pytest.approx(1.0, abs=1e-6)
    # The coarse grid + FPR rescaling make it a different number on imperfect maps.
    maps = random_maps(rng, masks, None, shift=0.3)
    april = aupro_aprilgan(maps, masks)
    standard = pixel_metrics(maps, masks)["aupro"]
    assert 0.0 < april < 1.0
    assert april != pytest.approx(standard, abs=1e-6)


def test_aprilgan_constant_map_is_nan() -> None:
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 1, 1] = True
    assert math.isnan(aupro_aprilgan(np.ones((1, 4, 4)), masks))


# --------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b: pixel_metrics(a, b),
        lambda a, b: aupro_slow(a, b),
        lambda a, b: aupro_aprilgan(a, b),
    ],
)
def test_pixel_shape_mismatch_names_shapes(call: object) -> None:
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    masks = np.zeros((2, 4, 5), dtype=bool)
    with pytest.raises(ConfigError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        call(maps, masks)  # type: ignore[operator]


def test_image_shape_mismatch_names_shapes() -> None:
    with pytest.raises(ConfigError, match=r"\(3,\).*\(4,\)"):
        image_metrics(np.zeros(3), np.zeros(4))


def test_invalid_inputs_raise_config_error() -> None:
    maps = np.zeros((1, 3, 3), dtype=np.float32)
    masks = np.zeros((1, 3, 3), dtype=bool)
    with pytest.raises(ConfigError, match="binary"):
        image_metrics(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(ConfigError, match="binary"):
        pixel_metrics(maps, np.full((1, 3, 3), 0.5))
    with pytest.raises(ConfigError, match="empty"):
        image_metrics(np.array([]), np.array([]))
    with pytest.raises(ConfigError, match="empty"):
        pixel_metrics(np.zeros((0, 3, 3)), np.zeros((0, 3, 3), dtype=bool))
    with pytest.raises(ConfigError, match="NaN"):
        pixel_metrics(np.full((1, 3, 3), np.nan), masks)
    with pytest.raises(ConfigError, match="NaN"):
        image_metrics(np.array([0.1, np.inf]), np.array([0, 1]))
    with pytest.raises(ConfigError, match=r"\(N, H, W\)"):
        pixel_metrics(maps[0], masks[0])
    with pytest.raises(ConfigError, match="fpr_limit"):
        pixel_metrics(maps, masks, fpr_limit=0.0)
    with pytest.raises(ConfigError, match="fpr_limit"):
        aupro_slow(maps, masks, fpr_limit=1.5)
    with pytest.raises(ConfigError, match="max_step"):
        aupro_aprilgan(maps, masks, max_step=0)
    with pytest.raises(ConfigError, match="numeric"):
        image_metrics(np.array(["a", "b"]), np.array([0, 1]))


# --------------------------------------------------------------------------
# helpers exposed by the module


def test_f1_max_helper() -> None:
    precision = np.array([0.5, 1.0, 0.0, 1.0])
    recall = np.array([1.0, 0.5, 0.0, 0.0])
    assert f1_max(precision, recall) == pytest.approx(2 / 3)
    assert math.isnan(f1_max(np.zeros(3), np.zeros(3)))
    rng = np.random.default_rng(1)
    y = rng.random(50) < 0.3
    s = np.round(rng.random(50), 1)
    p, r, _ = precision_recall_curve(y, s)
    assert f1_max(p, r) == pytest.approx(sk_f1_max(y, s))
    assert f1_max(p, r) == pytest.approx(image_metrics(s, y)["i_f1"])


def test_summarise_population_std_and_nan() -> None:
    runs = [
        {"i_auroc": 0.8, "aupro": math.nan, "p_ap": math.nan},
        {"i_auroc": 0.9, "aupro": 0.5, "p_ap": math.nan},
        {"i_auroc": 1.0, "aupro": 0.7},
    ]
    mean, std = summarise(runs)
    assert list(mean) == ["i_auroc", "aupro", "p_ap"]
    assert mean["i_auroc"] == pytest.approx(0.9)
    assert std["i_auroc"] == pytest.approx(np.std([0.8, 0.9, 1.0]))  # ddof=0
    assert mean["aupro"] == pytest.approx(0.6)
    assert std["aupro"] == pytest.approx(0.1)
    assert math.isnan(mean["p_ap"]) and math.isnan(std["p_ap"])
    single_mean, single_std = summarise([{"x": 0.3}])
    assert single_mean == {"x": 0.3} and single_std == {"x": 0.0}
    with pytest.raises(ConfigError):
        summarise([])


# --------------------------------------------------------------------------
# category-sized input (runs; timing is measured by hand, not asserted)


def test_pixel_metrics_category_sized_input() -> None:
    rng = np.random.default_rng(42)
    n, h, w = 300, 256, 256
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(0, n, 3):  # a third of the images carry 1-3 defects
        for _ in range(rng.integers(1, 4)):
            y0, x0 = rng.integers(0, h - 40, size=2)
            dy, dx = rng.integers(4, 40, size=2)
            masks[i, y0 : y0 + dy, x0 : x0 + dx] = True
    maps = rng.random((n, h, w), dtype=np.float32)
    maps += 0.5 * masks
    out = pixel_metrics(maps, masks)
    assert all(0.0 < v <= 1.0 for v in out.values())
    assert out["p_auroc"] > 0.8


def test_table_cells_name_undefined_metrics_instead_of_printing_nan() -> None:
    # a report's null / NaN (no defective pixel in a category) must read as a dash in the markdown table and
    # plot labels, and a missing std (one seed) as 0
    assert format_mean_std(0.8234, 0.0123) == "82.3±1.2"
    assert format_mean_std(float("nan"), float("nan")) == "–"
    assert format_mean_std(None, None) == "–"
    assert format_mean_std(0.5, None) == "50.0±0.0"


def test_verdict_at_the_fitted_threshold_counts_what_a_worker_flags() -> None:
    scores = np.array([0.1, 0.3, 0.5, 0.2, 0.5, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    # a score equal to the threshold is a defect, as Head.score decides it
    assert verdict_metrics(scores, labels, 0.5) == pytest.approx({"v_far": 1 / 3, "v_recall": 2 / 3})
    assert verdict_metrics(scores, labels, 1.0) == pytest.approx({"v_far": 0.0, "v_recall": 0.0})
    # no threshold (an unfitted head) or no defective image: undefined, not 0
    assert all(math.isnan(v) for v in verdict_metrics(scores, labels, math.nan).values())
    assert math.isnan(verdict_metrics(scores[:3], labels[:3], 0.5)["v_recall"])
    with pytest.raises(ConfigError, match="scores"):
        verdict_metrics(scores, labels[:5], 0.5)
