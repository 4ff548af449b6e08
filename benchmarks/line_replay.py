"""Line replay: a category played as a production line, to measure what commissioning and feedback buy.

References are drawn from ``train/good``; the stream is the rest of ``train/good`` plus the test split, with
defective frames subsampled to about 10 % of it, shuffled by seed. Every frame is scored by the version live when
it arrives (prequential: no frame is scored by a version that learnt from it). Four modes, on the same frames:

* ``static``: the fitted head throughout;
* ``threshold``: after commissioning, the quantile-anchored threshold from the live scores, bank unchanged;
* ``commissioning``: after commissioning, the bank grown from the sure-good frames and the threshold from
  cross-fitted scores (:func:`scorer.commissioning.grow`, what the calibrator runs);
* ``feedback``: commissioning, then a simulated operator labels alarms with their true label (up to
  ``--labels``) and a candidate is refitted after every ``--refit-every`` labels, going live only when it is
  not worse on the labelled frames (:func:`scorer.commissioning.not_worse`).

For each mode, on the frames after commissioning: false-alarm rate and recall at the live verdicts, the recall an
oracle threshold gets at the same false-alarm rate on the same (normalised) scores, image AUROC, and the best
recall at <= 2 % false alarms. Tokens are embedded once per image and cached; a grown bank is searched only for
its added rows (the nearest neighbour in a union is the nearer of the two), which gives the same scores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from inspection_core.errors import DatasetError
from scorer.backbones import load_backbone
from scorer.backbones.base import Backbone, BackboneOutput
from scorer.commissioning import (
    DEFECT,
    GOOD,
    UNKNOWN,
    LineEvidence,
    LineOptions,
    commission,
    extra_rows_grids,
    judged_scores,
    not_worse,
    verdict_errors,
    with_feedback,
)
from scorer.data import Category, discover, draw_references
from scorer.fit import fit_head
from scorer.head import Head
from scorer.images import load_image
from scorer.metrics import image_metrics

MODES = ("static", "threshold", "commissioning", "feedback")
DEFECT_SHARE = 0.10
FAR_BUDGET = 0.02  # the false-alarm rate the "best recall" columns are read at


def stream_order(cat: Category, refs: list[Path], seed: int) -> tuple[list[Path], np.ndarray]:
    """The replayed stream: paths and labels (1 = defective), about ``DEFECT_SHARE`` defective, shuffled."""
    rng = np.random.default_rng(seed)
    ref_set = set(refs)
    good = [p for p in cat.train if p not in ref_set] + [s.path for s in cat.test if s.label == 0]
    bad = [s.path for s in cat.test if s.label == 1]
    n_bad = min(len(bad), max(1, round(len(good) * DEFECT_SHARE / (1 - DEFECT_SHARE))))
    bad = [bad[i] for i in sorted(rng.choice(len(bad), size=n_bad, replace=False))]
    paths = good + bad
    labels = np.array([0] * len(good) + [1] * len(bad))
    order = rng.permutation(len(paths))
    return [paths[i] for i in order], labels[order]


class TokenCache:
    """Tokens of each image at one depth, computed once (fp16 on the CPU, as a fit's held-out set keeps them)."""

    def __init__(self, backbone: Backbone, depth: int, folder: Path | None) -> None:
        self.backbone, self.depth, self.folder = backbone, depth, folder
        self.mem: dict[str, list[torch.Tensor]] = {}

    def _entry(self, prefix: str, key: bytes) -> Path | None:
        """Where a cached item lives (None without a folder): its kind, then a hash of what it depends on."""
        return (
            None if self.folder is None else self.folder / f"{prefix}{hashlib.sha256(key).hexdigest()[:32]}.safetensors"
        )

    def _file(self, path: Path) -> Path | None:
        return self._entry("", f"{self.backbone.weights_id}:{self.depth}:{path.resolve()}".encode())

    def head(self, refs: list[Path], seed: int) -> Head:
        """The default head fitted on ``refs``; the artifact is cached beside the tokens (the fit is deterministic)."""
        from scorer.artifact import load_head, save_head

        bb = self.backbone
        f = self._entry("head-", f"{bb.weights_id}:{seed}:{[str(p) for p in refs]}".encode())
        if f is not None and f.is_file():
            return load_head(f, bb)
        head = fit_head(bb, [load_image(p) for p in refs], seed=seed)
        if f is not None:
            save_head(head, f)
        return head

    def grids(self, head: Head, paths: list[Path], feats: BackboneOutput) -> torch.Tensor:
        """The fitted head's per-tap grids of the stream (the costly search), cached beside the tokens."""
        from safetensors.torch import load_file, save_file

        f = self._entry("grids-", _grids_key(head, paths))
        if f is not None and f.is_file():
            return load_file(str(f))["grids"]
        grids = head.search_features(feats, taps=head.weighted_taps())
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            save_file({"grids": grids.contiguous()}, str(f))
        return grids

    def get(self, paths: list[Path]) -> BackboneOutput:
        from safetensors.torch import load_file, save_file

        todo = []
        for p in paths:
            if str(p) in self.mem:
                continue
            f = self._file(p)
            if f is not None and f.is_file():
                d = load_file(str(f))
                self.mem[str(p)] = [d[f"t{i}"] for i in range(self.depth)]
            else:
                todo.append(p)
        with torch.inference_mode():
            for s in range(0, len(todo), 8):
                chunk = todo[s : s + 8]
                out = self.backbone.forward_images([load_image(p) for p in chunk], depth=self.depth)
                for j, p in enumerate(chunk):
                    toks = [out.tokens[i][j].half().contiguous() for i in range(self.depth)]
                    self.mem[str(p)] = toks
                    f = self._file(p)
                    if f is not None:
                        f.parent.mkdir(parents=True, exist_ok=True)
                        save_file({f"t{i}": t for i, t in enumerate(toks)}, str(f))
        n_taps = len(self.backbone.taps)
        tokens = [torch.stack([self.mem[str(p)][i] for p in paths]) for i in range(self.depth)]
        zero = torch.zeros(1, 1, 1, dtype=tokens[0].dtype).expand_as(tokens[0])
        tokens += [zero] * (n_taps - self.depth)  # taps past the depth are never searched
        return BackboneOutput(tokens, self.backbone.grid)


def _grids_key(head: Head, paths: list[Path]) -> bytes:
    """What a head's grids of a stream depend on: its bank (the first MiB of each tap), fusion and the frames."""
    parts = [b.float().numpy().tobytes()[: 1 << 20] for b in head.bank]
    parts += [repr(head.options.tap_weights).encode(), "\n".join(str(p) for p in paths).encode()]
    return b"\0".join(parts)


def oracle_recall(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """The best recall any threshold on these scores gets with at most ``far`` of the good frames flagged."""
    good, bad = np.sort(scores[labels == 0])[::-1], scores[labels == 1]
    if bad.size == 0:
        return float("nan")
    allowed = int(np.floor(far * good.size + 1e-9))  # good frames that may score at or above the cut
    cut = good[allowed] if allowed < good.size else -np.inf  # the cut must lie above this good frame
    return float((bad > cut).mean())


def summarise(norm: np.ndarray, labels: np.ndarray) -> dict:
    """Figures on the frames after commissioning, from normalised scores (1.0 = the live version's cut)."""
    flagged = norm >= 1.0
    good, bad = labels == 0, labels == 1
    far = float(flagged[good].mean()) if good.any() else float("nan")
    out = {
        "far_after": far,
        "recall_after": float(flagged[bad].mean()) if bad.any() else float("nan"),
        "oracle_recall_after": oracle_recall(norm, labels, far),
        "auroc_after": image_metrics(norm, labels)["i_auroc"],
        "best_recall_at_2pct": oracle_recall(norm, labels, FAR_BUDGET),
    }
    return out


def replay(
    cat: Category,
    backbone: Backbone,
    cache: TokenCache,
    *,
    shots: int,
    seed: int,
    labels_budget: int,
    commissioning: int,
    refit_every: int,
    opts: LineOptions,
    timing_frames: int = 0,
) -> dict:
    refs = draw_references(cat.train, shots, seed)
    t0 = time.perf_counter()
    head = cache.head(refs, seed)
    fit_s = time.perf_counter() - t0
    if head.depth > cache.depth:
        raise DatasetError(f"the fitted head reads {head.depth} taps; the token cache holds {cache.depth}")
    paths, labels = stream_order(cat, refs, seed)
    n = len(paths)
    n_com = min(commissioning, n // 2)
    feats = cache.get(paths)
    t0 = time.perf_counter()
    grids = cache.grids(head, paths, feats)
    search_s = (time.perf_counter() - t0) / n
    static = head.score_features(feats, grids=grids)[0].astype(np.float64)
    after = np.arange(n) >= n_com
    ids = [str(p.relative_to(cat.root)) for p in paths]
    com_idx, after_idx = np.flatnonzero(~after), np.flatnonzero(after)

    def evidence(idx: np.ndarray, lab: np.ndarray, commissioning: bool) -> LineEvidence:
        return LineEvidence(
            feats.select(idx),
            static[idx],
            lab[idx],
            np.full(len(idx), commissioning),
            grids[idx],
            [ids[i] for i in idx],
        )

    unlabelled = np.full(n, UNKNOWN)
    com_ev = evidence(com_idx, unlabelled, True)
    modes: dict[str, dict] = {}
    norm_static = static / head.image_threshold
    y_after = labels[after]
    modes["static"] = {"versions": 1, **summarise(norm_static[after], y_after)}

    v_thr, _ = commission(head, com_ev, replace(opts, growth=0.0))
    modes["threshold"] = {
        "versions": 2,
        "threshold": v_thr.meta["line"]["threshold"],
        **summarise(static[after] / v_thr.image_threshold, y_after),
    }

    t0 = time.perf_counter()
    v2, state = commission(head, com_ev, opts)
    commission_s = time.perf_counter() - t0
    feats_after = feats.select(after_idx)
    grids_v2 = extra_rows_grids(v2, feats_after, grids[after_idx])
    s2 = v2.score_features(feats_after, grids=grids_v2)[0].astype(np.float64)
    modes["commissioning"] = {
        "versions": 2,
        "threshold": v2.meta["line"]["threshold"],
        "bank_rows": v2.meta["line"]["bank_rows"],
        "fitted_bank_rows": v2.meta["line"]["fitted_bank_rows"],
        "commission_s": commission_s,
        **summarise(s2 / v2.image_threshold, y_after),
    }

    # feedback: prequential over the frames after commissioning (position k = frame after_idx[k])
    v2_rows = [int(b.shape[0]) for b in v2.bank]
    live, live_scores = v2, s2
    lab = unlabelled.copy()
    used, since, versions, refused = 0, 0, 2, []
    norm_fb = np.zeros(len(after_idx))
    for k, j in enumerate(after_idx):
        norm_fb[k] = live_scores[k] / live.image_threshold
        if norm_fb[k] >= 1.0 and used < labels_budget:
            lab[j] = GOOD if labels[j] == 0 else DEFECT
            used += 1
            since += 1
        if since >= refit_every or (used == labels_budget and since > 0):
            since = 0
            known = np.flatnonzero(lab != UNKNOWN)
            cand, _ = with_feedback(state, live, evidence(known, lab, False), opts, frames_seen=k + 1)
            cand_grids = extra_rows_grids(cand, feats_after, grids_v2, known_rows=v2_rows)
            cand_scores = cand.score_features(feats_after, grids=cand_grids)[0].astype(np.float64)
            la = lab[after_idx]
            seen = la != UNKNOWN
            judged = judged_scores(cand, [ids[i] for i in after_idx[seen]], cand_scores[seen])
            ok, why = not_worse(
                verdict_errors(judged, la[seen], cand.image_threshold),
                verdict_errors(live_scores[seen], la[seen], live.image_threshold),
            )
            if ok:
                live, live_scores, versions = cand, cand_scores, versions + 1
            else:
                refused.append({"after_frame": int(j), "why": why})
    modes["feedback"] = {
        "versions": versions,
        "labels_used": used,
        "labelled_defects": int((lab == DEFECT).sum()),
        "refused_candidates": refused,
        "bank_rows": [int(b.shape[0]) for b in live.bank],
        **summarise(norm_fb, y_after),
    }
    out = {
        "dataset": cat.key,
        "shots": shots,
        "seed": seed,
        "stream_frames": n,
        "stream_defects": int(labels.sum()),
        "commissioning_frames": n_com,
        "frames_after": int(after.sum()),
        "defects_after": int(labels[after].sum()),
        "fit_s": fit_s,
        "fitted_image_threshold": head.image_threshold,
        "static_search_s_per_frame": search_s,
        "modes": modes,
    }
    if timing_frames:
        out["cost"] = frame_cost(head, live, paths[:timing_frames])
    return out


def frame_cost(static: Head, grown: Head, paths: list[Path]) -> dict:
    """Seconds per frame, backbone included, of the static head and the final grown one, back to back."""
    imgs = [load_image(p) for p in paths]
    out = {}
    for name, h in (("static", static), ("grown", grown), ("static_again", static)):
        h.score(imgs[:2])  # warm-up
        t0 = time.perf_counter()
        h.score(imgs, batch_size=len(imgs))
        out[name] = (time.perf_counter() - t0) / len(imgs)
    base = min(out["static"], out["static_again"])
    out["ratio"] = out["grown"] / base
    out["bank_rows_ratio"] = [g.shape[0] / s.shape[0] for g, s in zip(grown.bank, static.bank, strict=True)]
    return out


def table(runs: list[dict]) -> str:
    """Markdown: one row per dataset, K and mode, mean (min-max) over seeds."""
    lines = [
        "| dataset | K | mode | false alarms after | recall after | oracle recall, same rate | image AUROC after "
        "| best recall at <= 2 % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["dataset"], r["shots"]) for r in runs})
    for ds, k in keys:
        rs = [r for r in runs if r["dataset"] == ds and r["shots"] == k]
        for m in MODES:
            cells = []
            for f in ("far_after", "recall_after", "oracle_recall_after", "auroc_after", "best_recall_at_2pct"):
                v = np.array([r["modes"][m][f] for r in rs], dtype=float)
                cells.append(f"{100 * np.nanmean(v):.1f} ({100 * np.nanmin(v):.1f}-{100 * np.nanmax(v):.1f})")
            lines.append(f"| {ds} | {k} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace, data: list[str]) -> dict:
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone)
    opts = LineOptions(image_far=args.image_far, growth=LineOptions.growth if args.growth is None else args.growth)
    cache = TokenCache(backbone, depth=min(3, len(backbone.taps)), folder=Path(args.cache) if args.cache else None)
    runs = []
    for root in data:
        for cat in discover(root):
            for k in args.shots:
                for seed in args.seeds:
                    r = replay(
                        cat,
                        backbone,
                        cache,
                        shots=k,
                        seed=seed,
                        labels_budget=args.labels,
                        commissioning=args.commissioning,
                        refit_every=args.refit_every,
                        opts=opts,
                        timing_frames=args.timing_frames if seed == args.seeds[0] else 0,
                    )
                    runs.append(r)
                    m = r["modes"]
                    print(
                        f"{cat.key} K={k} seed={seed}: "
                        + "; ".join(
                            f"{name} far {100 * m[name]['far_after']:.1f}% rec {100 * m[name]['recall_after']:.0f}% "
                            f"auroc {100 * m[name]['auroc_after']:.1f}"
                            for name in MODES
                        ),
                        flush=True,
                    )
    report = {
        "runs": runs,
        "table": table(runs),
        "options": {k: v for k, v in vars(args).items() if k != "func"} | {"data": data},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    print(report["table"])
    return report
