"""The round-2 table of BENCHMARKS.md from the sweep results: python benchmarks/tap_fusion/table.py"""

import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "results"
rows = {}
for ds in ("kolektor_sdd", "magnetic_tile"):
    for f in (RESULTS / f"tapfusion-{ds}.jsonl",):
        for line in open(f):
            r = json.loads(line)
            for m, name in (
                ("mid", "knn (default: mid-level taps)"),
                ("mean4", "knn-mean (every tap)"),
                ("auto", "knn-auto (held-out tap choice)"),
            ):
                rows.setdefault((ds, r["k"], name), {})[r["seed"]] = r["res"][m]
print("| dataset | K | method | seeds | i_auroc | p_ap | p_auroc | aupro |")
print("|---|---|---|---|---|---|---|---|")
order = ["knn (default: mid-level taps)", "knn-mean (every tap)", "knn-auto (held-out tap choice)"]
verd = []
for ds in ("kolektor_sdd", "magnetic_tile"):
    for k in (1, 2, 4):
        stats = {}
        for name in order:
            d = rows[(ds, k, name)]
            cell = []
            st = {}
            for key in ("i_auroc", "p_ap", "p_auroc", "aupro"):
                v = np.array([d[s][key] for s in sorted(d)])
                st[key] = (v.mean(), v.std())
                cell.append(f"{100 * v.mean():.1f}±{100 * v.std():.1f}")
            stats[name] = st
            print(f"| {ds} | {k} | {name} | {','.join(map(str, sorted(d)))} | " + " | ".join(cell) + " |")
        dflt = stats[order[0]]
        res = []
        for key in ("i_auroc", "p_ap"):
            best = max(order[1:], key=lambda n: stats[n][key][0])
            dm, bm = dflt[key][0], stats[best][key][0]
            tol = max(dflt[key][1], stats[best][key][1])
            res.append(("win" if dm >= bm else "tie" if bm - dm <= tol else "loss", best.split()[0], dm - bm))
        ok = all(x[0] == "win" for x in res) or (sorted(x[0] for x in res) == ["tie", "win"])
        verd.append((ds, k, res, ok))
print()
print("| dataset | K | image AUROC: default − best baseline | pixel AP: default − best baseline | passes |")
print("|---|---|---|---|---|")
for ds, k, res, ok in verd:
    c = [f"{100 * d:+.1f} vs {b} ({o})" for o, b, d in res]
    print(f"| {ds} | {k} | {c[0]} | {c[1]} | {'yes' if ok else 'NO'} |")
