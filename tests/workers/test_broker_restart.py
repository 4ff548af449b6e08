"""A broker restart on the real embedded broker (which loses every topic, offset and group): ingest, a worker
process and the calibrator carry on, and a worker started afterwards gets its head without a calibrator restart."""

from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
import threading
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


def _results(kafka: KafkaConfig, timeout: float) -> list:
    """Results on the results topic, read until one is OK or ``timeout`` passes (every status, for the report)."""
    parsed: list = []

    def until(recs: list) -> bool:
        parsed[:] = [results_pb2.InspectionResult.FromString(m.value) for m in recs]
        return bool(_ok(parsed))

    poll_topic(kafka, "results", until=until, timeout=timeout)
    return parsed


def _ok(results: list) -> list:
    return [r for r in results if r.status == results_pb2.STATUS_OK]


class _Output(threading.Thread):
    """Drains a service's piped output (a full pipe would block its logging) and keeps the lines."""

    def __init__(self, proc) -> None:  # noqa: ANN001 - subprocess.Popen
        super().__init__(daemon=True)
        self.proc = proc
        self.lines: list[str] = []
        self.start()

    def run(self) -> None:
        for line in iter(self.proc.stdout.readline, b""):
            self.lines.append(line.decode(errors="replace"))

    def metrics_url(self, timeout: float = 60) -> str:
        """The worker prints ``worker: metrics on ... http://HOST:PORT ...`` once serving."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(r"(http://[\d.]+:\d+)", line)
                if m:
                    return m.group(1)
            if not self.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"worker printed no metrics URL:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])


def _report(results: list, out: _Output, kafka: KafkaConfig, ing: Ingest, url: str) -> str:
    """What a failure needs to be understood: results, frames on the topic, ingest counts, the worker's view."""
    statuses = collections.Counter(results_pb2.Status.Name(r.status) for r in results)
    frames = collections.Counter(m.partition for m in poll_topic(kafka, "frames", until=lambda _: False, timeout=3))
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            wanted = ("inspection_frames_scored_total", "inspection_consumer_lag", "inspection_worker_publish")
            lines = [ln for ln in r.read().decode().splitlines() if ln.startswith(wanted)]
    except OSError as exc:
        lines = [f"(no metrics: {exc})"]
    return (
        f"results by status: {dict(statuses)}; frames per partition: {dict(frames)}; ingest published "
        f"{dict(ing.stats.published)}, dropped {dict(ing.stats.dropped)}; readyz {_ready(url)}; worker metrics:\n"
        + "\n".join(lines)
        + f"\nworker log:\n{out.tail()}"
    )


def _ready(url: str) -> dict:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def test_services_survive_a_broker_restart(tmp_path, tiny_vit, start_worker) -> None:
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
    out = _Output(worker)
    late = None
    try:
        url = out.metrics_url()
        with CalibratorClient(calibrator) as c:
            c.fit("widget", sorted((cat / "train" / "good").glob("*.png")), method="knn")
        seen = _results(kafka, 90)
        assert _ok(seen), f"no OK result before the restart; {_report(seen, out, kafka, ing, url)}"
        assert _ready(url)["ready"] is True

        broker.stop()  # every topic, offset and group is gone with it
        assert wait_for(lambda: ing.publish_error is not None, 20), "ingest did not notice the broker went away"
        assert checks["publishing"]()[0] is False
        time.sleep(3)
        assert worker.poll() is None, "the worker exited while the broker was down"

        broker = EmbeddedBroker(port=port).start()
        # nobody recreates the topics by hand: ingest, worker and calibrator do it themselves
        assert wait_for(lambda: ing.publish_error is None, 60), f"ingest never recovered: {ing.publish_error}"
        seen = _results(kafka, 120)
        assert _ok(seen), f"no OK result after the restart; {_report(seen, out, kafka, ing, url)}"
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
        worker.send_signal(signal.SIGTERM)  # not stop_gracefully: _Output reads the pipe
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        broker.stop()
    out.join(10)
    assert worker.returncode == 0, out.tail()
