# ruff: noqa
"""Tap-fusion sweep: per-tap knn distance grids on cached tokens, fusion/augmentation variants."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from experiments.common import datasets_root, token_cache
from scorer.backbones import load_backbone  # noqa: E402
from scorer.backbones.base import BackboneOutput  # noqa: E402
from scorer.data import discover, draw_references  # noqa: E402
from scorer.evaluate import resize_mask  # noqa: E402
from scorer.features import FeatureCache  # noqa: E402
from scorer.head import gaussian_blur, nn_distance, upsample  # noqa: E402
from scorer.images import load_image, load_mask  # noqa: E402
from scorer.metrics import image_metrics, pixel_metrics  # noqa: E402

CACHE = token_cache()
DATA = datasets_root()
torch.set_num_threads(2)


def views(img: np.ndarray, kind: str) -> list[np.ndarray]:
    out = [img]
    if kind in ("flip", "rot+flip"):
        out += [img[:, ::-1].copy(), img[::-1].copy()]
    if kind in ("rot", "rot+flip"):
        out += [np.rot90(img, k).copy() for k in (1, 2, 3)]
    return out


def dist_grids(q_tokens: list[torch.Tensor], bank: list[torch.Tensor], grid) -> torch.Tensor:
    """(N, S, G, G) nearest-patch distance per tap."""
    out = []
    for s in range(len(q_tokens)):
        ds = []
        for i in range(0, q_tokens[s].shape[0], 16):
            ds.append(nn_distance(q_tokens[s][i : i + 16].float(), bank[s], dtype="bfloat16"))
        out.append(torch.cat(ds).view(-1, *grid))
    return torch.stack(out, 1)


def to_maps(grids: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """fused (N, S, G, G) -> (N, 256, 256) blurred."""
    if w is None:
        fused = grids.mean(1)
    else:
        fused = (grids * w.view(1, -1, 1, 1)).sum(1)
    outs = []
    for i in range(0, fused.shape[0], 64):
        m = upsample(fused[i : i + 64, None], 256)[:, 0]
        outs.append(gaussian_blur(m, 4.0))
    return torch.cat(outs)


def img_score(maps: torch.Tensor) -> np.ndarray:
    flat = maps.flatten(1)
    k = max(1, round(flat.shape[1] * 0.01))
    return flat.topk(k, 1).values.mean(1).numpy()


def metrics(maps: torch.Tensor, labels, masks, pixel=True) -> dict:
    m = image_metrics(img_score(maps), labels)
    if pixel:
        m.update(pixel_metrics(maps.numpy(), masks))
    return {k: m[k] for k in ("i_auroc", "p_ap", "p_auroc", "aupro") if k in m}


class DS:
    def __init__(self, name: str, bb, max_test=None):
        cat = discover(DATA / name)[0]
        self.cat = cat
        tests = list(cat.test)
        self.labels = np.array([s.label for s in tests])
        self.masks = np.zeros((len(tests), 256, 256), bool)
        for i, s in enumerate(tests):
            if s.mask_path is not None:
                img = load_image(s.path)
                self.masks[i] = resize_mask(load_mask(s.mask_path, img.shape[:2]), 256)
        self.test = FeatureCache(CACHE).embed_paths(bb, [s.path for s in tests])
        self.bb = bb

    def refs(self, k: int, seed: int) -> list[Path]:
        return draw_references(self.cat.train, k, seed)


_AUG: dict = {}


def ref_feats(ds: DS, paths, kind: str) -> list[BackboneOutput]:
    """Per reference: tokens of its views (fp32 fit precision)."""
    out = []
    for p in paths:
        key = (str(p), kind)
        if key not in _AUG:
            img = load_image(p)
            with ds.bb.precision_scope("fp32"):
                _AUG[key] = ds.bb.embed(views(img, kind))
        out.append(_AUG[key])
    return out


def bank_of(feats: list[BackboneOutput]) -> list[torch.Tensor]:
    n = len(feats[0].tokens)
    return [F.normalize(torch.cat([f.tokens[s].flatten(0, -2) for f in feats]).float(), dim=-1).to(torch.bfloat16)
            for s in range(n)]


def loo_normal_grids(feats: list[BackboneOutput], grid) -> torch.Tensor:
    """Each reference's identity view scored against the others' views (K>=2) -> (K, S, G, G)."""
    k = len(feats)
    outs = []
    for j in range(k):
        others = [feats[i] for i in range(k) if i != j]
        q = [t[:1] for t in feats[j].tokens]
        outs.append(dist_grids(q, bank_of(others), grid))
    return torch.cat(outs)


from scorer.fit import _augment
from scorer.synth import synthesize
from sklearn.metrics import roc_auc_score, average_precision_score

if __name__ == "__main__":
    bb = load_backbone("dinov2-vits14").set_precision("bf16")
    name = sys.argv[1]
    shots = [int(x) for x in sys.argv[2].split(",")]
    ds = DS(name, bb)
    grid = bb.grid
    out = open(f"res3-{name}.jsonl", "a")
    for k in shots:
        for seed in [int(x) for x in __import__("os").environ.get("SEEDS", "0,1,2").split(",")]:
            t0 = time.time()
            paths = ds.refs(k, seed)
            imgs = [load_image(p) for p in paths]
            feats = ref_feats(ds, paths, "none")
            D = dist_grids(ds.test.tokens, bank_of(feats), grid)
            if k >= 2:
                N = loo_normal_grids(feats, grid)
            else:
                rng = np.random.default_rng(seed + 101)
                with bb.precision_scope("fp32"):
                    vf = bb.embed([_augment(imgs[0], rng) for _ in range(4)])
                N = dist_grids(vf.tokens, bank_of(feats), grid)
            syn = synthesize(imgs, 16, seed + 1000)
            with bb.precision_scope("fp32"):
                sf = bb.embed([s[0] for s in syn])
            A = []
            for i, (_, m, j) in enumerate(syn):
                others = [feats[q] for q in range(k) if q != j] or feats
                A.append(dist_grids([t[i:i+1] for t in sf.tokens], bank_of(others), grid))
            A = torch.cat(A)
            amask = np.stack([resize_mask(s[1], 256) for s in syn])
            vp, vi = [], []
            for s in range(4):
                nm, am = to_maps(N[:, s:s+1]), to_maps(A[:, s:s+1])
                sc = np.r_[img_score(nm), img_score(am)]
                lab = np.r_[np.zeros(len(nm)), np.ones(len(am))]
                vi.append(roc_auc_score(lab, sc)); vp.append(average_precision_score(amask.ravel(), am.numpy().ravel()))
            vp = np.array(vp); vi = np.array(vi)
            mu = N.mean((0, 2, 3))
            keep = vp >= 0.5 * vp.max()
            w_auto = torch.tensor(keep, dtype=torch.float32); w_auto /= w_auto.sum()
            w_auto_n = torch.tensor(keep, dtype=torch.float32) / mu; w_auto_n /= w_auto_n.sum()
            w_mid = torch.tensor([0, 1, 1, 0.0]) / 2
            w_mid_n = torch.tensor([0, 1, 1, 0.0]) / mu; w_mid_n /= w_mid_n.sum()
            score_v = vp * vi
            w_soft = torch.tensor(np.where(keep, score_v, 0), dtype=torch.float32); w_soft /= w_soft.sum()
            res = {}
            for nm_, w in (("mean4", None), ("mid", w_mid), ("mid_n", w_mid_n), ("auto", w_auto), ("auto_n", w_auto_n), ("soft", w_soft)):
                res[nm_] = metrics(to_maps(D, w), ds.labels, ds.masks)
            rec = {"ds": name, "k": k, "seed": seed, "vp": vp.tolist(), "vi": vi.tolist(), "mu": mu.tolist(), "res": res}
            out.write(json.dumps(rec) + "\n"); out.flush()
            print(k, seed, "keep", keep.astype(int).tolist(), {a: (round(b["i_auroc"], 3), round(b["p_ap"], 3)) for a, b in res.items()}, f"{time.time()-t0:.0f}s", flush=True)
