# ruff: noqa
"""Per-tap scale normalisation of today's default knn fusion, paired on the same searched grids.

python -m experiments.tap_fusion.normalise DATASET KS SEEDS N_TEST  (e.g. kolektor_sdd 2,4 0,1,2 100; N_TEST 0 = all)

Per K and seed: fit the default head (`fit_head`), keep its held-out search (the fit's `calibrate_thresholds` is
wrapped to see it), search a stratified test subset once on the head's weighted taps, then fuse the same grids
three ways: `raw` (the shipped weights on raw cosine distances), `mean` (each weight divided by the tap's mean
held-out normal distance) and `p99` (by its 99th percentile). One JSON line per fit on stdout.
Results: `normalise-<dataset>.jsonl` in the results folder; K >= 2 only (K = 1 keeps no held-out search).
"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(2)
from experiments.common import dataset
import scorer.fit as fit
from scorer.backbones import load_backbone
from scorer.backbones.base import auto_precision
from scorer.data import discover, draw_references
from scorer.evaluate import resize_mask
from scorer.images import load_image, load_mask
from scorer.metrics import image_metrics, pixel_metrics

ds, shots, seeds, n_test = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4])
cat = discover(dataset(ds))[0]
tests = list(cat.test)
if n_test and n_test < len(tests):
    norm = [s for s in tests if s.label == 0]; bad = [s for s in tests if s.label == 1]
    nb = max(1, round(n_test * len(bad) / len(tests))); nn_ = n_test - nb
    pick = lambda xs, n: [xs[i] for i in np.linspace(0, len(xs) - 1, min(n, len(xs))).round().astype(int)]
    tests = pick(norm, nn_) + pick(bad, nb)
labels = np.array([s.label for s in tests])
bb = load_backbone("dinov2-vits14"); bb.set_precision(auto_precision("cpu"))
imgs = [load_image(s.path) for s in tests]
masks = np.zeros((len(tests), 256, 256), bool)
for i, (s, im) in enumerate(zip(tests, imgs)):
    if s.mask_path is not None:
        masks[i] = resize_mask(load_mask(s.mask_path, im.shape[:2]), 256)
t = time.perf_counter()
with torch.inference_mode():
    feats = bb.embed(imgs, depth=3)
print("embedded", len(imgs), round(time.perf_counter() - t, 1), file=sys.stderr)
del imgs
captured = {}
orig = fit.set_thresholds
def cap(head, ref_feats, held, opts, *, meta=None, search=None):
    captured["search"] = search; captured["held"] = held
    return orig(head, ref_feats, held, opts, meta=meta, search=search)
fit.set_thresholds = cap
for k in shots:
    for seed in seeds:
        refs = [load_image(p) for p in draw_references(cat.train, k, seed)]
        t = time.perf_counter()
        head = fit.fit_head(bb, refs, seed=0)
        tf = time.perf_counter() - t
        w = np.array(head.options.tap_weights)
        s = captured["search"]
        taps = [i for i in range(4) if w[i] > 0]
        with torch.inference_mode():
            grids = head.search_features(feats, taps=taps)
        out = {"dataset": ds, "k": k, "seed": seed, "weights": w.tolist(), "fit_s": tf}
        scales = {}
        if s is not None:
            n = s.normals  # (n, S, g, g)
            scales["mean"] = [float(n[:, i].mean()) for i in range(4)]
            scales["p99"] = [float(torch.quantile(n[:, i].flatten(), 0.99)) for i in range(4)]
        variants = {"raw": w}
        for name in ("mean", "p99"):
            if name in scales:
                sc = np.array(scales[name]); variants[name] = np.where(w > 0, w / np.maximum(sc, 1e-6), 0)
        res = {}
        for name, wv in variants.items():
            h = head.with_options(tap_weights=tuple(float(x) for x in wv))
            sc_, mp, _ = h.score_features(feats, grids=grids)
            m = {**image_metrics(sc_, labels), **pixel_metrics(mp, masks)}
            res[name] = {x: round(100 * m[x], 2) for x in ("i_auroc", "p_ap", "p_auroc", "aupro")}
        out["scales"] = scales; out["res"] = res
        print(json.dumps(out), flush=True)
