"""The tap-fusion and support-view tables of BENCHMARKS.md from the sweep results.

``python -m experiments.tap_fusion.table [DEFAULT]``: every training-free row, then whether DEFAULT (a row name;
``eval-knn`` by default: the shipped head as ``cff-inspect eval --method knn`` measured it) is >= the best of the
other rows on image AUROC and pixel AP at each K. Rows come from ``tapfusion-*.jsonl`` (sweep.py: tap fusion
rules), ``augment-*.jsonl`` (augment.py: support views) and ``round3-*.json`` (cff-inspect eval reports).
"""

import json
import sys

import numpy as np

from experiments.common import results_dir

RESULTS = results_dir()
DATASETS = ("kolektor_sdd", "magnetic_tile")
NAMES = {
    "eval-knn": "knn, the default: mid taps + rot/flip views while K <= 4 (cff-inspect eval)",
    "auto-views": "knn, mid taps + rot/flip views while K <= 4 (sweep)",
    "rot": "knn, mid taps + quarter turns",
    "flip": "knn, mid taps + flips",
    "mid": "knn, mid-level taps, no views",
    "mean4": "knn-mean (every tap)",
    "mean4-views": "knn-mean + rot/flip views",
    "auto": "knn-auto (held-out tap choice, no views)",
    "eval-knn-auto": "knn-auto + views (held-out tap choice; cff-inspect eval)",
}
AUTO_VIEWS_UP_TO = 4  # scorer.fit.AUTO_VIEWS_UP_TO
EVAL_ROWS = {"knn": "eval-knn", "knn-auto": "eval-knn-auto"}


def load() -> dict:
    rows: dict = {}
    for ds in DATASETS:
        for line in open(RESULTS / f"tapfusion-{ds}.jsonl"):
            r = json.loads(line)
            rows.setdefault((ds, r["k"], "auto"), {})[r["seed"]] = r["res"]["auto"]
        f = RESULTS / f"augment-{ds}.jsonl"
        for line in open(f) if f.exists() else ():
            r = json.loads(line)
            res, k, seed = r["res"], r["k"], r["seed"]
            for name, key in (("mid", "mid/none"), ("rot", "mid/rot"),
                              ("flip", "mid/flip"), ("mean4", "mean4/none"), ("mean4-views", "mean4/rot+flip")):
                if key in res:
                    rows.setdefault((ds, k, name), {})[seed] = res[key]
            pick = "mid/rot+flip" if k <= AUTO_VIEWS_UP_TO else "mid/none"
            if pick in res:
                rows.setdefault((ds, k, "auto-views"), {})[seed] = res[pick]
    for f in sorted(RESULTS.glob("round3-*.json")):
        for rec in json.loads(f.read_text())["records"]:
            name = EVAL_ROWS.get(rec["method"])
            if name is not None and rec["dataset"] in DATASETS:
                for p in rec["per_seed"]:
                    rows.setdefault((rec["dataset"], rec["shots"], name), {})[p["seed"]] = p["metrics"]
    return rows


def main() -> None:
    default = sys.argv[1] if len(sys.argv) > 1 else "eval-knn"
    rows = load()
    print("| dataset | K | method | seeds | i_auroc | p_ap | p_auroc | aupro |")
    print("|---|---|---|---|---|---|---|---|")
    verd = []
    for ds in DATASETS:
        for k in (1, 2, 4):
            stats = {}
            for name in NAMES:
                d = rows.get((ds, k, name))
                if not d:
                    continue
                st, cell = {}, []
                for key in ("i_auroc", "p_ap", "p_auroc", "aupro"):
                    v = np.array([d[s][key] for s in sorted(d)])
                    st[key] = (v.mean(), v.std())
                    cell.append(f"{100 * v.mean():.1f}±{100 * v.std():.1f}")
                stats[name] = st
                label = NAMES[name] + (" (default)" if name == default else "")
                print(f"| {ds} | {k} | {label} | {','.join(map(str, sorted(d)))} | " + " | ".join(cell) + " |")
            if default not in stats:
                continue
            # the default is compared with every other row, except the same head measured by the sweep
            same = {"eval-knn": "auto-views", "auto-views": "eval-knn"}.get(default)
            others = [n for n in stats if n not in (default, same) and stats[n] != stats[default]]
            res = []
            for key in ("i_auroc", "p_ap"):
                best = max(others, key=lambda n: stats[n][key][0])
                dm, bm = stats[default][key][0], stats[best][key][0]
                tol = max(stats[default][key][1], stats[best][key][1])
                res.append(("win" if dm >= bm else "tie" if bm - dm <= tol else "loss", best, dm - bm))
            ok = all(x[0] == "win" for x in res) or sorted(x[0] for x in res) == ["tie", "win"]
            verd.append((ds, k, res, ok))
    print()
    print("| dataset | K | image AUROC: default − best other row | pixel AP: default − best other row | passes |")
    print("|---|---|---|---|---|")
    for ds, k, res, ok in verd:
        c = [f"{100 * d:+.1f} vs {b} ({o})" for o, b, d in res]
        print(f"| {ds} | {k} | {c[0]} | {c[1]} | {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
