"""Stage 1 of the worker: frames parsed, checked and decoded, every refusal with its dead-letter reason."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks.hostile_load import encoded, jpeg_scan_bomb
from inspection_core.errors import ConfigError
from inspection_core.names import MAX_PIXELS, MAX_SIDE, DeadLetterReason
from inspection_core.wire import to_json
from inspection_pb.v1 import frames_pb2
from scorer.images import jpeg_scans
from workers.codec import (
    BadFrame,
    FrameImage,
    check_frame,
    check_product,
    decode_frame_image,
    decode_jpegs,
    parse_frame,
    publishable,
)
from workers.config import WorkerConfig
from workers.post import new_result


def test_raw_frames_and_size_guard() -> None:
    cfg = WorkerConfig(max_pixels=10_000)
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    f = frames_pb2.Frame(frame_id="x", encoding=frames_pb2.ENCODING_RAW_RGB8, image=img.tobytes(), width=5, height=4)
    assert np.array_equal(decode_frame_image(f, cfg).pixels, img)
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
    out = decode_jpegs([FrameImage((64, 48), jpeg=data, device=cpu) for data in (good, good[:300], good)])
    assert isinstance(out[1], BadFrame) and "truncated" in str(out[1])
    assert [tuple(o.pixels.shape) for o in (out[0], out[2])] == [(3, 64, 48), (3, 64, 48)]
    assert all(o.pixels.dtype == torch.uint8 for o in (out[0], out[2]))


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
    assert [r.value for r in DeadLetterReason] == [
        "not_a_frame",
        "invalid_product",
        "bad_image",
        "invalid_field",
        "decode_limit",
    ]


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


# -- hostile frames: each refused cheaply, with a reason that names the limit --------------------------------------
def _frame(**kw) -> frames_pb2.Frame:  # noqa: ANN003
    f = frames_pb2.Frame(frame_id="f1", camera_id="cam-1", product_id="demo", **kw)
    if not f.HasField("capture_time"):
        f.capture_time.FromNanoseconds(time.time_ns())
    return f


def test_a_jpeg_scan_bomb_is_refused_before_any_decoder_sees_it() -> None:
    """Thousands of few-byte scans each cost a pass over every block: counted from the markers, not decoded."""
    import torch

    bomb = jpeg_scan_bomb(side=2048, scans=5000)
    f = _frame(encoding=frames_pb2.ENCODING_JPEG, image=bomb)
    for device in (None, torch.device("cpu")):  # the PIL path and the device-decode path
        t0 = time.perf_counter()
        with pytest.raises(BadFrame, match=r"frame f1: JPEG has 5\d{3} scans, over the limit of 256") as e:
            decode_frame_image(f, WorkerConfig(), device)
        assert time.perf_counter() - t0 < 0.5
        assert e.value.reason is DeadLetterReason.DECODE_LIMIT
    cfg = WorkerConfig(max_jpeg_scans=6000, decode_budget_s=0.05)  # under the scan limit: the time budget stops it
    t0 = time.perf_counter()
    with pytest.raises(BadFrame, match=r"decoding took over 0.05 s \(the decode time budget\)") as e:
        decode_frame_image(f, cfg)
    assert time.perf_counter() - t0 < 1.0 and e.value.reason is DeadLetterReason.DECODE_LIMIT
    ordinary = jpeg_scan_bomb(side=256, scans=20)  # a few dozen scans is fine
    assert decode_frame_image(
        _frame(encoding=frames_pb2.ENCODING_JPEG, image=ordinary), WorkerConfig()
    ).pixels.shape == (
        256,
        256,
        3,
    )


def test_scans_are_counted_from_segments_not_from_bytes_inside_them() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="JPEG", progressive=True)
    data = buf.getvalue()
    n = jpeg_scans(data)
    assert 2 <= n <= 12
    # a comment segment full of SOS-looking bytes does not count
    com = b"\xff\xfe" + (2 + 4000).to_bytes(2, "big") + b"\xff\xda" * 2000
    assert jpeg_scans(data[:2] + com + data[2:]) == n
    with pytest.raises(BadFrame, match="limit of 1"):
        decode_frame_image(_frame(encoding=frames_pb2.ENCODING_JPEG, image=data), WorkerConfig(max_jpeg_scans=1))


@pytest.mark.parametrize(
    ("seconds", "nanos", "why"),
    [
        (10**12, 0, "outside 0001-01-01..9999-12-31"),
        (-62_135_596_801, 0, "outside 0001-01-01..9999-12-31"),
        (-5, 0, "before 1970"),
        (100, -1, "nanos"),
        (100, 10**9, "nanos"),
    ],
)
def test_impossible_capture_times_are_bad_frames(seconds: int, nanos: int, why: str) -> None:
    f = _frame()
    f.capture_time.seconds, f.capture_time.nanos = seconds, nanos
    with pytest.raises(BadFrame, match=f"frame f1: capture_time .*{why}") as e:
        check_frame(f, WorkerConfig(), time.time())
    assert e.value.reason is DeadLetterReason.INVALID_FIELD
    safe = publishable(f)
    assert not safe.HasField("capture_time") and safe.frame_id == "f1"
    to_json(new_result(safe, 3, "w"))  # the refusal result serialises


def test_frames_from_the_future_are_refused_beyond_the_clock_skew_allowance() -> None:
    now = time.time()
    cfg = WorkerConfig(max_future_s=300)
    f = _frame()
    f.capture_time.FromNanoseconds(int((now + 250) * 1e9))
    check_frame(f, cfg, now)  # within the allowance
    f.capture_time.FromNanoseconds(int((now + 3600) * 1e9))
    with pytest.raises(BadFrame, match=r"capture_time .* is 3600 s in the future \(allowed clock skew 300 s\)"):
        check_frame(f, cfg, now)
    with pytest.raises(ConfigError, match="max_future_s"):
        WorkerConfig(max_future_s=-1)
    check_frame(frames_pb2.Frame(frame_id="no-time"), cfg, now)  # no capture time: nothing to check


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("camera_id", "c" * (1 << 20), r"camera id 'c{64}'\.\.\. \(1048576 chars\) is too long \(max 128 characters\)"),
        ("frame_id", "f" * 300, r"frame id 'f{64}'\.\.\. \(300 chars\) is too long \(max 256 characters\)"),
        ("camera_id", "cam\x00\x1b[2J", r"camera id .* has a control or unprintable character"),
        ("frame_id", "f\nx", r"frame id .* has a control or unprintable character"),
    ],
)
def test_ids_follow_the_id_rules(field: str, value: str, why: str) -> None:
    f = _frame()
    setattr(f, field, value)
    with pytest.raises(BadFrame, match=why) as e:
        check_frame(f, WorkerConfig(), time.time())
    assert e.value.reason is DeadLetterReason.INVALID_FIELD and len(str(e.value)) < 300
    safe = publishable(f)
    assert len(safe.frame_id) <= 256 and len(safe.camera_id) <= 128
    assert all(c.isprintable() for c in safe.frame_id + safe.camera_id)
    assert safe.frame_id and (field != "frame_id" or safe.frame_id.startswith("f"))


def test_attributes_are_bounded() -> None:
    ok = _frame()
    ok.attributes.update({f"k{i}": "v" * 1000 for i in range(8)})
    check_frame(ok, WorkerConfig(), time.time())
    cases = [
        ({f"k{i}": "v" for i in range(70_000)}, r"70000 attributes, over the limit of 64"),
        ({"k": "v" * 2000}, r"attribute 'k' has a 2000-byte value, over the limit of 1024"),
        ({"k" * 300: "v"}, r"attribute 'k{64}'\.\.\. \(300 chars\) has a 300-byte key, over the limit of 256"),
        ({f"k{i}": "v" * 1000 for i in range(40)}, r"attributes total \d+ bytes, over the limit of 16384"),
    ]
    for attrs, why in cases:
        f = _frame()
        f.attributes.update(attrs)
        with pytest.raises(BadFrame, match=why) as e:
            check_frame(f, WorkerConfig(), time.time())
        assert e.value.reason is DeadLetterReason.INVALID_FIELD and len(str(e.value)) < 300
        assert len(publishable(f).attributes) == 0


@pytest.mark.parametrize(
    ("declared", "fmt", "actual"),
    [
        (frames_pb2.ENCODING_PNG, "TIFF", "TIFF"),
        (frames_pb2.ENCODING_JPEG, "PPM", "PPM"),
        (frames_pb2.ENCODING_PNG, "JPEG", "JPEG"),
        (frames_pb2.ENCODING_JPEG, "BMP", "BMP"),
        (frames_pb2.ENCODING_JPEG, "PNG", "PNG"),
    ],
)
def test_the_declared_encoding_is_enforced(declared: int, fmt: str, actual: str) -> None:
    f = _frame(encoding=declared, image=encoded(np.full((8, 8, 3), 7, np.uint8), fmt))
    name = "PNG" if declared == frames_pb2.ENCODING_PNG else "JPEG"
    with pytest.raises(BadFrame, match=f"frame f1: declared {name} but the bytes are {actual}") as e:
        decode_frame_image(f, WorkerConfig())
    assert e.value.reason is DeadLetterReason.BAD_IMAGE
