"""The default head against the best training-free row, per dataset and K, from eval reports.

python -m benchmarks.verdict report1.json [report2.json ...] [--default knn] [--baselines knn-mean knn-auto]

A row passes when the default's mean over seeds is >= the best baseline's on image AUROC and on pixel AP; a
shortfall within one standard deviation (of either row) counts as a tie, and a tie passes only where the other
metric wins outright.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scorer.evaluate import METRIC_KEYS, _fmt


def _cmp(d: dict, b: dict, key: str) -> str:
    dm, bm = d["mean"][key], b["mean"][key]
    if dm >= bm:
        return "win"
    return "tie" if bm - dm <= max(d["std"][key], b["std"][key]) else "loss"


def verdicts(records: list[dict], default: str, baselines: list[str]) -> list[tuple]:
    out = []
    by = {(r["dataset"], r["shots"], r["method"]): r for r in records}
    for ds, k in sorted({(r["dataset"], r["shots"]) for r in records}):
        d = by.get((ds, k, default))
        rivals = [by[(ds, k, m)] for m in baselines if (ds, k, m) in by]
        if d is None or not rivals:
            continue
        res = []
        for key in ("i_auroc", "p_ap"):
            best = max(rivals, key=lambda r, key=key: r["mean"][key])
            res.append((key, best["method"], _cmp(d, best, key)))
        (_, _, a), (_, _, b) = res
        ok = (a == "win" and b == "win") or (a == "tie" and b == "win") or (a == "win" and b == "tie")
        out.append((ds, k, res, ok))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--default", default="knn")
    ap.add_argument("--baselines", nargs="+", default=["knn-mean", "knn-auto"])
    args = ap.parse_args(argv)
    records = [r for p in args.reports for r in json.loads(Path(p).read_text())["records"]]
    print("| dataset | K | method | " + " | ".join(METRIC_KEYS) + " | fit s |")
    print("|" + "---|" * (4 + len(METRIC_KEYS)))
    order = {m: i for i, m in enumerate(["knn", "knn-mean", "knn-auto", "aprilgan", "cff", "cff-unguarded"])}
    for r in sorted(records, key=lambda r: (r["dataset"], r["shots"], order.get(r["method"], 99))):
        cells = [_fmt(r["mean"][k], r["std"][k]) for k in METRIC_KEYS]
        print(
            f"| {r['dataset']} | {r['shots']} | {r['method']} | "
            + " | ".join(cells)
            + f" | {r['fit_seconds_mean']:.1f} |"
        )
    print(f"\nDefault `{args.default}` against the best of {', '.join(args.baselines)}:\n")
    print("| dataset | K | image AUROC vs | pixel AP vs | passes |")
    print("|---|---|---|---|---|")
    for ds, k, res, ok in verdicts(records, args.default, args.baselines):
        cells = [f"{outcome} ({best})" for _, best, outcome in res]
        print(f"| {ds} | {k} | " + " | ".join(cells) + f" | {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
