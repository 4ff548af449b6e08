"""A real Prometheus scrapes a live `cff-inspect run`; every dashboard panel's query must return data.

Also checks the process endpoints (/healthz, /readyz with named checks) and that the metrics Prometheus stored
agree with what the run itself reports (frames published vs scored).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from inspection_core.broker import free_port
from monitoring import dashboards
from monitoring.prom import Prometheus, find_prometheus

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# Panels that can only show data on a machine with a GPU.
GPU_ONLY = ("gpu",)
# Series that exist only after something went wrong: their panels fall back to `or on() vector(0)`.
ERROR_ONLY = ("inspection_dead_lettered_total", "inspection_frames_dropped_total", "inspection_heads_refused_total",
              'status!="ok"',
              # and series that exist only once an operator sent feedback, or a frame fell out of retention
              "inspection_feedback_received_total", "inspection_line_false_alarm_rate", "inspection_line_recall",
              "inspection_line_frames_lost_total")  # fmt: skip
FALLBACK = re.compile(r"\s+or\s+on\(\)\s+vector\(0\)\s*$")


def _real(expr: str) -> str:
    """The panel's query without its zero fallback, unless it only has data when things go wrong."""
    return expr if any(e in expr for e in ERROR_ONLY) else FALLBACK.sub("", expr)


def _need_prometheus() -> None:
    if find_prometheus() is None:
        msg = "prometheus is not installed (apt-get install -y prometheus; .ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def _get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read().decode()
            code = r.status
    except urllib.error.HTTPError as e:
        body, code = e.read().decode(), e.code
    except (urllib.error.URLError, OSError):
        return 0, ""
    try:
        return code, json.loads(body)
    except ValueError:
        return code, body


def _wait(pred, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_every_dashboard_panel_has_data_from_a_live_run(tmp_path, stop_gracefully) -> None:
    """`run --prometheus` starts Prometheus with the project's rules; every panel query must find data."""
    _need_prometheus()
    mport, pport = free_port(), free_port()
    run = subprocess.Popen(
        [sys.executable, "-m", "cff_inspect", "run", "--backbone", "tiny-vit", "--method", "cff", "--steps", "3",
         "--duration", "90", "--fps", "2", "--out", str(tmp_path / "out"), "--device", "cpu",
         "--commissioning-frames", "6",  # the line makes its own version during the run: its panels get data
         "--metrics-port", str(mport), "--summary-json", str(tmp_path / "s.json"),
         "--prometheus", "--prometheus-port", str(pport), "--scrape-interval", "1s"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{mport}"
    try:
        prom = Prometheus({}, tmp_path / "unused", port=pport)  # a client of the one `run --prometheus` started
        _wait(lambda: _get(f"{base}/healthz")[0] == 200, 120, "/healthz")
        _wait(lambda: _get(f"{prom.url}/-/ready")[0] == 200, 60, "the Prometheus that run --prometheus starts")
        code, ready = _get(f"{base}/readyz")
        assert code in (200, 503) and "worker_broker" in ready["checks"] and "worker_heads" in ready["checks"]
        _wait(lambda: _get(f"{base}/readyz")[0] == 200, 120, "/readyz to turn ready (head loaded, broker up)")
        _, ready = _get(f"{base}/readyz")
        assert re.search(r"v\d+$", ready["checks"]["worker_heads"]["detail"])  # v1, or already the line's v2

        def scored() -> float:
            r = prom.query('sum(inspection_frames_scored_total{status="ok"})')
            return float(r[0]["value"][1]) if r else 0.0

        _wait(lambda: scored() >= 6, 120, "Prometheus to scrape scored frames")
        time.sleep(4)  # a few more scrapes so that rate() windows hold two samples of every series

        missing = []
        for name, dash in dashboards.build().items():
            for title, expr in dashboards.panel_queries(dash):
                if any(g in title.lower() for g in GPU_ONLY):
                    continue
                if not prom.query(_real(expr)):
                    missing.append(f"{name} / {title}: {expr}")
        assert not missing, "panels without data:\n" + "\n".join(missing)

        # the same panels filtered on the demo camera and product through the drill-down variables
        drill = dashboards.build()["drilldown"]
        filtered = dashboards.panel_queries(drill, {"camera": "cam-1", "product": "demo-texture"})
        empty = [t for t, e in filtered if not any(g in t.lower() for g in GPU_ONLY) and not prom.query(_real(e))]
        assert not empty, f"drill-down panels empty for cam-1: {empty}"

        heads = prom.query("inspection_active_head_info")
        assert [h["metric"]["version"] for h in heads] in (["1"], ["2"])  # the fit, or the line version after it
        assert prom.query('inspection_service_info{service="worker"}')
        assert prom.query('inspection_calibrator_calls_total{rpc="FitHead",code="OK"}')
        rules = prom.api("rules")
        names = {r["name"] for g in rules["groups"] for r in g["rules"]}
        assert {"CameraDown", "NoWorkerAlive"} <= names
        assert all(r.get("health") == "ok" for g in rules["groups"] for r in g["rules"]), rules
    finally:
        out = stop_gracefully(run, timeout=60)
    assert run.returncode == 0, out[-3000:]
    assert "prometheus on" in out
    assert _get(f"http://127.0.0.1:{pport}/-/ready")[0] == 0  # stopped with the run
