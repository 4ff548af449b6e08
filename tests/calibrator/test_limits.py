"""Limits of the calibrator over real gRPC: image bombs refused from the header, one server per port, and errors
that never repeat unbounded input."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from PIL import Image

from calibrator.client import CalibratorClient, CalibratorError
from calibrator.security import ServerSecurity
from calibrator.service import serve
from calibrator.store import HeadStore
from inspection_core.errors import ECHO_LIMIT, ConfigError
from inspection_core.names import MAX_PIXELS
from inspection_pb.v1 import calibrator_pb2, calibrator_pb2_grpc

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CHUNK = 64 << 10


@pytest.fixture
def stub(tmp_path, tiny_vit):
    server, port = serve(HeadStore(tmp_path / "store"), tiny_vit, port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield calibrator_pb2_grpc.CalibratorStub(channel)
    channel.close()
    server.stop(0)


def _fit(
    images: dict[str, bytes], *, product: str = "widget", backbone: str = "tiny-vit", method: str = "knn", **options
):
    yield calibrator_pb2.FitRequest(
        header=calibrator_pb2.FitHeader(
            product_id=product, backbone=backbone, method=method, shots=len(images), options=options
        )
    )
    for i, (name, data) in enumerate(images.items()):
        for s in range(0, len(data), CHUNK):
            last = s + CHUNK >= len(data)
            yield calibrator_pb2.FitRequest(
                chunk=calibrator_pb2.ImageChunk(index=i, name=name, data=data[s : s + CHUNK], last=last)
            )


def _refused(stub, stream, timeout: float = 60) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as e:
        list(stub.FitHead(stream, timeout=timeout))
    return e.value


def test_pixel_bombs_are_refused_from_the_header(stub, png_bomb) -> None:
    """Issue 16: a 79 kB PNG of 9000 x 9000 took the calibrator to 11 GB for minutes; 30000 x 30000 was UNKNOWN."""
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, format="PNG")
    for name, data, size in (
        ("huge-9000.png", buf.getvalue(), "9000x9000"),
        ("bomb-30000.png", png_bomb(30000, 30000), "900000000 pixels"),
    ):
        t0 = time.perf_counter()
        err = _refused(stub, _fit({name: data}), timeout=20)  # a full decode and fit would run far longer
        elapsed = time.perf_counter() - t0
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.code(), err.details())
        msg = err.details()
        assert msg.startswith(f"{name}: ") and size in msg and f"limit of {MAX_PIXELS} pixels" in msg, msg
        assert "refused from its header, before decoding" in msg
        assert elapsed < 10, f"{name}: refused after {elapsed:.1f} s"


def test_long_input_is_not_echoed_in_errors(stub) -> None:
    """A 10 kB product id (or backbone, method, option or file name) comes back as its first characters only."""
    long = "a" * 10_000
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(buf, format="PNG")
    ok = {"r.png": buf.getvalue()}
    sel = calibrator_pb2.HeadSelector(product_id=long)
    calls = {
        "FitHead": lambda: list(stub.FitHead(_fit(ok, product=long), timeout=30)),
        "GetHead": lambda: stub.GetHead(sel, timeout=30),
        "ActivateHead": lambda: stub.ActivateHead(sel, timeout=30),
        "DownloadHead": lambda: list(stub.DownloadHead(sel, timeout=30)),
        "ListHeads": lambda: stub.ListHeads(calibrator_pb2.ListHeadsRequest(product_id=long), timeout=30),
    }
    for rpc, call in calls.items():
        with pytest.raises(grpc.RpcError) as e:
            call()
        msg = e.value.details()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, e.value.code())
        assert len(msg) < 300 and "too long" in msg and "(10000 chars)" in msg, (rpc, msg[:400])
    for stream, code in (
        (_fit(ok, backbone=long), grpc.StatusCode.FAILED_PRECONDITION),
        (_fit(ok, method=long), grpc.StatusCode.INVALID_ARGUMENT),
        (_fit({long: b"\x89PNG broken"}), grpc.StatusCode.INVALID_ARGUMENT),  # the file name
        (_fit(ok, **{long: "1"}), grpc.StatusCode.INVALID_ARGUMENT),
        (_fit(ok, steps=long), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        err = _refused(stub, stream)
        msg = err.details()
        assert err.code() == code and "(10000 chars)" in msg and long[: ECHO_LIMIT + 1] not in msg, msg[:400]
        assert len(msg) < 400, msg  # the echo is cut; the fixed text (e.g. the list of known options) remains


def test_a_second_calibrator_on_a_taken_port_refuses_to_start(tmp_path, tiny_vit) -> None:
    """grpcio's default SO_REUSEPORT let a second, tokenless calibrator share the port and answer calls."""
    token = "s3cret-token-for-tests"
    first, port = serve(HeadStore(tmp_path / "a"), tiny_vit, port=0, security=ServerSecurity(token=token))
    try:
        try:
            second, _ = serve(HeadStore(tmp_path / "b"), tiny_vit, port=port)
        except ConfigError as exc:
            assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in str(exc)
        else:
            second.stop(0)
            pytest.fail(f"a second calibrator started on port {port}, which the first one holds")
        for _ in range(5):  # every connection reaches the first one: a call without its token is refused
            with CalibratorClient(f"127.0.0.1:{port}") as anon, pytest.raises(CalibratorError) as e:
                anon.list()
            assert e.value.code == "UNAUTHENTICATED"
        cmd = [sys.executable, "-m", "cff_inspect", "calibrator", "--port", str(port), "--no-kafka", "--no-metrics",
               "--backbone", "tiny-vit", "--device", "cpu", "--store", str(tmp_path / "c")]  # fmt: skip
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("cff-inspect calibrator kept running on a taken port")
        assert r.returncode == 2, r.stderr
        assert (
            r.stderr.strip()
            .splitlines()[-1]
            .startswith(f"cff-inspect: error: cannot listen on 127.0.0.1:{port}: the address is already in use")
        ), r.stderr
        assert "Traceback" not in r.stderr
    finally:
        first.stop(0)


def test_a_port_taken_on_any_address_of_the_host_name_is_refused(tmp_path, tiny_vit) -> None:
    """``--host localhost`` started beside a program holding 127.0.0.1:P: grpcio bound [::1]:P alone and served."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        want = (
            f"cannot listen on localhost:{port}: the address is already in use "
            f"(127.0.0.1:{port}, an address localhost resolves to, is taken)"
        )
        try:
            server, _ = serve(HeadStore(tmp_path / "a"), tiny_vit, host="localhost", port=port)
        except ConfigError as exc:
            assert str(exc).startswith(want), exc
        else:
            server.stop(0)
            pytest.fail(f"the calibrator started on localhost:{port} while 127.0.0.1:{port} is taken")
        cmd = [sys.executable, "-m", "cff_inspect", "calibrator", "--host", "localhost", "--port", str(port),
               "--no-kafka", "--no-metrics", "--backbone", "tiny-vit", "--device", "cpu",
               "--store", str(tmp_path / "b")]  # fmt: skip
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("cff-inspect calibrator kept running on a taken port")
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(f"cff-inspect: error: {want}"), r.stderr
        assert "Traceback" not in r.stderr
