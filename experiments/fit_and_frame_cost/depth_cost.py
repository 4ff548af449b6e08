"""Per-frame CPU cost of the default knn head with and without the shallow forward.

python -m experiments.fit_and_frame_cost.depth_cost [K] [N_IMAGES] [ROUNDS]
(kolektor_sdd references seed 0, the first N test images)

The same fitted head scores the same frames, alternating: once as shipped (the backbone stops after the last
weighted tap, block 9 of 12 for the mid-level taps) and once with every block run; one JSON line per pass, then
the ratio of the medians. The two must give identical scores, which is checked.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import torch

from experiments.common import kolektor
from scorer.fit import fit_head
from scorer.head import search_dtype


def main(k: int = 4, n: int = 8, rounds: int = 3) -> None:
    bb, refs, test = kolektor(k, n)
    head = fit_head(bb, refs, method="knn")
    head = head.with_options(bank_dtype=search_dtype(head))  # what a worker's --bank-dtype auto searches in
    real = bb.extract

    def every_block(px: torch.Tensor, depth: int | None = None) -> object:
        return real(px)

    head.score(test[:2])  # warm-up: bank on the device, first search
    times: dict[str, list[float]] = {"shallow": [], "every block": []}
    scores: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for mode in times:
            bb.extract = every_block if mode == "every block" else real  # type: ignore[method-assign]
            t = time.perf_counter()
            s = head.score(test)
            times[mode].append((time.perf_counter() - t) / n)
            scores[mode] = s.image_scores
            print(
                json.dumps(
                    {
                        "k": k,
                        "depth": head.depth if mode == "shallow" else len(bb.taps),
                        "mode": mode,
                        "bank_dtype": head.options.bank_dtype,
                        "score_s_per_image": times[mode][-1],
                    }
                ),
                flush=True,
            )
    bb.extract = real  # type: ignore[method-assign]
    same = bool(np.array_equal(scores["shallow"], scores["every block"]))
    ratio = statistics.median(times["every block"]) / statistics.median(times["shallow"])
    print(json.dumps({"identical_scores": same, "every_block_over_shallow": ratio}), flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
