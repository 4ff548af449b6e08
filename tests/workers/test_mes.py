"""What an MES team sees: JSON defect events from the real broker, evidence over HTTP, ``cff-inspect tail``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

from inspection_core.wire import encode
from inspection_pb.v1 import frames_pb2
from scorer.artifact import save_head
from scorer.backbones import load_backbone
from scorer.demo import make_demo_dataset
from scorer.fit import fit_head
from scorer.images import load_image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_head(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("mes")
    cat = make_demo_dataset(d, n_train=4, n_good=2, n_bad=0)
    head = fit_head(load_backbone("tiny-vit"), [load_image(p) for p in sorted((cat / "train" / "good").glob("*"))])
    path = d / "demo-v1.safetensors"
    save_head(head, path, product="demo", version=1)
    return cat, path


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _frame(image: bytes, w: int, h: int) -> frames_pb2.Frame:
    f = frames_pb2.Frame(
        frame_id=f"cam-7-{uuid.uuid4().hex[:8]}",
        camera_id="cam-7",
        product_id="demo",
        encoding=frames_pb2.ENCODING_PNG,
        image=image,
        width=w,
        height=h,
    )
    f.attributes.update({"line": "L7", "shift": "night"})
    f.capture_time.GetCurrentTime()
    return f


def _records(kafka, topic: str, want: int, timeout: float) -> list:  # noqa: ANN001
    from kafka import KafkaConsumer  # what an MES developer writes: a plain client, no project code

    c = KafkaConsumer(
        kafka.topic(topic), bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest", group_id=None
    )
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < want and time.monotonic() < deadline:
            for msgs in c.poll(timeout_ms=500).values():
                out.extend(msgs)
    finally:
        c.close()
    return out


def _tail(kafka, *args: str) -> list[dict]:  # noqa: ANN001
    cmd = [sys.executable, "-m", "cff_inspect", "tail", *args, "--from-beginning", "--idle-timeout", "5"]
    cmd += ["--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_a_json_consumer_reads_defect_events_with_size_attributes_and_evidence_urls(
    start_broker, demo_head, start_worker, stop_gracefully, tmp_path
) -> None:
    cat, head_path = demo_head
    kafka = start_broker(partitions=2)
    worker = start_worker(
        kafka,
        *("--head", f"demo={head_path}", "--max-batch", "4", "--max-wait-ms", "30", "--worker-id", "w-mes"),
        *("--topic-encoding", "defects=json", "--topic-encoding", "results=json"),
        *("--evidence-dir", str(tmp_path / "evidence"), "--metrics-host", "127.0.0.1"),
    )
    try:
        good = load_image(sorted((cat / "test" / "good").glob("*"))[0])
        noise = np.random.default_rng(0).integers(0, 256, (80, 112, 3), dtype=np.uint8)  # nothing like the product
        frames = [_frame(_png(good), good.shape[1], good.shape[0]), _frame(_png(noise), 112, 80)]
        prod = kafka.producer()
        for f in frames:
            prod.send(kafka.topic("frames"), key=b"cam-7", value=f.SerializeToString())
        as_json = _frame(_png(noise), 112, 80)  # a camera host in another language may send JSON frames
        value, headers = encode(as_json, "json")
        prod.send(kafka.topic("frames"), key=b"cam-7", value=value, headers=headers)
        prod.send(kafka.topic("frames"), key=b"cam-7", value=b"\x00 not a frame")
        prod.flush()
        prod.close()
        frames.append(as_json)

        results = _records(kafka, "results", 3, timeout=120)
        assert {dict(m.headers)["content-type"] for m in results} == {
            b"application/json; messageType=inspection.v1.InspectionResult"
        }
        by_id = {r["frameId"]: r for r in (json.loads(m.value) for m in results)}
        assert set(by_id) == {f.frame_id for f in frames}
        ok = by_id[frames[0].frame_id]
        assert ok["status"] == "STATUS_OK" and (ok["width"], ok["height"]) == (good.shape[1], good.shape[0])
        assert ok["attributes"] == {"line": "L7", "shift": "night"} and ok["resultTime"].endswith("Z")

        events = _records(kafka, "defects", 2, timeout=60)
        assert dict(events[0].headers)["content-type"] == b"application/json; messageType=inspection.v1.DefectEvent"
        by_frame = {e["frameId"]: e for e in (json.loads(m.value) for m in events)}
        ev = by_frame[frames[1].frame_id]  # the noise frame is a defect
        assert (ev["width"], ev["height"]) == (112, 80) and ev["attributes"] == {"line": "L7", "shift": "night"}
        assert ev["resultTime"] >= ev["captureTime"] and ev["workerId"] == "w-mes" and ev["imageThreshold"] > 0
        for r in ev["regions"]:  # boxes normalise by the image size the event carries
            assert 0 <= r["xMin"] < r["xMax"] <= ev["width"] and 0 <= r["yMin"] < r["yMax"] <= ev["height"]
        url = ev["evidence"]["imageUri"]
        assert url.startswith("http://127.0.0.1:") and "/evidence/" in url
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.headers["Content-Type"] == "image/jpeg"
            assert Image.open(io.BytesIO(resp.read())).size == (112, 80)
        with urllib.request.urlopen(ev["evidence"]["overlayUri"], timeout=10) as resp:
            assert resp.headers["Content-Type"] == "image/png"

        tailed = _tail(kafka, "defects")
        assert {e["frameId"] for e in tailed} == set(by_frame)
        assert _tail(kafka, "results", "--camera", "cam-7", "-n", "1")[0]["cameraId"] == "cam-7"
        (dead,) = _tail(kafka, "dlq")
        assert dead["message"]["reasonCode"] == "not_a_frame" and dead["message"]["worker"] == "w-mes"
        assert dead["headers"]["content-type"] == "application/octet-stream" and dead["message"]["frame"] is None
    finally:
        out = stop_gracefully(worker)
    assert worker.returncode == 0, out.decode()[-3000:]
