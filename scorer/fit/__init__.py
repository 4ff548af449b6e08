"""Fitting heads from a product's K normal references (what the calibrator service and ``heads fit`` call).

``knn`` (the default) trains nothing: its bank holds the references (and their support views) and its tap
fusion is chosen on a held-out set (``scorer.fit.knn``). ``aprilgan`` and ``cff`` are trained on synthetic
anomalies (``scorer.fit.learned``). Every head's thresholds come from the held-out set — references left out
of the bank (augmented views when K = 1) and synthetic anomalies of another seed than the training ones —
never from test data (``scorer.fit.heldout``, ``scorer.fit.thresholds``). A ``cff`` fit is guarded: it is
kept only when it beats the training-free head on the held-out set (``guard``), so the CFF affine weights can
never make a product worse than training-free scoring on what the fit can measure.

``fit_heads`` is the one fit; ``fit_head`` (one method, from images) and ``fit_heads_from_features``
(several, from embedded references) call it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from inspection_core.errors import ConfigError, HeadError, ImageError
from scorer.backbones.base import Backbone, BackboneOutput
from scorer.fit.heldout import (
    HeldOut,
    HeldOutSearch,
    _bank_without,
    held_out_scores,
    held_out_set,
    mask_targets,
    search_held_out,
)
from scorer.fit.knn import concat_outputs, fit_knn_taps, support_views, views_for, with_support_views
from scorer.fit.learned import fit_learned, token_normal, train_stage1, train_stage2
from scorer.fit.options import (
    AUTO_VIEWS_UP_TO,
    DEFAULT_METHOD,
    FIT_METHODS,
    KNN_TAPS,
    STRING_OPTIONS,
    SUPPORT_VIEWS,
    FitOptions,
    HeldOutOptions,
    KnnOptions,
    LearnedOptions,
    ThresholdOptions,
)
from scorer.fit.thresholds import image_threshold_from_normals, set_thresholds, threshold_from_good
from scorer.head import Head, KnnHead, LearnedHead, check_compatible
from scorer.progress import Counter, Progress, no_progress

log = logging.getLogger(__name__)

__all__ = [
    "AUTO_VIEWS_UP_TO",
    "DEFAULT_METHOD",
    "FIT_METHODS",
    "KNN_TAPS",
    "STRING_OPTIONS",
    "SUPPORT_VIEWS",
    "FitOptions",
    "HeldOut",
    "HeldOutOptions",
    "HeldOutSearch",
    "KnnOptions",
    "LearnedOptions",
    "ThresholdOptions",
    "_bank_without",
    "check_references",
    "concat_outputs",
    "fit_head",
    "fit_heads",
    "fit_heads_from_features",
    "guard",
    "held_out_scores",
    "held_out_set",
    "image_threshold_from_normals",
    "mask_targets",
    "search_held_out",
    "set_thresholds",
    "support_views",
    "threshold_from_good",
    "token_normal",
    "train_stage1",
    "train_stage2",
    "views_for",
]


def check_references(references: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(references) == 0:
        raise ConfigError("at least one reference image is needed")
    out = []
    for i, r in enumerate(references):
        if not isinstance(r, np.ndarray) or r.ndim != 3 or r.shape[2] != 3 or r.dtype != np.uint8:
            raise ImageError(
                f"reference {i}: expected an H x W x 3 uint8 RGB array, got {getattr(r, 'shape', type(r))}"
            )
        out.append(r)
    return out


def _check_methods(methods: Sequence[str], base_head: Head | None) -> tuple[str, ...]:
    for m in methods:
        if m not in FIT_METHODS:
            raise ConfigError(f"unknown method {m!r}; known: {', '.join(FIT_METHODS)}")
    if base_head is not None and not {"aprilgan", "cff"} & set(methods):
        # beside a learned head knn may come too (the base head serves the learned one; knn is its guard's
        # reference), but a base head for knn alone is a mistake worth naming
        raise ConfigError("method knn is training-free and takes no base head")
    return tuple(methods)


def fit_heads(
    backbone: Backbone,
    references: Sequence[np.ndarray],
    *,
    methods: Sequence[str],
    ref_feats: BackboneOutput | None = None,
    base_head: Head | None = None,
    options: FitOptions | None = None,
    seed: int = 0,
    progress: Progress = no_progress,
) -> dict[str, Head]:
    """Fit once and return the asked heads (``knn``, ``aprilgan``, ``cff``) on the same references.

    ``ref_feats``: the references already embedded (else they are, reported as stage ``features``). Only what
    is asked is built and thresholded: ``aprilgan`` alone skips stage 2, ``knn`` alone trains nothing. A
    guarded ``cff`` may come back as the training-free head (its meta says why). ``progress`` receives
    :class:`~scorer.progress.ProgressEvent` s, in order: ``features`` (references embedded, of K),
    ``held-out`` (images embedded), ``views`` (support views embedded, when the knn bank has them),
    ``synthesis`` (images embedded), ``stage1`` / ``stage2`` (steps, with the loss; learned methods only)
    and ``thresholds`` (heads thresholded).
    """
    refs = check_references(references)
    wanted = _check_methods(methods, base_head)
    opts = options or FitOptions()
    with backbone.precision_scope(opts.precision):
        if ref_feats is None:
            ref_feats = backbone.embed(
                refs, letterbox=opts.score.letterbox, progress=Counter(progress, "features", len(refs)).callback()
            )
        return _fit(backbone, refs, ref_feats, base_head, opts, seed, wanted, progress)


def fit_head(
    backbone: Backbone,
    references: Sequence[np.ndarray],
    *,
    base_head: Head | None = None,
    options: FitOptions | None = None,
    method: str | None = None,
    seed: int = 0,
    progress: Progress = no_progress,
) -> Head:
    """The scorer API: a head for a new product from its K normal reference images (see ``fit_heads``).

    ``method`` defaults to the training-free ``knn`` head, or to ``cff`` when a base head is given.
    """
    method = method or ("cff" if base_head is not None else DEFAULT_METHOD)
    return fit_heads(
        backbone, references, methods=(method,), base_head=base_head, options=options, seed=seed, progress=progress
    )[method]


def fit_heads_from_features(
    backbone: Backbone,
    references: Sequence[np.ndarray],
    ref_feats: BackboneOutput,
    *,
    methods: Sequence[str] = ("aprilgan", "cff"),
    **kw: object,
) -> dict[str, Head]:
    """``fit_heads`` on references already embedded (an evaluation embeds them once for every method)."""
    return fit_heads(backbone, references, methods=methods, ref_feats=ref_feats, **kw)  # type: ignore[arg-type]


def _fit(
    backbone: Backbone,
    refs: list[np.ndarray],
    ref_feats: BackboneOutput,
    base_head: Head | None,
    opts: FitOptions,
    seed: int,
    methods: tuple[str, ...],
    progress: Progress,
) -> dict[str, Head]:
    t_start = time.perf_counter()
    if base_head is not None:
        check_compatible(base_head, backbone)
        if not isinstance(base_head, LearnedHead):
            raise HeadError("the base head has no projections (is it a knn head?)")
    n_taps = len(backbone.taps)
    # Only a knn head on the mid-level taps (or mid+first) is fitted: nothing reads the last tap, so the held-out
    # set and the support views skip its blocks (a quarter of DINOv2's); the views' rows of that tap's bank are zeros,
    # never nearest, so were the tap weighted later it would search the references alone.
    depth = n_taps - 1 if methods == ("knn",) and opts.knn.knn_taps in ("mid", "mid+first") and n_taps >= 3 else None
    held = held_out_set(backbone, refs, ref_feats, opts, seed, progress, depth=depth)
    if len(refs) == 1:
        # measured (BENCHMARKS.md, the verdict at the fitted threshold): views of the one reference score like
        # it, other good parts do not, and such thresholds flagged most good test images on both datasets
        log.warning(
            "one reference: the image threshold comes from views of that image alone, which cannot show how other "
            "good parts differ; expect false alarms until you fit with 2 or more references or set the threshold "
            "from known-good frames (heads set-threshold --good)"
        )
    knn: KnnHead | None = None
    knn_record: dict | None = None
    knn_search: HeldOutSearch | None = None
    knn_feats = ref_feats
    if "knn" in methods or ("cff" in methods and opts.learned.guard):
        kind = views_for(opts.knn.support_views, len(refs))
        knn_feats = with_support_views(
            backbone, refs, ref_feats, kind, letterbox=opts.score.letterbox, depth=depth, progress=progress
        )
        knn, knn_record, knn_search = fit_knn_taps(
            backbone, knn_feats, held, opts.knn, opts.score, n_refs=len(refs), views=kind
        )
        knn.meta["view_taps"] = depth or n_taps  # taps of the views' bank rows; later ones are zero rows
    learned: dict[str, LearnedHead] = {}
    meta: dict = {"shots": len(refs), "base_head": base_head is not None}
    if "aprilgan" in methods or "cff" in methods:
        learned, meta = fit_learned(
            backbone, refs, ref_feats, base_head, opts.learned, opts.score, seed, "cff" in methods, progress
        )
    # every head asked for, and the guard's training-free reference, is thresholded on the held-out set
    heads: dict[str, Head] = {}
    thresholds = Counter(progress, "thresholds", (knn is not None) + sum(name in methods for name in learned))
    thresholds.start()
    if knn is not None:
        knn = set_thresholds(knn, knn_feats, held, opts, meta={"shots": len(refs)}, search=knn_search)
        thresholds.step(detail="knn")
        if knn_record is not None:
            knn.meta["tap_choice"] = knn_record
        if "knn" in methods:
            heads["knn"] = knn
    for name, h in learned.items():
        if name in methods:
            heads[name] = set_thresholds(h, ref_feats, held, opts, meta=meta)
            thresholds.step(detail=name)
    if "cff" in heads and knn is not None:
        heads["cff"] = guard(heads["cff"], knn)
    total = time.perf_counter() - t_start
    for h in heads.values():
        h.meta["fit_seconds"] = total  # the whole fit, held-out set included, for every head it returns
    return heads


def guard(learned: Head, training_free: Head) -> Head:
    """Keep the cff head only where it beats the training-free one on the held-out set.

    Both were measured on the same held-out normals and synthetic anomalies (``fit_metrics.held_out_quality``:
    mean of image AUROC and pixel AP); a tie keeps the training-free head, which has nothing to overfit.
    """
    qc = learned.meta["fit_metrics"]["held_out_quality"]
    qk = training_free.meta["fit_metrics"]["held_out_quality"]
    keep = qc["score"] > qk["score"]
    chosen = learned if keep else training_free
    why = f"held-out score {qc['score']:.3f} (cff) vs {qk['score']:.3f} (training-free knn): " + (
        "the cff head is better" if keep else "the cff head does not beat the training-free head"
    )
    out = replace(chosen, meta={**chosen.meta})
    out.meta["guard"] = {"requested": "cff", "chosen": chosen.method, "reason": why, "cff": qc, "knn": qk}
    log.info("guard: %s", why)
    return out
