"""Stage 3, post-processing: scores -> InspectionResult (verdict, regions, heatmap), DefectEvent, evidence.

Pure message building plus the evidence archive on disk; no Kafka client here.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import numpy as np
from PIL import Image

from inspection_pb.v1 import common_pb2, frames_pb2, results_pb2
from monitoring import metrics
from workers.config import ActiveHead

if TYPE_CHECKING:
    from scorer.head import Region, Scores


@dataclass(frozen=True)
class Timing:
    """Per-frame stage times that go into ``InspectionResult.timings``."""

    decode_s: float
    inference_s: float
    queue_wait_s: float
    batch_size: int


def new_result(frame: frames_pb2.Frame, status: int, worker_id: str, reason: str = "") -> results_pb2.InspectionResult:
    """The result every parseable frame gets, with what the frame says about itself."""
    r = results_pb2.InspectionResult(
        frame_id=frame.frame_id,
        camera_id=frame.camera_id,
        product_id=frame.product_id,
        sequence=frame.sequence,
        status=status,
        reason=reason,
        worker_id=worker_id,
        width=frame.width,  # what the frame declares; a scored result has the decoded size instead
        height=frame.height,
    )
    r.attributes.update(frame.attributes)
    r.capture_time.CopyFrom(frame.capture_time)
    r.result_time.GetCurrentTime()
    return r


def heatmap_png(amap: np.ndarray, pixel_threshold: float) -> bytes:
    """8-bit PNG of the map, 255 at 1.5x the pixel threshold (the map's max where there is none)."""
    m = amap.astype(np.float32)
    thr = pixel_threshold if np.isfinite(pixel_threshold) else float(m.max() or 1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(m / (1.5 * thr) * 255, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class FrameScore:
    """One frame's share of a scored batch."""

    image_score: float
    normalized_score: float  # score / image threshold; NaN where the head has none
    is_defect: bool
    amap: np.ndarray  # float16 at the map size
    regions: list[Region]


def per_frame(scores: Scores) -> list[FrameScore]:
    """A batch's :class:`scorer.head.Scores` split into one :class:`FrameScore` per image, in order."""
    return [
        FrameScore(float(s), float(n), bool(d), m, r)
        for s, n, d, m, r in zip(
            scores.image_scores, scores.normalized_scores, scores.is_defect, scores.maps, scores.regions, strict=True
        )
    ]


def scored_result(
    frame: frames_pb2.Frame,
    score: FrameScore,
    active: ActiveHead,
    timing: Timing,
    *,
    worker_id: str,
    hw: tuple[int, int],
    heatmap: bool = False,
) -> results_pb2.InspectionResult:
    """An OK result for one scored frame: scores, verdict, regions in source pixels (of the image ``hw`` =
    (height, width) as decoded), timings."""
    r = new_result(frame, results_pb2.STATUS_OK, worker_id)
    r.height, r.width = hw
    r.head.CopyFrom(active.ref)
    r.image_score = score.image_score
    r.normalized_score = score.normalized_score if np.isfinite(score.normalized_score) else 0.0
    r.image_threshold = float(active.head.image_threshold)
    r.verdict = results_pb2.VERDICT_DEFECT if score.is_defect else results_pb2.VERDICT_OK
    for reg in score.regions:
        r.regions.add(x_min=reg.x_min, y_min=reg.y_min, x_max=reg.x_max, y_max=reg.y_max, area=reg.area, peak=reg.peak)
    r.timings.decode_s = timing.decode_s
    r.timings.inference_s = timing.inference_s
    r.timings.queue_wait_s = timing.queue_wait_s
    r.timings.batch_size = timing.batch_size
    if heatmap:
        r.heatmap_png = heatmap_png(score.amap, active.head.pixel_threshold)
    return r


def defect_event(frame: frames_pb2.Frame, result: results_pb2.InspectionResult) -> results_pb2.DefectEvent:
    """What MES sees of a DEFECT verdict (keyed by product id on the defects topic)."""
    d = results_pb2.DefectEvent(
        event_id=str(uuid.uuid4()),
        frame_id=frame.frame_id,
        camera_id=frame.camera_id,
        product_id=frame.product_id,
        image_score=result.image_score,
        normalized_score=result.normalized_score,
        image_threshold=result.image_threshold,
        width=result.width,
        height=result.height,
        worker_id=result.worker_id,
    )
    d.attributes.update(result.attributes)
    d.capture_time.CopyFrom(frame.capture_time)
    d.result_time.CopyFrom(result.result_time)
    d.head.CopyFrom(result.head)
    d.regions.extend(result.regions)
    return d


def frame_ref(rec: object) -> common_pb2.FrameRef | None:
    """Where a consumed record sits (topic, partition, offset): results name it so the calibrator can read the
    frame back (line calibration, feedback); None for a record that did not come from a broker."""
    topic, partition, offset = (getattr(rec, k, None) for k in ("topic", "partition", "offset"))
    if not isinstance(topic, str) or not isinstance(partition, int) or not isinstance(offset, int):
        return None
    return common_pb2.FrameRef(topic=topic, partition=partition, offset=offset)


def mark_line(
    msg: results_pb2.InspectionResult | results_pb2.DefectEvent, active: ActiveHead, ref: common_pb2.FrameRef | None
) -> None:
    """What the line needs of a scored frame: its place on the frames topic, and whether its verdict is
    provisional (the head version is commissioning)."""
    msg.provisional = bool(active.provisional)
    if ref is not None:
        msg.frame_ref.CopyFrom(ref)


class EvidenceArchive:
    """Defect JPEGs and heatmap overlays in one folder, oldest removed first past ``max_bytes``.

    Events carry URLs into it: ``url_base/<name>`` when the worker serves the folder over HTTP (its metrics
    server, :meth:`http_get`), ``file://`` paths otherwise. A removal is counted
    (``inspection_worker_evidence_deleted_total``) and its URL answers 410 Gone, never a silent 404.

    File names come from :meth:`file_stem`: a readable ASCII prefix of the frame id plus a hash of its exact
    bytes, so distinct ids (``lot-7/part-1`` and ``lot-7_part-1``, or any Unicode id) never share a file.
    """

    _NAME = re.compile(r"[A-Za-z0-9._-]{1,160}")
    _TYPES = {".jpg": "image/jpeg", ".png": "image/png"}
    _REMEMBER = 100_000  # names of removed files kept for 410 answers (bounded)

    def __init__(self, root: str | Path, max_bytes: int, url_base: str | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.url_base = url_base.rstrip("/") if url_base else None
        self._lock = threading.Lock()
        self._deleted: OrderedDict[str, None] = OrderedDict()
        self._files: OrderedDict[str, int] = OrderedDict()  # name -> size, oldest first
        if self.root.is_dir():  # a restarted worker keeps (and caps) what its predecessor archived
            for p in sorted((p for p in self.root.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime):
                self._files[p.name] = p.stat().st_size
        self._total = sum(self._files.values())

    @staticmethod
    def file_stem(frame_id: str) -> str:
        """``<readable prefix>-<16 hex of sha256(frame id as UTF-8)>``: only ``[A-Za-z0-9._-]``, never starting
        with a dot, at most 97 characters; the same id always gives the same stem (a redelivered frame
        overwrites its own evidence)."""
        digest = hashlib.sha256(frame_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        prefix = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in frame_id[:80])
        prefix = prefix.lstrip(".") or "frame"
        return f"{prefix}-{digest}"

    def _uri(self, path: Path) -> str:
        if self.url_base:
            return f"{self.url_base}/{quote(path.name, safe='')}"
        return path.resolve().as_uri()

    def save(
        self, frame_id: str, img: np.ndarray, amap: np.ndarray, pixel_threshold: float, regions: list[Region]
    ) -> common_pb2.Evidence:
        """``img`` is H x W x 3 uint8 (``FrameImage.rgb``)."""
        from scorer.visualize import overlay

        self.root.mkdir(parents=True, exist_ok=True)
        stem = self.file_stem(frame_id)
        jpg, png = self.root / f"{stem}.jpg", self.root / f"{stem}_overlay.png"
        Image.fromarray(img).save(jpg, quality=90)
        overlay(img, amap.astype(np.float32), pixel_threshold=pixel_threshold, regions=regions, verdict="DEFECT").save(
            png
        )
        with self._lock:
            for p in (jpg, png):
                self._total -= self._files.pop(p.name, 0)
                self._files[p.name] = p.stat().st_size
                self._total += self._files[p.name]
                self._deleted.pop(p.name, None)
        self.cap()
        return common_pb2.Evidence(image_uri=self._uri(jpg), overlay_uri=self._uri(png))

    def cap(self) -> None:
        with self._lock:
            while self._files and self._total > self.max_bytes:
                name, size = self._files.popitem(last=False)
                self._total -= size
                (self.root / name).unlink(missing_ok=True)
                self._deleted[name] = None
                if len(self._deleted) > self._REMEMBER:
                    self._deleted.popitem(last=False)
                metrics.EVIDENCE_DELETED.inc()
            metrics.EVIDENCE_BYTES.set(self._total)

    def http_get(self, name: str) -> tuple[int, bytes, str]:
        """``GET <url_base>/<name>`` (``name`` percent-decoded): (status, body, content type). Only names this
        archive holds or held, directly in its folder: no separators, no leading dot, so no traversal."""
        ctype = self._TYPES.get(Path(name).suffix.lower())
        if not self._NAME.fullmatch(name) or name.startswith(".") or ctype is None:
            return 404, b"not an evidence file name\n", "text/plain"
        with self._lock:
            known, gone = name in self._files, name in self._deleted
        if known:
            try:
                return 200, (self.root / name).read_bytes(), ctype
            except OSError:
                gone = True
        if gone:
            return 410, b"removed by the evidence archive's size cap (--evidence-max-bytes)\n", "text/plain"
        return 404, b"no such evidence file on this worker\n", "text/plain"
