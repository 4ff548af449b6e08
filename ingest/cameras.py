"""Camera sources -> Kafka frames topic.

Sources: image folders, video files, RTSP/HTTP URLs and USB device indices (the
last three through OpenCV). Several cameras per process, from a TOML camera list.
A camera that drops is reopened with exponential backoff; when the broker is slow
or unreachable, frames wait in a bounded buffer that drops the oldest frame (and
counts it) — never unbounded memory, never a silent stall.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
import tomllib
import uuid
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from inspection_core.env import parse_bool
from inspection_core.errors import ConfigError, InspectionError, cut
from inspection_core.ids import check_product_id
from inspection_core.kafka import KafkaConfig, Reconnector
from inspection_core.wire import encode
from inspection_pb.v1 import frames_pb2
from monitoring import metrics
from scorer.images import IMAGE_SUFFIXES, list_images, load_image

log = logging.getLogger(__name__)


class CameraError(InspectionError):
    """A camera source cannot be opened or read."""


@dataclass(frozen=True)
class CameraConfig:
    id: str
    product: str
    source: str
    fps: float = 2.0
    resize: tuple[int, int] | None = None  # (width, height)
    jpeg_quality: int = 90
    loop: bool = True  # folders and video files start over at the end
    # copied into every Frame and from there into its result and defect event (line, station, shift, ...)
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", check_attributes(self.attributes, where=f"camera {self.id}"))
        if not self.id or len(self.id) > 128:
            raise ConfigError(f"camera id {self.id!r} must be 1-128 characters")
        check_product_id(self.product)
        if isinstance(self.fps, bool) or not isinstance(self.fps, int | float) or not 0 < self.fps <= 1000:
            raise ConfigError(f"camera {self.id}: fps must be a number in (0, 1000], got {self.fps!r}")
        if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int):
            raise ConfigError(f"camera {self.id}: jpeg_quality must be an integer 1..100, got {self.jpeg_quality!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"camera {self.id}: jpeg_quality must be 1..100, got {self.jpeg_quality}")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 8):
            raise ConfigError(f"camera {self.id}: resize must be [width, height] >= 8, got {self.resize}")


_ATTR_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_VALUE = 256


def check_attributes(attrs: object, *, where: str) -> dict[str, str]:
    """Frame attributes: at most 32, keys ``[A-Za-z][A-Za-z0-9_.-]{0,63}``, string values up to 256 characters
    (they travel in every frame, result and defect event, so they stay small)."""
    if not isinstance(attrs, Mapping):
        raise ConfigError(f'{where}: attributes must be a table of KEY = "value", got {type(attrs).__name__}')
    if len(attrs) > MAX_ATTRIBUTES:
        raise ConfigError(f"{where}: {len(attrs)} attributes, at most {MAX_ATTRIBUTES}")
    out = {}
    for k, v in attrs.items():
        if not isinstance(k, str) or not _ATTR_KEY.fullmatch(k):
            raise ConfigError(f"{where}: attribute name {cut(str(k))!r} must match [A-Za-z][A-Za-z0-9_.-]{{0,63}}")
        if not isinstance(v, str):
            raise ConfigError(f"{where}: attribute {k} must be a string, got {type(v).__name__} ({cut(str(v))})")
        if len(v) > MAX_ATTRIBUTE_VALUE:
            raise ConfigError(f"{where}: attribute {k} is {len(v)} characters, at most {MAX_ATTRIBUTE_VALUE}")
        out[k] = v
    return out


def parse_attribute(spec: str, *, where: str = "--attribute") -> tuple[str, str]:
    """``line=L1`` -> ("line", "L1")."""
    k, eq, v = spec.partition("=")
    if not eq:
        raise ConfigError(f"{where} expects KEY=VALUE, got {cut(spec)!r}")
    return next(iter(check_attributes({k: v}, where=where).items()))


def with_attributes(cams: list[CameraConfig], common: Mapping[str, str]) -> list[CameraConfig]:
    """Attributes every camera gets (``--attribute``); a camera's own value for the same key wins."""
    if not common:
        return cams
    return [replace(c, attributes={**common, **c.attributes}) for c in cams]


def load_cameras(path: str | Path) -> list[CameraConfig]:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read camera list ({exc})") from None
    cams = []
    for i, c in enumerate(data.get("camera", [])):
        try:
            if "resize" in c:
                c["resize"] = tuple(c["resize"])
            cams.append(CameraConfig(**c))
        except TypeError as exc:  # an unknown or missing key
            raise ConfigError(f"{p}: camera {i}: {exc}".replace("CameraConfig.__init__() ", "")) from None
    if not cams:
        raise ConfigError(f"{p}: no [[camera]] entries")
    ids = [c.id for c in cams]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{p}: duplicate camera ids")
    return cams


def parse_camera(spec: str) -> CameraConfig:
    """``ID=PRODUCT@SOURCE[,fps=N][,loop=0|1]`` (the ``--camera`` option) -> CameraConfig."""
    head, _, opts = spec.partition(",")
    if "=" not in head or "@" not in head:
        raise ConfigError(f"--camera expects ID=PRODUCT@SOURCE[,fps=N], got {spec!r}")
    cid, rest = head.split("=", 1)
    product, source = rest.split("@", 1)
    kw: dict = {}
    for kv in filter(None, opts.split(",")):
        k, _, v = kv.partition("=")
        if k == "fps":
            try:
                kw["fps"] = float(v)
            except ValueError:
                raise ConfigError(f"--camera {cid}: fps must be a number, got {v!r}") from None
        elif k == "loop":
            kw["loop"] = parse_bool(v, name=f"--camera {cid}: loop")
        elif k.startswith("attr."):
            key, val = parse_attribute(f"{k[5:]}={v}", where=f"--camera {cid}")
            kw.setdefault("attributes", {})[key] = val
        else:
            raise ConfigError(f"--camera option {cut(k)!r} unknown (fps, loop, attr.KEY)")
    return CameraConfig(id=cid, product=product, source=source, **kw)


def is_stream(source: str) -> bool:
    """RTSP/HTTP URLs and USB device indices: sources that may come and go, so they are retried, never refused."""
    return "://" in source or source.isdigit()


def check_source(cam: CameraConfig) -> None:
    """ConfigError (exit 2) at start when a folder or file source does not exist or a folder holds no images: a
    mistyped path never turns into endless reconnect warnings. Streams are left to the reconnect loop."""
    if is_stream(cam.source):
        return
    p = Path(cam.source)
    if p.is_dir():
        if not list_images(p):
            raise ConfigError(
                f"camera {cam.id}: no images ({', '.join(IMAGE_SUFFIXES)}) in folder {cut(cam.source, 256)}"
            )
    elif not p.is_file():
        raise ConfigError(
            f"camera {cam.id}: source {cut(cam.source, 256)!r} does not exist (expected an image folder, a video file, "
            "an rtsp:// or http:// URL, or a USB device index)"
        )


def _encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def open_source(cam: CameraConfig) -> Iterator[np.ndarray]:
    """RGB frames from the camera's source; raises CameraError when it cannot be opened or ends."""
    src = cam.source
    p = Path(src)
    if p.is_dir():
        files = list_images(p)
        if not files:
            raise CameraError(f"camera {cam.id}: no images ({', '.join(IMAGE_SUFFIXES)}) in {p}")
        while True:
            for f in files:
                yield load_image(f)
            if not cam.loop:
                return
    import cv2

    target: str | int = int(src) if src.isdigit() else src
    cap = cv2.VideoCapture(target)
    if not cap.isOpened():
        raise CameraError(f"camera {cam.id}: cannot open source {src!r}")
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                if p.is_file() and cam.loop:
                    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    ok, bgr = cap.read()
                if not ok:
                    raise CameraError(f"camera {cam.id}: source {src!r} stopped delivering frames")
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


@dataclass
class IngestStats:
    captured: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    published: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    dropped: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    reconnects: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    camera_up: dict[str, bool] = field(default_factory=dict)

    # Each count also goes to the Prometheus metric of the same meaning (monitoring.metrics).
    def capture(self, camera: str) -> None:
        self.captured[camera] += 1
        metrics.FRAMES_CAPTURED.labels(camera=camera).inc()

    def publish(self, camera: str) -> None:
        self.published[camera] += 1
        metrics.FRAMES_PUBLISHED.labels(camera=camera).inc()

    def drop(self, camera: str, reason: str) -> None:
        self.dropped[(camera, reason)] += 1
        metrics.FRAMES_DROPPED.labels(camera=camera, reason=reason).inc()

    def up(self, camera: str, is_up: bool) -> None:
        self.camera_up[camera] = is_up
        metrics.CAMERA_UP.labels(camera=camera).set(1 if is_up else 0)

    def reconnect(self, camera: str) -> None:
        self.reconnects[camera] += 1
        metrics.CAMERA_RECONNECTS.labels(camera=camera).inc()


class Ingest:
    """Camera threads feed one bounded buffer; one sender thread publishes to Kafka."""

    def __init__(
        self,
        kafka: KafkaConfig,
        cameras: list[CameraConfig],
        *,
        buffer_size: int = 64,
        max_frames: int | None = None,
        backoff_max_s: float = 30.0,
        publish_timeout_s: float = 30.0,
    ) -> None:
        if buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {buffer_size}")
        self.kafka = kafka
        self.cameras = cameras
        self.buffer: deque[frames_pb2.Frame] = deque()
        self.buffer_size = buffer_size
        self.max_frames = max_frames
        self.backoff_max_s = backoff_max_s
        self.publish_timeout_s = publish_timeout_s
        self.stats = IngestStats()
        metrics.init_zero_series(cameras=tuple(c.id for c in cameras))
        self.stop_event = threading.Event()
        self._reconnector = Reconnector(
            kafka, "ingest", self.stop_event, metrics.INGEST_PUBLISH_FAILURES.inc, max_delay_s=self.backoff_max_s
        )
        self._cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._seq: dict[str, int] = defaultdict(int)

    def _enqueue(self, frame: frames_pb2.Frame) -> None:
        with self._cv:
            if len(self.buffer) >= self.buffer_size:
                old = self.buffer.popleft()
                self.stats.drop(old.camera_id, "buffer_full")
            self.buffer.append(frame)
            metrics.INGEST_BUFFER.set(len(self.buffer))
            self._cv.notify()

    def _make_frame(self, cam: CameraConfig, img: np.ndarray) -> frames_pb2.Frame:
        if cam.resize is not None:
            img = np.asarray(Image.fromarray(img).resize(cam.resize, Image.BILINEAR))
        self._seq[cam.id] += 1
        f = frames_pb2.Frame(
            frame_id=f"{cam.id}-{uuid.uuid4().hex}",
            camera_id=cam.id,
            product_id=cam.product,
            sequence=self._seq[cam.id],
            encoding=frames_pb2.ENCODING_JPEG,
            image=_encode_jpeg(img, cam.jpeg_quality),
            width=img.shape[1],
            height=img.shape[0],
        )
        f.attributes.update(cam.attributes)
        f.capture_time.GetCurrentTime()
        return f

    def _camera_loop(self, cam: CameraConfig) -> None:
        backoff = 0.5
        period = 1.0 / cam.fps
        while not self.stop_event.is_set():
            try:
                frames = open_source(cam)
                self.stats.up(cam.id, True)
                next_t = time.monotonic()
                for img in frames:
                    if self.stop_event.is_set():
                        return
                    if self.max_frames is not None and self.stats.captured[cam.id] >= self.max_frames:
                        return
                    self.stats.capture(cam.id)
                    self._enqueue(self._make_frame(cam, img))
                    backoff = 0.5
                    next_t += period
                    delay = next_t - time.monotonic()
                    if delay > 0:
                        self.stop_event.wait(delay)
                    else:
                        next_t = time.monotonic()
                return  # a non-looping source ended
            except (CameraError, InspectionError, OSError) as exc:
                self.stats.up(cam.id, False)
                self.stats.reconnect(cam.id)
                log.warning("%s; retrying in %.1fs", exc, backoff)
                self.stop_event.wait(backoff)
                backoff = min(self.backoff_max_s, backoff * 2)

    def _sender(self) -> None:
        """Publish the buffer's oldest frame until acknowledged; on failure keep it, drop the producer and back off.

        A fresh producer per failure matters: after a broker restart the old client's idempotent session
        fails for good (``InitProducerIdResponse UnknownError`` forever), and a broker that lost its topics
        gets them back from :func:`ensure_topics`. ``publish_error`` (readiness) says why while it fails.
        """
        producer = None
        topic = self.kafka.topic("frames")
        rc = self._reconnector
        while True:
            with self._cv:
                while not self.buffer and not (self.stop_event.is_set() or self._cameras_done()):
                    self._cv.wait(0.2)
                if not self.buffer and (self.stop_event.is_set() or self._cameras_done()):
                    break
                frame = self.buffer[0]
            try:
                if producer is None:
                    producer = rc.producer()
                value, headers = encode(frame)
                producer.send(topic, key=frame.camera_id.encode(), value=value, headers=headers).get(
                    timeout=self.publish_timeout_s
                )
            except Exception as exc:  # broker slow or down: keep the frame, back off, buffer stays bounded
                producer, dead = None, producer
                if not rc.failed(exc, dead):
                    break
                continue
            rc.succeeded()
            with self._cv:
                if self.buffer and self.buffer[0] is frame:
                    self.buffer.popleft()
                self.stats.publish(frame.camera_id)
                metrics.INGEST_BUFFER.set(len(self.buffer))
        if producer is not None:
            try:
                producer.flush(10)
                producer.close(10)
            except Exception as exc:  # noqa: BLE001 - shutting down: say so, do not hide the summary
                log.warning("closing the producer failed: %s", exc)
        self._drop_remaining()

    @property
    def publish_error(self) -> str | None:
        """Why publishing fails, while it does (readiness)."""
        return self._reconnector.error

    def _drop_remaining(self) -> None:
        with self._cv:
            while self.buffer:
                self.stats.drop(self.buffer.popleft().camera_id, "shutdown")
            metrics.INGEST_BUFFER.set(0)

    def _cameras_done(self) -> bool:
        cams = [t for t in self._threads if t.name.startswith("camera-")]
        return bool(cams) and not any(t.is_alive() for t in cams)

    def start(self) -> Ingest:
        for cam in self.cameras:
            t = threading.Thread(target=self._camera_loop, args=(cam,), name=f"camera-{cam.id}", daemon=True)
            self._threads.append(t)
            t.start()
        s = threading.Thread(target=self._sender, name="ingest-sender", daemon=True)
        self._threads.append(s)
        s.start()
        return self

    @property
    def running(self) -> bool:
        """True while the sender publishes (it ends when every camera is done or on stop)."""
        return bool(self._threads) and self._threads[-1].is_alive()

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout)

    def stop(self) -> None:
        self.stop_event.set()
        with self._cv:
            self._cv.notify_all()
        self.join(15)
        self._drop_remaining()  # the sender may still be blocked on an unreachable broker
