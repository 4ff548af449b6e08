"""Every metric the services export, in one place, so rules and dashboards have one source of names.

Conventions (see ``../shared/design/interfaces.md``): prefix ``inspection_``, seconds for durations,
``_total`` counters, and only bounded labels: camera, product, reason, stage, status, code, partition,
rpc, method, version (the active head version: an info-style gauge whose old series are removed on swap,
so it never holds more than one series per product).

Services import the metric objects from here and record into them; ``scorer`` never does. All
objects live in the process-wide default registry, so ``cff-inspect run`` (ingest, worker and calibrator
in one process) exposes them on one endpoint.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

from inspection_core.names import DeadLetterReason

# Latency buckets: frames are scored in tens of milliseconds on a GPU and in seconds on a small CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Normalised score = score / image threshold: 1.0 is the verdict line for every product.
SCORE_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)
FIT_BUCKETS = (1, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)

SERVICE_INFO = Gauge(
    "inspection_service_info", "1 per running component (service: ingest, worker, calibrator)", ["service"]
)
# Default /metrics ports; ``cff-inspect run`` serves all components on RUN_PORT.
DEFAULT_PORTS = {"run": 9100, "ingest": 9101, "worker": 9102, "calibrator": 9103}

# -- ingest -------------------------------------------------------------------------------------------------
FRAMES_CAPTURED = Counter("inspection_frames_captured_total", "Frames read from a camera", ["camera"])
FRAMES_PUBLISHED = Counter(
    "inspection_frames_published_total", "Frames acknowledged by the broker on the frames topic", ["camera"]
)
FRAMES_DROPPED = Counter(
    "inspection_frames_dropped_total",
    "Frames dropped before reaching the broker (reason: buffer_full, shutdown)",
    ["camera", "reason"],
)
INGEST_PUBLISH_FAILURES = Counter(
    "inspection_ingest_publish_failures_total",
    "Publish attempts the broker did not acknowledge (the frame stays buffered, the producer is recreated)",
)
CAMERA_UP = Gauge("inspection_camera_up", "1 while the camera source delivers frames, 0 while reconnecting", ["camera"])
CAMERA_RECONNECTS = Counter("inspection_camera_reconnects_total", "Camera source reconnect attempts", ["camera"])
INGEST_BUFFER = Gauge("inspection_ingest_buffer_frames", "Frames waiting in the bounded ingest buffer")

# -- workers ------------------------------------------------------------------------------------------------
FRAMES_SCORED = Counter(
    "inspection_frames_scored_total",
    "Results published, by status (ok, no_head, bad_frame, stale)",
    ["camera", "product", "status"],
)
BATCH_SIZE = Histogram("inspection_batch_size", "Frames per scoring batch", buckets=BATCH_BUCKETS)
E2E_LATENCY = Histogram(
    "inspection_end_to_end_latency_seconds",
    "Camera capture time to result published (includes clock skew between hosts)",
    ["camera", "product"],
    buckets=LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "inspection_stage_latency_seconds",
    "Per-frame time in each worker stage (queue_wait, decode, inference, publish), measured locally",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
STAGES = ("queue_wait", "decode", "inference", "publish")
DEFECTS = Counter("inspection_defects_total", "Frames judged defective (defect events published)", ["product"])
ANOMALY_SCORE = Histogram(
    "inspection_anomaly_score_normalized",
    "Image anomaly score divided by the head's image threshold (1.0 = verdict threshold)",
    ["product"],
    buckets=SCORE_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "inspection_consumer_lag_messages", "Frames not yet consumed, per assigned partition", ["partition"]
)
DEAD_LETTERED = Counter(
    "inspection_dead_lettered_total", "Messages sent to the dead-letter topic (reason header)", ["reason"]
)
HEAD_INFO = Gauge(
    "inspection_active_head_info", "1 for the head version a worker scores a product with", ["product", "version"]
)
HEAD_VERSION = Gauge("inspection_active_head_version", "Active head version per product (numeric)", ["product"])
# backbone: built for another backbone; sha256: the artifact is not the announced one; download: the calibrator
# did not serve it; invalid: bad artifact, id or record; signature: unsigned or wrongly signed announcement;
# address: names a calibrator this worker does not trust; replay: older than the announcement already applied.
RECORDS_DROPPED = Counter(
    "inspection_worker_records_dropped_total",
    "Records a worker could not publish and skipped (topic: results, defects, frames.dlq; reason: too_large, "
    "unencodable)",
    ["topic", "reason"],
)
EVIDENCE_DELETED = Counter(
    "inspection_worker_evidence_deleted_total",
    "Evidence files the worker's archive removed to stay under its size cap (their URLs answer 410 Gone)",
)
EVIDENCE_BYTES = Gauge("inspection_worker_evidence_bytes", "Bytes the worker's evidence archive holds now")
PUBLISH_FAILURES = Counter(
    "inspection_worker_publish_failures_total",
    "Batches the broker did not acknowledge; each is kept and published again with a fresh producer",
)
COMMIT_FAILURES = Counter("inspection_worker_commit_failures_total", "Offset commits the broker refused")
HEAD_REFUSALS = ("backbone", "sha256", "download", "invalid", "signature", "address", "replay")
HEADS_REFUSED = Counter(
    "inspection_heads_refused_total",
    "Announced heads a worker did not apply (reason: one of HEAD_REFUSALS)",
    ["reason"],
)
HEAD_SWAPS = Counter("inspection_head_swaps_total", "Heads swapped in between batches", ["product"])
GPU_MEMORY = Gauge("inspection_gpu_memory_bytes", "GPU memory allocated by this process", ["device"])
GPU_UTILIZATION = Gauge(
    "inspection_gpu_utilization_ratio", "GPU utilisation (0..1), where NVML is available", ["device"]
)

# -- calibrator ---------------------------------------------------------------------------------------------
FIT_DURATION = Histogram(
    "inspection_fit_duration_seconds",
    "Head fit time from last upload byte to stored artifact (status: ok, cancelled, failed)",
    ["method", "status"],
    buckets=FIT_BUCKETS,
)
CALIBRATOR_CALLS = Counter(
    "inspection_calibrator_calls_total", "Calibrator gRPC calls by method and status code", ["rpc", "code"]
)
CALIBRATOR_HEADS = Gauge("inspection_calibrator_active_heads", "Products with an active head in the store")
CALIBRATOR_FIT_STREAMS = Gauge(
    "inspection_calibrator_fit_streams", "FitHead streams holding a fit slot, by state", ["state"]
)  # state: uploading, waiting, fitting

_head_lock = threading.Lock()


def set_active_head(product: str, version: int | None) -> None:
    """Keep exactly one ``inspection_active_head_info`` series per product (none once removed)."""
    with _head_lock:
        for labels in list(HEAD_INFO._metrics):  # noqa: SLF001 - prometheus_client has no public label listing
            if labels[0] == product:
                HEAD_INFO.remove(*labels)
        if version is None:
            try:
                HEAD_VERSION.remove(product)
            except KeyError:
                pass
            return
        HEAD_INFO.labels(product=product, version=str(version)).set(1)
        HEAD_VERSION.labels(product=product).set(version)
        DEFECTS.labels(product=product).inc(0)  # the series exists from 0, so increase() sees the first defect


def init_zero_series(*, cameras: tuple[str, ...] = (), worker: bool = False) -> None:
    """Create the error counters at 0 so that ``increase()`` and alerts see their first event."""
    for cam in cameras:
        for reason in ("buffer_full", "shutdown"):
            FRAMES_DROPPED.labels(camera=cam, reason=reason).inc(0)
        CAMERA_RECONNECTS.labels(camera=cam).inc(0)
    if worker:
        for dl in DeadLetterReason:
            DEAD_LETTERED.labels(reason=dl.value).inc(0)
        for reason in HEAD_REFUSALS:
            HEADS_REFUSED.labels(reason=reason).inc(0)
        for topic in ("results", "defects", "frames.dlq"):
            RECORDS_DROPPED.labels(topic=topic, reason="too_large").inc(0)
        EVIDENCE_DELETED.inc(0)


def status_label(name: str) -> str:
    """``STATUS_NO_HEAD`` -> ``no_head`` (bounded: the proto enum)."""
    return name.removeprefix("STATUS_").lower()


MAX_LABEL_VALUES = 256
_seen: dict[str, set[str]] = {}


def bounded(kind: str, value: str) -> str:
    """A camera or product label from message data; past ``MAX_LABEL_VALUES`` distinct values it is ``other``.

    Frames come from any producer on the topic, so their ids cannot be trusted to stay few.
    """
    with _head_lock:
        seen = _seen.setdefault(kind, set())
        if value in seen:
            return value
        if len(seen) >= MAX_LABEL_VALUES:
            return "other"
        seen.add(value)
        return value


# -- the line calibrates the head (calibrator.line) -------------------------------------------------------------
COMMISSIONING_FRAMES = Gauge(
    "inspection_commissioning_frames",
    "OK frames collected for the active head version's commissioning (0 once it ends)",
    ["product"],
)
COMMISSIONING_TARGET = Gauge(
    "inspection_commissioning_target", "Frames a commissioning version collects before its line version", ["product"]
)
FEEDBACK_RECEIVED = Counter("inspection_feedback_received_total", "Operator feedback records read", ["product"])
# reason: invalid, unknown_frame, wrong_product, duplicate, flood, past_retention (calibrator.line)
FEEDBACK_REFUSED = Counter(
    "inspection_feedback_refused_total", "Operator feedback records refused, by reason", ["reason"]
)
LINE_VERSIONS = Counter(
    "inspection_line_versions_total",
    "Head versions the line made (outcome: activated, candidate = worse on labelled frames, dry_run)",
    ["product", "outcome"],
)
LINE_FALSE_ALARM_RATE = Gauge(
    "inspection_line_false_alarm_rate",
    "Share of frames operators labelled good that were flagged defective (estimated from feedback)",
    ["product"],
)
LINE_RECALL = Gauge(
    "inspection_line_recall",
    "Share of frames operators labelled defective that were flagged defective (estimated from feedback)",
    ["product"],
)
LINE_BANK_ROWS = Gauge("inspection_line_bank_rows", "Memory-bank rows of the active line version", ["product"])
LINE_FRAMES_LOST = Counter(
    "inspection_line_frames_lost_total",
    "Frames the line could not read back from the frames topic (past retention, unreadable)",
    ["product"],
)
