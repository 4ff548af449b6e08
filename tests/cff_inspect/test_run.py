"""``cff-inspect run`` end to end: embedded broker, in-process head fit, worker, two demo cameras."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_bounded_run_summary(tmp_path) -> None:
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cff_inspect",
            "run",
            "--backbone",
            "tiny-vit",
            "--method",
            "knn",
            "--duration",
            "8",
            "--fps",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--summary-json",
            str(summary),
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert s["frames_published"] >= 8
    assert s["results_received"] >= s["frames_published"] - s["dropped"]
    assert s["distinct_frame_ids"] == s["frames_published"] - s["dropped"]
    assert s["statuses"] == {"STATUS_OK": s["results_received"]}
    assert s["defects"] >= 1 and s["latency_p50_s"] > 0
    assert list((tmp_path / "out" / "evidence").glob("*_overlay.png"))
    # nothing left running: the embedded broker's port is free again
    assert "embedded broker on" in proc.stderr
