"""K-shot fit wall time of one checkout (issue 12), so two checkouts can be timed back to back in one run.

python benchmarks/fit_time.py REPO METHOD K REPEATS   (kolektor_sdd references, seed 0; prints one JSON line)
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path


def main(repo: str, method: str, k: int, reps: int) -> dict:
    sys.path.insert(0, repo)  # the checkout to time, old or new
    torch = importlib.import_module("torch")
    torch.set_num_threads(2)
    load_backbone = importlib.import_module("scorer.backbones").load_backbone
    auto_precision = importlib.import_module("scorer.backbones.base").auto_precision
    data = importlib.import_module("scorer.data")
    fit_head = importlib.import_module("scorer.fit").fit_head
    load_image = importlib.import_module("scorer.images").load_image

    bb = load_backbone("dinov2-vits14")
    bb.set_precision(auto_precision("cpu"))
    cat = data.discover(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "kolektor_sdd")[0]
    refs = [load_image(p) for p in data.draw_references(cat.train, k, 0)]
    fit_head(bb, refs[:1], method="knn")  # warm-up: first forward, allocator
    seconds, head = [], None
    for _ in range(reps):
        t = time.perf_counter()
        head = fit_head(bb, refs, method=method)
        seconds.append(time.perf_counter() - t)
    return {"repo": repo, "method": method, "chosen": head.method, "k": k, "seconds": seconds}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
