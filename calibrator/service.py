"""The calibrator gRPC service: fit, store, serve and activate per-product heads.

FitHead takes a client stream (header, then image chunks) and answers with a
server stream of progress ending with the head's info. A cancelled or expired
call stops the fit at the next progress step and stores nothing. Standard health
service and reflection are registered.

Hostile or idle clients never take the whole server (``calibrator.config``): FitHead
streams hold one of a few slots and are refused at once when none is free, an upload
that stalls is aborted, references are reduced to about the backbone's input as they
arrive, and the gRPC threads FitHead may not take stay free for ListHeads,
DownloadHead and health, which ``/readyz`` checks for real.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import math
import queue
import socket
import threading
import time
from concurrent import futures
from dataclasses import replace

import grpc
import numpy as np
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from calibrator.config import DEFAULT_LIMITS, ServiceLimits, refuse_unsigned
from calibrator.line import LineManager, LineSettings, line_info, manual_meta
from calibrator.security import ServerSecurity
from calibrator.store import HeadStore, StoreError, StoreWriteError, manifest_ref
from inspection_core.errors import ConfigError, HeadError, ImageError, cut, quoted
from inspection_core.ids import check_product_id
from inspection_core.names import CHUNK_BYTES, MAX_SHOTS, MAX_SHOTS_CEILING, METHODS
from inspection_core.trust import HeadSigner
from inspection_core.wire import finite
from inspection_pb.v1 import calibrator_pb2, calibrator_pb2_grpc
from monitoring import metrics
from scorer.artifact import load_head
from scorer.backbones.base import Backbone
from scorer.fit import FitOptions, fit_head
from scorer.images import decode_reduced, open_checked
from scorer.progress import ProgressEvent

log = logging.getLogger(__name__)
MAX_IMAGE_BYTES = 64 << 20


class _Cancelled(Exception):
    pass


_END = object()  # the client closed its side of a FitHead stream


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every call by method and final status code (outermost, so refused calls count too), and the calls
    running now (``busy``: each holds a gRPC handler thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: dict[str, int] = {}

    def busy(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self._busy.items() if v}

    def _count(self, rpc: str, n: int) -> None:
        with self._lock:
            self._busy[rpc] = self._busy.get(rpc, 0) + n

    def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201
        handler = continuation(details)
        if handler is None:
            return None
        rpc = details.method.rsplit("/", 1)[-1]

        def record(ctx, default: grpc.StatusCode) -> None:  # noqa: ANN001
            code = ctx.code() or default
            metrics.CALIBRATOR_CALLS.labels(rpc=rpc, code=code.name).inc()

        def unary(behavior):  # noqa: ANN001, ANN202
            def run(req, ctx):  # noqa: ANN001, ANN202
                self._count(rpc, 1)
                try:
                    out = behavior(req, ctx)
                except BaseException:
                    record(ctx, grpc.StatusCode.UNKNOWN)
                    raise
                finally:
                    self._count(rpc, -1)
                record(ctx, grpc.StatusCode.OK)
                return out

            return run

        def streaming(behavior):  # noqa: ANN001, ANN202
            def run(req, ctx):  # noqa: ANN001, ANN202
                self._count(rpc, 1)
                try:
                    yield from behavior(req, ctx)
                except GeneratorExit:
                    record(ctx, grpc.StatusCode.CANCELLED)
                    raise
                except BaseException:
                    record(ctx, grpc.StatusCode.UNKNOWN)
                    raise
                finally:
                    self._count(rpc, -1)
                record(ctx, grpc.StatusCode.OK)

            return run

        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kw)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kw)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kw)
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)


def _stated_size(data: bytes, name: str) -> tuple[int, int]:
    """Width and height from the header (ImageError past the per-image limits); (0, 0) for data that is not an
    image, which the decoder then reports."""
    try:
        with open_checked(io.BytesIO(data), name=name) as im:
            return im.size
    except ImageError:
        raise
    except Exception:  # noqa: BLE001 - not an image: decode_reduced names the problem
        return 0, 0


def head_info(store: HeadStore, product: str, version: int = 0) -> calibrator_pb2.HeadInfo:
    m = store.info(product, version)
    info = calibrator_pb2.HeadInfo(
        head=manifest_ref(product, m),
        backbone=m["backbone"],
        weights_sha256=m["weights_sha256"],
        method=m["method"],
        shots=m.get("shots") or 0,
        image_threshold=finite(m.get("image_threshold"), 0.0),
        pixel_threshold=finite(m.get("pixel_threshold"), 0.0),
        active=bool(m["active"]),
        reference_sha256=m.get("reference_sha256") or [],
    )
    guard = (m.get("meta") or {}).get("guard") or {}
    info.requested_method = str(guard.get("requested") or m["method"])
    info.selection = str(guard.get("reason") or "")
    line_info(info, store, product, m)
    for k, v in (m.get("fit_metrics") or {}).items():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            info.fit_metrics[k] = float(v)
    if m.get("created"):
        ts = timestamp_pb2.Timestamp()
        try:
            ts.FromJsonString(m["created"].replace("+00:00", "Z"))
            info.created_time.CopyFrom(ts)
        except ValueError:
            pass
    return info


class CalibratorService(calibrator_pb2_grpc.CalibratorServicer):
    def __init__(
        self,
        store: HeadStore,
        backbone: Backbone,
        *,
        base_head_path: str | None = None,
        announcer=None,  # noqa: ANN001 - calibrator.announce.Announcer
        max_shots: int = MAX_SHOTS,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        fit_precision: str = "fp32",
        limits: ServiceLimits = DEFAULT_LIMITS,
    ) -> None:
        self.fit_precision = fit_precision  # fits in fp32 by default: bf16 fits shifted thresholds (BENCHMARKS.md)
        self.announcer = announcer
        self.max_shots = max_shots
        self.max_image_bytes = max_image_bytes
        self.store = store
        self.backbone = backbone
        self.base_head = load_head(base_head_path, backbone) if base_head_path else None
        self.limits = limits
        self.line = None  # calibrator.line.LineManager, when the line calibrates heads (serve with kafka)
        self._fit_slots = threading.BoundedSemaphore(limits.fit_slots)  # FitHead streams admitted at all
        self._fits = threading.BoundedSemaphore(limits.max_fits)  # of those, fits computing: bounds their memory
        self._streams = {"uploading": 0, "waiting": 0, "fitting": 0}
        self._streams_lock = threading.Lock()
        self.ref_side = 2 * backbone.image_size  # references keep twice the input size: the resize stays as fine

    def _stage(self, old: str | None, new: str | None) -> None:
        with self._streams_lock:
            if old:
                self._streams[old] -= 1
            if new:
                self._streams[new] += 1
            for k, v in self._streams.items():
                metrics.CALIBRATOR_FIT_STREAMS.labels(state=k).set(v)

    def fit_streams(self) -> dict[str, int]:
        """FitHead streams now, by state (uploading, waiting for a fit, fitting)."""
        with self._streams_lock:
            return dict(self._streams)

    # -- helpers ----------------------------------------------------------------
    def _announce(self, product: str) -> None:
        if self.announcer is not None:
            try:
                self.announcer.announce(self.store, product)
            except Exception as exc:  # the store change stands; announcements are repeated on restart
                log.warning("announcing %s failed: %s", product, exc)

    @staticmethod
    def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, msg: str) -> None:
        context.abort(code, msg)

    @staticmethod
    def _write_status(exc: StoreWriteError) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED if exc.disk_full else grpc.StatusCode.INTERNAL

    def _guard(self, context: grpc.ServicerContext, fn):  # noqa: ANN001, ANN202
        try:
            return fn()
        except StoreWriteError as exc:
            self._abort(context, self._write_status(exc), str(exc))
        except StoreError as exc:
            self._abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except (ConfigError, ImageError) as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except HeadError as exc:
            self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    # -- FitHead ------------------------------------------------------------------
    def FitHead(self, request_iterator, context):  # noqa: ANN001, ANN201, N802
        """Admission first: a stream beyond the fit slots is refused now, before it can hold a thread."""
        if not self._fit_slots.acquire(blocking=False):
            n = self.fit_streams()
            lim = self.limits
            self._abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this calibrator takes {lim.fit_slots} FitHead streams at once (--max-fits {lim.max_fits} + "
                f"--fit-queue {lim.fit_queue}) and all are taken ({n['fitting']} fitting, {n['waiting']} waiting, "
                f"{n['uploading']} uploading); try again later",
            )
        stop = threading.Event()
        state = {"now": "uploading"}
        self._stage(None, "uploading")
        try:
            yield from self._fit(request_iterator, context, stop, state)
        finally:
            stop.set()
            self._stage(state["now"], None)
            self._fit_slots.release()

    def _reader(self, request_iterator, stop: threading.Event) -> queue.Queue:  # noqa: ANN001
        """The client's messages through a small queue, read on a thread of their own, so the handler can stop
        waiting for a stalled client (gRPC's request iterator blocks without a timeout)."""
        q: queue.Queue = queue.Queue(maxsize=4)

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.5)
                    return
                except queue.Full:
                    continue

        def read() -> None:
            try:
                for msg in request_iterator:
                    put(msg)
                    if stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - a cancelled call ends the iterator with an error; the handler sees it
                pass
            put(_END)

        threading.Thread(target=read, name="fit-upload", daemon=True).start()
        return q

    def _fit(self, request_iterator, context, stop: threading.Event, state: dict):  # noqa: ANN001, ANN202, C901
        idle_s = self.limits.fit_idle_s
        q = self._reader(request_iterator, stop)
        received = {"what": "no header"}

        def nxt():  # noqa: ANN202
            try:
                return q.get(timeout=idle_s)
            except queue.Empty:
                self._abort(
                    context,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"FitHead upload stalled: nothing arrived for {idle_s:g} s after {received['what']}; the stream "
                    "is dropped so it does not hold a fit slot (send chunks without pauses; --fit-idle-s)",
                )

        first = nxt()
        if first is _END:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty FitHead stream: send a header first")
        if first.WhichOneof("part") != "header":
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the first FitHead message must be the header")
        h = first.header
        try:
            product = check_product_id(h.product_id)
        except ConfigError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if h.backbone and h.backbone != self.backbone.spec:
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this calibrator serves backbone {self.backbone.spec!r}, not {quoted(h.backbone)}",
            )
        method = h.method or METHODS[0]
        if method not in METHODS:
            known = ", ".join(METHODS)
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"unknown method {quoted(method)}; known: {known}")
        if h.shots < 1:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at least one reference image is needed, got shots={h.shots}",
            )
        if h.shots > self.max_shots:
            self._abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{h.shots} references exceed this calibrator's limit of {self.max_shots}",
            )
        yield calibrator_pb2.FitProgress(stage="receiving", total_steps=h.shots)
        received["what"] = f"the header of {product} (0 of {h.shots} images complete)"
        parts: dict[int, list[bytes]] = {}
        names: dict[int, str] = {}
        images: dict[int, np.ndarray] = {}
        shas: dict[int, str] = {}
        pixels = 0
        while (msg := nxt()) is not _END:
            if msg.WhichOneof("part") != "chunk":
                self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "only image chunks may follow the header")
            c = msg.chunk
            if c.index >= h.shots:
                self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"chunk for image {c.index} but shots={h.shots}")
            names[c.index] = cut(c.name) if c.name else names.get(c.index, f"image {c.index}")  # echoed in errors
            if c.index in images:
                self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{names[c.index]}: chunk after its last chunk")
            parts.setdefault(c.index, []).append(c.data)
            if sum(map(len, parts[c.index])) > self.max_image_bytes:
                self._abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{names[c.index]}: upload larger than {self.max_image_bytes >> 20} MiB",
                )
            if not c.last:
                continue
            # complete: checked against the fit's pixel budget from its header, then decoded reduced at once,
            # so the stream holds reduced references, never every upload and full decode together
            data = b"".join(parts.pop(c.index))
            name = names[c.index]
            shas[c.index] = hashlib.sha256(data).hexdigest()
            try:
                w, h_px = _stated_size(data, name)
                if pixels + w * h_px > self.limits.max_fit_pixels:
                    raise ImageError(
                        f"{name}: {w}x{h_px} ({w * h_px} pixels) brings the references of this fit to "
                        f"{pixels + w * h_px} pixels, over the limit of {self.limits.max_fit_pixels} for one fit "
                        "(--max-fit-pixels); send smaller or fewer references"
                    )
                pixels += w * h_px
                images[c.index] = decode_reduced(data, name=name, min_side=self.ref_side)
            except ImageError as exc:
                self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            del data
            received["what"] = f"image {c.index} of {product} ({len(images)} of {h.shots} images complete)"
            yield calibrator_pb2.FitProgress(stage="receiving", step=len(images), total_steps=h.shots)
        if len(images) != h.shots:
            missing = sorted(set(range(h.shots)) - set(images))
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"images {missing} were not sent completely")
        try:
            opts, seed = FitOptions(object_name=product.split(".")[0], precision=self.fit_precision).with_strings(
                dict(h.options)
            )
        except ConfigError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{product}: {exc}")
        if not self._fits.acquire(blocking=False):
            self._stage(state["now"], "waiting")
            state["now"] = "waiting"
            yield calibrator_pb2.FitProgress(
                stage="queued", detail=f"waiting for a running fit to finish ({self.limits.max_fits} at a time)"
            )
            while not self._fits.acquire(timeout=0.5):
                if not context.is_active():
                    log.info("fit of %s cancelled while queued; nothing stored", product)
                    return
        self._stage(state["now"], "fitting")
        state["now"] = "fitting"
        refs = [images[i] for i in range(h.shots)]
        images.clear()
        q_out: queue.Queue = queue.Queue()
        result: dict = {}

        def progress(ev: ProgressEvent) -> None:
            """Every scorer stage, as it comes (features, held-out, synthesis, stage1, stage2, thresholds)."""
            if not context.is_active():
                raise _Cancelled()
            q_out.put(
                calibrator_pb2.FitProgress(
                    stage=ev.stage, step=ev.done, total_steps=ev.total, loss=ev.loss, detail=ev.detail
                )
            )

        def work() -> None:
            t_fit = time.perf_counter()
            status = "failed"
            try:
                head = fit_head(
                    self.backbone,
                    refs,
                    base_head=self.base_head if method != "knn" else None,
                    options=opts,
                    method=method,
                    seed=seed,
                    progress=progress,
                )
                if not context.is_active():
                    raise _Cancelled()
                g = head.meta.get("guard")
                detail = f"{g['chosen']}: {g['reason']}" if g else f"{head.method}"
                q_out.put(calibrator_pb2.FitProgress(stage="selected", detail=detail))
                head.meta["reference_sha256"] = [shas[i] for i in range(h.shots)]
                if self.line is not None:
                    self.line.mark_fitted(head)  # commissioning: the line sets its cut (calibrator.line)
                with self.store.lock(product):  # only the store change: other changes of the product need not wait
                    result["version"] = self.store.add(product, head, activate=h.activate)
                status = "ok"
            except _Cancelled as exc:
                status = "cancelled"
                result["error"] = exc
            except BaseException as exc:  # reported to the stream below
                result["error"] = exc
            finally:
                self._fits.release()
                metrics.FIT_DURATION.labels(method=method, status=status).observe(time.perf_counter() - t_fit)
                q_out.put(None)

        t = threading.Thread(target=work, name=f"fit-{product}", daemon=True)
        t.start()
        while True:
            item = q_out.get()
            if item is None:
                break
            yield item
        t.join()
        err = result.get("error")
        if isinstance(err, _Cancelled):
            log.info("fit of %s cancelled; nothing stored", product)
            return
        if isinstance(err, StoreWriteError):
            self._abort(context, self._write_status(err), f"fit of {product} finished but was not stored: {err}")
        if err is not None:
            code = (
                grpc.StatusCode.INVALID_ARGUMENT
                if isinstance(err, ConfigError | ImageError)
                else grpc.StatusCode.INTERNAL
            )
            self._abort(context, code, f"fit of {product} failed: {err}")
        info = head_info(self.store, product, result["version"])
        if h.activate:
            self._announce(product)
        yield calibrator_pb2.FitProgress(stage="done", result=info)

    # -- unary calls -------------------------------------------------------------------
    def ListHeads(self, request, context):  # noqa: ANN001, ANN201, N802
        def run() -> calibrator_pb2.ListHeadsResponse:
            products = [check_product_id(request.product_id)] if request.product_id else self.store.products()
            out = calibrator_pb2.ListHeadsResponse()
            for p in products:
                for v in self.store.versions(p):
                    out.heads.append(head_info(self.store, p, v))
            return out

        return self._guard(context, run)

    def GetHead(self, request, context):  # noqa: ANN001, ANN201, N802
        return self._guard(context, lambda: head_info(self.store, request.product_id, request.version))

    def DownloadHead(self, request, context):  # noqa: ANN001, ANN201, N802
        path = self._guard(context, lambda: self.store.path(check_product_id(request.product_id), request.version))
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        for i in range(0, max(1, len(data)), CHUNK_BYTES):
            yield calibrator_pb2.ArtifactChunk(
                data=data[i : i + CHUNK_BYTES], sha256=sha if i == 0 else "", total_size=len(data) if i == 0 else 0
            )

    def ActivateHead(self, request, context):  # noqa: ANN001, ANN201, N802
        def run() -> calibrator_pb2.HeadInfo:
            p = check_product_id(request.product_id)
            with self.store.lock(p):
                v = self.store.activate(p, request.version or max(self.store.versions(p), default=0))
            self._announce(p)
            return head_info(self.store, p, v)

        return self._guard(context, run)

    def RollbackHead(self, request, context):  # noqa: ANN001, ANN201, N802
        def run() -> calibrator_pb2.HeadInfo:
            p = check_product_id(request.product_id)
            with self.store.lock(p):
                v = self.store.rollback(p)
            self._announce(p)
            return head_info(self.store, p, v)

        return self._guard(context, run)

    def DeleteHead(self, request, context):  # noqa: ANN001, ANN201, N802
        def run() -> calibrator_pb2.HeadInfo:
            p = check_product_id(request.product_id)
            with self.store.lock(p):
                info = head_info(self.store, p, request.version)
                self.store.delete(p, info.head.version)
            if info.active:
                self._announce(p)
            info.active = False
            return info

        return self._guard(context, run)

    def SetThresholds(self, request, context):  # noqa: ANN001, ANN201, N802
        def run() -> calibrator_pb2.HeadInfo:
            p = check_product_id(request.head.product_id)
            it = request.image_threshold if request.HasField("image_threshold") else None
            pt = request.pixel_threshold if request.HasField("pixel_threshold") else None
            for name, v in (("image_threshold", it), ("pixel_threshold", pt)):
                if v is not None and (not math.isfinite(v) or v <= 0):
                    raise ConfigError(f"{name} must be a positive number, got {v}")
            if it is None and pt is None:
                raise ConfigError("give image_threshold and/or pixel_threshold")
            with self.store.lock(p):
                head = load_head(self.store.path(p, request.head.version))
                head = replace(head.with_thresholds(image=it, pixel=pt), meta=manual_meta(head.meta))
                v = self.store.add(p, head, activate=request.activate)
            if request.activate:
                self._announce(p)
            return head_info(self.store, p, v)

        return self._guard(context, run)

    def FinishCommissioning(self, request, context):  # noqa: ANN001, ANN201, N802
        def run() -> calibrator_pb2.HeadInfo:
            p = check_product_id(request.product_id)
            if self.line is None:
                raise HeadError("this calibrator does not calibrate heads from the line (commissioning off, no Kafka)")
            return head_info(self.store, p, self.line.finish(p, request.version))

        return self._guard(context, run)


def serve(
    store: HeadStore,
    backbone: Backbone,
    *,
    host: str = "127.0.0.1",
    port: int = 50051,
    base_head_path: str | None = None,
    kafka=None,  # noqa: ANN001 - inspection_core.kafka.KafkaConfig: announce heads on the heads topic
    advertised_address: str | None = None,
    security: ServerSecurity | None = None,
    max_shots: int = MAX_SHOTS,
    fit_precision: str = "fp32",
    signer: HeadSigner | None = None,
    allow_unsigned: bool = False,
    reannounce_s: float = 30.0,
    limits: ServiceLimits = DEFAULT_LIMITS,
    line: LineSettings | None = None,
) -> tuple[grpc.Server, int]:
    """Start the service; returns (server, bound port). ``port=0`` picks a free port.

    With ``kafka``, active heads are announced now and every ``reannounce_s`` seconds (0: only at start and on
    changes), signed with ``signer``; without one it refuses to start unless ``allow_unsigned`` (logged as a
    warning). ``server.stop`` also stops the repeats. ``server.readiness`` is
    the check for ``/readyz``: ready while a gRPC handler thread is free (:class:`ThreadsCheck`).
    """
    security = security or ServerSecurity()
    if kafka is not None:
        refuse_unsigned(signer is not None, allow_unsigned)
        if signer is None:
            log.warning(
                "announcing heads UNSIGNED (--allow-unsigned-heads): anyone who can write the heads topic can "
                "announce heads as this calibrator; set --heads-key-file"
            )
    if not 1 <= max_shots <= MAX_SHOTS_CEILING:
        raise ConfigError(f"max_shots must be in 1..{MAX_SHOTS_CEILING}, got {max_shots}")
    taken = _taken_address(host, port)
    if taken is not None:
        also = "" if taken == host else f" ({taken}:{port}, an address {host} resolves to, is taken)"
        raise ConfigError(
            f"cannot listen on {host}:{port}: the address is already in use{also} (another calibrator or program?)"
        )
    executor = futures.ThreadPoolExecutor(max_workers=limits.grpc_threads, thread_name_prefix="calibrator-grpc")
    calls = MetricsInterceptor()
    server = grpc.server(
        executor,
        # grpcio sets SO_REUSEPORT by default: a second calibrator on a taken port would start and share its calls
        options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.so_reuseport", 0)],
        interceptors=[calls, *security.interceptors()],
    )
    service = CalibratorService(
        store, backbone, base_head_path=base_head_path, max_shots=max_shots, fit_precision=fit_precision, limits=limits
    )
    metrics.CALIBRATOR_HEADS.set_function(lambda: sum(1 for p in store.products() if store.active(p)))
    calibrator_pb2_grpc.add_CalibratorServicer_to_server(service, server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    names = (
        calibrator_pb2.DESCRIPTOR.services_by_name["Calibrator"].full_name,
        reflection.SERVICE_NAME,
        health.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    server.readiness = ThreadsCheck(executor, calls, service)  # type: ignore[attr-defined]
    creds = security.credentials()
    try:
        bound = server.add_secure_port(f"{host}:{port}", creds) if creds else server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ConfigError(
            f"cannot listen on {host}:{port}: the address is already in use (another calibrator?) "
            "or not available on this host"
        )
    server.start()
    if kafka is not None:
        from calibrator.announce import Announcer

        address = advertised_address or f"{socket.getfqdn() if host in ('0.0.0.0', '::', '[::]') else host}:{bound}"
        announcer = Announcer(kafka, address, signer)
        service.announcer = announcer
        n = announcer.announce_all(store)
        log.info("re-announced %d active heads%s", n, " (signed)" if signer is not None else "")
        announcer.repeat_every(store, reannounce_s)
        if line is not None and line.enabled:
            service.line = LineManager(store, backbone, kafka, line, service._announce)
            service.line.start()
        stop = server.stop

        def stop_all(grace: float | None) -> threading.Event:
            announcer.stop()
            if service.line is not None:
                service.line.stop()
            return stop(grace)

        server.stop = stop_all  # type: ignore[method-assign]
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    hs.set(names[0], health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def _taken_address(host: str, port: int) -> str | None:
    """An address ``host`` resolves to where ``port`` is already in use, or None.

    grpcio binds every address a name resolves to and starts if any one of them binds: ``localhost`` would take
    [::1] beside another program on 127.0.0.1 and share the name with it. Each address is tried here first
    (SO_REUSEADDR as grpcio sets it, so only a listener counts); one this host lacks (no IPv6) is skipped, as
    grpcio skips it.
    """
    if port == 0:
        return None
    name = host.strip("[]")
    try:
        found = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return None  # grpcio's own bind reports a name that does not resolve
    addrs = {(fam, sa[0]) for fam, _, _, _, sa in found}
    if name == "localhost":  # grpcio binds both loopbacks, whatever /etc/hosts says
        addrs |= {(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")}
    for fam, addr in sorted(addrs):
        try:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((addr, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"[{addr}]" if ":" in addr else addr
    return None


class ThreadsCheck:
    """Readiness of the gRPC side: ready while a handler thread picks up work within ``timeout_s``.

    A no-op probe goes through the server's own thread pool, queued behind the calls waiting there, just as a
    health, ListHeads or DownloadHead call would be: when it does not run in time, neither would they, and a load
    balancer should send them elsewhere. Full fit slots alone are not a reason: read-only calls are still served
    and FitHead answers RESOURCE_EXHAUSTED at once. The detail names what holds the threads.
    """

    def __init__(
        self, executor: futures.ThreadPoolExecutor, calls: MetricsInterceptor, service: CalibratorService,
        timeout_s: float = 1.0,
    ) -> None:  # fmt: skip
        self._executor = executor
        self._calls = calls
        self._service = service
        self._timeout_s = timeout_s
        self._probe: futures.Future | None = None
        self._lock = threading.Lock()

    def __call__(self) -> tuple[bool, str]:
        with self._lock:
            if self._probe is None or self._probe.done():  # never more than one probe waiting in the pool
                self._probe = self._executor.submit(time.monotonic)
            probe = self._probe
        try:
            probe.result(timeout=self._timeout_s)
            ok = True
        except futures.TimeoutError:
            ok = False
        lim = self._service.limits
        busy = self._calls.busy()
        fits = self._service.fit_streams()
        held = ", ".join(f"{rpc} {n}" for rpc, n in sorted(busy.items())) or "none"
        detail = (
            f"{sum(busy.values())} of {lim.grpc_threads} gRPC threads busy ({held}); FitHead streams: "
            f"{sum(fits.values())} of {lim.fit_slots} ({fits['fitting']} fitting, {fits['waiting']} waiting, "
            f"{fits['uploading']} uploading)"
        )
        if ok:
            return True, detail
        return False, (
            f"no gRPC handler thread free within {self._timeout_s:g} s: health, ListHeads and DownloadHead "
            f"calls would wait or time out; {detail}"
        )
