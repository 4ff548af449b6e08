"""Markdown tables for BENCHMARKS.md from eval reports (``reports/{deploy,cross}-*.json``).

python -m experiments.first_quality_table.make_table reports/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scorer.evaluate import METRIC_KEYS
from scorer.metrics import format_mean_std

PROTOCOLS = {"deploy": "deployment (references only)", "cross": "cross-dataset (base head on the other dataset)"}


def main(folder: str) -> None:
    root = Path(folder)
    for proto, title in PROTOCOLS.items():
        files = sorted(root.glob(f"{proto}-*.json"))
        if not files:
            continue
        print(f"\n### Protocol: {title}\n")
        print("| dataset | method | K | " + " | ".join(METRIC_KEYS) + " | fit s |")
        print("|" + "---|" * (4 + len(METRIC_KEYS)))
        stage_rows = []
        for f in files:
            rep = json.loads(f.read_text())
            for r in sorted(rep["records"], key=lambda r: (r["method"] != "cff", r["method"], r["shots"])):
                cells = [format_mean_std(r["mean"].get(k), r["std"].get(k)) for k in METRIC_KEYS]
                print(
                    f"| {r['dataset']} | {r['method']} | {r['shots']} | "
                    + " | ".join(cells)
                    + f" | {r['fit_seconds_mean']:.0f} |"
                )
                for tap, st in (r.get("stages") or {}).items():
                    if r["shots"] == 4:
                        stage_rows.append((r["dataset"], r["method"], tap, st))
        if stage_rows:
            print(f"\nPer-stage figures (K = 4, each tap's own map), {title}:\n")
            print("| dataset | method | tap | i_auroc | p_auroc | p_ap | aupro |")
            print("|---|---|---|---|---|---|---|")
            for ds, m, tap, st in stage_rows:
                cells = [format_mean_std(st["mean"][k], st["std"][k]) for k in ("i_auroc", "p_auroc", "p_ap", "aupro")]
                print(f"| {ds} | {m} | {tap} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reports")
