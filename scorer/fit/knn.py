"""The training-free knn head's fit: the support views its bank holds and the taps it fuses.

Nothing is trained: the tap fusion is chosen on the held-out set (or is the mid-level prior).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from scorer.backbones.base import Backbone, BackboneOutput, concat_outputs
from scorer.fit.heldout import HeldOut, HeldOutSearch, held_out_quality, held_out_scores, search_held_out
from scorer.fit.options import AUTO_VIEWS_UP_TO, KnnOptions
from scorer.head import KnnHead, ScoreOptions, image_score, knn_head
from scorer.progress import Counter, Progress


def views_for(support: str, k: int) -> str:
    """The support views a fit with ``k`` references uses (``auto`` resolved)."""
    if support != "auto":
        return support
    return "rot+flip" if k <= AUTO_VIEWS_UP_TO else "none"


def support_views(img: np.ndarray, kind: str, size: int, letterbox: bool) -> list[np.ndarray]:
    """The extra bank views of one reference (itself excluded): its two flips and/or three quarter turns.

    A squashed input is turned after the square resize the backbone would do anyway, so a non-square part is
    turned, not stretched along the other axis; a letterboxed one keeps its aspect and is turned as it is.
    """
    if kind == "none":
        return []
    base = img if letterbox else np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    out: list[np.ndarray] = []
    if kind in ("flip", "rot+flip"):
        out += [base[:, ::-1], base[::-1]]
    if kind in ("rot", "rot+flip"):
        out += [np.rot90(base, q) for q in (1, 2, 3)]
    return [np.ascontiguousarray(v) for v in out]


def _held_out_per_tap(
    head: KnnHead, ref_feats: BackboneOutput, held: HeldOut, taps: Sequence[int]
) -> tuple[list[dict], np.ndarray, HeldOutSearch]:
    """Each of ``taps``' held-out ranking alone (``held_out_quality``), its pixel APs (0 where undefined), and the
    search they came from (for the thresholds of whichever fusion is chosen)."""
    plain = head.with_options(tap_weights=None)
    search = search_held_out(plain, ref_feats, held, taps)
    _, _, n_st = held_out_scores(plain, ref_feats, held.normals, held.normal_src, per_stage=True, grids=search.normals)
    _, _, a_st = held_out_scores(
        plain, ref_feats, held.anomalies, held.anomaly_src, per_stage=True, grids=search.anomalies
    )
    assert n_st is not None and a_st is not None
    per_tap = []
    for s in taps:
        ns = image_score(torch.from_numpy(n_st[:, s].astype(np.float32)), head.options).numpy()
        an = image_score(torch.from_numpy(a_st[:, s].astype(np.float32)), head.options).numpy()
        per_tap.append(held_out_quality(ns, an, a_st[:, s], held.masks))
    aps = np.array([0.0 if not math.isfinite(t["pixel_ap"]) else t["pixel_ap"] for t in per_tap])
    return per_tap, aps, search


def choose_knn_taps(
    head: KnnHead, ref_feats: BackboneOutput, held: HeldOut
) -> tuple[tuple[float, ...], dict, HeldOutSearch]:
    """Fusion weights of a knn head from the held-out set alone.

    A tap whose map localises the held-out synthetic anomalies at less than half the best tap's pixel AP is
    dropped (on the encoder here: the last block, a saliency-tuned, semantic layer); the others are averaged.
    """
    per_tap, aps, search = _held_out_per_tap(head, ref_feats, held, range(len(head.taps)))
    keep = aps >= 0.5 * aps.max() if aps.max() > 0 else np.ones(len(aps), bool)
    weights = tuple(float(x) for x in keep.astype(np.float32))
    record = {
        "rule": "taps with held-out pixel AP >= 0.5 x the best, averaged",
        "taps": list(head.taps),
        "per_tap": per_tap,
        "weights": list(weights),
    }
    return weights, record, search


def mid_taps(n: int) -> tuple[float, ...]:
    """The mid-level taps: every tap but the first and the last, averaged."""
    return tuple(0.0 if i in (0, n - 1) else 1.0 for i in range(n))


def choose_mid_plus_first(
    head: KnnHead, ref_feats: BackboneOutput, held: HeldOut, n_refs: int
) -> tuple[tuple[float, ...], dict, HeldOutSearch | None]:
    """The mid-level taps, plus the first tap only where the held-out set says it localises best of all.

    The mid-level taps are the prior (PatchCore's argument, and the best rule measured on real defects); the
    held-out set may overrule it in one direction only, and only where it can be trusted: with K >= 2 each
    reference is scored against a bank without itself, and the first tap is added when its pixel AP on the
    synthetic anomalies is at least every mid-level tap's. With K = 1 the held-out normals are augmented copies
    of the one reference, which flatter the first block (measured: the held-out choice lost 3-6 image AUROC at
    K = 1 on both shared datasets), so the prior stands.
    """
    n = len(head.taps)
    weights = mid_taps(n)
    if n_refs < 2:
        rule = "mid-level taps (K = 1: no leave-one-out held-out set to judge the first tap)"
        return weights, {"rule": rule}, None
    # the last tap is never chosen (nor embedded, when only this head is fitted), so it is not searched either
    per_tap, aps, search = _held_out_per_tap(head, ref_feats, held, range(n - 1))
    first = bool(aps[0] > 0 and aps[0] >= aps[1 : n - 1].max())
    if first:
        weights = (1.0, *weights[1:])
    rule = "mid-level taps, plus the first where its held-out pixel AP is at least every mid-level tap's"
    return (
        weights,
        {
            "rule": rule,
            "taps": list(head.taps),
            "per_tap": per_tap,
            "first_added": first,
            "weights": list(weights),
        },
        search,
    )


def fit_knn_taps(
    backbone: Backbone,
    ref_feats: BackboneOutput,
    held: HeldOut,
    opts: KnnOptions,
    score: ScoreOptions,
    *,
    n_refs: int,
    views: str,
) -> tuple[KnnHead, dict | None, HeldOutSearch | None]:
    """``ref_feats`` holds the references, then each view of them in the same order (``n_refs`` sources).

    Also the held-out search the tap choice made, if it made one, for the thresholds to reuse.
    """
    head = knn_head(backbone, ref_feats, replace(score, tap_weights=None))
    head.meta.update(shots=n_refs, bank_sources=n_refs, support_views=views, bank_images=len(ref_feats))
    n = len(backbone.taps)
    if opts.knn_taps == "all" or n < 3:
        return head, None, None
    if opts.knn_taps == "mid":
        return head.with_options(tap_weights=mid_taps(n)), {"rule": "mid-level taps (first and last dropped)"}, None
    if opts.knn_taps == "mid+first":
        weights, record, search = choose_mid_plus_first(head, ref_feats, held, n_refs)
    else:
        weights, record, search = choose_knn_taps(head, ref_feats, held)
    return head.with_options(tap_weights=weights), record, search


def with_support_views(
    backbone: Backbone,
    refs: Sequence[np.ndarray],
    ref_feats: BackboneOutput,
    kind: str,
    *,
    letterbox: bool,
    depth: int | None,
    progress: Progress,
) -> BackboneOutput:
    """The references' tokens, then each ``kind`` view of them in the same order (bank image i is of i % K)."""
    if kind == "none":
        return ref_feats
    per_ref = [support_views(r, kind, backbone.image_size, letterbox) for r in refs]
    extra = [v for same_view in zip(*per_ref, strict=True) for v in same_view]  # view-major: i % K = ref
    views_done = Counter(progress, "views", len(extra), detail=kind).callback()
    # like the held-out set, at the precision frames are scored at (bf16 here: 1.4x faster; the bank is
    # searched in bf16 anyway); the references themselves stay at the fit's precision
    with backbone.precision_scope(backbone.precision):
        extra_feats = backbone.embed(extra, letterbox=letterbox, progress=views_done, depth=depth)
    return concat_outputs([ref_feats, extra_feats])
