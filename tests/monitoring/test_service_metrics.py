"""Metrics the services export: counted from what was really published, bounded labels, endpoints."""

from __future__ import annotations

import argparse
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from inspection_core.names import DeadLetterReason
from monitoring import metrics
from monitoring.http import MetricsServer, broker_check, start_metrics


def _v(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_active_head_info_keeps_one_series_per_product() -> None:
    metrics.set_active_head("m-gear", 1)
    metrics.set_active_head("m-gear", 2)
    metrics.set_active_head("m-bolt", 7)
    assert _v("inspection_active_head_info", product="m-gear", version="2") == 1
    assert REGISTRY.get_sample_value("inspection_active_head_info", {"product": "m-gear", "version": "1"}) is None
    assert _v("inspection_active_head_version", product="m-gear") == 2
    metrics.set_active_head("m-gear", None)
    assert REGISTRY.get_sample_value("inspection_active_head_info", {"product": "m-gear", "version": "2"}) is None
    assert REGISTRY.get_sample_value("inspection_active_head_version", {"product": "m-gear"}) is None
    assert _v("inspection_active_head_info", product="m-bolt", version="7") == 1


def test_labels_from_message_data_are_bounded() -> None:
    kind = f"k{uuid.uuid4().hex}"
    names = [metrics.bounded(kind, f"cam-{i}") for i in range(metrics.MAX_LABEL_VALUES + 50)]
    assert len(set(names)) == metrics.MAX_LABEL_VALUES + 1 and names[-1] == "other"
    assert metrics.bounded(kind, "cam-3") == "cam-3"  # known values stay themselves
    # dead-letter labels are the reasons the worker's codec attaches to each refusal (tests/workers/test_codec.py)
    assert {r.value for r in DeadLetterReason} == {
        "not_a_frame",
        "invalid_product",
        "bad_image",
        "invalid_field",
        "decode_limit",
    }


def test_endpoints_and_readiness_name_the_failing_check() -> None:
    state = {"heads": False}
    ms = MetricsServer("worker", host="127.0.0.1", port=0)
    ms.add_checks(heads=lambda: (state["heads"], "no head loaded" if not state["heads"] else "gear v1"))
    ms.add_checks(boom=lambda: 1 / 0 if not state["heads"] else (True, "fine"))
    ms.start()
    try:
        code, body = _get(f"{ms.url}/healthz")
        assert code == 200 and json.loads(body)["status"] == "alive"
        code, body = _get(f"{ms.url}/readyz")
        r = json.loads(body)
        assert code == 503 and r["ready"] is False
        assert r["checks"]["heads"] == {"ok": False, "detail": "no head loaded"}
        assert r["checks"]["boom"]["ok"] is False and "division by zero" in r["checks"]["boom"]["detail"]
        state["heads"] = True
        code, body = _get(f"{ms.url}/readyz")
        assert code == 200 and json.loads(body)["ready"] is True
        code, body = _get(f"{ms.url}/metrics")
        assert code == 200 and 'inspection_service_info{service="worker"} 1.0' in body
        assert _get(f"{ms.url}/nothing")[0] == 404
    finally:
        ms.stop()


def test_the_printed_metrics_address_is_the_one_bound(capsys: pytest.CaptureFixture[str]) -> None:
    """A wildcard bind is reachable from the network: the line must say 0.0.0.0, not the local URL it scrapes."""
    for host in ("0.0.0.0", "127.0.0.1"):
        args = argparse.Namespace(no_metrics=False, metrics_host=host, metrics_port=0)
        capsys.readouterr()  # what earlier tests left on stderr is not this call's output
        ms = start_metrics(args, "worker")
        try:
            # a log handler an earlier test installed may echo the INFO line too; the printed line is ours
            (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("worker: ")]
            assert line.startswith(f"worker: metrics on {host}:{ms.port}"), line
            assert ("all interfaces" in line) is (host == "0.0.0.0"), line
            assert _get(f"{ms.url}/healthz")[0] == 200  # .url stays the address to scrape from this host
        finally:
            ms.stop()


def test_broker_check_is_a_real_connection() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    ok, detail = broker_check(f"127.0.0.1:1,127.0.0.1:{port}", cache_s=0)()
    assert ok and str(port) in detail
    s.close()
    ok, detail = broker_check(f"127.0.0.1:{port}", cache_s=0)()
    assert not ok and "accepts connections" in detail


@pytest.mark.integration
def test_worker_metrics_count_what_was_published(tiny_vit, references, start_broker) -> None:
    from inspection_pb.v1 import frames_pb2, results_pb2
    from scorer.fit import fit_head
    from workers.config import ActiveHead, WorkerConfig, head_ref
    from workers.worker import Worker

    product = f"m{uuid.uuid4().hex[:6]}"
    head = fit_head(tiny_vit, references, method="knn")
    buf = io.BytesIO()
    Image.fromarray(references[0]).save(buf, format="PNG")
    kafka = start_broker(partitions=2, topic_prefix=f"{product}.")
    w = Worker(kafka, WorkerConfig(max_wait_ms=20), {product: ActiveHead(head, head_ref(product, head, "ab", 3))})
    assert _v("inspection_active_head_info", product=product, version="3") == 1
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    prod = kafka.producer()

    def send(image: bytes, prod_id: str = product) -> None:
        f = frames_pb2.Frame(frame_id=uuid.uuid4().hex, camera_id="cam-m", product_id=prod_id,
                             encoding=frames_pb2.ENCODING_PNG, image=image)  # fmt: skip
        f.capture_time.GetCurrentTime()
        prod.send(kafka.topic("frames"), key=b"cam-m", value=f.SerializeToString())

    for _ in range(3):
        send(buf.getvalue())
    send(b"\x89PNG broken")
    send(buf.getvalue(), prod_id="unknown-product")
    prod.send(kafka.topic("frames"), value=b"\xff\xffnot a frame")
    prod.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and w.counters["published"] < 5 + 1 + 1:  # 5 results + 2 dead letters
        time.sleep(0.2)
    w.stop_event.set()
    t.join(30)
    prod.close()
    assert _v("inspection_frames_scored_total", camera="cam-m", product=product, status="ok") == 3
    assert _v("inspection_frames_scored_total", camera="cam-m", product=product, status="bad_frame") == 1
    assert _v("inspection_frames_scored_total", camera="cam-m", product="unknown-product", status="no_head") == 1
    assert _v("inspection_end_to_end_latency_seconds_count", camera="cam-m", product=product) == 3
    assert _v("inspection_anomaly_score_normalized_count", product=product) == 3
    assert _v("inspection_dead_lettered_total", reason="not_a_frame") >= 1
    assert _v("inspection_dead_lettered_total", reason="bad_image") >= 1
    assert _v("inspection_stage_latency_seconds_count", stage="inference") >= 3
    lags = [s for m in REGISTRY.collect() if m.name == "inspection_consumer_lag_messages" for s in m.samples]
    assert lags and all(s.value >= 0 for s in lags)
    assert np.isfinite(_v("inspection_batch_size_sum"))
    del results_pb2
