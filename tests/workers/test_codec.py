"""Stage 1 of the worker: frames parsed, checked and decoded, every refusal with its dead-letter reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from inspection_core.names import MAX_PIXELS, MAX_SIDE, DeadLetterReason
from inspection_pb.v1 import frames_pb2
from workers.codec import BadFrame, DeferredJpeg, check_product, decode_frame_image, decode_jpegs, parse_frame
from workers.config import WorkerConfig


def test_raw_frames_and_size_guard() -> None:
    cfg = WorkerConfig(max_pixels=10_000)
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    f = frames_pb2.Frame(frame_id="x", encoding=frames_pb2.ENCODING_RAW_RGB8, image=img.tobytes(), width=5, height=4)
    assert np.array_equal(decode_frame_image(f, cfg), img)
    f.width = 6
    with pytest.raises(BadFrame, match="expected 72"):
        decode_frame_image(f, cfg)
    buf = io.BytesIO()
    Image.new("L", (200, 200)).save(buf, format="PNG")
    big = frames_pb2.Frame(frame_id="y", encoding=frames_pb2.ENCODING_PNG, image=buf.getvalue())
    with pytest.raises(BadFrame, match="exceeds the limit"):
        decode_frame_image(big, cfg)
    with pytest.raises(BadFrame, match="unknown encoding"):
        decode_frame_image(frames_pb2.Frame(frame_id="z", encoding=0, image=b"abc"), cfg)


def test_batched_device_decode_isolates_a_truncated_jpeg() -> None:
    """One bad JPEG in a batch fails alone: the batch is retried image by image."""
    import torch

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
    good = buf.getvalue()
    cpu = torch.device("cpu")
    out = decode_jpegs([DeferredJpeg(good, cpu), DeferredJpeg(good[:300], cpu), DeferredJpeg(good, cpu)])
    assert isinstance(out[1], BadFrame) and "truncated" in str(out[1])
    assert [tuple(o.shape) for o in (out[0], out[2])] == [(3, 64, 48), (3, 64, 48)]
    assert all(o.dtype == torch.uint8 for o in (out[0], out[2]))


def test_refusals_carry_their_dead_letter_reason() -> None:
    with pytest.raises(BadFrame, match="not a Frame") as e:
        parse_frame(b"\xff\xffnot a frame")
    assert e.value.reason is DeadLetterReason.NOT_A_FRAME
    with pytest.raises(BadFrame, match="no frame_id") as e:
        parse_frame(frames_pb2.Frame(camera_id="c").SerializeToString())
    assert e.value.reason is DeadLetterReason.NOT_A_FRAME
    with pytest.raises(BadFrame, match="invalid product id") as e:
        check_product(frames_pb2.Frame(frame_id="x", product_id="Bad Id"))
    assert e.value.reason is DeadLetterReason.INVALID_PRODUCT
    with pytest.raises(BadFrame, match="empty image") as e:
        decode_frame_image(frames_pb2.Frame(frame_id="x", product_id="ok"), WorkerConfig())
    assert e.value.reason is DeadLetterReason.BAD_IMAGE
    assert [r.value for r in DeadLetterReason] == ["not_a_frame", "invalid_product", "bad_image"]


def test_frames_get_the_calibrators_size_limits(png_bomb) -> None:
    """One limit for frames and uploads (inspection_core.names), checked from the header, PIL's bombs included."""
    cfg = WorkerConfig()
    assert (cfg.max_pixels, cfg.max_side) == (MAX_PIXELS, MAX_SIDE)
    for w, h in ((30000, 30000), (9000, 9000), (MAX_SIDE + 1, 8)):
        f = frames_pb2.Frame(frame_id="big", encoding=frames_pb2.ENCODING_PNG, image=png_bomb(w, h))
        with pytest.raises(BadFrame, match=f"frame big: image .* exceeds the limit of {MAX_PIXELS} pixels") as e:
            decode_frame_image(f, cfg)
        assert e.value.reason is DeadLetterReason.BAD_IMAGE
    raw = frames_pb2.Frame(frame_id="strip", encoding=frames_pb2.ENCODING_RAW_RGB8, width=MAX_SIDE + 1, height=1)
    raw.image = bytes(raw.width * 3)
    with pytest.raises(BadFrame, match=f"raw frame strip: image size {MAX_SIDE + 1}x1 .* px a side"):
        decode_frame_image(raw, cfg)


def test_refusals_never_repeat_unbounded_input(png_bomb) -> None:
    """A 10 kB product or frame id comes back cut to its start: the reason lands in headers and results."""
    with pytest.raises(BadFrame) as e:
        check_product(frames_pb2.Frame(frame_id="x", product_id="a" * 10_000))
    assert e.value.reason is DeadLetterReason.INVALID_PRODUCT
    assert "too long" in str(e.value) and "(10000 chars)" in str(e.value) and len(str(e.value)) < 300
    f = frames_pb2.Frame(frame_id="f" * 10_000, encoding=frames_pb2.ENCODING_PNG, image=png_bomb(30000, 30000))
    with pytest.raises(BadFrame, match="exceeds the limit") as e:
        decode_frame_image(f, WorkerConfig())
    assert "(10000 chars)" in str(e.value) and len(str(e.value)) < 300
