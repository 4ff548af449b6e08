# ruff: noqa
"""Locally aware patch features (PatchCore's 3 x 3 neighbourhood average before the nearest-patch search),
on the same cached tokens, references and rules as ``augment.py``: the mid-level taps with and without it.

python -m experiments.tap_fusion.pool DATASET 1,2,4   (raw: pool-DATASET.jsonl in the results folder)
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.common import results_dir
from experiments.tap_fusion import sweep
from experiments.tap_fusion.augment import views
from scorer.backbones.base import BackboneOutput  # noqa: E402
from scorer.images import load_image  # noqa: E402


def pooled(tokens: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """(B, N, D) -> the same with each token the mean of its p x p neighbourhood (edges: the valid ones)."""
    out = []
    for i in range(0, tokens.shape[0], 32):
        t = tokens[i : i + 32].float()
        b, n, d = t.shape
        g = t.transpose(1, 2).reshape(b, d, *grid)
        g = F.avg_pool2d(g, p, stride=1, padding=p // 2, count_include_pad=False)
        out.append(g.reshape(b, d, n).transpose(1, 2).to(tokens.dtype))
    return torch.cat(out)


def main() -> None:
    bb = sweep.load_backbone("dinov2-vits14").set_precision("bf16")
    name, shots = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
    kinds = os.environ.get("KINDS", "none,rot+flip").split(",")
    ds = sweep.DS(name, bb)
    grid = bb.grid
    w = torch.tensor([0, 1, 1, 0.0]) / 2
    test_p = [pooled(t, grid, 3) if s in (1, 2) else t[:1] for s, t in enumerate(ds.test.tokens)]
    out = open(results_dir() / f"pool-{name}.jsonl", "a")
    for k in shots:
        for seed in [int(x) for x in os.environ.get("SEEDS", "0,1,2").split(",")]:
            imgs = [load_image(p) for p in ds.refs(k, seed)]
            res = {}
            for kind in kinds:
                t0 = time.time()
                with bb.precision_scope("fp32"):
                    feats = [bb.embed(views(im, kind, bb.image_size)) for im in imgs]
                pf = [BackboneOutput([pooled(t, grid, 3) for t in f.tokens], f.grid) for f in feats]
                bank = sweep.bank_of(pf)
                D = torch.stack(
                    [
                        torch.cat([sweep.nn_distance(test_p[s][i : i + 16].float(), bank[s], dtype="bfloat16")
                                   for i in range(0, test_p[s].shape[0], 16)]).view(-1, *grid)
                        if s in (1, 2) else torch.zeros(len(ds.labels), *grid)
                        for s in range(4)
                    ],
                    1,
                )
                res[f"mid-pool3/{kind}"] = sweep.metrics(sweep.to_maps(D, w), ds.labels, ds.masks)
                print(k, seed, kind, {a: (round(b["i_auroc"], 3), round(b["p_ap"], 3)) for a, b in res.items() if a.endswith(kind)},
                      f"{time.time() - t0:.0f}s", flush=True)
            out.write(json.dumps({"ds": name, "k": k, "seed": seed, "res": res}) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
