"""PNG figures of an eval report: ROC / PR curves (image and pixel level) and metric against K.

matplotlib is imported inside the functions that draw, on its Agg canvas (no display, no
pyplot state), so importing the scorer or running ``cff-inspect --help`` never loads it.
Image-level curves are redrawn from the report's per-image scores; pixel-level curves come
from the binned histograms ``run_eval`` collects (``scorer.curves``), without which those
panels say so instead of failing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inspection_core.errors import ConfigError
from scorer.curves import Curves, ScoreHistogram, image_curves
from scorer.metrics import format_mean_std

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["write_plots"]

_K_METRICS = ("i_auroc", "i_ap", "i_f1", "p_auroc", "p_ap", "p_f1", "aupro")
_PANELS = (  # (title, level, curve, metric in the legend)
    ("image ROC", "image", "roc", "i_auroc"),
    ("image PR", "image", "pr", "i_ap"),
    ("pixel ROC", "pixel", "roc", "p_auroc"),
    ("pixel PR", "pixel", "pr", "p_ap"),
)


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is a declared dependency
        raise ConfigError("eval plots need matplotlib (pip install matplotlib), or pass --no-plots") from exc
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def _finite(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "category"


def _groups(report: dict) -> dict[tuple[str, str, str], list[dict]]:
    """Records per category, in report order; a category is its data root, dataset and name."""
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in report["records"]:
        out.setdefault((str(r.get("data_root", "")), r["dataset"], r["category"]), []).append(r)
    return out


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _draw_curves(
    ax: Axes, curves: list[tuple[int, Curves]], kind: str, colour: str, label: str, baseline: float | None
) -> bool:
    """One thin line per seed in the method's colour; the legend entry goes on the first."""
    drawn = False
    for c in (c for _, c in curves):
        x, y = (c.fpr, c.tpr) if kind == "roc" else (c.recall, c.precision)
        if x is None or y is None:
            continue
        kw = {"drawstyle": "steps-post"} if kind == "pr" else {}
        ax.plot(x, y, color=colour, lw=1.2, alpha=0.8, label=None if drawn else label, **kw)
        drawn = True
    if drawn and kind == "pr" and baseline is not None:
        ax.axhline(baseline, color="grey", lw=0.6, ls=":")
    return drawn


def _curves_figure(
    records: list[dict], key: tuple[str, str, str], histograms: Mapping[tuple, ScoreHistogram], path: Path
) -> Path:
    shots = sorted({r["shots"] for r in records})
    methods = list(dict.fromkeys(r["method"] for r in records))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig = _figure(4.0 * len(_PANELS), 3.6 * len(shots))
    axes = fig.subplots(len(shots), len(_PANELS), squeeze=False)
    title = key[2] if key[1] == key[2] else f"{key[1]}/{key[2]}"
    fig.suptitle(f"{title}: one line per seed (legend: mean±std over seeds, %)")
    for row, k in enumerate(shots):
        for col, (name, level, kind, metric) in enumerate(_PANELS):
            ax = axes[row][col]
            ax.set_title(f"{name}, K={k}", fontsize=10)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("false positive rate" if kind == "roc" else "recall")
            ax.set_ylabel("true positive rate" if kind == "roc" else "precision")
            if kind == "roc":
                ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")
            any_drawn = False
            missing = False
            for r in (r for r in records if r["shots"] == k):
                curves: list[tuple[int, Curves]] = []
                baseline = None
                for p in r["per_seed"]:
                    if level == "image":
                        rows = p.get("image_scores") or []
                        if not rows:
                            continue
                        labels = np.array([q["label"] for q in rows])
                        curves.append((p["seed"], image_curves(np.array([q["score"] for q in rows]), labels)))
                        baseline = float(labels.mean())
                    else:
                        h = histograms.get((*key, r["method"], k, p["seed"]))
                        if h is None:
                            missing = True
                            continue
                        curves.append((p["seed"], h.curves()))
                        total = int(h.anomalous.sum() + h.normal.sum())
                        baseline = float(h.anomalous.sum()) / total if total else None
                label = f"{r['method']} {format_mean_std(r['mean'].get(metric), r['std'].get(metric))}"
                any_drawn |= _draw_curves(ax, curves, kind, colours[r["method"]], label, baseline)
            if any_drawn:
                ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
            else:
                _empty(ax, "no pixel histograms kept" if missing else "undefined: one class only")
    return _save(fig, path)


def _k_figure(records: list[dict], key: tuple[str, str, str], path: Path) -> Path:
    methods = list(dict.fromkeys(r["method"] for r in records))
    shots = sorted({r["shots"] for r in records})
    fig = _figure(16.0, 7.0)
    axes = fig.subplots(2, 4, squeeze=False).ravel()
    title = key[2] if key[1] == key[2] else f"{key[1]}/{key[2]}"
    fig.suptitle(f"{title}: metric against K (mean ± std over seeds)")
    for ax, metric in zip(axes, _K_METRICS, strict=False):
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("K (reference images)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.minorticks_off()
        drawn = False
        span: list[float] = []
        for i, m in enumerate(methods):
            pts = sorted(
                (r["shots"], _finite(r["mean"].get(metric)), _finite(r["std"].get(metric)) or 0.0)
                for r in records
                if r["method"] == m
            )
            pts = [p for p in pts if p[1] is not None]
            if not pts:
                continue
            ks, ys, es = zip(*pts, strict=True)
            ax.errorbar(ks, ys, yerr=es, color=f"C{i % 10}", marker="o", ms=4, capsize=3, label=m)
            span += [y - e for y, e in zip(ys, es, strict=True)] + [y + e for y, e in zip(ys, es, strict=True)]
            drawn = True
        if not drawn:
            _empty(ax, "undefined")
            continue
        # Zoomed to the data (differences of a point matter), but never below a 0.05 span nor outside [0, 1].
        lo, hi = min(span), max(span)
        pad = max(0.025, 0.1 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) + 0.005)
        ax.ticklabel_format(axis="y", useOffset=False)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        for ax in axes:
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                break
    axes[-1].axis("off")
    if handles:
        axes[-1].legend(handles, labels, loc="center", fontsize=10, title="method")
    return _save(fig, path)


def write_plots(
    report: dict, report_path: str | Path, pixel_histograms: Mapping[tuple, ScoreHistogram] | None = None
) -> list[Path]:
    """Per category ``<report stem>_<category>_curves.png`` and ``..._k_vs_metric.png`` beside the report."""
    rp = Path(report_path)
    rp.parent.mkdir(parents=True, exist_ok=True)
    histograms = pixel_histograms or {}
    written: list[Path] = []
    used: set[str] = set()
    for key, records in _groups(report).items():
        slug = _slug(key[2] if key[1] == key[2] else f"{key[1]}_{key[2]}")
        base, n = slug, 2
        while slug in used:  # the same category from two --data roots
            slug, n = f"{base}-{n}", n + 1
        used.add(slug)
        written.append(_curves_figure(records, key, histograms, rp.with_name(f"{rp.stem}_{slug}_curves.png")))
        written.append(_k_figure(records, key, rp.with_name(f"{rp.stem}_{slug}_k_vs_metric.png")))
    return written
