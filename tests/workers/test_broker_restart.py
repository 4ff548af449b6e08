"""A broker restart on the real embedded broker (which loses every topic, offset and group): ingest, a worker
process and the calibrator carry on, and a worker started afterwards gets its head without a calibrator restart."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest
from kafka_support import poll_topic

from calibrator.client import CalibratorClient
from calibrator.service import serve
from calibrator.store import HeadStore
from ingest.cameras import CameraConfig, Ingest
from ingest.entry import ingest_checks
from inspection_core.broker import EmbeddedBroker, free_port
from inspection_core.kafka import KafkaConfig, ensure_topics
from inspection_core.runtime import wait_for
from inspection_core.trust import HeadSigner, HeadTrust
from inspection_pb.v1 import results_pb2
from scorer.demo import make_demo_dataset
from workers.config import WorkerConfig
from workers.heads import HeadFollower
from workers.worker import Worker

pytestmark = pytest.mark.integration


def _ok_results(kafka: KafkaConfig, worker_id: str | None, timeout: float) -> list:
    """OK results (of ``worker_id`` if given) seen on the results topic within ``timeout``."""

    def ok(m) -> bool:  # noqa: ANN001
        r = results_pb2.InspectionResult.FromString(m.value)
        return r.status == results_pb2.STATUS_OK and (worker_id is None or r.worker_id == worker_id)

    recs = poll_topic(kafka, "results", keep=ok, timeout=timeout)
    return [results_pb2.InspectionResult.FromString(m.value) for m in recs]


def _metrics_url(proc, timeout: float = 60) -> str:  # noqa: ANN001
    """The worker prints ``worker: metrics on http://HOST:PORT/metrics`` once serving."""
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        m = re.search(rb"(http://[\d.]+:\d+)", line)
        if m:
            return m.group(1).decode()
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"worker printed no metrics URL:\n{seen.decode()[-2000:]}")


def _ready(url: str) -> dict:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def test_services_survive_a_broker_restart(tmp_path, tiny_vit, start_worker, stop_gracefully) -> None:
    cat = make_demo_dataset(tmp_path / "d", n_train=2, n_good=4, n_bad=0)
    port = free_port()
    key_file = tmp_path / "heads.key"
    key_file.write_bytes(b"0123456789abcdef0123456789abcdef")
    key = key_file.read_bytes()
    kafka = KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}", topic_prefix="rs.", partitions=1)
    broker = EmbeddedBroker(port=port).start()
    ensure_topics(kafka)
    server, cal_port = serve(
        HeadStore(tmp_path / "store"), tiny_vit, port=0, kafka=kafka, signer=HeadSigner(key), reannounce_s=2
    )
    calibrator = f"127.0.0.1:{cal_port}"
    worker = start_worker(
        kafka,
        "--backbone",
        "tiny-vit",
        "--max-wait-ms",
        "20",
        "--heads-key-file",
        str(key_file),
        "--calibrator-address",
        calibrator,
    )
    cam = CameraConfig(id="cam-1", product="widget", source=str(cat / "test" / "good"), fps=4)
    ing = Ingest(kafka, [cam], buffer_size=64, backoff_max_s=2, publish_timeout_s=3).start()
    checks = ingest_checks(kafka, ing)
    late = None
    try:
        url = _metrics_url(worker)
        with CalibratorClient(calibrator) as c:
            c.fit("widget", sorted((cat / "train" / "good").glob("*.png")), method="knn")
        assert _ok_results(kafka, None, 90), "no OK result before the restart"
        assert _ready(url)["ready"] is True

        broker.stop()  # every topic, offset and group is gone with it
        assert wait_for(lambda: ing.publish_error is not None, 20), "ingest did not notice the broker went away"
        assert checks["publishing"]()[0] is False
        time.sleep(3)
        assert worker.poll() is None, "the worker exited while the broker was down"

        broker = EmbeddedBroker(port=port).start()
        # nobody recreates the topics by hand: ingest, worker and calibrator do it themselves
        assert wait_for(lambda: ing.publish_error is None, 60), f"ingest never recovered: {ing.publish_error}"
        assert _ok_results(kafka, None, 120), "no OK result after the restart"
        assert worker.poll() is None
        assert wait_for(lambda: _ready(url)["ready"] is True, 30), _ready(url)

        # a worker started after the restart gets its head from the calibrator's periodic re-announcement
        late = Worker(kafka, WorkerConfig(group_id="late", worker_id="late-worker", max_wait_ms=20))
        HeadFollower(kafka, late, tiny_vit, trust=HeadTrust(key=key, addresses=(calibrator,))).start()
        assert wait_for(lambda: "widget" in late.heads, 30), f"late worker has no head: {dict(late.counters)}"
    finally:
        if late is not None:
            late.stop_event.set()
        ing.stop()
        server.stop(0)
        out = stop_gracefully(worker)
        broker.stop()
    assert worker.returncode == 0, out.decode()[-3000:]
