"""Limits of the calibrator over real gRPC: image bombs refused from the header."""

from __future__ import annotations

import io
import time

import grpc
import pytest
from PIL import Image

from calibrator.service import serve
from calibrator.store import HeadStore
from inspection_core.names import MAX_PIXELS
from inspection_pb.v1 import calibrator_pb2, calibrator_pb2_grpc

pytestmark = pytest.mark.integration
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
