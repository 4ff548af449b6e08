"""Stage 1, pre-processing: Kafka record -> checked Frame -> decoded image, in one call, :func:`admit`.

:func:`admit` gives an :class:`Admitted` frame with its :class:`FrameImage`, or a :class:`Refused` record with
its result status and dead-letter reason; :func:`decode_batch` then decodes the batch's deferred device JPEGs
together. Each check's refusal is a :class:`BadFrame` that carries its :class:`DeadLetterReason`, so the
dead-letter topic's header, the result's reason and the metric label come from one place. No Kafka client and
no scoring here.
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from inspection_core.errors import ConfigError, ImageError, InspectionError, cut, quoted
from inspection_core.ids import (
    MAX_CAMERA_ID,
    MAX_FRAME_ID,
    PRODUCT_ID,
    check_free_id,
    check_product_id,
    printable_start,
)
from inspection_core.names import DeadLetterReason
from inspection_core.wire import CONTENT_TYPE, OCTETS, WireError, content_type, decode, header
from inspection_pb.v1 import frames_pb2, results_pb2
from scorer.images import (
    DecodeLimitError,
    check_size,
    jpeg_scans,
    load_within,
    open_checked,
    sniff_format,
    to_rgb_uint8,
)
from workers.config import WorkerConfig

if TYPE_CHECKING:
    import torch


class BadFrame(InspectionError):
    """A message or frame image that cannot be used; the message is the reason shown to people."""

    def __init__(self, message: str, reason: DeadLetterReason = DeadLetterReason.BAD_IMAGE) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DeadLetter:
    """A message for the dead-letter topic: the original key and bytes, and why."""

    key: bytes | None
    value: bytes
    reason: DeadLetterReason
    detail: str
    content_type: bytes = OCTETS.encode()  # the original record's, when it had one


def record_content_type(headers: list | None) -> bytes:
    return header(headers, CONTENT_TYPE) or OCTETS.encode()


def parse_frame(value: bytes | None, headers: list | None = None) -> frames_pb2.Frame:
    """Record bytes -> Frame with a frame id (else BadFrame NOT_A_FRAME).

    Protobuf, or protobuf's JSON mapping when the record's ``content-type`` header says so (a camera host in
    another language may find JSON easier to write); a header naming another message type is refused.
    """
    try:
        frame = decode(value or b"", frames_pb2.Frame, headers)
    except WireError as exc:
        raise BadFrame(f"not a Frame: {exc}", DeadLetterReason.NOT_A_FRAME) from None
    if not frame.frame_id:
        raise BadFrame("not a Frame: no frame_id", DeadLetterReason.NOT_A_FRAME)
    return frame


def check_product(frame: frames_pb2.Frame) -> None:
    """BadFrame (INVALID_PRODUCT) for an id that breaks the rule; the reason repeats only the id's start."""
    try:
        check_product_id(frame.product_id)
    except ConfigError as exc:
        raise BadFrame(str(exc), DeadLetterReason.INVALID_PRODUCT) from None


# What a frame may carry besides its image: attributes are copied into its result and defect event, so they are
# bounded far below any record limit (70 000 of them once made both too large to publish).
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY = 256  # bytes (UTF-8)
MAX_ATTRIBUTE_VALUE = 1024
MAX_ATTRIBUTES_BYTES = 16 << 10
# protobuf's Timestamp range, 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z: JSON cannot show a time outside it
TIMESTAMP_MIN_S = -62_135_596_800
TIMESTAMP_MAX_S = 253_402_300_799


def _capture_time_problem(frame: frames_pb2.Frame, now: float, max_future_s: float) -> str | None:
    if not frame.HasField("capture_time"):
        return None
    s, ns = frame.capture_time.seconds, frame.capture_time.nanos
    if not TIMESTAMP_MIN_S <= s <= TIMESTAMP_MAX_S:
        return f"capture_time {s} s is outside 0001-01-01..9999-12-31"
    if not 0 <= ns <= 999_999_999:
        return f"capture_time nanos {ns} is outside 0..999999999"
    if s < 0:
        return f"capture_time {s} s is before 1970-01-01"
    ahead = s + ns / 1e9 - now
    if ahead > max_future_s:
        return f"capture_time {s} s is {ahead:.0f} s in the future (allowed clock skew {max_future_s:g} s)"
    return None


def _attributes_problem(attrs) -> str | None:  # noqa: ANN001 - a protobuf map<string, string>
    if len(attrs) > MAX_ATTRIBUTES:
        return f"{len(attrs)} attributes, over the limit of {MAX_ATTRIBUTES}"
    total = 0
    for k, v in attrs.items():
        kb, vb = len(k.encode()), len(v.encode())
        if kb > MAX_ATTRIBUTE_KEY:
            return f"attribute {quoted(k)} has a {kb}-byte key, over the limit of {MAX_ATTRIBUTE_KEY}"
        if vb > MAX_ATTRIBUTE_VALUE:
            return f"attribute {quoted(k)} has a {vb}-byte value, over the limit of {MAX_ATTRIBUTE_VALUE}"
        total += kb + vb
    if total > MAX_ATTRIBUTES_BYTES:
        return f"attributes total {total} bytes, over the limit of {MAX_ATTRIBUTES_BYTES}"
    return None


def check_frame(frame: frames_pb2.Frame, cfg: WorkerConfig, now: float) -> None:
    """BadFrame (INVALID_FIELD) for ids, capture time or attributes outside the frame rules.

    Everything here goes into a result, a defect event, record keys or metric labels: an unbounded id, a time
    JSON cannot show or megabytes of attributes would make those unpublishable (or a process die encoding them).
    """
    problems = []
    for what, value, limit in (
        ("frame id", frame.frame_id, MAX_FRAME_ID),
        ("camera id", frame.camera_id, MAX_CAMERA_ID),
    ):
        try:
            check_free_id(value, what=what, limit=limit)
        except ConfigError as exc:
            problems.append(str(exc))
    problems.append(_capture_time_problem(frame, now, cfg.max_future_s))
    problems.append(_attributes_problem(frame.attributes))
    found = [p for p in problems if p]
    if found:
        raise BadFrame(f"frame {cut(frame.frame_id)}: {'; '.join(found)}", DeadLetterReason.INVALID_FIELD)


def publishable(frame: frames_pb2.Frame) -> frames_pb2.Frame:
    """What of a refused frame its BAD_FRAME result may repeat: ids cut to the rules (printable, bounded), the
    capture time and attributes only where they passed; never the image. The result must always publish."""
    safe = frames_pb2.Frame(
        frame_id=printable_start(frame.frame_id, MAX_FRAME_ID) or "?",
        camera_id=printable_start(frame.camera_id, MAX_CAMERA_ID),
        product_id=frame.product_id
        if PRODUCT_ID.fullmatch(frame.product_id)
        else printable_start(frame.product_id, 64),
        sequence=frame.sequence,
        encoding=frame.encoding,
        width=frame.width,
        height=frame.height,
    )
    if _capture_time_problem(frame, float("inf"), 0.0) is None and frame.HasField("capture_time"):
        safe.capture_time.CopyFrom(frame.capture_time)  # (a future time is refused, but JSON can show it)
    if _attributes_problem(frame.attributes) is None:
        safe.attributes.update(frame.attributes)
    return safe


def ts_seconds(ts) -> float:  # noqa: ANN001 - protobuf Timestamp
    return ts.seconds + ts.nanos / 1e9


def is_stale(frame: frames_pb2.Frame, now: float, max_age_s: float) -> bool:
    return frame.HasField("capture_time") and now - ts_seconds(frame.capture_time) > max_age_s


@dataclass(frozen=True, eq=False)
class FrameImage:
    """A frame's image once the codec passed it, with its size ``hw`` = (height, width).

    Decoded RGB ``pixels`` (an H x W x 3 uint8 array; a 3 x H x W uint8 tensor after the device decode), or a
    ``jpeg`` whose header passed the checks, to be decoded with the rest of its batch on ``device``
    (:func:`decode_batch`). The only place that knows the two kinds apart.
    """

    hw: tuple[int, int]
    pixels: np.ndarray | torch.Tensor | None = None
    jpeg: bytes = b""
    device: torch.device | None = None

    @classmethod
    def of(cls, pixels: np.ndarray | torch.Tensor) -> FrameImage:
        if isinstance(pixels, np.ndarray):
            return cls((int(pixels.shape[0]), int(pixels.shape[1])), pixels)
        return cls((int(pixels.shape[1]), int(pixels.shape[2])), pixels)

    @property
    def deferred(self) -> bool:
        return self.pixels is None

    def rgb(self) -> np.ndarray:
        """H x W x 3 uint8 on the host (evidence JPEGs and overlays)."""
        if self.pixels is None:
            raise ValueError("a deferred JPEG has no pixels before decode_batch")
        if isinstance(self.pixels, np.ndarray):
            return self.pixels
        return self.pixels.permute(1, 2, 0).cpu().numpy()


def decode_frame_image(frame: frames_pb2.Frame, cfg: WorkerConfig, device: torch.device | None = None) -> FrameImage:
    """The frame's checked image: decoded on the host, or with ``device`` a checked JPEG deferred to
    :func:`decode_batch` there."""
    if not frame.image:
        raise BadFrame("empty image")
    name = f"frame {cut(frame.frame_id)}"
    enc = frame.encoding
    if enc == frames_pb2.ENCODING_RAW_RGB8:
        w, h = frame.width, frame.height
        try:
            check_size(w, h, name=name, max_pixels=cfg.max_pixels, max_side=cfg.max_side)
        except ImageError as exc:
            raise BadFrame(f"raw {exc}") from None
        if len(frame.image) != w * h * 3:
            raise BadFrame(f"raw frame has {len(frame.image)} bytes, expected {w * h * 3} for {w}x{h}")
        return FrameImage.of(np.frombuffer(frame.image, dtype=np.uint8).reshape(h, w, 3).copy())
    if enc not in (frames_pb2.ENCODING_JPEG, frames_pb2.ENCODING_PNG):
        raise BadFrame(f"unknown encoding {enc}")
    declared = "JPEG" if enc == frames_pb2.ENCODING_JPEG else "PNG"
    actual = sniff_format(frame.image)
    if actual != declared:  # no other format's parser ever sees the bytes
        what = actual or f"no known image format (first bytes {frame.image[:8].hex()})"
        raise BadFrame(f"{name}: declared {declared} but the bytes are {what}")
    if declared == "JPEG" and (scans := jpeg_scans(frame.image)) > cfg.max_jpeg_scans:
        # before any decoder, PIL or the device's: each scan is a pass over every block
        raise BadFrame(
            f"{name}: JPEG has {scans} scans, over the limit of {cfg.max_jpeg_scans}; refused before decoding",
            DeadLetterReason.DECODE_LIMIT,
        )
    try:
        # the calibrator's header check; WorkerConfig's limits default to the same inspection_core.names
        with open_checked(
            io.BytesIO(frame.image),
            name=name,
            max_pixels=cfg.max_pixels,
            max_side=cfg.max_side,
            formats=(declared,),
        ) as im:
            if device is not None and declared == "JPEG" and im.format == "JPEG":
                # header checked: size and scan count within the limits
                return FrameImage((im.height, im.width), jpeg=frame.image, device=device)
            load_within(im, cfg.decode_budget_s, name=name)
            return FrameImage.of(to_rgb_uint8(im, name=name))
    except DecodeLimitError as exc:
        raise BadFrame(str(exc), DeadLetterReason.DECODE_LIMIT) from None
    except ImageError as exc:
        raise BadFrame(str(exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadFrame(f"cannot decode image: {exc}") from None


def decode_jpegs(images: list[FrameImage]) -> list[FrameImage | BadFrame]:
    """Deferred JPEGs decoded in one batched torchvision call per device (nvJPEG on a GPU); a failing batch is
    retried image by image."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[FrameImage | BadFrame | None] = [None] * len(images)
    by_dev: dict[str, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        by_dev[str(im.device)].append(i)
    for dev, idx in by_dev.items():
        data = [torch.frombuffer(bytearray(images[i].jpeg), dtype=torch.uint8) for i in idx]
        try:
            imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)
        except RuntimeError:
            imgs = []
            for t in data:
                try:
                    imgs.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=dev))
                except RuntimeError as exc:
                    imgs.append(BadFrame(f"cannot decode image: {exc}"))
        for i, img in zip(idx, imgs, strict=True):
            out[i] = img if isinstance(img, BadFrame) else FrameImage.of(img)
    return out  # type: ignore[return-value]  # every slot filled above


# -- admission: one call per record ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refused:
    """A record that is not scored.

    ``status`` is its result's (BAD_FRAME, STALE or NO_HEAD; None for bytes that are not a Frame, which get no
    result), about ``frame`` (for BAD_FRAME only what passed the frame rules: the refusal must always publish).
    ``dead_letter`` says why the record goes to the dead-letter topic (None: it does not), ``content_type`` is
    the one its dead letter carries.
    """

    status: int | None
    reason: str
    frame: frames_pb2.Frame | None = None
    dead_letter: DeadLetterReason | None = None
    content_type: bytes = OCTETS.encode()


@dataclass(frozen=True)
class Admitted:
    """A frame that passed every check, its image, and how long the image took to decode."""

    frame: frames_pb2.Frame
    image: FrameImage
    decode_s: float
    content_type: bytes  # its record's, for the dead letter should a deferred decode fail

    def refused(self, exc: BadFrame) -> Refused:
        """BAD_FRAME, dead-lettered: the image failed after admission (the batch's device decode)."""
        return Refused(results_pb2.STATUS_BAD_FRAME, str(exc), publishable(self.frame), exc.reason, self.content_type)


def admit(
    value: bytes | None,
    headers: list | None,
    cfg: WorkerConfig,
    now: float,
    devices: Mapping[str, torch.device | None],
) -> Admitted | Refused:
    """One record -> a frame ready to score, or why not, in the order a newcomer would check: is it a Frame,
    are its ids, times and attributes within the rules, is it still fresh, is there a head for its product
    (``devices``: each product with an active head, and where its JPEGs are decoded, None for the host), and
    is its image usable."""
    try:
        frame = parse_frame(value, headers)
    except BadFrame as exc:
        return Refused(None, str(exc), dead_letter=exc.reason, content_type=record_content_type(headers))
    ctype = header(headers, CONTENT_TYPE) or content_type(frames_pb2.Frame).encode()
    try:
        check_frame(frame, cfg, now)
        check_product(frame)
        if is_stale(frame, now, cfg.max_age_s):
            return Refused(results_pb2.STATUS_STALE, f"older than {cfg.max_age_s:.0f}s", frame)
        if frame.product_id not in devices:
            return Refused(results_pb2.STATUS_NO_HEAD, f"no active head for product {frame.product_id}", frame)
        t0 = time.perf_counter()
        image = decode_frame_image(frame, cfg, devices[frame.product_id])
    except BadFrame as exc:
        return Refused(results_pb2.STATUS_BAD_FRAME, str(exc), publishable(frame), exc.reason, ctype)
    return Admitted(frame, image, time.perf_counter() - t0, ctype)


def decode_batch(batch: list[Admitted]) -> list[Admitted | Refused]:
    """The batch ready to score, in its order: deferred JPEGs decoded in one call per device, each charged an
    equal share of that time; a JPEG that fails to decode is refused alone."""
    out: list[Admitted | Refused] = list(batch)
    waiting = [i for i, a in enumerate(batch) if a.image.deferred]
    if not waiting:
        return out
    t0 = time.perf_counter()
    images = decode_jpegs([batch[i].image for i in waiting])
    per = (time.perf_counter() - t0) / len(waiting)
    for i, img in zip(waiting, images, strict=True):
        a = batch[i]
        out[i] = a.refused(img) if isinstance(img, BadFrame) else replace(a, image=img, decode_s=per)
    return out
