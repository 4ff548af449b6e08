"""Helpers shared by the monitoring tests: promtool, the metric catalogue and the rules files.

(Not ``conftest.py``: tests import these functions, and ``tests/conftest.py`` owns that module name.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import monitoring.metrics as metrics_module

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
PROMETHEUS = MONITORING / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS / "tests").glob("*.yml"))

# A raw metric name (not the middle of a recording-rule name) and a recording-rule name level:metric:ops.
RAW_NAME = re.compile(r"(?<![\w:])inspection_\w+")
RECORDED_NAME = re.compile(r"(?<![\w:])[a-zA-Z_]\w*:[\w:]*\w")
# A series selector: name with an optional {matchers}; labels inside the matchers.
SELECTOR = re.compile(r"(?<![\w:])((?:[a-zA-Z_]\w*:[\w:]*\w)|inspection_\w+)\s*(\{[^}]*\})?")
MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
ALWAYS_LABELS = {"job", "instance"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def promtool_or_skip() -> str:
    path = shutil.which("promtool")
    if path is None:
        msg = "promtool not found on PATH (Debian/Ubuntu: apt-get install prometheus; or a Prometheus release tarball)"
        if in_ci():
            pytest.fail(f"{msg}; CI=true, so this is an error, not a skip")
        pytest.skip(msg)
    return path


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool from the repo root; the result's output is for assertion messages."""
    return subprocess.run(
        [promtool_or_skip(), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


@dataclass(frozen=True)
class Metric:
    family: str  # as registered, without _total
    kind: str  # counter, gauge, histogram
    labels: frozenset[str]

    def series_names(self) -> dict[str, frozenset[str]]:
        """Exposed series names -> their labels (le on histogram buckets)."""
        if self.kind == "counter":
            return {f"{self.family}_total": self.labels}
        if self.kind == "histogram":
            return {
                f"{self.family}_bucket": self.labels | {"le"},
                f"{self.family}_sum": self.labels,
                f"{self.family}_count": self.labels,
            }
        return {self.family: self.labels}


def catalogue() -> list[Metric]:
    return [
        Metric(m._name, m._type, frozenset(m._labelnames))
        for m in vars(metrics_module).values()
        if isinstance(m, MetricWrapperBase)
    ]


def exposed_series() -> dict[str, frozenset[str]]:
    """Every series name monitoring.metrics exposes -> its label names."""
    out: dict[str, frozenset[str]] = {}
    for m in catalogue():
        out.update(m.series_names())
    return out


def load_rules() -> list[dict]:
    groups = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    return [rule for group in groups for rule in group["rules"]]


def recording_rules() -> dict[str, str]:
    """Recorded name -> expression."""
    return {r["record"]: r["expr"] for r in load_rules() if "record" in r}


def recorded_labels(name: str) -> frozenset[str]:
    """Labels a recording rule keeps, from its level: ``camera_product_status:...`` -> camera, product, status."""
    return frozenset(name.split(":", 1)[0].split("_"))


def unknown_names(expr: str, recorded: set[str], series: set[str]) -> set[str]:
    """Names used in ``expr`` that are neither exposed by monitoring.metrics nor recorded by the rules files."""
    raw = set(RAW_NAME.findall(expr)) - series
    rec = set(RECORDED_NAME.findall(_strip_strings(expr))) - recorded
    return raw | rec


def bad_matchers(expr: str, recorded: set[str], series: dict[str, frozenset[str]]) -> list[str]:
    """``name{label...}`` matchers on labels that series does not have."""
    problems = []
    for name, body in SELECTOR.findall(expr):
        if not body:
            continue
        if name in series:
            allowed = series[name] | ALWAYS_LABELS
        elif name in recorded:
            allowed = recorded_labels(name)
        else:
            continue  # reported by unknown_names
        for label in MATCHER_LABEL.findall(_strip_strings(body)):
            if label not in allowed:
                problems.append(f"{name} has no label {label!r} (has {sorted(allowed)})")
    return problems


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
