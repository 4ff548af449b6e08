"""Few-shot evaluation on MVTec-layout folders.

Features are extracted once per image and reused by every method, shot count and
seed; all pixel metrics come from one sort (``scorer.metrics``) at the output map
resolution. Image scores and thresholds are never normalised with test data.

The report keeps every test image's score per method, K and seed (so image-level
curves and any other figure can be redrawn from the JSON alone) and is strict JSON:
undefined values (a metric of a split without anomalous pixels, say) are ``null``.
Pixel-level curves need the maps, which are dropped after each run, so ``run_eval``
can fill a caller's dict with one small :class:`~scorer.curves.ScoreHistogram` per run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inspection_core.errors import ConfigError
from inspection_core.names import EVAL_METHODS
from scorer.backbones.base import Backbone, BackboneOutput, concat_outputs
from scorer.curves import ScoreHistogram
from scorer.data import Category, discover, draw_references
from scorer.features import FeatureCache
from scorer.head import Head, ScoreOptions, knn_head
from scorer.images import load_image, load_mask
from scorer.metrics import format_mean_std, image_metrics, pixel_metrics, summarise, verdict_metrics
from scorer.progress import Counter, Progress, no_progress

log = logging.getLogger(__name__)

# v_far / v_recall: the verdict at the head's own fitted image threshold (no test label chooses it)
METRIC_KEYS = ("i_auroc", "i_ap", "i_f1", "p_auroc", "p_ap", "p_f1", "aupro", "v_far", "v_recall")

# (data_root, dataset, category, method, K, seed) of a run -> its pixel-score histogram
HistogramKey = tuple[str, str, str, str, int, int]


@dataclass(frozen=True)
class EvalConfig:
    shots: tuple[int, ...] = (1, 2, 4)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("knn", "knn-mean", "aprilgan", "cff", "cff-unguarded")
    sampling: str = "random"
    per_stage: bool = False
    batch_size: int = 8
    max_test: int | None = None  # subsample the test split (stratified, deterministic) for quick runs
    cache_dir: str | None = None  # on-disk token cache shared by eval and train-base runs
    fit_precision: str | None = "fp32"  # refs and fits at this precision; test images at the backbone's
    score: ScoreOptions = field(default_factory=ScoreOptions)

    def __post_init__(self) -> None:
        for m in self.methods:
            if m not in EVAL_METHODS:
                raise ConfigError(f"unknown method {m!r}; known: {', '.join(EVAL_METHODS)}")
        if not self.shots or min(self.shots) < 1:
            raise ConfigError(f"shots must be >= 1, got {self.shots}")
        if not self.seeds:
            raise ConfigError("at least one seed is needed")


# A factory builds a head for a method from reference images and their features.
HeadFactory = Callable[[str, Backbone, list[np.ndarray], BackboneOutput, int], Head]

# What the table compares (inspection_core.names.EVAL_METHODS). knn / aprilgan / cff are what `heads fit
# --method` deploys (cff guarded); knn-mean is the plain training-free mean over every tap (AnomalyDINO-style,
# the earlier baseline), knn-auto the knn head with its taps chosen on the held-out set
# (FitOptions.knn_taps="auto"), knn-views / knn-noviews the knn head with every reference's flips and quarter
# turns in its bank at every K / never (FitOptions.support_views) and cff-unguarded the CFF head before
# the guard, so the table shows what each step changes.


# knn variants that differ from the default knn head by one FitOptions field each (the ablation rows)
VARIANTS: dict[str, dict[str, str]] = {
    "knn-auto": {"knn_taps": "auto"},
    "knn-mid": {"knn_taps": "mid"},
    "knn-views": {"support_views": "rot+flip"},
    "knn-noviews": {"support_views": "none"},
}


def default_head_factory(
    base_head: Head | None = None,
    fit_options: object | None = None,
    progress: Progress = no_progress,
    methods: Sequence[str] | None = None,
) -> HeadFactory:
    """Build heads per method; one fit serves every method for the same references.

    ``methods``: the evaluation's methods (default all), so a knn-only evaluation trains no learned head.
    ``progress`` gets each fit's own stages (``held-out``, ``stage1``, ...; see :func:`scorer.fit.fit_head`).
    """
    asked = set(EVAL_METHODS if methods is None else methods)
    learned = tuple(m for m in ("aprilgan", "cff") if m in asked or (m == "cff" and "cff-unguarded" in asked))
    cache: dict[tuple, dict[str, Head]] = {}

    def make(method: str, backbone: Backbone, images: list[np.ndarray], feats: BackboneOutput, seed: int) -> Head:
        from scorer.fit import FitOptions, fit_heads_from_features, guard

        opts = fit_options if isinstance(fit_options, FitOptions) else FitOptions()
        if method == "knn-mean":
            return knn_head(backbone, feats, opts.score)
        if method in VARIANTS:
            variant = replace(opts, **VARIANTS[method])
            return fit_heads_from_features(
                backbone, images, feats, options=variant, seed=seed, methods=("knn",), progress=progress
            )["knn"]
        key = (seed, tuple(hashlib.sha256(im.tobytes()).hexdigest() for im in images))
        if key not in cache:
            cache.clear()
            # knn also as the cff guard's reference, with a base head too: it needs none, and `heads fit
            # --base-head` guards the same way, so the cross-dataset cff row is what that fit deploys
            wanted = learned + (("knn",) if "knn" in asked or "cff" in learned else ())
            heads = fit_heads_from_features(
                backbone,
                images,
                feats,
                base_head=base_head,
                options=replace(opts, guard=False),
                seed=seed,
                methods=wanted,
                progress=progress,
            )
            if "cff" in heads:
                heads["cff-unguarded"] = heads["cff"]
                if "knn" in heads:
                    heads["cff"] = guard(heads["cff"], heads["knn"])
            cache[key] = heads
        if method not in cache[key]:
            raise ConfigError(f"method {method} is not available with a base head")
        return cache[key][method]

    return make


def _subsample(tests: Sequence, max_test: int | None) -> list:
    if max_test is None or len(tests) <= max_test:
        return list(tests)
    normal = [s for s in tests if s.label == 0]
    bad = [s for s in tests if s.label == 1]
    n_bad = max(1, round(max_test * len(bad) / len(tests)))
    n_norm = max(1, max_test - n_bad)
    pick = lambda xs, n: [xs[i] for i in np.linspace(0, len(xs) - 1, min(n, len(xs))).round().astype(int)]  # noqa: E731
    return pick(normal, n_norm) + pick(bad, n_bad)


def _half(out: BackboneOutput) -> BackboneOutput:
    return BackboneOutput([t.half() for t in out.tokens], out.grid, out.global_embedding, out.content)


def _fit_scope(backbone: Backbone, precision: str | None):  # noqa: ANN202
    return backbone.precision_scope(precision) if precision else contextlib.nullcontext()


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(im) > 127


def _relative(path: Path, root: Path) -> str:
    """Image path as the report names it: relative to the ``--data`` folder, so reports move with the data."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def evaluate_category(
    cat: Category,
    backbone: Backbone,
    cfg: EvalConfig,
    factory: HeadFactory,
    *,
    data_root: Path | None = None,
    pixel_histograms: MutableMapping[HistogramKey, ScoreHistogram] | None = None,
    progress: Progress = no_progress,
    runs: Counter | None = None,
) -> list[dict]:
    """Records of one category; ``pixel_histograms`` (optional) receives each run's pixel-score histogram.

    ``progress`` gets stage ``features`` (test images embedded, of the split) and ``runs``: the
    (method, K, seed) runs done, counted by ``runs`` across categories when given (``run_eval``), so the ETA
    covers the whole evaluation.
    """
    root = Path(data_root) if data_root is not None else cat.root
    tests = _subsample(cat.test, cfg.max_test)
    names = [_relative(s.path, root) for s in tests]
    labels = np.array([s.label for s in tests])
    if labels.min() == labels.max():
        raise ConfigError(f"{cat.key}: the test split needs both normal and defective images")
    size = cfg.score.map_size
    t0 = time.perf_counter()
    images = [load_image(s.path) for s in tests]
    masks = np.zeros((len(tests), size, size), dtype=bool)
    for i, (s, img) in enumerate(zip(tests, images, strict=True)):
        if s.mask_path is not None:
            masks[i] = resize_mask(load_mask(s.mask_path, img.shape[:2]), size)
    del images
    if runs is None:
        runs = Counter(progress, "runs", len(cfg.methods) * len(cfg.shots) * len(cfg.seeds))
        runs.start()
    test_feats = FeatureCache(cfg.cache_dir).embed_paths(
        backbone,
        [s.path for s in tests],
        batch_size=cfg.batch_size,
        letterbox=cfg.score.letterbox,
        progress=Counter(progress, "features", len(tests), detail=f"{cat.key} test images").callback(),
    )
    t_feat = time.perf_counter() - t0
    per_image_s = t_feat / len(tests)
    ref_cache: dict[Path, tuple[np.ndarray, BackboneOutput]] = {}

    def refs_for(paths: list[Path]) -> tuple[list[np.ndarray], BackboneOutput]:
        todo = [p for p in paths if p not in ref_cache]
        if todo:
            imgs = [load_image(p) for p in todo]
            feats = FeatureCache(cfg.cache_dir).embed_paths(
                backbone, todo, batch_size=cfg.batch_size, letterbox=cfg.score.letterbox
            )
            for j, p in enumerate(todo):
                ref_cache[p] = (imgs[j], _half(feats.select([j])))
        imgs = [ref_cache[p][0] for p in paths]
        parts = [ref_cache[p][1] for p in paths]
        return imgs, concat_outputs(parts)

    acc: dict[tuple[str, int], dict[str, list]] = {
        (m, k): {"per_seed": [], "stages": [], "fit_s": []} for m in cfg.methods for k in cfg.shots
    }
    keep = ("map_size", "smooth_sigma", "image_score", "topk_fraction", "bank_dtype", "letterbox")
    for k in cfg.shots:
        for seed in cfg.seeds:
            paths = draw_references(cat.train, k, seed, mode=cfg.sampling)
            with _fit_scope(backbone, cfg.fit_precision):
                imgs, feats = refs_for(paths)
            for method in cfg.methods:
                slot = acc[(method, k)]
                tf = time.perf_counter()
                with _fit_scope(backbone, cfg.fit_precision):
                    head = factory(method, backbone, imgs, feats, seed)
                slot["fit_s"].append(time.perf_counter() - tf)
                head = head.with_options(**{f: getattr(cfg.score, f) for f in keep})
                scores, maps, stages = head.score_features(test_feats, batch=cfg.batch_size, per_stage=cfg.per_stage)
                m = {
                    **image_metrics(scores, labels),
                    **pixel_metrics(maps, masks),
                    **verdict_metrics(scores, labels, head.image_threshold),
                }
                if pixel_histograms is not None:
                    key = (str(root), cat.dataset, cat.name, method, k, seed)
                    pixel_histograms[key] = ScoreHistogram.of(maps, masks)
                slot["per_seed"].append(
                    {
                        "seed": seed,
                        "metrics": m,
                        "image_scores": [
                            {"image": name, "label": int(s.label), "defect": s.defect, "score": float(sc)}
                            for name, s, sc in zip(names, tests, scores, strict=True)
                        ],
                        "references": [str(p) for p in paths],
                        "image_threshold": head.image_threshold,
                        "pixel_threshold": head.pixel_threshold,
                        "fit_metrics": head.meta.get("fit_metrics", {}),
                        "guard": head.meta.get("guard"),
                        "tap_weights": list(head.options.tap_weights) if head.options.tap_weights else None,
                    }
                )
                if stages is not None:
                    st = []
                    n_top = max(1, round(size * size * cfg.score.topk_fraction))
                    for si in range(stages.shape[1]):
                        sm = stages[:, si].astype(np.float32)
                        sc = torch.from_numpy(sm).flatten(1).topk(n_top, 1).values.mean(1).numpy()
                        st.append({**image_metrics(sc, labels), **pixel_metrics(sm, masks)})
                    slot["stages"].append(st)
                what = f"{cat.key} {method} K={k} seed={seed}"
                log.info("%s: %s", what, " ".join(f"{q}={m[q]:.3f}" for q in METRIC_KEYS))
                runs.step(detail=what)
    records = []
    for (method, k), slot in acc.items():
        mean, std = summarise([p["metrics"] for p in slot["per_seed"]])
        rec = {
            "dataset": cat.dataset,
            "category": cat.name,
            "data_root": str(root),
            "method": method,
            "shots": k,
            "seeds": list(cfg.seeds),
            "mean": mean,
            "std": std,
            "per_seed": slot["per_seed"],
            "n_test": len(tests),
            "n_defective": int(labels.sum()),
            "feature_seconds_per_image": None if cfg.cache_dir else per_image_s,
            "fit_seconds_mean": float(np.mean(slot["fit_s"])),
        }
        if slot["stages"]:
            rec["stages"] = {}
            for si, tap in enumerate(backbone.taps):
                smean, sstd = summarise([s[si] for s in slot["stages"]])
                rec["stages"][str(tap)] = {"mean": smean, "std": sstd}
        records.append(rec)
    return records


def run_eval(
    data: Sequence[str | Path],
    backbone: Backbone,
    cfg: EvalConfig,
    *,
    base_head: Head | None = None,
    base_head_path: str | None = None,
    fit_options: object | None = None,
    factory: HeadFactory | None = None,
    pixel_histograms: MutableMapping[HistogramKey, ScoreHistogram] | None = None,
    progress: Progress = no_progress,
) -> dict:
    """The report (plain JSON data, NaN where undefined: ``write_report`` turns those into null).

    ``progress``: see :func:`evaluate_category`; ``runs`` counts every category's runs.
    """
    cats: list[tuple[Path, Category]] = []
    for d in data:
        cats.extend((Path(d), c) for c in discover(d))
    from scorer.fit import FitOptions

    fo = fit_options if isinstance(fit_options, FitOptions) else FitOptions()
    fit_options = replace(fo, score=replace(fo.score, letterbox=cfg.score.letterbox))
    factory = factory or default_head_factory(base_head, fit_options, progress, cfg.methods)
    t0 = time.perf_counter()
    records: list[dict] = []
    runs = Counter(progress, "runs", len(cats) * len(cfg.methods) * len(cfg.shots) * len(cfg.seeds))
    runs.start()
    for root, cat in cats:
        records.extend(
            evaluate_category(
                cat,
                backbone,
                cfg,
                factory,
                data_root=root,
                pixel_histograms=pixel_histograms,
                progress=progress,
                runs=runs,
            )
        )
    return {
        "format": "cff-inspect-eval/1",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "backbone": backbone.spec,
        "weights_id": backbone.weights_id,
        "image_size": backbone.image_size,
        "taps": list(backbone.taps),
        "protocol": "cross-dataset" if base_head is not None else "deployment",
        "base_head": base_head_path,
        "sampling": cfg.sampling,
        "map_size": cfg.score.map_size,
        "smooth_sigma": cfg.score.smooth_sigma,
        "image_score": cfg.score.image_score,
        "letterbox": cfg.score.letterbox,
        "aupro_fpr_limit": 0.3,
        "torch_threads": torch.get_num_threads(),
        "fit_options": _fit_options_record(fit_options),
        "bank_dtype": cfg.score.bank_dtype,
        "elapsed_seconds": time.perf_counter() - t0,
        "records": records,
    }


def _fit_options_record(fit_options: object | None) -> dict:
    from dataclasses import asdict

    from scorer.fit import FitOptions

    fo = fit_options if isinstance(fit_options, FitOptions) else FitOptions()
    return {k: v for k, v in asdict(fo).items() if k != "score"}


def markdown_table(report: dict) -> str:
    head = "| dataset | category | method | K | " + " | ".join(METRIC_KEYS) + " |"
    sep = "|" + "---|" * (4 + len(METRIC_KEYS))
    lines = [head, sep]
    for r in report["records"]:
        cells = [format_mean_std(r["mean"][k], r["std"][k]) for k in METRIC_KEYS]
        lines.append(f"| {r['dataset']} | {r['category']} | {r['method']} | {r['shots']} | " + " | ".join(cells) + " |")
        for tap, st in (r.get("stages") or {}).items():
            cells = [format_mean_std(st["mean"].get(k), st["std"].get(k)) for k in METRIC_KEYS]
            lines.append(f"| | | ↳ tap {tap} | {r['shots']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def json_safe(obj: object) -> object:
    """Plain JSON values: non-finite floats become None (strict parsers reject NaN), numpy scalars Python ones."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_report(report: dict, path: str | Path) -> None:
    """Atomic, strict JSON (``null`` for undefined values, never a bare NaN or Infinity)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
    tmp.replace(p)
