"""Hostile and idle clients over real gRPC: huge references, stalled uploads, a full disk. None of them may starve
the read-only calls (ListHeads, DownloadHead, health) or blow up the calibrator's memory."""

from __future__ import annotations

import errno
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from calibrator.config import ServiceLimits
from calibrator.service import serve
from calibrator.store import HeadStore
from inspection_core.errors import ConfigError
from inspection_pb.v1 import calibrator_pb2, calibrator_pb2_grpc
from monitoring.http import MetricsServer

pytestmark = pytest.mark.integration
CHUNK = 64 << 10


def _png(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.new(mode, size, (90, 120, 150) if mode == "RGB" else 128)
    if w * h <= 1 << 20:  # small references get texture, so the fit has something to learn
        arr = np.asarray(base).astype(np.int16) + rng.integers(-20, 20, np.asarray(base).shape)
        base = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    base.save(buf, format="PNG")
    return buf.getvalue()


def _header(product: str = "widget", shots: int = 1, method: str = "knn", activate: bool = True, **options):
    return calibrator_pb2.FitRequest(
        header=calibrator_pb2.FitHeader(
            product_id=product, backbone="tiny-vit", method=method, shots=shots, activate=activate, options=options
        )
    )


def _fit(images: dict[str, bytes], **header) -> Iterator[calibrator_pb2.FitRequest]:
    yield _header(shots=len(images), **header)
    for i, (name, data) in enumerate(images.items()):
        for s in range(0, len(data), CHUNK):
            yield calibrator_pb2.FitRequest(
                chunk=calibrator_pb2.ImageChunk(
                    index=i, name=name, data=data[s : s + CHUNK], last=s + CHUNK >= len(data)
                )
            )


def _stalled(release: threading.Event, after: list[calibrator_pb2.FitRequest] = ()) -> Iterator:  # noqa: B006
    """A header (and ``after``), then nothing until ``release``: an idle or hostile uploader."""
    yield _header(product="idle")
    yield from after
    release.wait()


def _start(tmp_path: Path, tiny_vit, **limits):  # noqa: ANN001, ANN202
    store = HeadStore(tmp_path / "store")
    server, port = serve(store, tiny_vit, port=0, limits=ServiceLimits(**limits))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, calibrator_pb2_grpc.CalibratorStub(channel), store


@pytest.fixture
def calibrator(tmp_path, tiny_vit):
    made = []

    def start(**limits):  # noqa: ANN202
        made.append(_start(tmp_path / str(len(made)), tiny_vit, **limits))
        return made[-1]

    yield start
    for server, channel, *_ in made:
        channel.close()
        server.stop(0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_huge_reference_is_reduced_as_it_is_decoded(calibrator) -> None:
    """A 115 kB PNG of 6300 x 6300 (under the 40 Mpx per-image limit) took the calibrator from 1.1 to 7.9 GB and
    128 s: it is reduced to twice the backbone's input right after decoding, so the fit costs about what a small
    reference costs."""
    server, _, stub, store = calibrator()
    data = _png((6300, 6300))
    peak, done = [_rss()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(_rss())
            time.sleep(0.02)

    before = peak[0]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        progress = list(stub.FitHead(_fit({"huge.png": data}, method="cff", steps="2", guard="false"), timeout=60))
    finally:
        done.set()
        sampler.join()
    elapsed = time.perf_counter() - t0
    assert progress[-1].stage == "done" and progress[-1].result.head.version == 1
    grown = (max(peak) - before) / 2**20
    assert elapsed < 20, f"fit of one 6300 x 6300 reference took {elapsed:.1f} s"
    assert grown < 700, f"the calibrator grew by {grown:.0f} MiB fitting one 6300 x 6300 reference"  # full: 119 MiB
    assert store.active("widget") == 1


def test_the_pixels_of_one_fit_are_bounded(calibrator) -> None:
    """Each reference passes the per-image limit, together they do not: refused from the headers, naming the image
    that went over and the numbers."""
    _, _, stub, store = calibrator(max_fit_pixels=1_000_000)
    images = {"a.png": _png((800, 800)), "b.png": _png((800, 800), seed=1)}
    with pytest.raises(grpc.RpcError) as e:
        list(stub.FitHead(_fit(images), timeout=30))
    msg = e.value.details()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), msg)
    assert msg.startswith("b.png: 800x800 (640000 pixels)") and "1280000 pixels" in msg, msg
    assert "limit of 1000000" in msg and "--max-fit-pixels" in msg, msg
    assert store.products() == []


def test_idle_fit_streams_leave_read_only_calls_and_health_served(calibrator) -> None:
    """Ten FitHead streams that sent a header and then nothing held every gRPC thread: DownloadHead, ListHeads
    and health timed out while /readyz said ready. Now the streams beyond the fit slots are refused at once and
    every read-only call answers."""
    server, channel, stub, _ = calibrator()  # default limits: 8 threads, 1 fit + 2 queued
    list(stub.FitHead(_fit({"r.png": _png((64, 64))}), timeout=60))
    release = threading.Event()
    pool = futures.ThreadPoolExecutor(10)
    refused: list[grpc.RpcError] = []

    def idle(i: int):  # noqa: ANN202
        t0 = time.perf_counter()
        try:
            list(stub.FitHead(_stalled(release), timeout=60))
        except grpc.RpcError as exc:
            return exc, time.perf_counter() - t0
        return None, time.perf_counter() - t0

    streams = [pool.submit(idle, i) for i in range(10)]
    metrics_server = MetricsServer("calibrator", host="127.0.0.1", port=0).add_checks(grpc=server.readiness).start()
    try:
        time.sleep(1.0)  # every stream has reached the server
        early = [f.result() for f in streams if f.done()]
        assert len(early) == 7, f"{len(early)} of 10 idle streams ended; 7 are over the 3 fit slots"
        for err, took in early:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
            assert "3 FitHead streams at once" in err.details() and "try again later" in err.details()
            assert took < 5, took
        refused = [e for e, _ in early]
        sel = calibrator_pb2.HeadSelector(product_id="widget")
        t0 = time.perf_counter()
        calls = {
            "health": lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5),
            "ListHeads": lambda: stub.ListHeads(calibrator_pb2.ListHeadsRequest(), timeout=5),
            "GetHead": lambda: stub.GetHead(sel, timeout=5),
            "DownloadHead": lambda: list(stub.DownloadHead(sel, timeout=5)),
        }
        answers = {name: pool.submit(call) for name, call in calls.items() for _ in range(3)}
        answers = {name: f.result(timeout=10) for name, f in answers.items()}
        assert answers["health"].status == health_pb2.HealthCheckResponse.SERVING
        assert [h.head.version for h in answers["ListHeads"].heads] == [1]
        assert b"".join(c.data for c in answers["DownloadHead"])
        assert time.perf_counter() - t0 < 5
        with urllib.request.urlopen(f"{metrics_server.url}/readyz", timeout=5) as r:
            body = json.loads(r.read())
        detail = body["checks"]["grpc"]["detail"]
        assert r.status == 200 and body["ready"], body
        assert "FitHead streams: 3 of 3 (0 fitting, 0 waiting, 3 uploading)" in detail, detail
    finally:
        release.set()
        metrics_server.stop()
    rest = [f.result(timeout=30) for f in streams]
    assert sum(e is not None and e.code() == grpc.StatusCode.INVALID_ARGUMENT for e, _ in rest) == 3, [
        (e.code(), e.details()) for e, _ in rest if e is not None and e not in refused
    ]
    pool.shutdown()


def test_a_stalled_upload_is_aborted_and_frees_its_slot(calibrator) -> None:
    server, _, stub, store = calibrator(fit_idle_s=1, max_fits=1, fit_queue=0)
    release = threading.Event()
    data = _png((64, 64))
    half = calibrator_pb2.FitRequest(chunk=calibrator_pb2.ImageChunk(index=0, name="r.png", data=data[:100]))
    try:
        for after, what in (([], "after the header of idle (0 of 1 images complete)"), ([half], "after the header")):
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as e:
                list(stub.FitHead(_stalled(release, after), timeout=30))
            took = time.perf_counter() - t0
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (e.value.code(), e.value.details())
            assert "FitHead upload stalled: nothing arrived for 1 s" in e.value.details()
            assert what in e.value.details() and "--fit-idle-s" in e.value.details()
            assert took < 5, took
    finally:
        release.set()
    # the single slot is free again: a real fit goes through
    progress = list(stub.FitHead(_fit({"r.png": data}), timeout=60))
    assert progress[-1].stage == "done" and store.active("widget") == 1


def test_readiness_says_not_ready_when_no_thread_would_answer_health(calibrator, monkeypatch) -> None:
    """Every handler thread held (here: ListHeads calls stuck on a slow store): a health call times out, so
    /readyz must say so, with the reason; once the threads come back it is ready again."""
    server, channel, stub, store = calibrator(grpc_threads=4, max_fits=1, fit_queue=1)
    check = server.readiness
    ok, detail = check()
    assert ok and detail.startswith("0 of 4 gRPC threads busy"), detail
    slow = threading.Event()
    real = store.products
    monkeypatch.setattr(store, "products", lambda: (slow.wait(30), real())[1])
    pool = futures.ThreadPoolExecutor(4)
    stuck = [pool.submit(stub.ListHeads, calibrator_pb2.ListHeadsRequest(), timeout=30) for _ in range(4)]
    try:
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        ms = MetricsServer("calibrator", host="127.0.0.1", port=0).add_checks(grpc=check).start()
        try:
            with pytest.raises(urllib.error.HTTPError) as h:
                urllib.request.urlopen(f"{ms.url}/readyz", timeout=5)
            body = json.loads(h.value.read())
        finally:
            ms.stop()
        assert h.value.code == 503 and not body["ready"], body
        detail = body["checks"]["grpc"]["detail"]
        assert detail.startswith("no gRPC handler thread free within 1 s") and "4 of 4 gRPC threads busy" in detail
        assert "ListHeads 4" in detail, detail
    finally:
        slow.set()
    assert all(len(f.result(timeout=30).heads) == 0 for f in stuck)
    time.sleep(0.2)
    assert check()[0]
    pool.shutdown()


@pytest.mark.parametrize(
    ("err", "code", "words"),
    [
        (errno.ENOSPC, grpc.StatusCode.RESOURCE_EXHAUSTED, "No space left on device (the head store's disk is full)"),
        (errno.EIO, grpc.StatusCode.INTERNAL, "Input/output error"),
    ],
)
def test_store_write_failures_get_a_clear_status_and_change_nothing(calibrator, monkeypatch, err, code, words) -> None:
    """ActivateHead on a full disk answered UNKNOWN. Every store write that fails now names the product, what
    failed and the file; the artifact, the state and the folder are as they were (no temporary files left)."""
    _, _, stub, store = calibrator()
    ref = {"r.png": _png((64, 64))}
    list(stub.FitHead(_fit(ref), timeout=60))
    list(stub.FitHead(_fit(ref, activate=False), timeout=60))
    for v in (2, 1):  # a history to roll back along
        stub.ActivateHead(calibrator_pb2.HeadSelector(product_id="widget", version=v))
    folder = store.root / "widget"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def fail(fd: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fsync", fail)  # the data is written, the sync fails: as a full disk does
    sel = calibrator_pb2.HeadSelector(product_id="widget")
    attempts = {
        "activating version 2": lambda: stub.ActivateHead(calibrator_pb2.HeadSelector(product_id="widget", version=2)),
        "rolling back to version 2": lambda: stub.RollbackHead(sel),
        "deleting version 2": lambda: stub.DeleteHead(calibrator_pb2.HeadSelector(product_id="widget", version=2)),
        "storing version 3": lambda: stub.SetThresholds(
            calibrator_pb2.SetThresholdsRequest(head=sel, image_threshold=0.5, activate=True)
        ),
        "fit of widget finished but was not stored: widget: storing version 3": lambda: list(
            stub.FitHead(_fit(ref), timeout=60)
        ),
    }
    for what, call in attempts.items():
        with pytest.raises(grpc.RpcError) as e:
            call()
        msg = e.value.details()
        assert e.value.code() == code, (what, e.value.code(), msg)
        assert "widget" in msg and what in msg and words in msg and str(folder) in msg, msg
        assert "the store is unchanged" in msg, msg
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before, what
    assert store.active("widget") == 1 and store.versions("widget") == [1, 2]
    # a product the store did not have: its folder is not left behind either
    with pytest.raises(grpc.RpcError) as e:
        list(stub.FitHead(_fit(ref, product="gadget"), timeout=60))
    assert e.value.code() == code and "gadget: storing version 1" in e.value.details()
    assert store.products() == ["widget"]


def test_limits_keep_threads_for_read_only_calls() -> None:
    with pytest.raises(ConfigError, match=r"--max-fits 4 \+ --fit-queue 4 .* raise --grpc-threads to at least 10"):
        ServiceLimits(max_fits=4, fit_queue=4)
    with pytest.raises(ConfigError, match="--fit-idle-s must be > 0"):
        ServiceLimits(fit_idle_s=0)
    ServiceLimits(grpc_threads=10, max_fits=4, fit_queue=4)


def test_limits_are_flags_and_variables() -> None:
    from calibrator.entry import settings_from
    from cff_inspect.cli import build_parser
    from inspection_core.env import bind_env

    env = {"CFF_INSPECT_MAX_FIT_PIXELS": "1000", "CFF_INSPECT_FIT_IDLE_S": "2.5"}
    args = bind_env(build_parser(), env).parse_args(["calibrator", "--no-kafka", "--max-fits", "2"])
    limits = settings_from(args).limits
    assert (limits.max_fit_pixels, limits.fit_idle_s, limits.max_fits) == (1000, 2.5, 2)
    assert settings_from(build_parser().parse_args(["calibrator", "--no-kafka"])).limits == ServiceLimits()
