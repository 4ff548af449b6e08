"""Per-frame CPU cost of a K-shot knn head against the size of its bank (issue 12: support views).

python benchmarks/score_cost.py [K] [N_IMAGES] [BANK_DTYPE]   (kolektor_sdd references seed 0, the first N test
images; BANK_DTYPE float32 (default: the exact search) or bfloat16 (what a worker's ``--bank-dtype auto`` picks
where the backbone scores in bf16);
one JSON line per support-views setting: the bank's image count, full score seconds per image, and the
search-and-maps part alone: the same call on precomputed tokens)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from scorer import data
from scorer.backbones import load_backbone
from scorer.backbones.base import auto_precision
from scorer.fit import FitOptions, fit_head
from scorer.images import load_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "kolektor_sdd"


def kolektor(k: int, n: int) -> tuple:
    """The CPU benchmarks' set-up: 2 threads, dinov2-vits14 at this CPU's precision, kolektor_sdd's K seed-0
    references and its first ``n`` test images -> (backbone, references, test images)."""
    torch.set_num_threads(2)
    bb = load_backbone("dinov2-vits14")
    bb.set_precision(auto_precision("cpu"))
    cat = data.discover(DATA)[0]
    refs = [load_image(p) for p in data.draw_references(cat.train, k, 0)]
    return bb, refs, [load_image(s.path) for s in cat.test[:n]]


def main(k: int = 4, n: int = 8, bank_dtype: str = "float32") -> None:
    bb, refs, test = kolektor(k, n)
    with bb.precision_scope(bb.precision):
        tokens = bb.embed(test)
    for views in ("none", "flip", "rot+flip"):
        head = fit_head(bb, refs, method="knn", options=FitOptions().with_strings({"support_views": views})[0])
        head = head.with_options(bank_dtype=bank_dtype)
        head.score(test[:2])  # warm-up: bank on the device, first search
        full, search = [], []
        for _ in range(2):
            t = time.perf_counter()
            head.score(test)
            full.append((time.perf_counter() - t) / n)
            t = time.perf_counter()
            with torch.inference_mode():
                head.score_features(tokens)
            search.append((time.perf_counter() - t) / n)
        print(
            json.dumps(
                {
                    "k": k,
                    "support_views": views,
                    "bank_dtype": bank_dtype,
                    "bank_images": head.meta["bank_images"],
                    "score_s_per_image": full,
                    "search_and_maps_s_per_image": search,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]), *sys.argv[3:4])
