"""The line calibrates the head, online: commissioning, feedback, the no-harm rule and rollback.

The line manager runs against a real embedded broker (frames are read back by partition and offset) and a real
head store; ``test_line_end_to_end`` adds the real gRPC calibrator and a real worker process.
"""

from __future__ import annotations

import io
import json
import time
import uuid

import grpc
import numpy as np
import pytest
from kafka_support import poll_topic
from PIL import Image

from calibrator.line import LineManager, is_commissioning, read_state
from calibrator.line_config import LineSettings
from calibrator.service import serve
from calibrator.store import HeadStore
from inspection_core.wire import decode, encode
from inspection_pb.v1 import (
    calibrator_pb2,
    calibrator_pb2_grpc,
    common_pb2,
    feedback_pb2,
    frames_pb2,
    results_pb2,
)
from monitoring import metrics
from scorer.artifact import load_head
from scorer.fit import fit_head

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]
N = 12  # commissioning frames


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _odd(seed: int) -> np.ndarray:
    """A part unlike the references (a checkerboard): the fitted head flags it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    board = ((yy // 8 + xx // 8) % 2 * 200 + 20).astype(np.float32)
    img = np.stack([board, 220 - board, board], -1) + rng.normal(0, 3, (64, 64, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _refused(reason: str) -> float:
    return metrics.FEEDBACK_REFUSED.labels(reason=reason)._value.get()


class Line:
    """A product on a line: frames published to the real frames topic, scored by the store's active version."""

    def __init__(self, kafka, store: HeadStore, manager: LineManager | None, backbone, product: str = "widget") -> None:  # noqa: ANN001
        self.kafka, self.store, self.manager, self.backbone, self.product = kafka, store, manager, backbone, product
        self.producer = kafka.producer()
        self.results: dict[str, results_pb2.InspectionResult] = {}

    def show(self, images: list[np.ndarray], product: str | None = None) -> list[results_pb2.InspectionResult]:
        product = product or self.product
        m = self.store.info(product)
        head = load_head(self.store.path(product), self.backbone)
        scores = head.score(images)
        out = []
        for j, img in enumerate(images):
            f = frames_pb2.Frame(
                frame_id=f"f-{uuid.uuid4().hex[:10]}", camera_id="cam", product_id=product,
                encoding=frames_pb2.ENCODING_PNG, image=_png(img),
            )  # fmt: skip
            md = self.producer.send(self.kafka.topic("frames"), key=b"cam", value=f.SerializeToString()).get(30)
            r = results_pb2.InspectionResult(
                frame_id=f.frame_id, product_id=product, status=results_pb2.STATUS_OK,
                image_score=float(scores.image_scores[j]), image_threshold=head.image_threshold,
                verdict=results_pb2.VERDICT_DEFECT if scores.is_defect[j] else results_pb2.VERDICT_OK,
                provisional=is_commissioning(self.store, product, m),
                head=common_pb2.HeadRef(product_id=product, version=m["version"]),
                frame_ref=common_pb2.FrameRef(topic=md.topic, partition=md.partition, offset=md.offset),
            )  # fmt: skip
            if self.manager is not None:
                self.manager.on_result(r)
            else:  # through the results topic, to the service's own consumer
                self.producer.send(self.kafka.topic("results"), key=b"cam", value=r.SerializeToString()).get(30)
            self.results[f.frame_id] = r
            out.append(r)
        return out

    def label(self, frame_id: str, label: int, product: str | None = None, encoding: str = "protobuf") -> bool:
        fb = feedback_pb2.Feedback(frame_id=frame_id, product_id=product or self.product, label=label, who="test")
        value, headers = encode(fb, encoding)
        return self.manager.on_feedback(value, headers)


@pytest.fixture
def line(tmp_path, tiny_vit, make_refs, start_broker):
    kafka = start_broker(partitions=1)
    store = HeadStore(tmp_path / "store")
    settings = LineSettings(commissioning_frames=N, feedback_refit_labels=1, feedback_min_interval_s=0)
    manager = LineManager(store, tiny_vit, kafka, settings)
    head = fit_head(tiny_vit, make_refs(3), method="knn")
    manager.mark_fitted(head)
    store.add("widget", head, activate=True)
    manager.caught_up.set()  # no consumer thread here: results are handed over directly
    lp = Line(kafka, store, manager, tiny_vit)
    yield lp
    lp.producer.close(5)


def _goods(make_refs, n: int, seed: int = 10) -> list[np.ndarray]:
    return [make_refs(1, seed=seed + i)[0] for i in range(n)]


def test_commissioning_makes_an_active_version_that_records_its_frames(line, make_refs) -> None:
    first = line.show(_goods(make_refs, N - 1))
    assert all(r.provisional for r in first) and line.store.active("widget") == 1
    line.show(_goods(make_refs, 1, seed=50))  # the N-th frame: the line version is made
    assert line.store.active("widget") == 2
    m = line.store.info("widget", 2)
    rec = m["meta"]["line"]
    assert rec["threshold"]["rule"] == "q90-log" and rec["frames"]["commissioning"] == N
    assert len(rec["cross_fitted_scores"]) == N and len(rec["evidence"]) == N
    assert rec["frame_ids"] == list(line.results)[:N]
    assert m["meta"]["line_status"] == "commissioned" and not is_commissioning(line.store, "widget", m)
    assert 1 in read_state(line.store, "widget")["finished"]
    assert m["image_threshold"] != line.store.info("widget", 1)["image_threshold"]
    assert not any(r.provisional for r in line.show(_goods(make_refs, 2, seed=60)))
    # an automatic version rolls back like a manual one, and v1 does not commission again
    assert line.store.rollback("widget") == 1
    assert not is_commissioning(line.store, "widget", line.store.info("widget"))


def test_a_false_alarm_fed_back_scores_below_the_next_threshold(line, make_refs) -> None:
    line.show(_goods(make_refs, N))
    assert line.store.active("widget") == 2
    odd = _odd(0)
    (alarm,) = line.show([odd])
    assert alarm.verdict == results_pb2.VERDICT_DEFECT
    assert line.label(alarm.frame_id, feedback_pb2.LABEL_GOOD, encoding="json")  # JSON feedback is read too
    assert line.store.active("widget") == 3, "one label and no interval: the refit goes live (0 vs 1 mistakes)"
    m = line.store.info("widget", 3)
    assert m["meta"]["line_status"] == "feedback" and m["meta"]["line"]["labels"] == {"good": 1, "defect": 0}
    (again,) = line.show([odd])
    assert again.verdict == results_pb2.VERDICT_OK and again.image_score < again.image_threshold


def test_bad_feedback_changes_nothing_and_is_counted(line, make_refs) -> None:
    line.show(_goods(make_refs, N))
    (r,) = line.show([_odd(1)])
    before = {k: _refused(k) for k in ("unknown_frame", "wrong_product", "duplicate", "invalid")}
    versions = line.store.versions("widget")
    assert not line.label("no-such-frame", feedback_pb2.LABEL_GOOD)
    assert not line.label(r.frame_id, feedback_pb2.LABEL_GOOD, product="gadget")
    assert not line.label(r.frame_id, feedback_pb2.LABEL_UNSPECIFIED)
    assert not line.manager.on_feedback(b"\x00 not a Feedback \xff")
    assert line.store.versions("widget") == versions and read_state(line.store, "widget")["labels"] == {}
    assert line.label(r.frame_id, feedback_pb2.LABEL_UNSURE)  # recorded, never learnt from: no refit
    assert not line.label(r.frame_id, feedback_pb2.LABEL_UNSURE)  # the same label again
    assert line.store.versions("widget") == versions
    after = {k: _refused(k) for k in before}
    assert after == {k: before[k] + n for k, n in {"unknown_frame": 1, "wrong_product": 1, "duplicate": 1,
                                                   "invalid": 2}.items()}  # fmt: skip


def test_a_candidate_worse_on_labelled_defects_is_not_activated(line, make_refs) -> None:
    line.show(_goods(make_refs, N))
    live = line.store.active("widget")
    # two near-identical odd parts: the operator calls one good and the other a defect the live version caught
    good, bad = line.show([_odd(2), _odd(3)])
    assert bad.verdict == results_pb2.VERDICT_DEFECT
    line.manager.settings = LineSettings(commissioning_frames=N, feedback_refit_labels=2, feedback_min_interval_s=0)
    assert line.label(bad.frame_id, feedback_pb2.LABEL_DEFECT)
    assert line.store.active("widget") == live  # one new label: no refit yet
    assert line.label(good.frame_id, feedback_pb2.LABEL_GOOD)
    cand = max(line.store.versions("widget"))
    assert cand > live and line.store.active("widget") == live, "a candidate that misses a labelled defect stays off"
    m = line.store.info("widget", cand)
    assert m["meta"]["line_status"] == "candidate" and "misses 1 labelled defects" in m["meta"]["candidate_reason"]
    assert m["meta"]["line"]["no_harm"]["activated"] is False


def test_dry_run_stores_the_line_version_inactive(tmp_path, tiny_vit, make_refs, start_broker) -> None:
    kafka = start_broker(partitions=1)
    store = HeadStore(tmp_path / "store")
    manager = LineManager(store, tiny_vit, kafka, LineSettings(commissioning_frames=N, line_dry_run=True))
    head = fit_head(tiny_vit, make_refs(3), method="knn")
    manager.mark_fitted(head)
    store.add("widget", head, activate=True)
    manager.caught_up.set()
    lp = Line(kafka, store, manager, tiny_vit)
    try:
        lp.show(_goods(make_refs, N))
    finally:
        lp.producer.close(5)
    assert store.active("widget") == 1 and store.versions("widget") == [1, 2]
    assert store.info("widget", 2)["meta"]["line_status"] == "dry-run"
    assert not is_commissioning(store, "widget", store.info("widget"))  # its phase ended: no more provisional


# -- the services end to end ---------------------------------------------------------------------------------


def _fit_stream(product: str, images: list[bytes]):  # noqa: ANN202
    yield calibrator_pb2.FitRequest(
        header=calibrator_pb2.FitHeader(product_id=product, backbone="tiny-vit", shots=len(images), activate=True,
                                        method="knn")
    )  # fmt: skip
    for i, data in enumerate(images):
        yield calibrator_pb2.FitRequest(
            chunk=calibrator_pb2.ImageChunk(index=i, name=f"r{i}.png", data=data, last=True)
        )


def _frames(kafka, images: list[np.ndarray], product: str = "widget") -> list[str]:  # noqa: ANN001
    prod = kafka.producer()
    ids = []
    for i, img in enumerate(images):
        f = frames_pb2.Frame(
            frame_id=f"e2e-{uuid.uuid4().hex[:10]}", camera_id="cam", product_id=product, sequence=i,
            encoding=frames_pb2.ENCODING_PNG, image=_png(img),
        )  # fmt: skip
        f.capture_time.GetCurrentTime()
        prod.send(kafka.topic("frames"), key=b"cam", value=f.SerializeToString())
        ids.append(f.frame_id)
    prod.flush()
    prod.close(5)
    return ids


def _results(kafka, ids: list[str], timeout: float = 40) -> dict[str, results_pb2.InspectionResult]:  # noqa: ANN001
    want = set(ids)
    recs = poll_topic(
        kafka, "results", keep=lambda m: decode(m.value, results_pb2.InspectionResult, m.headers).frame_id in want,
        until=lambda got: len(got) >= len(want), timeout=timeout,
    )  # fmt: skip
    out = {}
    for m in recs:
        r = decode(m.value, results_pb2.InspectionResult, m.headers)
        out[r.frame_id] = r
    return out


def _wait(cond, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_line_end_to_end(tmp_path, tiny_vit, make_refs, start_broker, start_worker, stop_gracefully, capsys) -> None:
    """Real calibrator (gRPC, announcements, line manager) and a real worker process on a real broker."""
    kafka = start_broker(partitions=1)
    store = HeadStore(tmp_path / "store")
    settings = LineSettings(commissioning_frames=N, feedback_refit_labels=1, feedback_min_interval_s=0)
    server, port = serve(store, tiny_vit, port=0, kafka=kafka, allow_unsigned=True, reannounce_s=0, line=settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = calibrator_pb2_grpc.CalibratorStub(channel)
    try:
        done = list(stub.FitHead(_fit_stream("widget", [_png(r) for r in make_refs(3)])))[-1].result
        assert done.head.version == 1 and done.commissioning
        worker = start_worker(
            kafka, "--backbone", "tiny-vit", "--max-batch", "4", "--max-wait-ms", "30", "--worker-id", "w-line"
        )
        ids = _frames(kafka, _goods(make_refs, N))
        got = _results(kafka, ids, timeout=60)
        if set(got) != set(ids):
            out = stop_gracefully(worker)
            raise AssertionError(f"{len(got)} of {len(ids)} results; the worker said:\n{out.decode()[-3000:]}")
        for r in got.values():
            assert r.status == results_pb2.STATUS_OK and r.provisional and r.head.version == 1
            assert r.frame_ref.topic == kafka.topic("frames") and r.frame_ref.offset >= 0
        _wait(lambda: store.active("widget") == 2, 40, "the commissioned version")
        info = stub.GetHead(calibrator_pb2.HeadSelector(product_id="widget"))
        assert info.line_status == "commissioned" and not info.commissioning
        assert json.loads(json.dumps(store.info("widget")["meta"]["line"]["frame_ids"])) == list(ids)

        def scored_by_v2() -> bool:
            (fid,) = _frames(kafka, [_odd(7)])
            return _results(kafka, [fid], timeout=20)[fid].head.version == 2

        _wait(scored_by_v2, 40, "the worker to score with v2")
        (fid,) = _frames(kafka, [_odd(7)])
        r = _results(kafka, [fid])[fid]
        assert not r.provisional and r.verdict == results_pb2.VERDICT_DEFECT  # a false alarm on an odd good part
        from cff_inspect.cli import main as cli

        args = ["feedback", fid, "good", "--who", "op", "--bootstrap-servers", kafka.bootstrap_servers,
                "--topic-prefix", kafka.topic_prefix, "--topic-encoding", "feedback=json"]  # fmt: skip
        assert cli(args) == 0 and json.loads(capsys.readouterr().out)["productId"] == "widget"
        _wait(lambda: store.active("widget") == 3, 40, "the version refitted from feedback")
        back = stub.RollbackHead(calibrator_pb2.HeadSelector(product_id="widget"))
        assert back.head.version == 2 and back.active and back.line_status == "commissioned"
    finally:
        channel.close()
        server.stop(0)


def test_finish_commissioning_over_grpc(tmp_path, tiny_vit, make_refs, start_broker) -> None:
    """FinishCommissioning ends the phase early with what the service's consumer collected from the results topic;
    too few frames, or a version that is not commissioning, is a clear refusal."""
    kafka = start_broker(partitions=1)
    store = HeadStore(tmp_path / "store")
    settings = LineSettings(commissioning_frames=50)
    server, port = serve(store, tiny_vit, port=0, kafka=kafka, allow_unsigned=True, reannounce_s=0, line=settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = calibrator_pb2_grpc.CalibratorStub(channel)
    product = "widget-fc"
    collected = metrics.COMMISSIONING_FRAMES.labels(product=product)
    lp = Line(kafka, store, None, tiny_vit, product=product)
    try:
        list(stub.FitHead(_fit_stream(product, [_png(r) for r in make_refs(3)])))
        lp.show(_goods(make_refs, 3))
        _wait(lambda: collected._value.get() == 3, 20, "3 frames collected")
        with pytest.raises(grpc.RpcError) as e:
            stub.FinishCommissioning(calibrator_pb2.HeadSelector(product_id=product))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "3 commissioning frames" in e.value.details()
        lp.show(_goods(make_refs, 5, seed=30))
        _wait(lambda: collected._value.get() == 8, 20, "8 frames collected")
        from cff_inspect.cli import main as cli

        rc = cli(["heads", "finish-commissioning", "--product", product, "--calibrator", f"127.0.0.1:{port}"])
        assert rc == 0  # the CLI's client: `cff-inspect heads finish-commissioning`
        info = store.info(product)
        assert info["version"] == 2 and info["active"] and info["meta"]["line_status"] == "commissioned"
        assert info["meta"]["line"]["frames"]["commissioning"] == 8
        with pytest.raises(grpc.RpcError) as e:  # v2 is not commissioning
            stub.FinishCommissioning(calibrator_pb2.HeadSelector(product_id=product))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not commissioning" in e.value.details()
    finally:
        lp.producer.close(5)
        channel.close()
        server.stop(0)
