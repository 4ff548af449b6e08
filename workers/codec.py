"""Stage 1, pre-processing: Kafka record -> checked Frame -> decoded image.

Every refusal is a :class:`BadFrame` that carries its :class:`DeadLetterReason`, so the dead-letter
topic's header, the result's reason and the metric label come from one place. No Kafka client and no
scoring here.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from inspection_core.errors import ConfigError, ImageError, InspectionError, cut
from inspection_core.ids import check_product_id
from inspection_core.names import DeadLetterReason
from inspection_core.wire import CONTENT_TYPE, OCTETS, WireError, decode, header
from inspection_pb.v1 import frames_pb2
from scorer.images import check_size, open_checked, to_rgb_uint8
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


def ts_seconds(ts) -> float:  # noqa: ANN001 - protobuf Timestamp
    return ts.seconds + ts.nanos / 1e9


def is_stale(frame: frames_pb2.Frame, now: float, max_age_s: float) -> bool:
    return frame.HasField("capture_time") and now - ts_seconds(frame.capture_time) > max_age_s


@dataclass(frozen=True)
class DeferredJpeg:
    """A JPEG whose header passed the checks, to be decoded with the rest of its batch on ``device``."""

    data: bytes
    device: torch.device


def decode_frame_image(
    frame: frames_pb2.Frame, cfg: WorkerConfig, device: torch.device | None = None
) -> np.ndarray | DeferredJpeg:
    """H x W x 3 uint8 array; with ``device``, a checked JPEG is returned for :func:`decode_jpegs` there."""
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
        return np.frombuffer(frame.image, dtype=np.uint8).reshape(h, w, 3).copy()
    if enc not in (frames_pb2.ENCODING_JPEG, frames_pb2.ENCODING_PNG):
        raise BadFrame(f"unknown encoding {enc}")
    try:
        # the calibrator's header check; WorkerConfig's limits default to the same inspection_core.names
        with open_checked(io.BytesIO(frame.image), name=name, max_pixels=cfg.max_pixels, max_side=cfg.max_side) as im:
            if device is not None and enc == frames_pb2.ENCODING_JPEG and im.format == "JPEG":
                return DeferredJpeg(frame.image, device)  # header checked: size within the limits
            im.load()
            return to_rgb_uint8(im, name=name)
    except ImageError as exc:
        raise BadFrame(str(exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadFrame(f"cannot decode image: {exc}") from None


def decode_jpegs(jobs: list[DeferredJpeg]) -> list[torch.Tensor | BadFrame]:
    """One batched torchvision decode per device (nvJPEG on a GPU); a failing batch is retried image by image."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | BadFrame | None] = [None] * len(jobs)
    by_dev: dict[str, list[int]] = defaultdict(list)
    for i, j in enumerate(jobs):
        by_dev[str(j.device)].append(i)
    for dev, idx in by_dev.items():
        data = [torch.frombuffer(bytearray(jobs[i].data), dtype=torch.uint8) for i in idx]
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
            out[i] = img
    return out  # type: ignore[return-value]  # every slot filled above
