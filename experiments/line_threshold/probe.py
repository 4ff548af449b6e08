"""Which threshold rule holds on live commissioning scores, static and grown bank (see README.md).

    python -m experiments.line_threshold.probe kolektor_sdd 4 0,1,2 /tmp/line_grids

Reuses the token and grid caches of `cff-inspect bench line --cache DIR` (and a single-file token cache, when
/tmp/line_cache_<dataset>.safetensors exists); prints false alarms / recall after commissioning per rule.
"""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch

from benchmarks import line_replay as lr
from scorer.backbones import load_backbone
from scorer.commissioning import LineEvidence, LineOptions, commission, extra_rows_grids
from scorer.data import draw_references, load_category

Z = NormalDist().inv_cdf(0.99)


def rules(sc: np.ndarray) -> dict[str, float]:
    x = np.log(np.maximum(sc, 1e-12))
    med = np.median(x)
    mad = np.median(np.abs(x - med))
    q75, q90 = np.quantile(x, [0.75, 0.9])
    return {
        "hampel_mad": float(np.exp(med + Z * max(1.4826 * mad, 0.02))),
        "upper_semi_iqr": float(np.exp(med + Z * max((q75 - med) / 0.6745, 0.02))),
        "q90_extrap": float(np.exp(med + Z * max((q90 - med) / 1.2816, 0.02))),
        "empirical_q99": float(np.quantile(sc, 0.99)),
        "upper_avg": float(
            np.exp(
                med
                + Z
                * max(
                    np.mean([(np.quantile(x, q) - med) / NormalDist().inv_cdf(q) for q in (0.75, 0.8, 0.85, 0.9)]), 0.02
                )
            )
        ),
    }


def main() -> None:
    ds, k, seeds, folder = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")], Path(sys.argv[4])
    torch.set_num_threads(2)
    root = Path("/work/shared/datasets") / ds
    cat = load_category(root)
    bb = load_backbone("dinov2-vits14")
    cache = lr.TokenCache(bb, 3, folder)
    single = Path(f"/tmp/line_cache_{ds}.safetensors")
    if single.is_file():
        from safetensors.torch import load_file

        d = load_file(str(single))
        for p in list(cat.train) + [s.path for s in cat.test]:
            r = str(p.relative_to(root))
            cache.mem[str(p)] = [d[f"{r}::{t}"] for t in range(3)]
    for seed in seeds:
        refs = draw_references(cat.train, k, seed)
        head = cache.head(refs, seed)
        paths, labels = lr.stream_order(cat, refs, seed)
        n = len(paths)
        n_com = min(200, n // 2)
        feats = cache.get(paths)
        grids = cache.grids(head, paths, feats)
        static = head.score_features(feats, grids=grids)[0]
        com, post = np.arange(n_com), np.arange(n_com, n)
        y_com, y = labels[com], labels[post]
        ev = LineEvidence(feats.select(com), static[com], np.full(n_com, -1), np.ones(n_com, bool), grids[com],
                          [str(p) for p in np.array(paths)[com]])  # fmt: skip
        v2, state = commission(head, ev, LineOptions())
        cf_scores = v2.score_features(ev.feats, grids=state.cross_grids)[0]
        fa = feats.select(post)
        s2 = v2.score_features(fa, grids=extra_rows_grids(v2, fa, grids[post]))[0]
        for name, live, after in (("static", static[com], static[post]), ("grown", cf_scores, s2)):
            good_live = live[y_com == 0]
            print(f"{ds} K={k} seed={seed} {name}: live good median {np.median(good_live):.4f}, "
                  f"post good median {np.median(after[y == 0]):.4f}, true q99 of post goods "
                  f"{np.quantile(after[y == 0], 0.99):.4f}, defects in commissioning {int(y_com.sum())}")  # fmt: skip
            for rule, t in rules(live).items():
                far = float((after[y == 0] >= t).mean())
                rec = float((after[y == 1] >= t).mean())
                orc = lr.oracle_recall(after, y, far)
                print(
                    f"   {rule:15s} t={t:.4f} far {100 * far:5.1f}% recall {100 * rec:5.1f}%",
                    f"oracle {100 * orc:5.1f}%",
                )


if __name__ == "__main__":
    main()
