"""Per-frame CPU cost of the bank search in cache-sized blocks against the previous one-matmul-per-bank-chunk search.

python -m experiments.fit_and_frame_cost.search_blocks [K] [N_IMAGES] [ROUNDS]
(kolektor_sdd references seed 0, the first N test images)

The same fitted default head scores the same frames' tokens, alternating the two searches (the previous one is
kept here verbatim, as it was in ``scorer.head.nn_distance`` before); one JSON line per pass with the whole
score_features time per image, then the ratio of the medians. The distances must agree (checked).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from experiments.common import kolektor
from scorer import head as head_mod
from scorer.fit import fit_head
from scorer.head import search_dtype


def previous_search(
    query: torch.Tensor, bank: torch.Tensor, *, chunk: int = 4096, dtype: str = "float32"
) -> torch.Tensor:
    """The search before the blocks: the whole batch against one 4096-row bank chunk at a time."""
    dt = getattr(torch, dtype)
    q = F.normalize(query.float(), dim=-1).to(dt)
    bk = bank.to(q.device)
    best = None
    for s in range(0, bk.shape[0], chunk):
        m = (q @ bk[s : s + chunk].to(dt).T).amax(-1).float()
        best = m if best is None else torch.maximum(best, m)
    assert best is not None
    return 1.0 - best


def main(k: int = 4, n: int = 8, rounds: int = 3) -> None:
    bb, refs, test = kolektor(k, n)
    head = fit_head(bb, refs, method="knn")
    head = head.with_options(bank_dtype=search_dtype(head))  # what a worker's --bank-dtype auto searches in
    tokens = bb.embed(test, depth=head.depth)
    blocked = head_mod.nn_distance
    results: dict[str, list[float]] = {"blocks": [], "previous": []}
    maps = {}
    for _ in range(rounds):
        for name, fn in (("blocks", blocked), ("previous", previous_search)):
            head_mod.nn_distance = fn
            try:
                t = time.perf_counter()
                _, maps[name], _ = head.score_features(tokens)
                per_image = (time.perf_counter() - t) / n
            finally:
                head_mod.nn_distance = blocked
            results[name].append(per_image)
            print(json.dumps({"search": name, "k": k, "images": n, "score_s_per_image": per_image}))
    diff = float(abs(maps["blocks"] - maps["previous"]).max())
    assert diff < 1e-5, f"the two searches disagree by {diff}"
    med = {name: statistics.median(v) for name, v in results.items()}
    print(
        json.dumps(
            {
                "median_s_per_image": med,
                "speedup": med["previous"] / med["blocks"],
                "max_map_diff": diff,
                "search_dtype": head.options.bank_dtype,
                "bank_rows": int(head.bank[0].shape[0]),
            }
        )
    )


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(*args)
