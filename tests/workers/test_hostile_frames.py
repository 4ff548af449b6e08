"""One hostile frame must not stall, crash or starve a worker: the real broker and a real worker process."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from kafka_support import poll_topic
from PIL import Image
from prometheus_client import REGISTRY

from benchmarks.hostile_load import HOSTILE_KINDS, hostile_frame, jpeg_scan_bomb
from inspection_core.kafka import KafkaConfig
from inspection_core.wire import decode
from inspection_pb.v1 import frames_pb2, results_pb2
from scorer.artifact import save_head
from scorer.backbones import load_backbone
from scorer.fit import fit_head
from workers.config import WorkerConfig
from workers.worker import Outputs, Worker

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head_path(tmp_path_factory: pytest.TempPathFactory, make_refs) -> Path:
    bb = load_backbone("tiny-vit")
    head = fit_head(bb, make_refs(3, (32, 32)), method="knn")
    path = tmp_path_factory.mktemp("hostile") / "demo-v1.safetensors"
    save_head(head, path, product="demo", version=1)
    return path


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _good(tag: str) -> frames_pb2.Frame:
    f = frames_pb2.Frame(
        frame_id=f"good-{tag}-{uuid.uuid4().hex[:6]}",
        camera_id="cam-g",
        product_id="demo",
        encoding=frames_pb2.ENCODING_PNG,
        image=_png(),
    )
    f.capture_time.FromNanoseconds(time.time_ns())
    return f


def _send(kafka: KafkaConfig, frames: list[frames_pb2.Frame]) -> None:
    prod = kafka.producer(max_request_size=24 << 20)
    for f in frames:
        prod.send(kafka.topic("frames"), key=f.camera_id[:64].encode(), value=f.SerializeToString()).get(30)
    prod.close()


def _results(kafka: KafkaConfig, want: int, timeout: float) -> list[results_pb2.InspectionResult]:
    recs = poll_topic(kafka, "results", until=lambda got: len(got) >= want, timeout=timeout)
    return [decode(m.value, results_pb2.InspectionResult, m.headers) for m in recs]


def _options(head: Path, *extra: str) -> list[str]:
    return ["--head", f"demo={head}", "--no-follow-heads", "--max-batch", "4", "--max-wait-ms", "30", *extra]


def test_a_jpeg_scan_bomb_does_not_stall_the_worker(start_broker, start_worker, head_path, stop_gracefully) -> None:
    """20 000 few-byte scans (340 kB, header 4096 x 4096) took the decoder ~25 s: the frame behind it waited and
    the consumer overran its poll interval. Now it is refused from its markers in milliseconds."""
    kafka = start_broker(partitions=1)
    worker = start_worker(kafka, *_options(head_path))
    try:
        _send(kafka, [_good("warm")])
        assert len(_results(kafka, 1, 120)) == 1, (
            f"no first result: {worker.poll()} {stop_gracefully(worker)[-2000:]!r}"
        )
        bomb = _good("bomb")
        bomb.encoding, bomb.image = frames_pb2.ENCODING_JPEG, jpeg_scan_bomb(side=4096, scans=20_000)
        after = _good("after")
        t0 = time.monotonic()
        _send(kafka, [bomb, after])
        got = {r.frame_id: r for r in _results(kafka, 3, 15)}
        assert {bomb.frame_id, after.frame_id} <= set(got), f"stalled: {time.monotonic() - t0:.1f}s"
        assert got[bomb.frame_id].status == results_pb2.STATUS_BAD_FRAME
        assert "JPEG has 20006 scans, over the limit of 256" in got[bomb.frame_id].reason
        assert got[after.frame_id].status == results_pb2.STATUS_OK
        (dl,) = poll_topic(kafka, "frames.dlq", timeout=15)
        assert dict(dl.headers)["reason-code"] == b"decode_limit"
        assert worker.poll() is None
    finally:
        out = stop_gracefully(worker)
    assert worker.returncode == 0, out.decode()[-3000:]


def _tail(kafka: KafkaConfig, topic: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cff_inspect", "tail", topic, "--from-beginning", "--idle-timeout", "4"]
    cmd += ["--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_hostile_frame_gets_one_publishable_result(
    start_broker, start_worker, head_path, stop_gracefully
) -> None:
    """Timestamps past 9999 killed a JSON-results worker on every restart, a 1 MB camera id grew /metrics by
    megabytes, 70 000 attributes (18 MB) got no result at all. Each now gets exactly one BAD_FRAME result that
    serialises, and a good frame behind them is scored."""
    kafka = start_broker(partitions=1)
    worker = start_worker(kafka, *_options(head_path, "--topic-encoding", "results=json"))
    try:
        now = time.time()
        hostile = [hostile_frame(k, f"h-{k}-{uuid.uuid4().hex[:6]}", now, _png()) for k in HOSTILE_KINDS]
        good = _good("last")
        _send(kafka, [*hostile, good])
        results = _results(kafka, len(hostile) + 1, 180)
        assert worker.poll() is None, "the worker died"
        assert len(results) == len(hostile) + 1
        by_prefix = {r.frame_id[:40]: r for r in results}
        assert by_prefix[good.frame_id[:40]].status == results_pb2.STATUS_OK
        for f in hostile:
            r = by_prefix[f.frame_id[:40]]
            assert r.status == results_pb2.STATUS_BAD_FRAME, (f.frame_id[:40], r.reason)
            assert len(r.reason) < 400 and len(r.camera_id) <= 128 and len(r.frame_id) <= 256
            assert len(r.attributes) <= 64 and r.ByteSize() < 4096
        dlq = poll_topic(kafka, "frames.dlq", until=lambda got: len(got) >= len(hostile), timeout=30)
        assert len(dlq) == len(hostile)
        printed = _tail(kafka, "results")
        assert printed.returncode == 0, printed.stderr[-2000:]
        assert len(printed.stdout.splitlines()) == len(hostile) + 1
        frames = _tail(kafka, "frames")  # the raw frames hold the impossible timestamps: one error line each
        assert frames.returncode == 0, frames.stderr[-2000:]
        lines = frames.stdout.splitlines()
        assert len(lines) == len(hostile) and json.loads(lines[-1])["frameId"] == good.frame_id
        assert frames.stderr.count("cannot be shown as JSON") == 1  # the one beyond 9999
    finally:
        out = stop_gracefully(worker)
    assert worker.returncode == 0, out.decode()[-3000:]


class _Rec(NamedTuple):
    value: bytes
    key: bytes | None = b"k"
    headers: list | None = None
    timestamp: int = 0
    topic: str = "frames"
    partition: int = 0
    offset: int = 0


def _worker(*encodings: tuple[str, str]) -> Worker:
    kafka = KafkaConfig(bootstrap_servers="127.0.0.1:9", topic_prefix="u.", topic_encodings=encodings)
    return Worker(kafka, WorkerConfig(worker_id="wu"))


def test_a_megabyte_camera_id_never_reaches_a_metric_label() -> None:
    """The refusal's result carries the id cut to the rules; that is all the camera label can ever see."""
    w = _worker()
    f = hostile_frame("huge_camera_id", "h-cam", time.time(), _png())
    out = w.process([_Rec(f.SerializeToString())])
    (r,) = out.results
    assert r.status == results_pb2.STATUS_BAD_FRAME and len(r.camera_id) <= 128
    assert "camera id 'cccc" in r.reason and "(1048576 chars) is too long" in r.reason
    assert len(out.dead_letters) == 1 and out.dead_letters[0].reason.value == "invalid_field"
    w._observe(out, 0.0)
    labels = {s.labels.get("camera", "") for m in REGISTRY.collect() for s in m.samples}
    assert max(map(len, labels)) <= 128


def test_a_result_that_cannot_be_encoded_is_published_stripped_and_counted() -> None:
    """The backstop behind the frame rules: a JSON encode failure used to kill the worker on every restart."""
    w = _worker(("results", "json"))
    bad = results_pb2.InspectionResult(frame_id="f-x", camera_id="cam", status=results_pb2.STATUS_OK)
    bad.capture_time.seconds = 10**12
    out = Outputs([bad], [], [])
    ((topic, key, value, _headers),) = w._records(out)
    shown = json.loads(value)
    assert topic == "u.results" and key == b"cam" and shown["frameId"] == "f-x"
    assert shown["status"] == "STATUS_BAD_FRAME" and "could not be encoded" in shown["reason"]
    assert out.results[0].status == results_pb2.STATUS_BAD_FRAME  # what is counted is what was published
    assert w.counters["unencodable"] == 1
