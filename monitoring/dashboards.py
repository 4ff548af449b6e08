"""Grafana dashboards as code: plain dicts -> JSON, no dependency beyond the standard library.

``python -m monitoring.dashboards`` rewrites ``monitoring/grafana/dashboards/*.json`` (``--check`` only
reports whether they are stale). Two dashboards:

* ``overview``: the whole pipeline (throughput, latency, lag, quality, cameras, heads, errors, calibrator);
* ``drilldown``: one or more cameras / products, chosen with the ``camera`` and ``product`` variables.

Expressions use only metric names from :mod:`monitoring.metrics` and recording rules from
``monitoring/prometheus/rules/recording.yml``. Error-count panels fall back to ``or on() vector(0)`` so that
every panel has data once frames flow (a counter with labels has no series before its first event).
:func:`panel_queries` returns each panel's expressions with the template variables filled in, for tests that
evaluate them against a live Prometheus.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent / "grafana" / "dashboards"
SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana would put in for its built-in variables at a 15 s scrape interval (see the datasource's
# timeInterval in grafana/provisioning/datasources/prometheus.yml).
BUILTIN_VALUES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
RI = "$__rate_interval"
ZERO = " or on() vector(0)"  # a 0 series only when the left side has none


# -- building blocks ----------------------------------------------------------------------------------------


def target(expr: str, legend: str = "", *, instant: bool = False, fmt: str = "time_series") -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "range": not instant}
    if instant:
        t["instant"] = True
    if fmt != "time_series":
        t["format"] = fmt
    return t


def panel(
    pid: int,
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    kind: str = "timeseries",
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    **extra: Any,
) -> dict[str, Any]:
    for ref, t in zip("ABCDEFGHIJ", targets, strict=False):
        t["refId"] = ref
    p: dict[str, Any] = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": 0, "y": 0},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "fillOpacity": 10, "showPoints": "never"}
        p["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    for key, value in extra.items():
        if key in ("options", "fieldConfig"):
            _merge(p[key], value)
        else:
            p[key] = value
    return p


def _score_heatmap(selector: str) -> dict[str, Any]:
    """Targets and options of a normalised-score heatmap (overview: all products; drill-down: selected)."""
    return {
        "targets": [
            target(
                f"sum by (le) (increase(inspection_anomaly_score_normalized_bucket{selector}[{RI}]))",
                "{{le}}",
                fmt="heatmap",
            )
        ],
        "kind": "heatmap",
        "options": {
            "calculate": False,
            "yAxis": {"axisLabel": "normalised score (le)"},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges"},
            "tooltip": {"show": True, "yHistogram": True},
        },
    }


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Left-to-right, top-to-bottom on Grafana's 24-column grid."""
    x = y = row_h = 0
    for p in panels:
        g = p["gridPos"]
        if x + g["w"] > 24:
            x, y, row_h = 0, y + row_h, 0
        g["x"], g["y"] = x, y
        x += g["w"]
        row_h = max(row_h, g["h"])
    return panels


def quantiles(metric: str, by: str, selector: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[dict]:
    """``histogram_quantile`` targets over ``rate(<metric>_bucket{selector}[$__rate_interval])``."""
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        target(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{selector}[{RI}])))",
            f"{prefix}p{round(q * 100)}",
        )
        for q in qs
    ]


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": query,
        "refresh": 2,  # on time range change: new cameras/products appear without a reload
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
    }


def dashboard(uid: str, title: str, description: str, panels: list[dict], variables: list[dict]) -> dict[str, Any]:
    return {
        "id": None,
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["cff-inspect"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "title": "cff-inspect dashboards",
                "type": "dashboards",
                "tags": ["cff-inspect"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": _layout(panels),
    }


UP_DOWN_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "down", "color": "red", "index": 0},
            "1": {"text": "up", "color": "green", "index": 1},
        },
    }
]

# A state timeline of a 0/1 "up" gauge: red while down, green while up.
UP_DOWN_TIMELINE: dict[str, Any] = {
    "kind": "state-timeline",
    "fieldConfig": {
        "defaults": {
            "mappings": UP_DOWN_MAPPINGS,
            "color": {"mode": "thresholds"},
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
            },
        }
    },
    "options": {"showValue": "never", "mergeValues": True},
}


# -- overview -----------------------------------------------------------------------------------------------


def overview() -> dict[str, Any]:
    scored_ok_zero = f'sum by (product) (rate(inspection_frames_scored_total{{status="ok"}}[{RI}])) * 0'
    panels = [
        panel(
            1,
            "Components up",
            "Running components by service (ingest, worker, calibrator) over every scraped job; 0 workers = "
            "nothing is scored (alert NoWorkerAlive).",
            [target("count by (service) (inspection_service_info == 1)", "{{service}}", instant=True)],
            kind="stat",
            w=6,
            h=4,
            options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value", "textMode": "value_and_name"},
        ),
        panel(
            2,
            "Scored frames/s",
            "Results published per second over all cameras and statuses: the pipeline's throughput right now.",
            [target(f"sum(rate(inspection_frames_scored_total[{RI}])){ZERO}", "scored/s", instant=True)],
            kind="stat",
            unit="cps",
            w=6,
            h=4,
            options={"reduceOptions": {"calcs": ["lastNotNull"]}, "graphMode": "area"},
        ),
        panel(
            3,
            "End-to-end latency p99",
            "99th percentile of capture-to-result time over the last 5 minutes, per job; the SLO line is 0.5 s.",
            [target("job:inspection_end_to_end_latency_seconds:p99_5m", "{{job}}", instant=True)],
            kind="stat",
            unit="s",
            w=6,
            h=4,
            options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"},
            fieldConfig={
                "defaults": {
                    "thresholds": {
                        "mode": "absolute",
                        "steps": [{"color": "green", "value": None}, {"color": "red", "value": 0.5}],
                    }
                }
            },
        ),
        panel(
            4,
            "Total consumer lag",
            "Frames published but not yet consumed, summed over the frames topic's partitions; should stay near 0.",
            [target("sum(partition:inspection_consumer_lag_messages:max)" + ZERO, "lag", instant=True)],
            kind="stat",
            w=6,
            h=4,
            options={"reduceOptions": {"calcs": ["lastNotNull"]}, "graphMode": "area"},
        ),
        panel(
            10,
            "Throughput by status",
            "Results published per second by status: ok is scored; no_head, bad_frame and stale are frames that "
            "could not be scored (no active head, undecodable image, too old).",
            [target(f"sum by (status) (rate(inspection_frames_scored_total[{RI}]))", "{{status}}")],
            unit="cps",
        ),
        panel(
            11,
            "Frame funnel: captured, published, scored",
            "Frames per second at each step; a gap between captured and published is dropped frames, between "
            "published and scored a backlog (lag) or dead letters.",
            [
                target(f"sum(rate(inspection_frames_captured_total[{RI}])){ZERO}", "captured"),
                target(f"sum(rate(inspection_frames_published_total[{RI}])){ZERO}", "published"),
                target(f"sum(rate(inspection_frames_scored_total[{RI}])){ZERO}", "scored"),
            ],
            unit="cps",
        ),
        panel(
            12,
            "End-to-end latency p50 / p95 / p99",
            "Camera capture to result published, over all cameras and products; includes clock skew between the "
            "camera hosts and the workers. The SLO is 99 % under 0.5 s.",
            quantiles("inspection_end_to_end_latency_seconds", ""),
            unit="s",
        ),
        panel(
            13,
            "Latency SLO burn rate",
            "Share of frames slower than 0.5 s divided by the 1 % error budget, per job: 1 spends the budget exactly "
            "in 30 days; LatencySLOBurn pages above 14.4 (1h and 5m) and warns above 6 (6h and 30m).",
            [
                target("job:inspection_end_to_end_latency_over_slo:ratio_rate5m / 0.01", "{{job}} 5m"),
                target("job:inspection_end_to_end_latency_over_slo:ratio_rate1h / 0.01", "{{job}} 1h"),
                target("job:inspection_end_to_end_latency_over_slo:ratio_rate6h / 0.01", "{{job}} 6h"),
            ],
            fieldConfig={
                "defaults": {
                    "custom": {"thresholdsStyle": {"mode": "line"}},
                    "thresholds": {
                        "mode": "absolute",
                        "steps": [
                            {"color": "green", "value": None},
                            {"color": "orange", "value": 6},
                            {"color": "red", "value": 14.4},
                        ],
                    },
                }
            },
        ),
        panel(
            14,
            "Stage latency p99 by stage",
            "99th percentile of the time a frame spends in each worker stage (queue_wait, decode, inference, "
            "publish), measured on the worker: the tallest line is the bottleneck.",
            quantiles("inspection_stage_latency_seconds", "stage", qs=(0.99,)),
            unit="s",
        ),
        panel(
            15,
            "Consumer lag per partition",
            "Frames not yet consumed on each partition of the frames topic (max over workers); a line that keeps "
            "rising means workers are slower than the cameras (alert ConsumerLagGrowing above 1000).",
            [target("partition:inspection_consumer_lag_messages:max", "partition {{partition}}")],
        ),
        panel(
            16,
            "Batch size",
            "Frames per scoring batch (median, p95 and mean): small batches at high lag hint at a slow consumer, "
            "large ones at a saturated accelerator.",
            [
                *quantiles("inspection_batch_size", "", qs=(0.5, 0.95)),
                target(
                    f"sum(rate(inspection_batch_size_sum[{RI}])) / sum(rate(inspection_batch_size_count[{RI}]))",
                    "mean",
                ),
            ],
        ),
        panel(
            17,
            "Defects/s per product",
            "Frames judged defective per second, per product (0 for products scored without defects).",
            [
                target(
                    f"sum by (product) (rate(inspection_defects_total[{RI}])) or {scored_ok_zero}",
                    "{{product}}",
                )
            ],
            unit="cps",
        ),
        panel(
            18,
            "Defect ratio per product",
            "Defects divided by frames scored ok over 5 minutes, per product; DefectRateSpike fires at 3x the 6-hour "
            "average and above 5 %.",
            [target("product:inspection_defects_per_frame:ratio_rate5m", "{{product}}")],
            unit="percentunit",
        ),
        panel(
            19,
            "Anomaly score distribution",
            "Normalised image scores of all products per score bucket (1.0 = verdict threshold): mass that moves "
            "towards 1.0 means drift or a head that no longer fits the product.",
            **_score_heatmap(""),
        ),
        panel(
            20,
            "Anomaly score p50 / p95 per product",
            "Median and 95th percentile of the normalised score per product; the verdict line is 1.0, so a p95 "
            "creeping towards it means more borderline frames.",
            quantiles("inspection_anomaly_score_normalized", "product", qs=(0.5, 0.95)),
        ),
        panel(
            21,
            "Camera health",
            "inspection_camera_up per camera over time: green while the source delivers frames, red while it "
            "reconnects (CameraDown after 2 minutes).",
            [target("max by (camera) (inspection_camera_up)", "{{camera}}")],
            h=8,
            **UP_DOWN_TIMELINE,
        ),
        panel(
            22,
            "Camera reconnects",
            "Reconnect attempts per camera in each interval; 0 for cameras that never reconnected.",
            [
                target(
                    f"sum by (camera) (increase(inspection_camera_reconnects_total[{RI}]))"
                    " or max by (camera) (inspection_camera_up) * 0",
                    "{{camera}}",
                )
            ],
        ),
        panel(
            23,
            "Active head version per product",
            "The version workers score each product with (highest over workers); compare with the version the "
            "calibrator activated.",
            [target("max by (product) (inspection_active_head_version)", "{{product}}", instant=True)],
            kind="stat",
            options={"reduceOptions": {"calcs": ["lastNotNull"]}, "textMode": "value_and_name", "colorMode": "none"},
        ),
        panel(
            24,
            "Workers per head version",
            "How many workers score each product with each head version: more than one version per product is a "
            "rollout in progress or a worker that refused the new head.",
            [target("product_version:inspection_active_head_info:count", "", instant=True, fmt="table")],
            kind="table",
            options={"showHeader": True, "sortBy": [{"displayName": "product", "desc": False}]},
            transformations=[
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True},
                        "renameByName": {"Value": "workers"},
                    },
                }
            ],
        ),
        panel(
            25,
            "Dead letters by reason",
            "Messages sent to the dead-letter topic per second by reason (0 when there are none); each one is a "
            "frame that was not inspected (alert DeadLetterGrowth).",
            [target(f"sum by (reason) (rate(inspection_dead_lettered_total[{RI}])){ZERO}", "{{reason}}")],
            unit="cps",
        ),
        panel(
            26,
            "Frames dropped by reason",
            "Frames dropped in ingest per second by reason (buffer_full, encode_error, publish_error); 0 when none "
            "(alert IngestDroppingFrames above 1 % of a camera's frames).",
            [target(f"sum by (reason) (rate(inspection_frames_dropped_total[{RI}])){ZERO}", "{{reason}}")],
            unit="cps",
        ),
        panel(
            27,
            "Heads refused and swapped",
            "Announced heads workers refused (by reason: backbone, sha256, download, invalid) and heads swapped in "
            "(by product), per interval; 0 when none.",
            [
                target(f"sum by (reason) (increase(inspection_heads_refused_total[{RI}])){ZERO}", "refused {{reason}}"),
                target(f"sum by (product) (increase(inspection_head_swaps_total[{RI}])){ZERO}", "swapped {{product}}"),
            ],
        ),
        panel(
            33,
            "Broker trouble: failed publishes, failed commits, skipped records",
            "Publish attempts the broker did not acknowledge (ingest and workers keep the frames and retry with a "
            "fresh producer), offset commits it refused, and records a worker skipped because the broker refused "
            "them as too large; per interval, 0 when none.",
            [
                target(f"sum(increase(inspection_ingest_publish_failures_total[{RI}])){ZERO}", "ingest publish"),
                target(f"sum(increase(inspection_worker_publish_failures_total[{RI}])){ZERO}", "worker publish"),
                target(f"sum(increase(inspection_worker_commit_failures_total[{RI}])){ZERO}", "worker commit"),
                target(
                    f"sum by (topic) (increase(inspection_worker_records_dropped_total[{RI}])){ZERO}",
                    "skipped {{topic}}",
                ),
            ],
        ),
        panel(
            34,
            "Evidence removed by the size cap",
            "Evidence files (defect JPEGs and overlays) the workers' archives removed to stay under "
            "--evidence-max-bytes, per interval; their URLs in earlier defect events now answer 410 Gone.",
            [
                target(
                    f"sum by (instance) (increase(inspection_worker_evidence_deleted_total[{RI}])){ZERO}",
                    "{{instance}}",
                )
            ],
            w=6,
        ),
        panel(
            35,
            "Evidence archive size",
            "Bytes each worker's evidence archive holds (capped by --evidence-max-bytes).",
            [target("sum by (instance) (inspection_worker_evidence_bytes)", "{{instance}}")],
            unit="bytes",
            w=6,
        ),
        panel(
            28,
            "Ingest buffer",
            "Frames waiting in each ingest process's bounded buffer; a full buffer drops frames (reason buffer_full).",
            [target("sum by (instance) (inspection_ingest_buffer_frames)", "{{instance}}")],
        ),
        panel(
            29,
            "Calibrator calls by code",
            "Calibrator gRPC calls per second by method and status code; 0 while nobody calls it. Server codes "
            "(INTERNAL, UNAVAILABLE, ...) raise CalibratorFitFailures, caller codes (INVALID_ARGUMENT, ...) do not.",
            [target(f"sum by (rpc, code) (rate(inspection_calibrator_calls_total[{RI}])){ZERO}", "{{rpc}} {{code}}")],
            unit="reqps",
        ),
        panel(
            30,
            "Head fit duration",
            "Median and p90 time from the last uploaded byte to the stored head, per method, over the last hour of "
            "successful fits; 0 before the first fit.",
            [
                target(
                    "histogram_quantile(0.5, sum by (method, le) "
                    '(increase(inspection_fit_duration_seconds_bucket{status="ok"}[1h])))' + ZERO,
                    "{{method}} p50",
                ),
                target(
                    "histogram_quantile(0.9, sum by (method, le) "
                    '(increase(inspection_fit_duration_seconds_bucket{status="ok"}[1h])))' + ZERO,
                    "{{method}} p90",
                ),
            ],
            unit="s",
        ),
        panel(
            31,
            "Fits and stored heads",
            "Head fits finished in the last hour by status (ok, cancelled, failed), FitHead streams holding a fit "
            "slot now by state (uploading, waiting, fitting; all slots taken means new fits are refused with "
            "RESOURCE_EXHAUSTED) and products with an active head in the calibrator's store; 0 when no calibrator "
            "is scraped.",
            [
                target(
                    f"sum by (status) (increase(inspection_fit_duration_seconds_count[1h])){ZERO}", "fits {{status}}"
                ),
                target(f"sum by (state) (inspection_calibrator_fit_streams){ZERO}", "streams {{state}}"),
                target(f"max(inspection_calibrator_active_heads){ZERO}", "active heads"),
            ],
        ),
        panel(
            32,
            "GPU memory and utilisation",
            "GPU memory allocated and utilisation (0..1, where NVML is available) per worker and device; 0 on CPU "
            "workers.",
            [
                target(f"sum by (instance, device) (inspection_gpu_memory_bytes){ZERO}", "{{instance}} {{device}}"),
                target(
                    f"max by (instance, device) (inspection_gpu_utilization_ratio){ZERO}",
                    "{{instance}} {{device}} utilisation",
                ),
            ],
            unit="bytes",
            fieldConfig={
                "overrides": [
                    {
                        "matcher": {"id": "byRegexp", "options": ".*utilisation"},
                        "properties": [
                            {"id": "unit", "value": "percentunit"},
                            {"id": "custom.axisPlacement", "value": "right"},
                        ],
                    }
                ]
            },
        ),
        # -- the line calibrates the head (calibrator.line, docs/line-calibration.md) --
        panel(
            40,
            "Commissioning progress",
            "Per product whose active head version is commissioning: OK frames collected so far and the number it "
            "waits for before the line sets its threshold (verdicts are provisional meanwhile); 0 when none is.",
            [
                target(f"max by (product) (inspection_commissioning_frames){ZERO}", "{{product}} collected"),
                target(f"max by (product) (inspection_commissioning_target){ZERO}", "{{product}} target"),
            ],
        ),
        panel(
            41,
            "Line versions and feedback",
            "Head versions the line made in the last hour by outcome (activated; candidate: worse on labelled frames "
            "than the live one, kept off; dry_run), operator feedback read, and feedback refused by reason.",
            [
                target(
                    f"sum by (outcome) (increase(inspection_line_versions_total[1h])){ZERO}", "versions {{outcome}}"
                ),
                target(f"sum(increase(inspection_feedback_received_total[1h])){ZERO}", "feedback read"),
                target(
                    f"sum by (reason) (increase(inspection_feedback_refused_total[1h])){ZERO}",
                    "feedback refused {{reason}}",
                ),
            ],
        ),
        panel(
            42,
            "Line quality from feedback",
            "Per product, estimated from operator labels: the share of frames labelled good that were flagged "
            "(false alarms) and of frames labelled defective that were flagged (recall); no series before the "
            "first label.",
            [
                target(f"max by (product) (inspection_line_false_alarm_rate){ZERO}", "{{product}} false alarms"),
                target(f"max by (product) (inspection_line_recall){ZERO}", "{{product}} recall"),
            ],
            unit="percentunit",
        ),
        panel(
            43,
            "Line bank size and lost frames",
            "Memory-bank rows of each product's active line version (search cost grows with them) and frames the "
            "line could not read back from the frames topic in the last hour (past retention or unreadable).",
            [
                target(f"max by (product) (inspection_line_bank_rows){ZERO}", "{{product}} bank rows"),
                target(
                    f"sum by (product) (increase(inspection_line_frames_lost_total[1h])){ZERO}",
                    "{{product}} frames lost",
                ),
            ],
        ),
    ]
    return dashboard(
        "cff-inspect-overview",
        "cff-inspect / Overview",
        "Streaming visual inspection: cameras -> Kafka -> workers -> results/defects, and the calibrator.",
        panels,
        [],
    )


# -- drilldown ----------------------------------------------------------------------------------------------


def drilldown() -> dict[str, Any]:
    cam = 'camera=~"$camera"'
    prod = 'product=~"$product"'
    both = f"{cam}, {prod}"
    e2e = "inspection_end_to_end_latency_seconds"
    ok_zero = f'sum by (product) (rate(inspection_frames_scored_total{{status="ok", {both}}}[{RI}])) * 0'
    panels = [
        panel(
            101,
            "Scored frames/s by camera and status",
            "Results per second for the selected cameras and products, split by status (ok, no_head, bad_frame, "
            "stale).",
            [
                target(
                    f"sum by (camera, status) (rate(inspection_frames_scored_total{{{both}}}[{RI}]))",
                    "{{camera}} {{status}}",
                )
            ],
            unit="cps",
        ),
        panel(
            102,
            "Captured vs published per camera",
            "Frames per second read from each selected camera and acknowledged by the broker; the gap is dropped "
            "frames.",
            [
                target(
                    f"sum by (camera) (rate(inspection_frames_captured_total{{{cam}}}[{RI}]))", "{{camera}} captured"
                ),
                target(
                    f"sum by (camera) (rate(inspection_frames_published_total{{{cam}}}[{RI}]))", "{{camera}} published"
                ),
            ],
            unit="cps",
        ),
        panel(
            103,
            "Camera up",
            "Source state of each selected camera: green while it delivers frames, red while it reconnects.",
            [target(f"max by (camera) (inspection_camera_up{{{cam}}})", "{{camera}}")],
            **UP_DOWN_TIMELINE,
        ),
        panel(
            104,
            "Dropped frames and reconnects per camera",
            "Frames dropped by ingest per second (by reason) and reconnect attempts per interval for the selected "
            "cameras; 0 when none.",
            [
                target(
                    f"sum by (camera, reason) (rate(inspection_frames_dropped_total{{{cam}}}[{RI}])){ZERO}",
                    "{{camera}} dropped {{reason}}",
                ),
                target(
                    f"sum by (camera) (increase(inspection_camera_reconnects_total{{{cam}}}[{RI}]))"
                    f" or max by (camera) (inspection_camera_up{{{cam}}}) * 0",
                    "{{camera}} reconnects",
                ),
            ],
        ),
        panel(
            105,
            "End-to-end latency p50 / p95 / p99",
            "Capture-to-result latency over the selected cameras and products together; the SLO is 99 % under 0.5 s.",
            quantiles(e2e, "", f"{{{both}}}"),
            unit="s",
        ),
        panel(
            106,
            "End-to-end latency p99 by camera",
            "99th percentile latency per selected camera: one camera far above the others points at its host (clock "
            "skew, network) rather than the workers.",
            quantiles(e2e, "camera", f"{{{both}}}", qs=(0.99,)),
            unit="s",
        ),
        panel(
            107,
            "Frames over the 0.5 s SLO by camera",
            "Share of each selected camera's frames slower than 0.5 s end to end; the budget is 1 %.",
            [
                target(
                    f'1 - sum by (camera) (rate({e2e}_bucket{{le="0.5", {both}}}[{RI}]))'
                    f" / sum by (camera) (rate({e2e}_count{{{both}}}[{RI}]))",
                    "{{camera}}",
                )
            ],
            unit="percentunit",
        ),
        panel(
            108,
            "Non-ok results by camera",
            "Frames per second that could not be scored, by camera and status (no_head: no active head for the "
            "product; bad_frame: undecodable image; stale: too old); 0 when none.",
            [
                target(
                    f'sum by (camera, status) (rate(inspection_frames_scored_total{{status!="ok", {both}}}[{RI}]))'
                    + ZERO,
                    "{{camera}} {{status}}",
                )
            ],
            unit="cps",
        ),
        panel(
            109,
            "Defects/s per product",
            "Frames judged defective per second for the selected products (0 for products without defects).",
            [target(f"sum by (product) (rate(inspection_defects_total{{{prod}}}[{RI}])) or {ok_zero}", "{{product}}")],
            unit="cps",
        ),
        panel(
            110,
            "Defect ratio per product",
            "Defects divided by frames scored ok over 5 minutes for the selected products.",
            [target(f"product:inspection_defects_per_frame:ratio_rate5m{{{prod}}}", "{{product}}")],
            unit="percentunit",
        ),
        panel(
            111,
            "Anomaly score distribution",
            "Normalised scores of the selected products per bucket (1.0 = verdict threshold): the share above 1.0 "
            "is the defect rate, mass close below 1.0 are borderline frames.",
            **_score_heatmap(f"{{{prod}}}"),
        ),
        panel(
            112,
            "Anomaly score p50 / p95 / p99 per product",
            "Percentiles of the normalised score per selected product; compare with the verdict line at 1.0.",
            quantiles("inspection_anomaly_score_normalized", "product", f"{{{prod}}}"),
        ),
        panel(
            113,
            "Frames above the verdict line per product",
            "Share of scored frames whose normalised score is above 1.0 per selected product; 1.0 is the verdict "
            "line, so this tracks the defect ratio from the score histogram.",
            [
                target(
                    f'1 - sum by (product) (rate(inspection_anomaly_score_normalized_bucket{{le=~"1(\\\\.0)?", {prod}}}'
                    f"[{RI}])) / sum by (product) (rate(inspection_anomaly_score_normalized_count{{{prod}}}[{RI}]))",
                    "{{product}}",
                )
            ],
            unit="percentunit",
        ),
        panel(
            114,
            "End-to-end latency p99 by product",
            "99th percentile capture-to-result latency per selected product.",
            quantiles(e2e, "product", f"{{{both}}}", qs=(0.99,)),
            unit="s",
        ),
        panel(
            115,
            "Workers per head version",
            "For each selected product, the active head version and how many workers score with it.",
            [
                target(
                    f"count by (product, version) (inspection_active_head_info{{{prod}}} == 1)",
                    "",
                    instant=True,
                    fmt="table",
                )
            ],
            kind="table",
            options={"showHeader": True, "sortBy": [{"displayName": "product", "desc": False}]},
            transformations=[
                {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {"Value": "workers"}}}
            ],
        ),
        panel(
            116,
            "Head swaps per product",
            "Heads swapped in per interval for the selected products (0 when none): a swap right before a change in "
            "defect ratio points at the new head.",
            [
                target(
                    f"sum by (product) (increase(inspection_head_swaps_total{{{prod}}}[{RI}])) or {ok_zero}",
                    "{{product}}",
                )
            ],
        ),
    ]
    variables = [
        query_variable("camera", "Camera", "label_values(inspection_frames_scored_total, camera)"),
        query_variable("product", "Product", "label_values(inspection_frames_scored_total, product)"),
    ]
    return dashboard(
        "cff-inspect-drilldown",
        "cff-inspect / Camera & product drilldown",
        "Throughput, latency, camera health, quality and heads for the cameras and products chosen above.",
        panels,
        variables,
    )


# -- API ----------------------------------------------------------------------------------------------------


def build() -> dict[str, dict[str, Any]]:
    """Dashboard name -> Grafana dashboard JSON (as a dict)."""
    return {"overview": overview(), "drilldown": drilldown()}


def iter_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])


_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str, dash_variables: set[str], variables: dict[str, str] | None = None) -> str:
    """Fill in template variables as Grafana would: given value, else ``.*`` (All); built-ins by BUILTIN_VALUES."""
    given = variables or {}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in given:
            return given[name]
        if name in BUILTIN_VALUES:
            return BUILTIN_VALUES[name]
        if name in dash_variables:
            return ".*"
        return m.group(0)

    return _VAR.sub(repl, expr)


def panel_queries(dashboard: dict[str, Any], variables: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(panel title, expression) for every target, template variables substituted.

    ``$camera`` / ``${camera}`` become ``variables["camera"]`` or ``.*``; ``$__rate_interval`` -> ``1m``,
    ``$__interval`` -> ``15s``, ``$__range`` -> ``1h``.
    """
    names = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    return [
        (p["title"], substitute(t["expr"], names, variables))
        for p in iter_panels(dashboard)
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def render(dash: dict[str, Any]) -> str:
    return json.dumps(dash, indent=2, ensure_ascii=False) + "\n"


def write(out_dir: str | Path = DASHBOARD_DIR) -> list[Path]:
    """Write ``<name>.json`` for every dashboard into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, dash in build().items():
        path = out / f"{name}.json"
        path.write_text(render(dash), encoding="utf-8")
        paths.append(path)
    return paths


def stale(out_dir: str | Path = DASHBOARD_DIR) -> list[str]:
    """Names of dashboards whose file in ``out_dir`` differs from :func:`build` (or is missing)."""
    out = Path(out_dir)
    return [
        name
        for name, dash in build().items()
        if not (out / f"{name}.json").is_file() or (out / f"{name}.json").read_text(encoding="utf-8") != render(dash)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.dashboards", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", nargs="?", default=str(DASHBOARD_DIR), help="default: %(default)s")
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON files are stale; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        names = stale(args.out_dir)
        for name in names:
            print(f"stale: {Path(args.out_dir) / name}.json (run python -m monitoring.dashboards)", file=sys.stderr)
        return 1 if names else 0
    for path in write(args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
