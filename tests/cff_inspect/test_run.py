"""``cff-inspect run`` end to end: embedded broker, calibrator fit over gRPC, worker, two demo cameras."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, summary: Path, duration: str) -> subprocess.CompletedProcess:
    return subprocess.run(
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
            duration,
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


def test_bounded_run_summary(tmp_path) -> None:
    summary = tmp_path / "summary.json"
    proc = _run(tmp_path, summary, "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(summary.read_text())
    # the head was fitted by the calibrator service and reached the worker through the heads topic
    assert s["head"].endswith("-v1") and s["fit_seconds"] > 0
    assert "uploading 4 good images" in proc.stderr
    assert s["frames_published"] >= 8
    assert s["results_received"] >= s["frames_published"] - s["dropped"]
    assert s["distinct_frame_ids"] == s["frames_published"] - s["dropped"]
    assert s["statuses"] == {"STATUS_OK": s["results_received"]}
    assert s["defects"] >= 1 and s["latency_p50_s"] > 0
    assert list((tmp_path / "out" / "evidence").glob("*_overlay.png"))
    key = tmp_path / "out" / "heads.key"  # signs the calibrator's announcements; the worker verifies with it
    assert key.stat().st_mode & 0o777 == 0o600 and f"announcements signed with {key}" in proc.stderr
    key_bytes = key.read_bytes()
    # nothing left running: the embedded broker's port is free again
    assert "embedded broker on" in proc.stderr

    # a second run on the same --out reuses the stored, still active head instead of fitting again
    again = _run(tmp_path, summary, "3")
    assert again.returncode == 0, again.stderr[-3000:]
    s2 = json.loads(summary.read_text())
    assert s2["head"] == s["head"] and "fit_seconds" not in s2
    assert "using the stored" in again.stderr
    assert key.read_bytes() == key_bytes  # kept with the head store


def test_run_takes_the_calibrators_line_settings() -> None:
    """`run` declares the line flags from calibrator.line_config (one declaration) and its calibrator gets them."""
    from calibrator.line_config import DEFAULT_LINE, line_from
    from cff_inspect.cli import build_parser
    from inspection_core.env import bind_env

    args = build_parser().parse_args(["run", "--commissioning-frames", "0", "--line-dry-run"])
    assert line_from(args) == replace(DEFAULT_LINE, commissioning_frames=0, line_dry_run=True)
    env = {"CFF_INSPECT_COMMISSIONING_FRAMES": "7"}
    assert line_from(bind_env(build_parser(), env).parse_args(["run"])).commissioning_frames == 7
    assert line_from(build_parser().parse_args(["run"])) == DEFAULT_LINE
