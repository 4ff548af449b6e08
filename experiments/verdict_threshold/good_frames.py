# ruff: noqa
"""Image threshold from 8 or 16 known-good frames (train/good, never the references) against the fit's own.

python -m experiments.verdict_threshold.good_frames 1,2,4   (K values; seeds 0-2 of both datasets; one JSON line per fit)

Each default head is refitted (the same references as the stored eval reports), scores 16 other train/good images,
and the threshold `heads set-threshold --good` would set (the fit's rule) is applied to the
stored test scores of the report rows: false alarms on good test images and defects flagged.
Raw: good-frames-threshold.jsonl.
"""
import json, sys
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(2)
from experiments.common import dataset, results_dir
from scorer.backbones import load_backbone
from scorer.backbones.base import auto_precision
from scorer.data import discover, draw_references
from scorer.fit import fit_head
from scorer.fit import image_threshold_from_normals
from scorer.images import load_image
from scorer.metrics import verdict_metrics
bb = load_backbone("dinov2-vits14"); bb.set_precision(auto_precision("cpu"))
R = str(results_dir()) + "/"
src = {("kolektor_sdd", 1): ("round3-knn-kolektor_sdd.json", "knn"), ("kolektor_sdd", 2): ("round4-kolektor_sdd.json", "knn-midfirst"),
       ("kolektor_sdd", 4): ("round4-kolektor_sdd.json", "knn-midfirst"), ("magnetic_tile", 1): ("round3-knn-magnetic_tile.json", "knn"),
       ("magnetic_tile", 2): ("round3-knn-magnetic_tile.json", "knn"), ("magnetic_tile", 4): ("round3-knn-magnetic_tile.json", "knn")}
for ds in ("kolektor_sdd", "magnetic_tile"):  # a regenerated run (benchmarks/regenerate.sh) holds every cell
    if Path(R + f"quality-knn-{ds}.json").exists():
        src.update({(ds, k): (f"quality-knn-{ds}.json", "knn") for k in (1, 2, 4)})
for k in [int(x) for x in sys.argv[1].split(",")]:
    for ds in ("kolektor_sdd", "magnetic_tile"):
        cat = discover(dataset(ds))[0]
        f, m = src[(ds, k)]
        rec = [r for r in json.load(open(R + f))["records"] if r["method"] == m and r["shots"] == k][0]
        for ps in rec["per_seed"]:
            seed = ps["seed"]
            refs_p = draw_references(cat.train, k, seed)
            head = fit_head(bb, [load_image(p) for p in refs_p], seed=seed)
            pool = [p for p in cat.train if p not in set(refs_p)]
            rng = np.random.default_rng(1000 + seed)
            good = [pool[i] for i in rng.choice(len(pool), 16, replace=False)]
            gs = head.score([load_image(p) for p in good]).image_scores
            s = np.array([x["score"] for x in ps["image_scores"]]); l = np.array([x["label"] for x in ps["image_scores"]])
            out = {"dataset": ds, "k": k, "seed": seed, "fit_thr": head.image_threshold, "stored_thr": ps["image_threshold"], "good_scores": [float(x) for x in gs]}
            for name, t in (("fit", ps["image_threshold"]), ("good8", image_threshold_from_normals(gs[:8], 0.01)),
                            ("good16", image_threshold_from_normals(gs, 0.01))):
                v = verdict_metrics(s, l, t)
                out[name] = {"thr": t, "far": v["v_far"], "recall": v["v_recall"]}
            print(json.dumps(out), flush=True)
