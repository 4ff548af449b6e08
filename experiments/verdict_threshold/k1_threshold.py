# ruff: noqa
"""K = 1 image threshold: held-out crops scored against the bank with vs without the reference's own tokens.

python -m experiments.verdict_threshold.k1_threshold  (refits K = 1 heads for seeds 0-2 of both datasets; test scores and the stored
threshold come from the round-3 eval reports; one JSON line per fit; raw: k1-threshold-views-only.jsonl)
"""
import json, sys
from dataclasses import replace
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(2)
from experiments.common import dataset, results_dir
import scorer.fit as fit
from scorer.backbones import load_backbone
from scorer.backbones.base import auto_precision
from scorer.data import discover, draw_references
from scorer.images import load_image
from scorer.metrics import verdict_metrics
bb = load_backbone("dinov2-vits14"); bb.set_precision(auto_precision("cpu"))
cap = {}
orig = fit.set_thresholds
def c(head, ref_feats, held, opts, *, meta=None, search=None):
    cap.update(head=head, feats=ref_feats, held=held)
    return orig(head, ref_feats, held, opts, meta=meta, search=search)
fit.set_thresholds = c
for ds, f in (("kolektor_sdd", "round3-knn-kolektor_sdd.json"), ("magnetic_tile", "round3-knn-magnetic_tile.json")):
    cat = discover(dataset(ds))[0]
    rep = json.load(open(results_dir() / f))
    rec = [r for r in rep["records"] if r["method"] == "knn" and r["shots"] == 1][0]
    for ps in rec["per_seed"]:
        seed = ps["seed"]
        refs = [load_image(p) for p in draw_references(cat.train, 1, seed)]
        head = fit.fit_head(bb, refs, seed=seed)
        h, feats, held = cap["head"], cap["feats"], cap["held"]
        n_img = len(feats); n_tok = feats.tokens[0].shape[1]
        rows = torch.ones(n_img, n_tok, dtype=torch.bool); rows[0] = False
        hv = replace(h, bank=[b[rows.flatten()] for b in h.bank])
        out = {}
        for name, hh in (("self", h), ("views_only", hv)):
            sc, _, _ = fit.held_out_scores(hh, feats, held.normals, held.normal_src)
            t = fit.image_threshold_from_normals(sc, 0.01)  # the fit's rule on these held-out scores
            s = np.array([x["score"] for x in ps["image_scores"]]); l = np.array([x["label"] for x in ps["image_scores"]])
            v = verdict_metrics(s, l, t)
            out[name] = {"normals": [round(float(x), 4) for x in sc], "thr": t, "far": v["v_far"], "recall": v["v_recall"]}
        out["stored_thr"] = ps["image_threshold"]; out["fitted_thr"] = head.image_threshold
        print(json.dumps({"dataset": ds, "seed": seed, **out}), flush=True)
