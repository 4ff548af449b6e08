"""Which taps ``knn_taps=mid+first`` picks, per dataset, K and seed, from the fit alone (no test image is read).

python -m experiments.tap_fusion.midfirst_choice DATASET K[,K...] [SEEDS]   (prints one JSON line per fit:
the weights and each tap's held-out pixel AP; the references are the eval's, ``draw_references(train, K, seed)``)
"""

from __future__ import annotations

import json
import sys

import torch

from experiments.common import datasets_root
from scorer import data  # noqa: E402
from scorer.backbones import load_backbone  # noqa: E402
from scorer.backbones.base import auto_precision  # noqa: E402
from scorer.fit import FitOptions, fit_head  # noqa: E402
from scorer.images import load_image  # noqa: E402

DATA = datasets_root()


def main(name: str, shots: list[int], seeds: list[int]) -> None:
    torch.set_num_threads(2)
    bb = load_backbone("dinov2-vits14")
    bb.set_precision(auto_precision("cpu"))
    cat = data.discover(DATA / name)[0]
    for k in shots:
        for seed in seeds:
            refs = [load_image(p) for p in data.draw_references(cat.train, k, seed)]
            head = fit_head(bb, refs, method="knn", options=FitOptions(knn_taps="mid+first"), seed=seed)
            choice = head.meta["tap_choice"]
            aps = [round(t["pixel_ap"], 3) for t in choice.get("per_tap", [])]
            rec = {"ds": name, "k": k, "seed": seed, "weights": list(head.options.tap_weights), "held_out_p_ap": aps}
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    seeds = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0,1,2").split(",")]
    main(sys.argv[1], [int(k) for k in sys.argv[2].split(",")], seeds)
