# ruff: noqa
"""Support augmentation sweep : flips / rotations of the references into the knn bank.

Same cached test tokens, same references and the same map/score rules as ``sweep.py``; the mid-level taps
(blocks 6 and 9) and the every-tap mean are computed with the plain bank and with banks holding each
reference's flipped / rotated views (rotated after the square resize, so a non-square product is not
stretched differently by the rotation). Raw: augment-DATASET.jsonl in the results folder.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from experiments.common import results_dir
from experiments.tap_fusion import sweep

from scorer.images import load_image  # noqa: E402


def views(img: np.ndarray, kind: str, size: int) -> list[np.ndarray]:
    sq = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    out = [sq]
    if kind in ("flip", "rot+flip"):
        out += [sq[:, ::-1].copy(), sq[::-1].copy()]
    if kind in ("rot", "rot+flip"):
        out += [np.rot90(sq, k).copy() for k in (1, 2, 3)]
    return out


def main() -> None:
    bb = sweep.load_backbone("dinov2-vits14").set_precision("bf16")
    name, shots = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
    kinds = os.environ.get("KINDS", "none,flip,rot+flip").split(",")
    ds = sweep.DS(name, bb)
    grid = bb.grid
    out = open(results_dir() / f"augment-{name}.jsonl", "a")
    for k in shots:
        for seed in [int(x) for x in os.environ.get("SEEDS", "0,1,2").split(",")]:
            paths = ds.refs(k, seed)
            imgs = [load_image(p) for p in paths]
            res = {}
            for kind in kinds:
                t0 = time.time()
                with bb.precision_scope("fp32"):
                    feats = [bb.embed(views(im, kind, bb.image_size)) for im in imgs]
                D = sweep.dist_grids(ds.test.tokens, sweep.bank_of(feats), grid)
                for rule, w in (("mid", torch.tensor([0, 1, 1, 0.0]) / 2), ("mean4", None)):
                    res[f"{rule}/{kind}"] = sweep.metrics(sweep.to_maps(D, w), ds.labels, ds.masks)
                print(k, seed, kind, {a: (round(b["i_auroc"], 3), round(b["p_ap"], 3)) for a, b in res.items() if a.endswith(kind)},
                      f"{time.time() - t0:.0f}s", flush=True)
            out.write(json.dumps({"ds": name, "k": k, "seed": seed, "res": res}) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
