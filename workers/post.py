"""Stage 3, post-processing: scores -> InspectionResult (verdict, regions, heatmap), DefectEvent, evidence.

Pure message building plus the evidence archive on disk; no Kafka client here.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from inspection_pb.v1 import common_pb2, frames_pb2, results_pb2
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
    )
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


def scored_result(
    frame: frames_pb2.Frame,
    scores: Scores,
    j: int,
    active: ActiveHead,
    timing: Timing,
    *,
    worker_id: str,
    heatmap: bool = False,
) -> results_pb2.InspectionResult:
    """An OK result for image ``j`` of a scored batch: scores, verdict, regions in source pixels, timings."""
    r = new_result(frame, results_pb2.STATUS_OK, worker_id)
    r.head.CopyFrom(active.ref)
    r.image_score = float(scores.image_scores[j])
    r.normalized_score = float(scores.normalized_scores[j]) if np.isfinite(scores.normalized_scores[j]) else 0.0
    r.image_threshold = float(active.head.image_threshold)
    r.verdict = results_pb2.VERDICT_DEFECT if bool(scores.is_defect[j]) else results_pb2.VERDICT_OK
    for reg in scores.regions[j]:
        r.regions.add(x_min=reg.x_min, y_min=reg.y_min, x_max=reg.x_max, y_max=reg.y_max, area=reg.area, peak=reg.peak)
    r.timings.decode_s = timing.decode_s
    r.timings.inference_s = timing.inference_s
    r.timings.queue_wait_s = timing.queue_wait_s
    r.timings.batch_size = timing.batch_size
    if heatmap:
        r.heatmap_png = heatmap_png(scores.maps[j], active.head.pixel_threshold)
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
    )
    d.capture_time.CopyFrom(frame.capture_time)
    d.head.CopyFrom(result.head)
    d.regions.extend(result.regions)
    return d


class EvidenceArchive:
    """Defect JPEGs and heatmap overlays in one folder, oldest removed first past ``max_bytes``."""

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def save(
        self, frame_id: str, img: object, amap: np.ndarray, pixel_threshold: float, regions: list[Region]
    ) -> common_pb2.Evidence:
        """``img`` is H x W x 3 uint8, or a 3 x H x W tensor from the device decode."""
        from scorer.visualize import overlay

        self.root.mkdir(parents=True, exist_ok=True)
        if not isinstance(img, np.ndarray):  # a torch tensor: torch is loaded already
            img = img.permute(1, 2, 0).cpu().numpy()  # type: ignore[attr-defined]
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in frame_id)[:120]
        jpg, png = self.root / f"{safe}.jpg", self.root / f"{safe}_overlay.png"
        Image.fromarray(img).save(jpg, quality=90)
        overlay(img, amap.astype(np.float32), pixel_threshold=pixel_threshold, regions=regions, verdict="DEFECT").save(
            png
        )
        self.cap()
        return common_pb2.Evidence(image_uri=jpg.resolve().as_uri(), overlay_uri=png.resolve().as_uri())

    def cap(self) -> None:
        files = sorted((p for p in self.root.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.max_bytes:
            p = files.pop(0)
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
