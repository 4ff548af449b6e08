"""The held-out set a fit measures on, never trains on, and its leave-one-out search.

Held-out references (augmented views when K = 1) and synthetic anomalies of another seed than the training
ones: thresholds, the knn tap choice and the cff guard are all measured on them, never on test data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from scorer.backbones.base import Backbone, BackboneOutput, letterbox_box
from scorer.fit.options import FitOptions
from scorer.head import Head, search_dtype
from scorer.metrics import image_metrics
from scorer.progress import Progress, ProgressEvent, no_progress
from scorer.synth import synthesize


def mask_targets(masks: Sequence[np.ndarray], size: int, *, letterbox: bool = False) -> torch.Tensor:
    """Masks at ``size``: squashed like the images, or (training targets of a letterboxed head) placed where
    the letterbox puts the image on the token grid."""
    out = np.zeros((len(masks), size, size), dtype=np.float32)
    for i, m in enumerate(masks):
        y0, x0, y1, x1 = letterbox_box(*m.shape[:2], size) if letterbox else (0, 0, size, size)
        im = Image.fromarray(m.astype(np.uint8) * 255).resize((x1 - x0, y1 - y0), Image.BILINEAR)
        out[i, y0:y1, x0:x1] = np.asarray(im) > 127
    return torch.from_numpy(out)


def _augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mild view of a normal image: small crop-and-resize and brightness change."""
    h, w = img.shape[:2]
    s = rng.uniform(0.9, 1.0)
    ch, cw = max(2, int(h * s)), max(2, int(w * s))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(img[y : y + ch, x : x + cw]).resize((w, h), Image.BILINEAR)
    f = np.asarray(crop).astype(np.float32) * rng.uniform(0.95, 1.05)
    return np.clip(f, 0, 255).astype(np.uint8)


@dataclass
class HeldOut:
    """Validation data no head is fitted on: held-out normals and synthetic anomalies of another seed.

    Each normal (and, for K >= 2, each anomaly) is scored against a bank without the reference it came
    from, so a training-free bank cannot win by matching an image with itself.
    """

    normals: BackboneOutput
    normal_src: list[int | None]
    anomalies: BackboneOutput
    anomaly_src: list[int | None]
    masks: np.ndarray  # (n, map, map) bool, as the maps cover the source
    how: str


def held_out_set(
    backbone: Backbone,
    refs: Sequence[np.ndarray],
    ref_feats: BackboneOutput,
    opts: FitOptions,
    seed: int,
    progress: Progress = no_progress,
    depth: int | None = None,
) -> HeldOut:
    """The held-out set; its embedding is reported as stage ``held-out`` (images done / total).

    ``depth``: the taps the heads to be thresholded read (``Backbone.run``); the others are zeros.
    """
    lb = opts.score.letterbox
    k = len(refs)
    n_views = 0 if k >= 2 else max(1, opts.held_out.n_augment_k1)
    total = n_views + opts.held_out.n_validation

    def part(offset: int) -> Callable[[int, int], None]:
        def cb(done: int, _: int) -> None:
            if done or not offset:  # the second embedding's start is the first one's end
                progress(ProgressEvent("held-out", offset + done, total))

        return cb

    # Nothing is trained on the held-out set: it is embedded at the precision the head will score frames at
    # (the backbone's own; bf16 on GPUs and bf16 CPUs, 1.8x faster here), so the thresholds are set on the
    # scores production sees. The references themselves stay at the fit's precision.
    with backbone.precision_scope(backbone.precision):
        if k >= 2:
            normals, normal_src, how = ref_feats, list(range(k)), "leave-one-out"
        else:
            rng = np.random.default_rng(seed + 101)
            views = [_augment(refs[0], rng) for _ in range(n_views)]
            normals = backbone.embed(views, letterbox=lb, progress=part(0), depth=depth)
            normal_src, how = [None] * len(views), "augmented views"
        synth = synthesize(refs, opts.held_out.n_validation, seed + 7919)
        anomalies = backbone.embed([x[0] for x in synth], letterbox=lb, progress=part(n_views), depth=depth)
    masks = mask_targets([x[1] for x in synth], opts.score.map_size).numpy() > 0.5
    src: list[int | None] = [x[2] if k >= 2 else None for x in synth]
    return HeldOut(normals, normal_src, anomalies, src, masks, how)


def _bank_without(head: Head, ref_feats: BackboneOutput, j: int | None) -> Head:
    """The head with reference ``j`` (and every view of it: bank image ``i`` comes from ``i % K``) left out."""
    if j is None:
        return head
    k = int(head.meta.get("bank_sources", len(ref_feats)))
    n_img = len(ref_feats)
    keep = [i for i in range(n_img) if i % k != j]
    n_tok = ref_feats.tokens[0].shape[1]
    if all(b.shape[0] == n_img * n_tok for b in head.bank):
        # the bank holds ref_feats' images in order, n_tok rows each: drop rows, nothing to recompute
        rows = torch.zeros(n_img, n_tok, dtype=torch.bool)
        rows[keep] = True
        return replace(head, bank=[b[rows.flatten()] for b in head.bank])
    return replace(head, bank=head.bank_from([t[keep] for t in ref_feats.tokens]))


@dataclass(frozen=True)
class HeldOutSearch:
    """The held-out set searched once, tap by tap, against a head's leave-one-out banks.

    The search is most of a fit's thresholding; with it the tap judgement and the thresholds of the chosen
    fusion read the same per-tap grids instead of searching again (the fused maps are the same bits: the
    same grids, batched the same way, fused and blurred by the same code).
    """

    taps: tuple[int, ...]  # the taps searched; the others' grids are zeros
    bank_rows: tuple[int, ...]  # the bank it was searched against (rows per tap), to refuse another head's
    normals: torch.Tensor  # (n, S, gh, gw) float32
    anomalies: torch.Tensor

    def serves(self, head: Head) -> bool:
        return set(head.weighted_taps()) <= set(self.taps) and self.bank_rows == tuple(b.shape[0] for b in head.bank)


def _by_source(src: Sequence[int | None]) -> list[tuple[int | None, list[int]]]:
    """Query indices grouped by the reference they came from (None first), each group scored on one bank."""
    return [
        (j, [i for i in range(len(src)) if src[i] == j]) for j in sorted(set(src), key=lambda x: -1 if x is None else x)
    ]


def _for_search(head: Head) -> Head:
    """The bank is searched in the dtype a worker on this machine would use (``search_dtype``), so thresholds
    are set on the scores production sees."""
    if (dtype := search_dtype(head)) != head.options.bank_dtype:
        head = head.with_options(bank_dtype=dtype)  # a copy only where it differs: the head's device cache stays
    return head


def search_held_out(head: Head, ref_feats: BackboneOutput, held: HeldOut, taps: Sequence[int]) -> HeldOutSearch:
    """Per-tap grids of the held-out normals and anomalies, each against the bank without its source."""
    head = _for_search(head)

    def grids(queries: BackboneOutput, src: Sequence[int | None]) -> torch.Tensor:
        out = torch.zeros(len(queries), head.n_stages, *head.grid)
        for j, idx in _by_source(src):
            out[idx] = _bank_without(head, ref_feats, j).search_features(queries.select(idx), taps=taps)
        return out

    return HeldOutSearch(
        tuple(taps),
        tuple(b.shape[0] for b in head.bank),
        grids(held.normals, held.normal_src),
        grids(held.anomalies, held.anomaly_src),
    )


def held_out_scores(
    head: Head,
    ref_feats: BackboneOutput,
    queries: BackboneOutput,
    src: Sequence[int | None],
    *,
    per_stage: bool = False,
    grids: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scores, maps (and stage maps) of ``queries``, each against the bank without its source reference.

    ``grids``: the queries' ``HeldOutSearch`` grids, which stand for the search.
    """
    head = _for_search(head)
    n = len(queries)
    scores = np.zeros(n, np.float32)
    maps = np.zeros((n, head.options.map_size, head.options.map_size), np.float32)
    stages = None
    with torch.inference_mode():
        for j, idx in _by_source(src):
            if grids is None:
                sc, mp, st = _bank_without(head, ref_feats, j).score_features(queries.select(idx), per_stage=per_stage)
            else:
                sc, mp, st = head.score_features(queries.select(idx), per_stage=per_stage, grids=grids[idx])
            scores[idx], maps[idx] = sc, mp
            if st is not None:
                if stages is None:
                    stages = np.zeros((n, *st.shape[1:]), np.float16)
                stages[idx] = st
    return scores, maps, stages


def held_out_quality(
    normal: np.ndarray, anomalous: np.ndarray, a_maps: np.ndarray, masks: np.ndarray
) -> dict[str, float]:
    """Held-out image AUROC (normals vs anomalies) and pixel AP (on the anomalies); ``score`` is their mean."""
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    i_auroc = image_metrics(np.r_[normal, anomalous], labels)["i_auroc"]
    p_ap = image_metrics(a_maps.astype(np.float32).ravel(), masks.ravel())["i_ap"] if masks.any() else math.nan
    vals = [v for v in (i_auroc, p_ap) if math.isfinite(v)]
    return {"image_auroc": float(i_auroc), "pixel_ap": float(p_ap), "score": float(np.mean(vals)) if vals else 0.0}
