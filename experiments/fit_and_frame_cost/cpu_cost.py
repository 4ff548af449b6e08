"""CPU cost per image of the scorer: backbone once, then each head's scoring, side by side.

    python -m experiments.fit_and_frame_cost.cpu_cost [--backbone dinov2-vits14] [--threads 2] [--repeats 5]

Prints one table: seconds per image for the backbone forward (batch 1 and 8) and for
scoring the tokens with knn / aprilgan / cff heads at K = 1, 4, 16 (memory-bank
search plus maps), and the ratio of each to the backbone.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from scorer.backbones import BackboneOutput, load_backbone
from scorer.fit import FitOptions, fit_heads_from_features
from scorer.head import knn_head


def _time(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="dinov2-vits14")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bb = load_backbone(args.backbone)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (bb.image_size, bb.image_size, 3), dtype=np.uint8) for _ in range(16)]
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; backbone {bb.spec} at {bb.image_size} px, grid {bb.grid}"
    )
    rows = []
    with torch.inference_mode():
        px1 = bb.preprocess(imgs[:1])
        px8 = bb.preprocess(imgs[:8])
        t1 = _time(lambda: bb.extract(px1), args.repeats)
        t8 = _time(lambda: bb.extract(px8), args.repeats) / 8
        tp = _time(lambda: bb.preprocess(imgs[:8]), args.repeats) / 8
    rows += [("preprocess (resize+normalise)", tp), ("backbone, batch 1", t1), ("backbone, batch 8", t8)]
    query = bb.embed(imgs[:8])
    for k in (1, 4, 16):
        refs = imgs[:k]
        rf = bb.embed(refs)
        heads = {"knn": knn_head(bb, rf)}
        heads.update(
            fit_heads_from_features(bb, refs, rf, options=FitOptions(steps_stage1=1, steps_stage2=1, n_synthetic=2))
        )
        for name, h in heads.items():
            with torch.inference_mode():
                q = BackboneOutput([t.float() for t in query.tokens], query.grid)
                ts = _time(lambda h=h, q=q: h.score_tokens(q), args.repeats) / 8
            rows.append((f"{name} head scoring, K={k} (batch 8)", ts))
    width = max(len(r[0]) for r in rows)
    print(f"| {'step':{width}s} | ms / image | x backbone (batch 8) |")
    print(f"|{'-' * (width + 2)}|---:|---:|")
    for name, s in rows:
        print(f"| {name:{width}s} | {1000 * s:8.1f} | {s / t8:6.2f} |")


if __name__ == "__main__":
    main()
