"""What the line teaches a head: a threshold from live frames, a bank grown from them, and operator feedback.

A head fitted from a few photos ranks parts well but cuts badly: its image threshold comes from views of those
photos, which score lower than other good parts. A running line shows the head hundreds of frames, nearly all
good, and operators who see every alarm. This module turns that evidence into a new head version; the
calibrator service and the line-replay benchmark both call it, so the benchmark measures what a line gets.

Three rules, each with its reason:

* **Threshold: a quantile-anchored cut on log scores** (:func:`robust_image_threshold`). ``exp(median + z *
  (Q90 - median) / 1.2816)`` of the log image scores of the commissioning frames, ``z`` for the target
  false-alarm rate: the distance from the median to the 90th percentile, read as a normal distribution's 1.28
  sigma, extrapolated to the target. False alarms live in the upper tail, and good frames' scores have a heavy
  one (on kolektor_sdd the 99th percentile of good frames sits at twice the median, where a median-absolute-
  deviation spread predicted 1.3 times and let 7-11 % of good frames through), so the spread is read as high in
  the tail as defects allow: up to 10 % of defective frames can only push the 90th percentile up, which errs
  toward fewer false alarms; the median ignores them. The fit's own rule includes the maximum, which a single
  defect ruins.
* **Bank growth: farthest-first coverage** (:func:`cover`). The frames the head itself is surest are good (at or
  below the median live score) offer their tokens; those the bank covers worst are added first, each pick
  shrinking its neighbours' distances (greedy k-center, as PatchCore's coreset), until the bank has grown by
  ``growth`` times its fitted rows or every offered token lies within the offered tokens' median distance. Search
  cost is linear in bank rows and the backbone's cost does not change, so a frame costs at most ``1 + growth``
  times the fitted head's.
* **No frame scores itself**: growth is cross-fitted. The commissioning frames are split into folds; each frame's
  score for the threshold comes from a bank grown from the other folds only, since a frame whose own tokens are in
  the bank scores near zero and would pull the cut down.

Operator feedback: a frame labelled good (a false alarm) adds its tokens until each lies within half the live
threshold of the bank, so its next score is at most half that threshold; a frame labelled defect never joins the
bank or the threshold's frames, and it is what :func:`not_worse` checks a candidate on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

from inspection_core.errors import ConfigError, HeadError
from scorer.backbones.base import BackboneOutput
from scorer.head import Head, nn_distance

GOOD, DEFECT, UNKNOWN = 0, 1, -1
THRESHOLD_RULE = "q90-log"
Q90_SIGMAS = NormalDist().inv_cdf(0.9)  # 1.2816: where a normal's 90th percentile lies, in sigmas


@dataclass(frozen=True)
class LineOptions:
    """How commissioning frames and feedback become a new head version."""

    image_far: float = 0.01  # the target share of good frames flagged
    growth: float = 0.5  # rows the bank may gain per tap, as a fraction of the fitted bank (0 = threshold only)
    sure_quantile: float = 0.5  # frames at or below this quantile of the live scores may join the bank
    folds: int = 2  # cross-fitting folds for the threshold's scores
    feedback_radius: float = 0.5  # a confirmed false alarm is covered to this fraction of the live threshold
    feedback_share: float = 0.2  # of the growth budget, kept for confirmed false alarms
    min_frames: int = 20  # fewer commissioning frames than this cannot show a score distribution

    def __post_init__(self) -> None:
        if not 0 < self.image_far < 0.5:
            raise ConfigError(f"image_far must be in (0, 0.5), got {self.image_far}")
        if not 0 <= self.growth <= 10:
            raise ConfigError(f"growth must be in [0, 10] (a fraction of the fitted bank), got {self.growth}")
        if not 0 < self.sure_quantile <= 1:
            raise ConfigError(f"sure_quantile must be in (0, 1], got {self.sure_quantile}")
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2 (a frame never scores against its own tokens), got {self.folds}")
        if not 0 <= self.feedback_share <= 1:
            raise ConfigError(f"feedback_share must be in [0, 1], got {self.feedback_share}")
        if not 0 < self.feedback_radius < 1:
            raise ConfigError(f"feedback_radius must be in (0, 1), got {self.feedback_radius}")
        if self.min_frames < 5:
            raise ConfigError(f"min_frames must be >= 5, got {self.min_frames}")


def robust_image_threshold(scores: Sequence[float] | np.ndarray, image_far: float) -> tuple[float, dict]:
    """The cut ``exp(median + z * (Q90 - median) / 1.2816)`` of log image scores, and what it came from."""
    sc = np.asarray(scores, dtype=np.float64).ravel()
    if sc.size < 5 or not np.isfinite(sc).all():
        raise ConfigError(f"need at least 5 finite frame scores to set a threshold, got {sc.size}")
    if not 0 < image_far < 0.5:
        raise ConfigError(f"image_far must be in (0, 0.5), got {image_far}")
    logs = np.log(np.maximum(sc, 1e-12))
    med = float(np.median(logs))
    q90 = float(np.quantile(logs, 0.9))
    # a floor on the spread: identical frames (a synthetic line) would otherwise flag any change at all
    sigma = max((q90 - med) / Q90_SIGMAS, 0.02)
    z = NormalDist().inv_cdf(1 - image_far)
    t = math.exp(med + z * sigma)
    return t, {
        "rule": THRESHOLD_RULE,
        "formula": "exp(median + z * max((Q90 - median) / 1.2816, 0.02)) of log image scores",
        "n": int(sc.size),
        "image_far": image_far,
        "z": z,
        "median_score": math.exp(med),
        "log_sigma": sigma,
        "flagged_share": float((sc >= t).mean()),
    }


def cover(
    candidates: torch.Tensor, dist: torch.Tensor, *, budget: int, radius: float, batch: int = 256
) -> torch.Tensor:
    """Indices of candidate rows picked farthest-first until ``budget`` rows or all lie within ``radius``.

    ``candidates``: (M, D) L2-normalised tokens; ``dist``: their distance (1 - max cosine) to the bank so far.
    Picks go in batches: of a batch's ``batch`` farthest rows, one that an earlier pick of the same batch
    covers to half its distance is skipped, so near-duplicates do not fill the budget.
    """
    if budget <= 0 or candidates.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    d = dist.clone().float()
    chosen: list[int] = []
    while len(chosen) < budget:
        k = min(batch, budget - len(chosen), int((d > radius).sum()))
        if k <= 0:
            break
        top = torch.topk(d, k).indices
        sims = candidates[top] @ candidates[top].T  # (k, k)
        kept: list[int] = []
        for a in range(k):
            if kept and float((1 - sims[a, kept]).min()) < 0.5 * float(d[top[a]]):
                continue
            kept.append(a)
        picks = top[kept]
        chosen.extend(picks.tolist())
        d[picks] = 0.0
        d = torch.minimum(d, 1 - (candidates @ candidates[picks].T).amax(1))
    return torch.tensor(chosen, dtype=torch.long)


@dataclass
class LineEvidence:
    """Frames a line showed a head version: tokens (the version's backbone, its depth), live scores, labels.

    ``labels``: GOOD / DEFECT from feedback, UNKNOWN otherwise; ``commissioning``: which frames were scored in
    the commissioning phase (the threshold's frames); ``grids``: the fitted bank's per-tap distance grids of
    these frames, when the caller already has them (the worker's search; else they are computed here).
    """

    feats: BackboneOutput
    live_scores: np.ndarray
    labels: np.ndarray
    commissioning: np.ndarray
    grids: torch.Tensor | None = None
    frame_ids: list[str] = field(default_factory=list)

    @property
    def tokens_per_frame(self) -> int:
        return int(self.feats.tokens[0].shape[1])

    def __post_init__(self) -> None:
        n = len(self.feats)
        for name in ("live_scores", "labels", "commissioning"):
            if len(getattr(self, name)) != n:
                raise HeadError(f"line evidence has {len(getattr(self, name))} {name} for {n} frames")
        if self.grids is not None and self.grids.shape[0] != n:
            raise HeadError(f"line evidence has {self.grids.shape[0]} grids for {n} frames")


def _rows(feats: BackboneOutput, frames: np.ndarray, tap: int) -> torch.Tensor:
    t = feats.tokens[tap][torch.as_tensor(frames, dtype=torch.long)]
    return F.normalize(t.float().flatten(0, -2), dim=-1)


def _search_new(feats: BackboneOutput, frames: np.ndarray, rows: torch.Tensor, tap: int, chunk: int) -> torch.Tensor:
    """(len(frames), N) distances of the frames' tokens to extra bank rows (inf where there are none)."""
    n_tok = feats.tokens[tap].shape[1]
    if rows.shape[0] == 0 or len(frames) == 0:
        return torch.full((len(frames), n_tok), float("inf"))
    out = []
    for s in range(0, len(frames), 8):
        q = feats.tokens[tap][torch.as_tensor(frames[s : s + 8], dtype=torch.long)].float()
        out.append(nn_distance(q, rows, chunk=chunk))
    return torch.cat(out)


def fitted_rows(head: Head) -> tuple[int, ...]:
    """Bank rows per tap as fitted (before any line growth), from the head's record or its bank."""
    line = head.meta.get("line") or {}
    base = line.get("fitted_bank_rows")
    return tuple(int(x) for x in base) if base else tuple(int(b.shape[0]) for b in head.bank)


def base_head(head: Head) -> Head:
    """The head with its bank cut back to the fitted rows: every line version grows from the fit, not from the
    version before, so the same evidence always gives the same version."""
    rows = fitted_rows(head)
    return replace(head, bank=[b[:r] for b, r in zip(head.bank, rows, strict=True)])


@dataclass
class LineState:
    """What a commissioning fit leaves for feedback refits: the fitted head, the commissioning evidence, the rows
    each fold added per tap, and the commissioning frames' cross-fitted grids. Kept in memory; :func:`commission`
    recomputes it from the same evidence."""

    base: Head
    evidence: LineEvidence
    fold_rows: dict[int, list[torch.Tensor]]
    cross_grids: torch.Tensor
    record: dict


def commission(head: Head, ev: LineEvidence, opts: LineOptions) -> tuple[Head, LineState]:
    """A new version from commissioning frames: the fitted bank grown from the sure-good frames (cross-fitted
    folds), the quantile-anchored threshold on the frames' cross-fitted scores. Thresholds and bank come from ``head``'s
    fitted bank (:func:`base_head`); frames labelled DEFECT are left out of both."""
    base = base_head(head)
    taps = base.weighted_taps()
    n = len(ev.feats)
    labels = np.asarray(ev.labels)
    usable = np.asarray(ev.commissioning, bool) & (labels != DEFECT)
    _need_frames(usable, opts)
    grids = ev.grids if ev.grids is not None else base.search_features(ev.feats, taps=taps)
    live = np.asarray(ev.live_scores, np.float64)
    cut = float(np.quantile(live[usable], opts.sure_quantile))
    sure = usable & (live <= cut)
    fold = np.arange(n) % opts.folds
    chunk = base.options.bank_chunk
    fold_rows: dict[int, list[torch.Tensor]] = {}
    for i in taps:
        budget = int(opts.growth * (1 - opts.feedback_share) * base.bank[i].shape[0])
        per_fold = []
        for f in range(opts.folds):
            frames = np.flatnonzero(sure & (fold == f))
            cand = _rows(ev.feats, frames, i)
            d = grids[frames, i].flatten()
            radius = float(d.median()) if d.numel() else 0.0
            per_fold.append(cand[cover(cand, d, budget=budget // opts.folds, radius=radius)])
        fold_rows[i] = per_fold
    # a sure frame of fold f offered rows to fold f: it sees the other folds' rows only; the rest see all
    cf = grids.clone().float()
    for i in taps:
        for f in range(opts.folds):
            frames = np.flatnonzero(fold == f)
            own = sure[frames]
            others = torch.cat([r for g, r in enumerate(fold_rows[i]) if g != f])
            every = torch.cat([others, fold_rows[i][f]])
            for sel, rows in ((frames[own], others), (frames[~own], every)):
                if len(sel):
                    d = _search_new(ev.feats, sel, rows, i, chunk)
                    cf[sel, i] = torch.minimum(cf[sel, i], d.view(len(sel), *cf.shape[2:]))
    record = {
        "fitted_bank_rows": list(fitted_rows(head)),
        "growth": opts.growth,
        "sure_quantile": opts.sure_quantile,
        "sure_score_cut": cut,
        "folds": opts.folds,
        "frames": {
            "commissioning": int(np.asarray(ev.commissioning, bool).sum()),
            "bank_frames": int(sure.sum()),
        },
        "frame_ids": list(ev.frame_ids)[:10000],
        "live_scores": [round(float(x), 6) for x in live][:10000],
    }
    state = LineState(base, ev, fold_rows, cf, record)
    return with_feedback(state, head, None, opts)


def _need_frames(usable: np.ndarray, opts: LineOptions) -> None:
    if int(usable.sum()) < opts.min_frames:
        raise HeadError(
            f"{int(usable.sum())} commissioning frames without a defect label; need {opts.min_frames} to set a cut"
        )


def label_cut(oos_good_scores: np.ndarray, frames_seen: int, image_far: float) -> float:
    """The lowest cut that lets at most ``image_far`` of the frames seen since commissioning through as labelled
    false alarms (scored out of sample); -inf when the labels allow the cut to stay where the rule put it.

    Every alarm an operator labels good is a sample of the good frames' upper tail, which is what a threshold
    from unlabelled frames cannot see."""
    s = np.sort(np.asarray(oos_good_scores, np.float64))[::-1]
    allowed = int(math.floor(image_far * max(0, frames_seen) + 1e-9))
    return float(np.nextafter(s[allowed], np.inf)) if s.size > allowed else float("-inf")


def with_feedback(
    state: LineState, live: Head, feedback: LineEvidence | None, opts: LineOptions, frames_seen: int | None = None
) -> tuple[Head, LineState]:
    """The commissioning version plus operator feedback: frames labelled GOOD add rows until each of their tokens
    lies within ``feedback_radius`` of ``live``'s threshold (from a reserve of ``feedback_share`` of the growth
    budget); frames labelled DEFECT (commissioning frames too, by frame id) leave the threshold's frames. With
    ``frames_seen`` (frames scored since commissioning ended), the cut is at least :func:`label_cut` of the
    labelled good frames' scores, each scored without its own rows; with feedback it never falls below the cut of
    ``live`` when that is a line version already."""
    base, ev = state.base, state.evidence
    taps = base.weighted_taps()
    chunk = base.options.bank_chunk
    labels = np.asarray(ev.labels).copy()
    fb_labels = np.zeros(0, int) if feedback is None else np.asarray(feedback.labels)
    if feedback is not None and feedback.frame_ids:
        index = {fid: k for k, fid in enumerate(ev.frame_ids)}
        for fid, lab in zip(feedback.frame_ids, fb_labels, strict=True):
            if fid in index and lab == DEFECT:
                labels[index[fid]] = DEFECT
    usable = np.asarray(ev.commissioning, bool) & (labels != DEFECT)
    _need_frames(usable, opts)  # defect labels on commissioning frames may leave too few
    goods = np.flatnonzero(fb_labels == GOOD)
    live_t = float(live.image_threshold)
    radius = opts.feedback_radius * live_t if math.isfinite(live_t) and live_t > 0 else 0.0
    cf = state.cross_grids
    fb_rows: dict[int, torch.Tensor] = {}
    oos = None  # the labelled good frames' grids without their own feedback rows
    if feedback is not None and len(goods):
        fb_grids = feedback.grids if feedback.grids is not None else base.search_features(feedback.feats, taps=taps)
        oos = fb_grids[goods].clone().float()
    for i in taps:
        line_rows = torch.cat(state.fold_rows[i])
        fb = torch.zeros(0, base.bank[i].shape[1])
        if oos is not None and feedback is not None:
            n_tok = feedback.tokens_per_frame
            d = torch.minimum(oos[:, i].flatten(), _search_new(feedback.feats, goods, line_rows, i, chunk).flatten())
            oos[:, i] = d.view(len(goods), *oos.shape[2:])
            reserve = int(opts.growth * opts.feedback_share * base.bank[i].shape[0])
            cand = _rows(feedback.feats, goods, i)
            picks = cover(cand, d, budget=reserve, radius=radius)
            fb = cand[picks]
            src = picks // n_tok
            for g in range(len(goods)):
                others = fb[src != g]
                if others.shape[0]:
                    dg = _search_new(feedback.feats, goods[g : g + 1], others, i, chunk)
                    oos[g, i] = torch.minimum(oos[g, i], dg.view(*oos.shape[2:]))
        fb_rows[i] = fb
        if fb.shape[0]:
            n = len(ev.feats)
            d = _search_new(ev.feats, np.arange(n), fb, i, chunk)
            cf = cf.clone() if cf is state.cross_grids else cf
            cf[:, i] = torch.minimum(cf[:, i], d.view(n, *cf.shape[2:]))
    bank = list(base.bank)
    for i in taps:
        bank[i] = torch.cat(
            [base.bank[i], *(r.to(base.bank[i].dtype) for r in state.fold_rows[i]), fb_rows[i].to(base.bank[i].dtype)]
        )
    grown = replace(base, bank=bank)
    scores, _, _ = grown.score_features(ev.feats, grids=cf)
    threshold, rule = robust_image_threshold(scores[usable], opts.image_far)
    oos_by_id: dict[str, float] = {}
    if oos is not None and feedback is not None:
        oos_scores = grown.score_features(feedback.feats.select(goods), grids=oos)[0]
        if feedback.frame_ids:
            oos_by_id = {feedback.frame_ids[g]: round(float(x), 6) for g, x in zip(goods, oos_scores, strict=True)}
        if frames_seen is not None:
            cut = label_cut(oos_scores, frames_seen, opts.image_far)
            rule = {
                **rule,
                "frames_seen": int(frames_seen),
                "label_cut": cut if math.isfinite(cut) else None,
                "raised_by_labels": bool(cut > threshold),
            }
            threshold = max(threshold, cut)
    if feedback is not None and "line" in live.meta and math.isfinite(live_t) and live_t > threshold:
        # labels are given to alarms only: they say nothing about frames below the live cut, and added rows only
        # ever lower scores, so keeping the live cut means feedback can never add a false alarm
        rule = {**rule, "kept_live_cut": live_t, "rule_cut": threshold}
        threshold = live_t
    out = grown.with_thresholds(image=threshold)
    line = {
        **state.record,
        "threshold": rule,
        "feedback_share": opts.feedback_share,
        "frames": {
            **state.record["frames"],
            "threshold_frames": int(usable.sum()),
            "confirmed_good": int(len(goods)),
            "confirmed_defect": _defects(ev, labels, feedback, fb_labels),
        },
        "taps": [
            {
                "tap": i,
                "fitted_rows": int(base.bank[i].shape[0]),
                "line_rows": int(sum(r.shape[0] for r in state.fold_rows[i])),
                "feedback_rows": int(fb_rows[i].shape[0]),
            }
            for i in taps
        ],
        "bank_rows": [int(b.shape[0]) for b in bank],
        "previous_image_threshold": live_t,
        "feedback_frame_ids": [] if feedback is None else list(feedback.frame_ids)[:10000],
        "labelled_good_out_of_sample": oos_by_id,
        "cross_fitted_scores": [round(float(x), 6) for x in scores[usable]][:10000],
    }
    out.meta = {**live.meta, "line": line}
    return out, state


def _defects(ev: LineEvidence, labels: np.ndarray, feedback: LineEvidence | None, fb_labels: np.ndarray) -> int:
    """Distinct frames labelled DEFECT among the commissioning frames and the feedback."""
    if ev.frame_ids and (feedback is None or feedback.frame_ids):
        ids = {f for f, lab in zip(ev.frame_ids, labels, strict=True) if lab == DEFECT}
        if feedback is not None:
            ids |= {f for f, lab in zip(feedback.frame_ids, fb_labels, strict=True) if lab == DEFECT}
        return len(ids)
    return int((labels == DEFECT).sum() + (fb_labels == DEFECT).sum())


def grow(head: Head, ev: LineEvidence, opts: LineOptions, frames_seen: int | None = None) -> tuple[Head, dict]:
    """A new version from line evidence in one call: commissioning frames (``ev.commissioning``) set the
    threshold and grow the bank, frames labelled afterwards are feedback (:func:`commission`, then
    :func:`with_feedback`). ``head`` is the live version: its threshold sets the feedback radius."""
    com = np.asarray(ev.commissioning, bool)
    labels = np.asarray(ev.labels)
    idx_c, idx_f = np.flatnonzero(com), np.flatnonzero(labels != UNKNOWN)

    def part(idx: np.ndarray) -> LineEvidence:
        return LineEvidence(
            ev.feats.select(idx),
            np.asarray(ev.live_scores)[idx],
            labels[idx],
            com[idx],
            None if ev.grids is None else ev.grids[idx],
            [ev.frame_ids[k] for k in idx] if ev.frame_ids else [],
        )

    out, state = commission(head, part(idx_c), opts)
    if len(idx_f):  # the commissioning version is already the answer without labels
        out, _ = with_feedback(state, head, part(idx_f), opts, frames_seen)
    return out, out.meta["line"]


def extra_rows_grids(
    head: Head, feats: BackboneOutput, base_grids: torch.Tensor, known_rows: Sequence[int] | None = None
) -> torch.Tensor:
    """Per-tap grids of ``feats`` against ``head``'s bank, given their grids against its first ``known_rows``
    rows per tap (default: the fitted rows): only the rest is searched (the nearest neighbour in a union is the
    nearer of the two)."""
    rows = fitted_rows(head) if known_rows is None else tuple(known_rows)
    out = base_grids.clone().float()
    n = len(feats)
    for i in head.weighted_taps():
        extra = head.bank[i][rows[i] :]
        if extra.shape[0]:
            d = _search_new(feats, np.arange(n), extra.float(), i, head.options.bank_chunk)
            out[:, i] = torch.minimum(out[:, i], d.view(n, *out.shape[2:]))
    return out


def judged_scores(head: Head, frame_ids: Sequence[str], scores: np.ndarray) -> np.ndarray:
    """A line version's scores of labelled frames as the no-harm rule reads them: a frame labelled good that joined
    its bank counts with the score it gets without its own rows, so a version is not judged on what it memorised."""
    oos = (head.meta.get("line") or {}).get("labelled_good_out_of_sample") or {}
    return np.array([oos.get(f, float(x)) for f, x in zip(frame_ids, scores, strict=True)], np.float64)


def verdict_errors(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    """Mistakes on labelled frames at a threshold: false alarms on GOOD, misses on DEFECT."""
    s, lab = np.asarray(scores), np.asarray(labels)
    fa = int(((s >= threshold) & (lab == GOOD)).sum())
    miss = int(((s < threshold) & (lab == DEFECT)).sum())
    return {"false_alarms": fa, "misses": miss, "errors": fa + miss, "labelled": int((lab != UNKNOWN).sum())}


def not_worse(candidate: dict[str, int], live: dict[str, int]) -> tuple[bool, str]:
    """A candidate goes live only with no more mistakes on the labelled frames than the live version; with as
    many, only if it misses no more labelled defects (a miss costs a line more than a false alarm)."""
    if candidate["errors"] > live["errors"]:
        return False, f"{candidate['errors']} mistakes on labelled frames, the live version {live['errors']}"
    if candidate["errors"] == live["errors"] and candidate["misses"] > live["misses"]:
        return False, f"misses {candidate['misses']} labelled defects, the live version {live['misses']}"
    return True, f"{candidate['errors']} mistakes on {candidate['labelled']} labelled frames (live: {live['errors']})"
