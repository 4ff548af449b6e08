"""K-shot fit wall time of one checkout, so two checkouts can be timed back to back in one run.

python -m experiments.fit_and_frame_cost.fit_time REPO METHOD K REPEATS [NAME=VALUE ...]
(fit options, e.g. support_views=rot+flip;
kolektor_sdd references, seed 0; prints one JSON line)
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import time

from experiments.common import dataset


def main(repo: str, method: str, k: int, reps: int, options: dict[str, str] | None = None) -> dict:
    sys.path.insert(0, repo)  # the checkout to time, old or new
    torch = importlib.import_module("torch")
    torch.set_num_threads(2)
    load_backbone = importlib.import_module("scorer.backbones").load_backbone
    auto_precision = importlib.import_module("scorer.backbones.base").auto_precision
    data = importlib.import_module("scorer.data")
    fit = importlib.import_module("scorer.fit")
    fit_head = fit.fit_head
    opts = fit.FitOptions().with_strings(options)[0] if options else None
    load_image = importlib.import_module("scorer.images").load_image

    bb = load_backbone("dinov2-vits14")
    bb.set_precision(auto_precision("cpu"))
    cat = data.discover(dataset("kolektor_sdd"))[0]
    refs = [load_image(p) for p in data.draw_references(cat.train, k, 0)]
    fit_head(bb, refs[:1], method="knn")  # warm-up: first forward, allocator
    kwargs: dict = {"options": opts} if opts is not None else {}
    takes_progress = "progress" in inspect.signature(fit_head).parameters  # checkouts before the progress events
    seconds, stages, head = [], [], None
    for _ in range(reps):
        ends: dict[str, float] = {}  # stage -> seconds into the fit at its last event (where the time went)
        t = time.perf_counter()
        if takes_progress:
            kwargs["progress"] = lambda e, ends=ends, t=t: ends.__setitem__(e.stage, round(time.perf_counter() - t, 2))
        head = fit_head(bb, refs, method=method, **kwargs)
        seconds.append(time.perf_counter() - t)
        stages.append(ends)
    out = {"repo": repo, "method": method, "options": options or {}, "chosen": head.method, "k": k, "seconds": seconds}
    return {**out, "stage_ends": stages} if takes_progress else out


if __name__ == "__main__":
    extra = dict(a.split("=", 1) for a in sys.argv[5:])
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), extra)))
