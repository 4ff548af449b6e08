"""The verdict at each head's own fitted image threshold, from eval reports that keep every test image's score.

python -m experiments.verdict_threshold.verdict_table REPORT:METHOD[:K,...] ...
(prints one markdown row per dataset, method and K)

A report made before `v_far` / `v_recall` were in eval's metrics still has each seed's threshold and scores, so
the rows are recomputed from those with `scorer.metrics.verdict_metrics`, the rule the eval now uses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from scorer.metrics import format_mean_std, verdict_metrics


def rows(report: str, method: str, shots: set[int] | None) -> list[str]:
    out = []
    for r in json.loads(Path(report).read_text())["records"]:
        if r["method"] != method or (shots and r["shots"] not in shots):
            continue
        per = []
        for p in r["per_seed"]:
            sc = np.array([x["score"] for x in p["image_scores"]])
            y = np.array([x["label"] for x in p["image_scores"]])
            per.append(verdict_metrics(sc, y, p["image_threshold"]))
        far, rec = (np.array([v[k] for v in per]) for k in ("v_far", "v_recall"))
        seeds = ", ".join(f"{100 * a:.1f} / {100 * b:.1f}" for a, b in zip(far, rec, strict=True))
        out.append(
            f"| {r['dataset']} | {r['shots']} | {method} | {format_mean_std(far.mean(), far.std())} | "
            f"{format_mean_std(rec.mean(), rec.std())} | {seeds} |"
        )
    return out


if __name__ == "__main__":
    print("| dataset | K | method | false alarms on good images (v_far) | defects flagged (v_recall) | per seed |")
    print("|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        path, method, *k = arg.split(":")
        print("\n".join(rows(path, method, {int(x) for x in k[0].split(",")} if k else None)))
