"""MES clients that are not this project: confluent-kafka (librdkafka, what Go, .NET, Node and C stacks sit on) in
both encodings, and the MES developer's guide's consumer run exactly as written."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspection_core.wire import encode
from inspection_pb.v1 import frames_pb2, results_pb2
from scorer.artifact import save_head
from scorer.backbones import load_backbone
from scorer.demo import make_demo_dataset
from scorer.fit import fit_head
from scorer.images import load_image

confluent_kafka = pytest.importorskip("confluent_kafka")  # in requirements.txt; skipped only outside make install
pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "mes-developer.md"


@pytest.fixture(scope="module")
def demo_head(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("mes-clients")
    cat = make_demo_dataset(d, n_train=4, n_good=2, n_bad=0)
    head = fit_head(load_backbone("tiny-vit"), [load_image(p) for p in sorted((cat / "train" / "good").glob("*"))])
    path = d / "demo-v1.safetensors"
    save_head(head, path, product="demo", version=1)
    return cat, path


def guide_block(lang: str, after: str) -> str:
    """The first fenced ``lang`` block of the guide after the text ``after``."""
    text = GUIDE.read_text()
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, text.index(after))
    assert m, f"no {lang} block after {after!r} in {GUIDE}"
    return m.group(1)


def substitute(code: str, bootstrap: str, prefix: str) -> str:
    """The one rule: the guide's broker address and topic prefix become the test broker's; nothing else changes."""
    return code.replace("kafka:9092", bootstrap).replace('"inspection.', f'"{prefix}')


def _frame_json(img: np.ndarray, line: str) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    f = frames_pb2.Frame(
        frame_id=f"cam-9-{uuid.uuid4().hex[:8]}",
        camera_id="cam-9",
        product_id="demo",
        encoding=frames_pb2.ENCODING_PNG,
        image=buf.getvalue(),
        width=img.shape[1],
        height=img.shape[0],
    )
    f.attributes["line"] = line
    f.capture_time.GetCurrentTime()
    value, headers = encode(f, "json")
    return f.frame_id, value, headers


def _consume(bootstrap: str, topic: str, want: int, timeout: float, idle: float | None = None) -> list:
    """Up to ``want`` records; with ``idle``, also stop once some came and none followed for that long."""
    c = confluent_kafka.Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"mes-{uuid.uuid4().hex[:6]}", "auto.offset.reset": "earliest"}
    )
    c.subscribe([topic])
    out: list = []
    deadline = time.monotonic() + timeout
    last = math.inf
    try:
        while len(out) < want and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                if idle is not None and time.monotonic() - last > idle:
                    break
                continue
            last = time.monotonic()
            assert m.error() is None, m.error()
            out.append(m)
    finally:
        c.close()
    return out


def test_confluent_kafka_and_the_guides_consumer_against_the_documented_worker(
    start_broker, demo_head, start_worker, stop_gracefully
) -> None:
    cat, head_path = demo_head
    kafka = start_broker(partitions=2)
    worker_cmd = guide_block("bash", "**A consumer in ten lines**").split()
    assert worker_cmd[:2] == ["cff-inspect", "worker"] and "--topic-encoding" in worker_cmd
    options = [o for o in worker_cmd[2:] if not o.startswith("bottle.top")]  # the head: the test's own product
    options[options.index("--head") : options.index("--head") + 1] = ["--head", f"demo={head_path}"]
    worker = start_worker(kafka, *options, "--max-batch", "4", "--max-wait-ms", "30")
    try:
        # produce JSON frames with librdkafka, as a camera host in another language would
        good = load_image(sorted((cat / "test" / "good").glob("*"))[0])
        noise = np.random.default_rng(0).integers(0, 256, (80, 112, 3), dtype=np.uint8)  # nothing like the product
        sent = [_frame_json(good, "L9"), _frame_json(noise, "L9")]
        prod = confluent_kafka.Producer({"bootstrap.servers": kafka.bootstrap_servers, "enable.idempotence": True})
        for _fid, value, headers in sent:
            prod.produce(kafka.topic("frames"), key=b"cam-9", value=value, headers=headers)
        assert prod.flush(30) == 0
        del prod
        ids = {fid for fid, _, _ in sent}

        # results in protobuf (the default), defects in JSON (the documented worker command)
        results = _consume(kafka.bootstrap_servers, kafka.topic("results"), 2, timeout=120)
        assert {dict(m.headers())["content-type"] for m in results} == {
            b"application/x-protobuf; messageType=inspection.v1.InspectionResult"
        }
        parsed = {r.frame_id: r for r in (results_pb2.InspectionResult.FromString(m.value()) for m in results)}
        assert set(parsed) == ids and all(r.status == results_pb2.STATUS_OK for r in parsed.values())
        assert all(dict(r.attributes) == {"line": "L9"} for r in parsed.values())

        # the results are in, so are their defect events: the noise frame's for sure (the good one's may be too)
        defects = _consume(kafka.bootstrap_servers, kafka.topic("defects"), 2, timeout=90, idle=5)
        assert {dict(m.headers())["content-type"] for m in defects} == {
            b"application/json; messageType=inspection.v1.DefectEvent"
        }
        events = {e["frameId"]: e for e in (json.loads(m.value()) for m in defects)}
        event = events[sent[1][0]]
        assert (event["width"], event["height"]) == (112, 80) and event["attributes"] == {"line": "L9"}
        assert "evidence" not in event  # no --evidence-dir: the case the guide's consumer must survive

        # the guide's consumer, literally (address and prefix substituted), in a fresh interpreter
        code = guide_block("python", "**A consumer in ten lines**")
        code = substitute(code, kafka.bootstrap_servers, kafka.topic(""))
        proc = subprocess.Popen(
            [sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            lines = [proc.stdout.readline() for _ in events]  # type: ignore[union-attr]
        finally:
            proc.kill()
            _, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, err[-2000:]
        (line,) = [x for x in lines if x.startswith(f"{event['frameId']} ")]
        assert line.startswith(f"{event['frameId']} demo L9 "), (line, err[-2000:])
        assert line.rstrip().endswith("None")  # evidence absent: .get() gave None, no KeyError
    finally:
        out = stop_gracefully(worker)
    assert worker.returncode == 0, out.decode()[-3000:]
