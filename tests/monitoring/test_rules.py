"""Prometheus config, recording rules and alerts: promtool checks and unit tests, plus static checks."""

from __future__ import annotations

import re

import pytest
import yaml
from monitoring_support import (
    MONITORING,
    PROMETHEUS,
    RULE_FILES,
    TEST_FILES,
    bad_matchers,
    load_rules,
    run_promtool,
    unknown_names,
)

ALERTS = [r for r in load_rules() if "alert" in r]
SEVERITIES = {"critical", "warning", "info"}


def _ok(proc) -> None:  # noqa: ANN001
    assert proc.returncode == 0, f"promtool exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def test_files_are_there() -> None:
    assert {p.name for p in RULE_FILES} == {"alerts.yml", "recording.yml"}
    assert TEST_FILES, "no promtool unit tests in monitoring/prometheus/tests"


def test_promtool_check_config() -> None:
    proc = run_promtool("check", "config", PROMETHEUS / "prometheus.yml")
    _ok(proc)
    assert "2 rule files found" in proc.stdout + proc.stderr, "rule_files must find rules/*.yml"


def test_promtool_check_rules() -> None:
    _ok(run_promtool("check", "rules", *RULE_FILES))


def test_promtool_unit_tests() -> None:
    _ok(run_promtool("test", "rules", *TEST_FILES))


def test_scrape_config_jobs() -> None:
    cfg = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert cfg["global"]["scrape_interval"] == "15s"
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in cfg["scrape_configs"]}
    assert jobs == {
        "cff-inspect-ingest": ["127.0.0.1:9101"],
        "cff-inspect-workers": ["127.0.0.1:9102"],
        "cff-inspect-calibrator": ["127.0.0.1:9103"],
    }
    assert cfg["rule_files"] == ["rules/*.yml"]


def test_rule_expressions_use_known_metrics_and_labels(series, recorded) -> None:  # noqa: ANN001
    problems = []
    for rule in load_rules():
        name = rule.get("record") or rule["alert"]
        for unknown in sorted(unknown_names(rule["expr"], set(recorded), set(series))):
            problems.append(f"{name}: unknown metric {unknown}")
        problems += [f"{name}: {p}" for p in bad_matchers(rule["expr"], set(recorded), series)]
    assert not problems, "\n".join(problems)


def test_recording_rule_names_follow_level_metric_operations(recorded) -> None:  # noqa: ANN001
    for name in recorded:
        level, metric, ops = name.split(":")
        assert level and ops and metric.startswith("inspection_"), name


def test_alerts_are_labelled_and_annotated() -> None:
    readme = (MONITORING / "README.md").read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+\s+(.+)$", readme, flags=re.M)}
    for alert in ALERTS:
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        assert alert["labels"].get("component"), name
        assert set(alert["annotations"]) == {"summary", "description", "runbook"}, name
        anchor = re.match(r"monitoring/README\.md#([\w-]+)", alert["annotations"]["runbook"])
        assert anchor and anchor.group(1) == name.lower(), f"{name}: runbook must point at README#{name.lower()}"
        assert anchor.group(1) in anchors, f"{name}: README.md has no section {anchor.group(1)}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fired: set[tuple[str, str]] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                exp = t.get("exp_alerts") or []
                if not exp:
                    quiet.add(t["alertname"])
                for a in exp:
                    assert a.get("exp_annotations"), f"{t['alertname']}: a firing case must check the annotations"
                    fired.add((t["alertname"], a["exp_labels"]["severity"]))
    wanted = {(a["alert"], a["labels"]["severity"]) for a in ALERTS}
    assert wanted <= fired, f"alerts (name, severity) never tested firing: {sorted(wanted - fired)}"
    assert {a["alert"] for a in ALERTS} <= quiet, f"never tested quiet: {sorted({a['alert'] for a in ALERTS} - quiet)}"


@pytest.mark.parametrize(
    "name",
    [
        "CameraDown",
        "ConsumerLagGrowing",
        "LatencySLOBurn",
        "DefectRateSpike",
        "DeadLetterGrowth",
        "NoWorkerAlive",
        "CalibratorFitFailures",
        "HeadsRefused",
    ],
)
def test_required_alert_exists(name: str) -> None:
    assert name in {a["alert"] for a in ALERTS}


def test_no_worker_alert_does_not_depend_on_job_names() -> None:
    (rule,) = [a for a in ALERTS if a["alert"] == "NoWorkerAlive"]
    assert 'service="worker"' in rule["expr"] and "job" not in rule["expr"]


def _slug(heading: str) -> str:
    """GitHub's heading anchor."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
