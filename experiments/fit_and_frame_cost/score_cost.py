"""Per-frame CPU cost of a K-shot knn head against the size of its bank (support views).

python -m experiments.fit_and_frame_cost.score_cost [K] [N_IMAGES] [BANK_DTYPE]
(kolektor_sdd references seed 0, the first N test
images; BANK_DTYPE float32 (default: the exact search) or bfloat16 (what a worker's ``--bank-dtype auto`` picks
where the backbone scores in bf16);
one JSON line per support-views setting: the bank's image count, full score seconds per image, and the
search-and-maps part alone: the same call on precomputed tokens)
"""

from __future__ import annotations

import json
import sys
import time

import torch

from experiments.common import kolektor
from scorer.fit import FitOptions, fit_head


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
