"""Distribution end to end: calibrator announces on Kafka, a worker process downloads over gRPC and hot-swaps."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from kafka_support import poll_topic

from calibrator.service import serve
from calibrator.store import HeadStore
from inspection_core.broker import EmbeddedBroker
from inspection_core.kafka import KafkaConfig, ensure_topics
from inspection_pb.v1 import calibrator_pb2, calibrator_pb2_grpc, frames_pb2, results_pb2
from scorer.demo import make_demo_dataset

pytestmark = pytest.mark.integration


def test_worker_takes_announced_heads_and_swaps_between_batches(
    tmp_path, tiny_vit, start_broker, start_worker, stop_gracefully
) -> None:
    cat = make_demo_dataset(tmp_path / "d", n_train=3, n_good=2, n_bad=0)
    refs = [p.read_bytes() for p in sorted((cat / "train" / "good").glob("*.png"))]
    frame_png = next((cat / "test" / "good").glob("*.png")).read_bytes()
    kafka = start_broker(partitions=2)
    server, port = serve(HeadStore(tmp_path / "store"), tiny_vit, port=0, kafka=kafka, allow_unsigned=True)
    worker = start_worker(kafka, "--backbone", "tiny-vit", "--max-wait-ms", "20")
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = calibrator_pb2_grpc.CalibratorStub(ch)
    prod = kafka.producer()
    watch = kafka.consumer(kafka.topic("results"), group_id=None)
    seen: list = []

    def pump(until, timeout: float = 90) -> bool:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        i = 0
        while time.monotonic() < deadline:
            f = frames_pb2.Frame(
                frame_id=uuid.uuid4().hex,
                camera_id="cam",
                product_id="widget",
                sequence=i,
                encoding=frames_pb2.ENCODING_PNG,
                image=frame_png,
            )
            f.capture_time.GetCurrentTime()
            prod.send(kafka.topic("frames"), key=b"cam", value=f.SerializeToString())
            prod.flush()
            i += 1
            for msgs in watch.poll(timeout_ms=300).values():
                seen.extend(results_pb2.InspectionResult.FromString(m.value) for m in msgs)
            if until():
                return True
        return False

    try:
        assert pump(lambda: any(r.status == results_pb2.STATUS_NO_HEAD for r in seen))

        def fit():
            yield calibrator_pb2.FitRequest(
                header=calibrator_pb2.FitHeader(
                    product_id="widget", backbone="tiny-vit", shots=len(refs), method="knn", activate=True
                )
            )
            for i, data in enumerate(refs):
                yield calibrator_pb2.FitRequest(chunk=calibrator_pb2.ImageChunk(index=i, data=data, last=True))

        done = list(stub.FitHead(fit()))[-1].result
        assert done.head.version == 1 and done.active
        assert pump(lambda: any(r.status == results_pb2.STATUS_OK and r.head.version == 1 for r in seen))
        v2 = stub.SetThresholds(
            calibrator_pb2.SetThresholdsRequest(
                head=calibrator_pb2.HeadSelector(product_id="widget"), image_threshold=123.0, activate=True
            )
        )
        assert v2.head.version == 2
        assert pump(lambda: any(r.status == results_pb2.STATUS_OK and r.head.version == 2 for r in seen))
        ok = [r for r in seen if r.status == results_pb2.STATUS_OK]
        assert all(r.head.head_id == f"widget-v{r.head.version}" and r.head.sha256 for r in ok)
        # after the swap no frame is scored with the old thresholds
        first_v2 = next(i for i, r in enumerate(ok) if r.head.version == 2)
        assert all(r.head.version == 2 and r.image_threshold == pytest.approx(123.0) for r in ok[first_v2:])
    finally:
        watch.close()
        prod.close()
        ch.close()
        server.stop(0)
        out = stop_gracefully(worker)
    assert worker.returncode == 0, out.decode()[-2000:]


def _announcements(kafka: KafkaConfig, timeout: float = 15) -> dict:
    from inspection_pb.v1 import heads_pb2

    recs = poll_topic(kafka, "heads", timeout=timeout)
    return {m.key.decode(): heads_pb2.HeadAnnouncement.FromString(m.value) for m in recs}


def test_restarted_calibrator_keeps_heads_and_repopulates_a_fresh_broker(tmp_path, tiny_vit) -> None:
    from calibrator.client import CalibratorClient

    cat = make_demo_dataset(tmp_path / "d", n_train=2, n_good=0, n_bad=0)
    refs = sorted((cat / "train" / "good").glob("*.png"))
    store_dir = tmp_path / "store"

    def start(kafka: KafkaConfig):  # noqa: ANN202 - (server, port); the same calibrator before and after
        return serve(
            HeadStore(store_dir),
            tiny_vit,
            port=0,
            kafka=kafka,
            advertised_address="cal.plant:50051",
            allow_unsigned=True,
        )

    with EmbeddedBroker() as b:
        kafka = KafkaConfig(bootstrap_servers=b.bootstrap, topic_prefix="r1.", partitions=1)
        ensure_topics(kafka)
        server, port = start(kafka)
        with CalibratorClient(f"127.0.0.1:{port}") as c:
            info = c.fit("widget", refs, method="knn")
        server.stop(0)
        first = _announcements(kafka)["widget"]
        assert first.head.sha256 == info.head.sha256 and first.calibrator_address == "cal.plant:50051"
    # the embedded broker lost everything; a restarted calibrator on the same store announces again
    with EmbeddedBroker() as b:
        kafka = KafkaConfig(bootstrap_servers=b.bootstrap, topic_prefix="r1.", partitions=1)
        ensure_topics(kafka)
        assert _announcements(kafka, timeout=2) == {}
        server, port = start(kafka)
        try:
            again = _announcements(kafka)["widget"]
            assert again.active and again.head.version == 1 and again.head.sha256 == info.head.sha256
            with CalibratorClient(f"127.0.0.1:{port}") as c:
                assert [(h.head.version, h.active) for h in c.list()] == [(1, True)]
                assert len(c.download("widget", expected_sha256=info.head.sha256)) > 0
        finally:
            server.stop(0)
