"""Worker end to end on the real embedded broker, with the worker as a real process."""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kafka_support import poll_topic
from PIL import Image

from inspection_core.kafka import KafkaConfig
from inspection_pb.v1 import frames_pb2, results_pb2
from scorer.artifact import save_head
from scorer.backbones import load_backbone
from scorer.demo import make_demo_dataset
from scorer.fit import fit_head
from scorer.images import load_image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_head(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("wk")
    cat = make_demo_dataset(d, n_train=4, n_good=4, n_bad=4)
    bb = load_backbone("tiny-vit")
    head = fit_head(bb, [load_image(p) for p in sorted((cat / "train" / "good").glob("*.png"))], method="knn")
    path = d / "demo-v1.safetensors"
    save_head(head, path, product="demo", version=1)
    return cat, path


@pytest.fixture
def broker(start_broker) -> KafkaConfig:
    return start_broker(partitions=4)


def _png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


def _frame(
    camera: str,
    seq: int,
    image: bytes,
    *,
    product: str = "demo",
    age_s: float = 0.0,
    encoding: int = frames_pb2.ENCODING_PNG,
) -> frames_pb2.Frame:
    f = frames_pb2.Frame(
        frame_id=f"{camera}-{seq}-{uuid.uuid4().hex[:8]}",
        camera_id=camera,
        product_id=product,
        sequence=seq,
        encoding=encoding,
        image=image,
    )
    f.capture_time.FromNanoseconds(int((time.time() - age_s) * 1e9))
    return f


def _worker_options(head: Path, worker_id: str) -> list[str]:
    return ["--head", f"demo={head}", "--max-batch", "4", "--max-wait-ms", "30", "--worker-id", worker_id]


def _collect(cfg: KafkaConfig, topic: str, want: int, timeout: float) -> list:
    return poll_topic(cfg, topic, until=lambda got: len(got) >= want, timeout=timeout)


def test_every_frame_gets_one_result_and_bad_ones_are_dead_lettered(
    broker, demo_head, start_worker, stop_gracefully
) -> None:
    cat, head_path = demo_head
    worker = start_worker(broker, *_worker_options(head_path, "w1"))
    try:
        goods = sorted((cat / "test" / "good").glob("*.png"))
        bads = sorted((cat / "test" / "scratch").glob("*.png"))
        frames = []
        for i, p in enumerate(goods + bads):
            frames.append(_frame("cam-a" if i % 2 else "cam-b", i, _png(p)))
        corrupt = [
            _frame("cam-a", 100, b"\xff\xd8\xff\xe0 not a jpeg", encoding=frames_pb2.ENCODING_JPEG),
            _frame("cam-b", 101, b""),
        ]
        no_head = _frame("cam-a", 102, _png(goods[0]), product="other")
        stale = _frame("cam-b", 103, _png(goods[0]), age_s=3600)
        frames += corrupt + [no_head, stale]
        prod = broker.producer()
        for f in frames:
            prod.send(broker.topic("frames"), key=f.camera_id.encode(), value=f.SerializeToString())
        prod.send(broker.topic("frames"), key=b"cam-a", value=b"\x00\x01 definitely not protobuf \xff")
        prod.flush()
        prod.close()

        recs = _collect(broker, "results", len(frames), timeout=120)
        results = [results_pb2.InspectionResult.FromString(m.value) for m in recs]
        ids = {r.frame_id for r in results}
        assert ids == {f.frame_id for f in frames}, f"missing {len({f.frame_id for f in frames} - ids)} results"
        by_id = {r.frame_id: r for r in results}
        for f in corrupt:
            assert by_id[f.frame_id].status == results_pb2.STATUS_BAD_FRAME and by_id[f.frame_id].reason
        assert by_id[no_head.frame_id].status == results_pb2.STATUS_NO_HEAD
        assert by_id[stale.frame_id].status == results_pb2.STATUS_STALE
        ok = [by_id[f.frame_id] for f in frames[: len(goods) + len(bads)]]
        assert all(r.status == results_pb2.STATUS_OK and r.head.head_id == "demo-v1" for r in ok)
        for r in ok:
            assert r.normalized_score == pytest.approx(r.image_score / r.image_threshold, rel=1e-4)
            assert (r.verdict == results_pb2.VERDICT_DEFECT) == (r.image_score >= r.image_threshold)
            assert r.timings.batch_size >= 1 and r.timings.inference_s > 0
        # results are keyed by camera id
        assert all(m.key.decode() == results_pb2.InspectionResult.FromString(m.value).camera_id for m in recs)

        n_defect = sum(r.verdict == results_pb2.VERDICT_DEFECT for r in ok)
        events = [results_pb2.DefectEvent.FromString(m.value) for m in _collect(broker, "defects", n_defect, 30)]
        assert {e.frame_id for e in events} == {r.frame_id for r in ok if r.verdict == results_pb2.VERDICT_DEFECT}
        dlq = _collect(broker, "frames.dlq", 3, 30)
        reasons = [dict(m.headers)["reason"].decode() for m in dlq]
        assert len(dlq) == 3 and any(r.startswith("not a Frame") for r in reasons)
        assert sum("decode" in r or "empty" in r for r in reasons) == 2
    finally:
        out = stop_gracefully(worker)
    assert worker.returncode == 0, out.decode()[-3000:]


def test_two_workers_share_partitions_and_a_killed_one_loses_nothing(broker, demo_head, start_worker) -> None:
    cat, head_path = demo_head
    images = [_png(p) for p in sorted((cat / "test").rglob("*.png"))]
    w1 = start_worker(broker, *_worker_options(head_path, "w1"))
    start_worker(broker, *_worker_options(head_path, "w2"))  # the fixture stops it
    watch = broker.consumer(broker.topic("results"), group_id=None)
    results: list = []

    def drain(timeout_ms: int = 300) -> None:
        for msgs in watch.poll(timeout_ms=timeout_ms).values():
            results.extend(results_pb2.InspectionResult.FromString(m.value) for m in msgs)

    try:
        prod = broker.producer()
        frames = []

        def send(i: int) -> None:
            f = _frame(f"cam-{i % 8}", i, images[i % len(images)])
            frames.append(f)
            prod.send(broker.topic("frames"), key=f.camera_id.encode(), value=f.SerializeToString())

        i = 0
        deadline = time.monotonic() + 90
        while {r.worker_id for r in results} != {"w1", "w2"} and time.monotonic() < deadline:
            send(i)
            i += 1
            prod.flush()
            drain(200)
        assert {r.worker_id for r in results} == {"w1", "w2"}, "both workers should receive partitions"
        w1.kill()  # SIGKILL mid-stream: no commit, no leave-group
        for j in range(i, i + 40):
            send(j)
            time.sleep(0.02)
        prod.flush()
        prod.close()
        want = {f.frame_id for f in frames}
        deadline = time.monotonic() + 120
        while not want <= {r.frame_id for r in results} and time.monotonic() < deadline:
            drain()
        got = {r.frame_id for r in results}
        assert want <= got, f"{len(want - got)} of {len(want)} frames lost"
        print(f"results {len(results)} for {len(want)} frames, duplicates {len(results) - len(got)}")
    finally:
        watch.close()  # the start_worker fixture stops w2 (and reaps w1)


def test_device_decode_scores_like_pil(tiny_vit, references) -> None:
    """The torchvision decode path (on the GPU in production; forced here on the CPU) gives the same verdicts."""
    from types import SimpleNamespace

    from scorer.fit import fit_head
    from workers.config import ActiveHead, WorkerConfig, head_ref
    from workers.worker import Worker

    head = fit_head(tiny_vit, references, method="knn")
    recs = []
    for i, ref in enumerate(references):
        buf = io.BytesIO()
        Image.fromarray(ref).save(buf, format="JPEG", quality=95)
        f = _frame("cam", i, buf.getvalue(), encoding=frames_pb2.ENCODING_JPEG)
        recs.append(SimpleNamespace(key=b"cam", value=f.SerializeToString(), timestamp=0, topic="t", partition=0,
                                    offset=i))  # fmt: skip
    broken = _frame("cam", 9, b"\xff\xd8\xff\xe0 not a jpeg", encoding=frames_pb2.ENCODING_JPEG)
    recs.append(SimpleNamespace(key=b"cam", value=broken.SerializeToString(), timestamp=0, topic="t", partition=0,
                                offset=9))  # fmt: skip
    out = {}
    for mode in ("never", "always"):
        w = Worker(KafkaConfig(bootstrap_servers="127.0.0.1:1"), WorkerConfig(device_decode=mode),
                   {"demo": ActiveHead(head, head_ref("demo", head, "ab"))})  # fmt: skip
        results, _defects, dlq = w.process(recs)
        by_seq = {r.sequence: r for r in results}
        assert by_seq.pop(9).status == results_pb2.STATUS_BAD_FRAME and len(dlq) == 1
        assert all(r.status == results_pb2.STATUS_OK for r in by_seq.values()) and len(by_seq) == len(references)
        out[mode] = [by_seq[i] for i in sorted(by_seq)]
    a = np.array([r.image_score for r in out["never"]])
    b = np.array([r.image_score for r in out["always"]])
    np.testing.assert_allclose(b, a, rtol=0.02)  # libjpeg-turbo in both; resize differs slightly (PIL vs torch)
    assert [r.verdict for r in out["never"]] == [r.verdict for r in out["always"]]


def test_bank_dtype_is_applied_to_every_head(tiny_vit, references) -> None:
    from inspection_core.errors import ConfigError
    from scorer.fit import fit_head
    from workers.config import ActiveHead, WorkerConfig, head_ref
    from workers.worker import Worker

    head = fit_head(tiny_vit, references, method="knn")
    kafka = KafkaConfig(bootstrap_servers="127.0.0.1:1")
    auto = Worker(kafka, WorkerConfig(), {"a": ActiveHead(head, head_ref("a", head))})
    assert auto.heads["a"].head.options.bank_dtype == "float32"  # CPU backbone: the head's own
    w = Worker(kafka, WorkerConfig(bank_dtype="bfloat16"), {"a": ActiveHead(head, head_ref("a", head))})
    w.set_head("b", ActiveHead(head, head_ref("b", head, version=2)))
    assert {p: a.head.options.bank_dtype for p, a in w.heads.items()} == {"a": "bfloat16", "b": "bfloat16"}
    assert w.heads["b"].ref.version == 2 and head.options.bank_dtype == "float32"  # the caller's head untouched
    with pytest.raises(ConfigError, match="bank_dtype must be"):
        WorkerConfig(bank_dtype="int8")
