"""Scoring worker: a Kafka consumer-group member with dynamic micro-batching.

Every parseable Frame yields exactly one InspectionResult (OK, NO_HEAD, BAD_FRAME or
STALE); bytes that do not parse as a Frame and undecodable images go to the
dead-letter topic with the reason in headers. Offsets are committed only after the
broker acknowledged the batch's results (at-least-once; results carry the frame id
so consumers can drop duplicates). A batch is formed across partitions up to
``max_batch`` frames or ``max_wait_ms`` after its first frame.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from google.protobuf.message import DecodeError
from PIL import Image

from cff_inspect.kafka import KafkaConfig, KafkaError
from inspection_pb.v1 import common_pb2, frames_pb2, results_pb2
from monitoring import metrics
from scorer.errors import ConfigError, ImageError
from scorer.head import Head, Scores
from scorer.images import to_rgb_uint8
from scorer.names import PRODUCT_ID

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    group_id: str = "cff-inspect-workers"
    max_batch: int = 8
    max_wait_ms: int = 50
    max_age_s: float = 60.0  # older frames get STALE instead of being scored
    max_pixels: int = 40_000_000  # decompression-bomb guard
    max_side: int = 16384
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    heatmap_in_result: bool = False
    evidence_dir: str | None = None
    evidence_max_bytes: int = 1 << 30
    # JPEG decode with torchvision on the scoring device: "auto" = when the head's backbone is on a GPU
    # (decode and resize then never leave it), "always" (also on the CPU), "never" (PIL).
    device_decode: str = "auto"
    # Memory-bank search dtype: "auto" = bfloat16 when the head's backbone is on a GPU (scores within ~0.2 %
    # of fp32, see BENCHMARKS.md), otherwise what the head was saved with.
    bank_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_age_s <= 0:
            raise ConfigError(f"max_age_s must be > 0, got {self.max_age_s}")
        if self.bank_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"bank_dtype must be auto, float32, bfloat16 or float16, got {self.bank_dtype!r}")
        if self.device_decode not in ("auto", "always", "never"):
            raise ConfigError(f"device_decode must be auto, always or never, got {self.device_decode!r}")


@dataclass
class ActiveHead:
    head: Head
    ref: common_pb2.HeadRef


class BadFrame(Exception):
    """A frame whose image cannot be used; the message is the reason."""


def decode_frame_image(
    frame: frames_pb2.Frame, cfg: WorkerConfig, device: torch.device | None = None
) -> np.ndarray | DeferredJpeg:
    """H x W x 3 uint8 array; with ``device``, a checked JPEG is returned for :func:`decode_jpegs` there."""
    if not frame.image:
        raise BadFrame("empty image")
    enc = frame.encoding
    if enc == frames_pb2.ENCODING_RAW_RGB8:
        w, h = frame.width, frame.height
        if w == 0 or h == 0 or w * h > cfg.max_pixels:
            raise BadFrame(f"raw frame size {w}x{h} is zero or too large")
        if len(frame.image) != w * h * 3:
            raise BadFrame(f"raw frame has {len(frame.image)} bytes, expected {w * h * 3} for {w}x{h}")
        return np.frombuffer(frame.image, dtype=np.uint8).reshape(h, w, 3).copy()
    if enc not in (frames_pb2.ENCODING_JPEG, frames_pb2.ENCODING_PNG):
        raise BadFrame(f"unknown encoding {enc}")
    try:
        with Image.open(io.BytesIO(frame.image)) as im:
            w, h = im.size
            if w == 0 or h == 0 or w * h > cfg.max_pixels or max(w, h) > cfg.max_side:
                raise BadFrame(f"image size {w}x{h} is zero or exceeds the limit ({cfg.max_pixels} pixels)")
            if device is not None and enc == frames_pb2.ENCODING_JPEG and im.format == "JPEG":
                return DeferredJpeg(frame.image, device)  # header checked: size within the limits
            im.load()
            return to_rgb_uint8(im, name=f"frame {frame.frame_id}")
    except BadFrame:
        raise
    except (ImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadFrame(f"cannot decode image: {exc}") from None


@dataclass(frozen=True)
class DeferredJpeg:
    """A JPEG whose header passed the checks, to be decoded with the rest of its batch on ``device``."""

    data: bytes
    device: torch.device


def decode_jpegs(jobs: list[DeferredJpeg]) -> list[torch.Tensor | BadFrame]:
    """One batched torchvision decode per device (nvJPEG on a GPU); a failing batch is retried image by image."""
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
    return out  # type: ignore[return-value]


def _ts_seconds(ts) -> float:  # noqa: ANN001 - protobuf Timestamp
    return ts.seconds + ts.nanos / 1e9


class Worker:
    def __init__(self, kafka: KafkaConfig, cfg: WorkerConfig, heads: dict[str, ActiveHead] | None = None) -> None:
        self.kafka = kafka
        self.cfg = cfg
        self.heads: dict[str, ActiveHead] = {p: self._prepared(a) for p, a in (heads or {}).items()}
        self._lock = threading.Lock()
        self.stop_event = threading.Event()
        self.counters: dict[str, int] = defaultdict(int)
        self.consumer = None
        self.producer = None
        self.last_poll_ok: float | None = None  # monotonic time of the last poll that reached the broker
        self._lag_t = 0.0
        self._lag_partitions: set[int] = set()
        metrics.init_zero_series(worker=True)
        for product, active in self.heads.items():
            metrics.set_active_head(product, active.ref.version)

    # -- heads ------------------------------------------------------------------
    def set_head(self, product: str, active: ActiveHead) -> None:
        """Swap takes effect between batches (the batch loop reads the dict once per batch)."""
        active = self._prepared(active)
        with self._lock:
            self.heads[product] = active
        metrics.set_active_head(product, active.ref.version)
        metrics.HEAD_SWAPS.labels(product=product).inc()

    def _prepared(self, active: ActiveHead) -> ActiveHead:
        want = self.cfg.bank_dtype
        bb = active.head.backbone
        if want == "auto":
            want = "bfloat16" if bb is not None and bb.device.type == "cuda" else active.head.options.bank_dtype
        if want == active.head.options.bank_dtype:
            return active
        return ActiveHead(active.head.with_options(bank_dtype=want), active.ref)

    def remove_head(self, product: str) -> None:
        with self._lock:
            self.heads.pop(product, None)
        metrics.set_active_head(product, None)

    # -- processing -------------------------------------------------------------
    def _decode_device(self, active: ActiveHead) -> torch.device | None:
        bb = active.head.backbone
        if bb is None or self.cfg.device_decode == "never":
            return None
        dev = bb.device
        return dev if self.cfg.device_decode == "always" or dev.type == "cuda" else None

    def _result(self, frame: frames_pb2.Frame, status: int, reason: str = "") -> results_pb2.InspectionResult:
        r = results_pb2.InspectionResult(
            frame_id=frame.frame_id,
            camera_id=frame.camera_id,
            product_id=frame.product_id,
            sequence=frame.sequence,
            status=status,
            reason=reason,
            worker_id=self.cfg.worker_id,
        )
        r.capture_time.CopyFrom(frame.capture_time)
        r.result_time.GetCurrentTime()
        return r

    def process(self, records: list) -> tuple[list, list, list]:  # noqa: ANN001 - kafka records
        """Records -> (results, defect events, dead letters); pure except for scoring."""
        results: list[results_pb2.InspectionResult] = []
        defects: list[results_pb2.DefectEvent] = []
        dlq: list[tuple[bytes | None, bytes, str]] = []
        with self._lock:
            heads = dict(self.heads)
        to_score: dict[str, list[tuple[frames_pb2.Frame, np.ndarray, float]]] = defaultdict(list)
        deferred: list = []
        now = time.time()
        for rec in records:
            t_take = time.time()
            try:
                frame = frames_pb2.Frame.FromString(rec.value or b"")
            except DecodeError as exc:
                dlq.append((rec.key, rec.value or b"", f"not a Frame: {exc}"))
                self.counters["dlq_unparseable"] += 1
                continue
            if not frame.frame_id:
                dlq.append((rec.key, rec.value or b"", "not a Frame: no frame_id"))
                self.counters["dlq_unparseable"] += 1
                continue
            if not PRODUCT_ID.fullmatch(frame.product_id):
                self._bad_frame(rec, frame, f"invalid product id {frame.product_id!r}", results, dlq)
                continue
            if frame.HasField("capture_time") and now - _ts_seconds(frame.capture_time) > self.cfg.max_age_s:
                results.append(self._result(frame, results_pb2.STATUS_STALE, f"older than {self.cfg.max_age_s:.0f}s"))
                self.counters["stale"] += 1
                continue
            active = heads.get(frame.product_id)
            if active is None:
                results.append(
                    self._result(frame, results_pb2.STATUS_NO_HEAD, f"no active head for product {frame.product_id}")
                )
                self.counters["no_head"] += 1
                continue
            t0 = time.perf_counter()
            queue_wait = max(0.0, t_take - rec.timestamp / 1000.0) if rec.timestamp and rec.timestamp > 0 else 0.0
            try:
                img = decode_frame_image(frame, self.cfg, self._decode_device(active))
            except BadFrame as exc:
                self._bad_frame(rec, frame, str(exc), results, dlq)
                continue
            if isinstance(img, DeferredJpeg):  # decoded below, all of the batch's JPEGs in one call
                deferred.append((rec, frame, img, queue_wait))
                continue
            to_score[frame.product_id].append((frame, img, time.perf_counter() - t0, queue_wait))  # type: ignore[arg-type]
        if deferred:
            t0 = time.perf_counter()
            decoded = decode_jpegs([d[2] for d in deferred])
            per = (time.perf_counter() - t0) / len(deferred)
            for (rec, frame, _, queue_wait), img in zip(deferred, decoded, strict=True):
                if isinstance(img, BadFrame):
                    self._bad_frame(rec, frame, str(img), results, dlq)
                else:
                    to_score[frame.product_id].append((frame, img, per, queue_wait))  # type: ignore[arg-type]
        for product, items in to_score.items():
            active = heads[product]
            t0 = time.perf_counter()
            scores = active.head.score([it[1] for it in items], batch_size=self.cfg.max_batch)
            inf_s = (time.perf_counter() - t0) / len(items)
            for j, (frame, img, decode_s, queue_wait) in enumerate(items):
                r, d = self._scored(frame, img, scores, j, active, decode_s, inf_s, queue_wait, len(items))
                results.append(r)
                if d is not None:
                    defects.append(d)
        return results, defects, dlq

    def _bad_frame(self, rec, frame: frames_pb2.Frame, reason: str, results: list, dlq: list) -> None:  # noqa: ANN001
        results.append(self._result(frame, results_pb2.STATUS_BAD_FRAME, reason))
        dlq.append((rec.key, rec.value, reason))
        self.counters["bad_frame"] += 1

    def _scored(
        self,
        frame,
        img,
        scores: Scores,
        j: int,
        active: ActiveHead,
        decode_s: float,  # noqa: ANN001
        inf_s: float,
        queue_wait: float,
        batch: int,
    ):  # noqa: ANN202
        r = self._result(frame, results_pb2.STATUS_OK)
        r.head.CopyFrom(active.ref)
        r.image_score = float(scores.image_scores[j])
        r.normalized_score = float(scores.normalized_scores[j]) if np.isfinite(scores.normalized_scores[j]) else 0.0
        r.image_threshold = float(active.head.image_threshold)
        defect = bool(scores.is_defect[j])
        r.verdict = results_pb2.VERDICT_DEFECT if defect else results_pb2.VERDICT_OK
        for reg in scores.regions[j]:
            r.regions.add(
                x_min=reg.x_min, y_min=reg.y_min, x_max=reg.x_max, y_max=reg.y_max, area=reg.area, peak=reg.peak
            )
        r.timings.decode_s = decode_s
        r.timings.inference_s = inf_s
        r.timings.queue_wait_s = queue_wait
        r.timings.batch_size = batch
        if self.cfg.heatmap_in_result:
            m = scores.maps[j].astype(np.float32)
            thr = active.head.pixel_threshold if np.isfinite(active.head.pixel_threshold) else float(m.max() or 1)
            buf = io.BytesIO()
            Image.fromarray(np.clip(m / (1.5 * thr) * 255, 0, 255).astype(np.uint8)).save(buf, format="PNG")
            r.heatmap_png = buf.getvalue()
        self.counters["scored"] += 1
        if not defect:
            return r, None
        self.counters["defects"] += 1
        d = results_pb2.DefectEvent(
            event_id=str(uuid.uuid4()),
            frame_id=frame.frame_id,
            camera_id=frame.camera_id,
            product_id=frame.product_id,
            image_score=r.image_score,
            normalized_score=r.normalized_score,
        )
        d.capture_time.CopyFrom(frame.capture_time)
        d.head.CopyFrom(active.ref)
        d.regions.extend(r.regions)
        if self.cfg.evidence_dir:
            d.evidence.CopyFrom(self._archive(frame, img, scores.maps[j], active, scores.regions[j]))
        return r, d

    def _archive(self, frame, img: np.ndarray, amap: np.ndarray, active: ActiveHead, regions):  # noqa: ANN001, ANN202
        from scorer.visualize import overlay

        root = Path(self.cfg.evidence_dir or ".")
        root.mkdir(parents=True, exist_ok=True)
        if isinstance(img, torch.Tensor):
            img = img.permute(1, 2, 0).cpu().numpy()
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in frame.frame_id)[:120]
        jpg, png = root / f"{safe}.jpg", root / f"{safe}_overlay.png"
        Image.fromarray(img).save(jpg, quality=90)
        overlay(
            img, amap.astype(np.float32), pixel_threshold=active.head.pixel_threshold, regions=regions, verdict="DEFECT"
        ).save(png)
        self._cap_evidence(root)
        return common_pb2.Evidence(image_uri=jpg.resolve().as_uri(), overlay_uri=png.resolve().as_uri())

    def _cap_evidence(self, root: Path) -> None:
        files = sorted((p for p in root.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.cfg.evidence_max_bytes:
            p = files.pop(0)
            total -= p.stat().st_size
            p.unlink(missing_ok=True)

    # -- Kafka loop ------------------------------------------------------------------
    def _collect(self) -> list:
        """Up to max_batch records, waiting at most max_wait_ms after the first one."""
        assert self.consumer is not None
        batch: list = []
        first: float | None = None
        while len(batch) < self.cfg.max_batch and not self.stop_event.is_set():
            if first is None:
                timeout = 200
            else:
                timeout = int(max(0.0, self.cfg.max_wait_ms - (time.monotonic() - first) * 1000))
            polled = self.consumer.poll(timeout_ms=timeout, max_records=self.cfg.max_batch - len(batch))
            self.last_poll_ok = time.monotonic()
            for recs in polled.values():
                batch.extend(recs)
            if batch and first is None:
                first = time.monotonic()
            if first is not None and (time.monotonic() - first) * 1000 >= self.cfg.max_wait_ms:
                break
            if first is None and not polled:
                break
        return batch

    def _publish(self, results: list, defects: list, dlq: list) -> None:
        assert self.producer is not None
        t = self.kafka.topics
        futures = []
        t0 = time.perf_counter()
        for r in results:
            futures.append(self.producer.send(t["results"], key=r.camera_id.encode(), value=r.SerializeToString()))
        for d in defects:
            futures.append(self.producer.send(t["defects"], key=d.product_id.encode(), value=d.SerializeToString()))
        for key, value, reason in dlq:
            futures.append(
                self.producer.send(
                    t["frames.dlq"],
                    key=key,
                    value=value,
                    headers=[("reason", reason.encode()[:1000]), ("worker", self.cfg.worker_id.encode())],
                )
            )
        self.producer.flush()
        for f in futures:
            f.get(timeout=30)  # raises if the broker did not acknowledge
        self.counters["published"] += len(futures)
        self.last_publish_s = time.perf_counter() - t0
        self._observe(results, defects, dlq, self.last_publish_s)

    def _observe(self, results: list, defects: list, dlq: list, publish_s: float) -> None:
        """Metrics for an acknowledged batch: what was published is what is counted."""
        now = time.time()
        for r in results:
            cam, prod = metrics.bounded("camera", r.camera_id), metrics.bounded("product", r.product_id)
            status = metrics.status_label(results_pb2.Status.Name(r.status))
            metrics.FRAMES_SCORED.labels(camera=cam, product=prod, status=status).inc()
            if r.status != results_pb2.STATUS_OK:
                continue
            if r.HasField("capture_time"):
                e2e = now - _ts_seconds(r.capture_time)
                metrics.E2E_LATENCY.labels(camera=cam, product=prod).observe(max(0.0, e2e))
            metrics.STAGE_LATENCY.labels(stage="queue_wait").observe(r.timings.queue_wait_s)
            metrics.STAGE_LATENCY.labels(stage="decode").observe(r.timings.decode_s)
            metrics.STAGE_LATENCY.labels(stage="inference").observe(r.timings.inference_s)
            metrics.STAGE_LATENCY.labels(stage="publish").observe(publish_s)
            if r.image_threshold > 0 and np.isfinite(r.image_threshold):
                metrics.ANOMALY_SCORE.labels(product=prod).observe(r.normalized_score)
        for d in defects:
            metrics.DEFECTS.labels(product=metrics.bounded("product", d.product_id)).inc()
        for _key, _value, reason in dlq:
            metrics.DEAD_LETTERED.labels(reason=metrics.dead_letter_reason(reason)).inc()

    def _update_lag(self, force: bool = False) -> None:
        """Lag per assigned partition from the fetch high-water mark (Tansu's end_offsets is not reliable)."""
        if self.consumer is None or (not force and time.monotonic() - self._lag_t < 2.0):
            return
        self._lag_t = time.monotonic()
        current: set[int] = set()
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            if hw is None:
                continue
            try:
                pos = self.consumer.position(tp, timeout_ms=1000)
            except Exception:  # noqa: BLE001 - mid-rebalance: try again next time
                continue
            if pos is None:
                continue
            metrics.CONSUMER_LAG.labels(partition=str(tp.partition)).set(max(0, hw - pos))
            current.add(tp.partition)
        for p in self._lag_partitions - current:  # revoked by a rebalance: not ours to report
            try:
                metrics.CONSUMER_LAG.remove(str(p))
            except KeyError:
                pass
        self._lag_partitions = current

    def run(self, *, ready: threading.Event | None = None) -> None:
        from kafka import OffsetAndMetadata

        self.consumer = self.kafka.consumer(self.kafka.topics["frames"], group_id=self.cfg.group_id)
        self.producer = self.kafka.producer()
        log.info(
            "worker %s joined group %s with heads for %s",
            self.cfg.worker_id,
            self.cfg.group_id,
            ", ".join(sorted(self.heads)) or "no product",
        )
        if ready is not None:
            ready.set()
        try:
            while not self.stop_event.is_set():
                records = self._collect()
                self._update_lag(force=bool(records))  # local figures: cheap after every batch
                if not records:
                    continue
                metrics.BATCH_SIZE.observe(len(records))
                results, defects, dlq = self.process(records)
                self._publish(results, defects, dlq)
                offsets: dict = {}
                for rec in records:
                    from kafka import TopicPartition

                    tp = TopicPartition(rec.topic, rec.partition)
                    if tp not in offsets or rec.offset + 1 > offsets[tp].offset:
                        offsets[tp] = OffsetAndMetadata(rec.offset + 1, "", -1)
                self.consumer.commit(offsets)
                self.counters["batches"] += 1
                self.counters["frames"] += len(records)
        except KafkaError:
            raise
        finally:
            log.info("worker %s stopping: %s", self.cfg.worker_id, dict(self.counters))
            try:
                self.producer.flush(10)
                self.producer.close(10)
            finally:
                self.consumer.close()


def head_ref(product: str, head: Head, sha256: str = "", version: int | None = None) -> common_pb2.HeadRef:
    v = int(version if version is not None else (head.meta.get("version") or 1))
    return common_pb2.HeadRef(product_id=product, head_id=f"{product}-v{v}", version=v, sha256=sha256)
