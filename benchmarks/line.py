"""`cff-inspect bench line`: a category replayed as a production line (the replay is :mod:`benchmarks.line_replay`).

Kept free of torch so that building the CLI stays fast; the replay loads it when it runs.
"""

from __future__ import annotations

import argparse
import os

from inspection_core.errors import DatasetError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", default=None, help="category folder or root (repeatable)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--labels", type=int, default=20, help="alarms the simulated operator labels (after commissioning)")
    p.add_argument(
        "--commissioning", type=int, default=200, help="frames in the commissioning phase (<= half the stream)"
    )
    p.add_argument("--refit-every", type=int, default=5, help="new labels that trigger a candidate version")
    p.add_argument(
        "--growth",
        type=float,
        default=None,
        help="bank rows added, fraction of the fitted bank (default: the calibrator default)",
    )
    p.add_argument("--image-far", type=float, default=0.01, help="the false-alarm rate the threshold aims at")
    p.add_argument("--backbone", default="dinov2-vits14")
    p.add_argument("--cache", default=os.environ.get("CFF_LINE_CACHE"), help="folder for cached tokens")
    p.add_argument("--timing-frames", type=int, default=8, help="frames timed per run for the cost ratio (0 = off)")
    p.add_argument("--json", default=None, help="write every run and the table here")


def main(args: argparse.Namespace) -> int:
    data = args.data or [d for d in os.environ.get("CFF_DATASETS", "").split(os.pathsep) if d]
    if not data and getattr(args, "default_data", None):
        data = [args.default_data]  # the CLI's ../shared/datasets
    if not data:
        raise DatasetError("no --data given, CFF_DATASETS unset and no ../shared/datasets: name a category folder")
    from benchmarks.line_replay import run

    run(args, data)
    return 0
