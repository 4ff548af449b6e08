"""The one result format of every benchmark: a JSON line with name, machine facts, parameters and metrics.

A benchmark's record is ``{"name", "created", "machine", "params", "metrics", ...detail}``: ``metrics`` holds the
flat figures to compare between runs (numbers keyed by name), the detail keys (tables, curves) what a reader needs
to see where they came from. ``write`` appends the record as one line, so one file collects runs to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(device: Any = None) -> dict[str, Any]:
    """What makes two runs comparable: CPU, cores, torch and its threads, the device the model ran on."""
    import torch

    facts: dict[str, Any] = {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if device is not None and torch.device(device).type == "cuda":
        facts["device"] = torch.cuda.get_device_name(torch.device(device))
    return facts


def params_of(args: argparse.Namespace, skip: tuple[str, ...] = ("func", "out", "command", "bench_command")) -> dict:
    """The command's options as given, minus the dispatch fields and the output path."""
    return {k: v for k, v in vars(args).items() if k not in skip and not k.startswith("_") and not callable(v)}


def record(name: str, machine: dict, params: dict, metrics: dict, **detail: Any) -> dict[str, Any]:
    """One benchmark run in the common format."""
    return {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "params": params,
        "metrics": metrics,
        **detail,
    }


def write(rec: dict, path: str | Path | None) -> None:
    """Append ``rec`` as one JSON line to ``path`` (folders created); nothing when no path was given."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def read(path: str | Path) -> list[dict]:
    """Every record of a JSON-lines results file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
