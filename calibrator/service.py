"""The calibrator gRPC service: fit, store, serve and activate per-product heads.

FitHead takes a client stream (header, then image chunks) and answers with a
server stream of progress ending with the head's info. A cancelled or expired
call stops the fit at the next progress step and stores nothing. Standard health
service and reflection are registered.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import socket
import threading
import time
from concurrent import futures
from dataclasses import replace

import grpc
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from calibrator.security import ServerSecurity
from calibrator.store import HeadStore, StoreError, manifest_ref
from inspection_core.errors import ConfigError, HeadError, ImageError, cut, quoted
from inspection_core.ids import check_product_id
from inspection_core.names import METHODS
from inspection_core.trust import HeadSigner
from inspection_pb.v1 import calibrator_pb2, calibrator_pb2_grpc
from monitoring import metrics
from scorer.artifact import load_head
from scorer.backbones.base import Backbone
from scorer.fit import FitOptions, fit_head
from scorer.images import decode_image
from scorer.progress import ProgressEvent

log = logging.getLogger(__name__)
CHUNK = 1 << 20
MAX_IMAGE_BYTES = 64 << 20
MAX_SHOTS = 16


class _Cancelled(Exception):
    pass


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every call by method and final status code (outermost, so refused calls count too)."""

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
                try:
                    out = behavior(req, ctx)
                except BaseException:
                    record(ctx, grpc.StatusCode.UNKNOWN)
                    raise
                record(ctx, grpc.StatusCode.OK)
                return out

            return run

        def streaming(behavior):  # noqa: ANN001, ANN202
            def run(req, ctx):  # noqa: ANN001, ANN202
                try:
                    yield from behavior(req, ctx)
                except GeneratorExit:
                    record(ctx, grpc.StatusCode.CANCELLED)
                    raise
                except BaseException:
                    record(ctx, grpc.StatusCode.UNKNOWN)
                    raise
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


def _num(x: float | None) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else 0.0


def head_info(store: HeadStore, product: str, version: int = 0) -> calibrator_pb2.HeadInfo:
    m = store.info(product, version)
    info = calibrator_pb2.HeadInfo(
        head=manifest_ref(product, m),
        backbone=m["backbone"],
        weights_sha256=m["weights_sha256"],
        method=m["method"],
        shots=m.get("shots") or 0,
        image_threshold=_num(m.get("image_threshold")),
        pixel_threshold=_num(m.get("pixel_threshold")),
        active=bool(m["active"]),
        reference_sha256=m.get("reference_sha256") or [],
    )
    guard = (m.get("meta") or {}).get("guard") or {}
    info.requested_method = str(guard.get("requested") or m["method"])
    info.selection = str(guard.get("reason") or "")
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
    ) -> None:
        self.fit_precision = fit_precision  # fits in fp32 by default: bf16 fits shifted thresholds (BENCHMARKS.md)
        self.announcer = announcer
        self.max_shots = max_shots
        self.max_image_bytes = max_image_bytes
        self.store = store
        self.backbone = backbone
        self.base_head = load_head(base_head_path, backbone) if base_head_path else None
        self._fit_lock = threading.Lock()  # one fit at a time per process keeps CPU memory bounded

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

    def _guard(self, context: grpc.ServicerContext, fn):  # noqa: ANN001, ANN202
        try:
            return fn()
        except StoreError as exc:
            self._abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except (ConfigError, ImageError) as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except HeadError as exc:
            self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    # -- FitHead ------------------------------------------------------------------
    def FitHead(self, request_iterator, context):  # noqa: ANN001, ANN201, N802
        try:
            first = next(request_iterator)
        except StopIteration:
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
        parts: dict[int, list[bytes]] = {}
        names: dict[int, str] = {}
        done: set[int] = set()
        for msg in request_iterator:
            if msg.WhichOneof("part") != "chunk":
                self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "only image chunks may follow the header")
            c = msg.chunk
            if c.index >= h.shots:
                self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"chunk for image {c.index} but shots={h.shots}")
            parts.setdefault(c.index, []).append(c.data)
            names[c.index] = cut(c.name) if c.name else names.get(c.index, f"image {c.index}")  # echoed in errors
            if sum(map(len, parts[c.index])) > self.max_image_bytes:
                self._abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{names[c.index]}: upload larger than {self.max_image_bytes >> 20} MiB",
                )
            if c.last and c.index not in done:
                done.add(c.index)
                yield calibrator_pb2.FitProgress(stage="receiving", step=len(done), total_steps=h.shots)
        if done != set(range(h.shots)):
            missing = sorted(set(range(h.shots)) - done)
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"images {missing} were not sent completely")
        images, shas = [], []
        for i in range(h.shots):
            data = b"".join(parts[i])
            shas.append(hashlib.sha256(data).hexdigest())
            try:
                images.append(decode_image(data, name=names[i]))
            except ImageError as exc:
                self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            opts, seed = FitOptions(object_name=product.split(".")[0], precision=self.fit_precision).with_strings(
                dict(h.options)
            )
        except ConfigError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{product}: {exc}")
        q: queue.Queue = queue.Queue()
        result: dict = {}

        def progress(ev: ProgressEvent) -> None:
            """Every scorer stage, as it comes (features, held-out, synthesis, stage1, stage2, thresholds)."""
            if not context.is_active():
                raise _Cancelled()
            q.put(
                calibrator_pb2.FitProgress(
                    stage=ev.stage, step=ev.done, total_steps=ev.total, loss=ev.loss, detail=ev.detail
                )
            )

        def work() -> None:
            t_fit = time.perf_counter()
            status = "failed"
            try:
                with self._fit_lock, self.store.lock(product):
                    head = fit_head(
                        self.backbone,
                        images,
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
                    q.put(calibrator_pb2.FitProgress(stage="selected", detail=detail))
                    head.meta["reference_sha256"] = shas
                    result["version"] = self.store.add(product, head, activate=h.activate)
                    status = "ok"
            except _Cancelled as exc:
                status = "cancelled"
                result["error"] = exc
            except BaseException as exc:  # reported to the stream below
                result["error"] = exc
            finally:
                metrics.FIT_DURATION.labels(method=method, status=status).observe(time.perf_counter() - t_fit)
                q.put(None)

        t = threading.Thread(target=work, name=f"fit-{product}", daemon=True)
        t.start()
        while True:
            item = q.get()
            if item is None:
                break
            yield item
        t.join()
        err = result.get("error")
        if isinstance(err, _Cancelled):
            log.info("fit of %s cancelled; nothing stored", product)
            return
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
        for i in range(0, max(1, len(data)), CHUNK):
            yield calibrator_pb2.ArtifactChunk(
                data=data[i : i + CHUNK], sha256=sha if i == 0 else "", total_size=len(data) if i == 0 else 0
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
                head = replace(head.with_thresholds(image=it, pixel=pt), meta=dict(head.meta))
                v = self.store.add(p, head, activate=request.activate)
            if request.activate:
                self._announce(p)
            return head_info(self.store, p, v)

        return self._guard(context, run)


def serve(
    store: HeadStore,
    backbone: Backbone,
    *,
    host: str = "127.0.0.1",
    port: int = 50051,
    base_head_path: str | None = None,
    workers: int = 8,
    kafka=None,  # noqa: ANN001 - inspection_core.kafka.KafkaConfig: announce heads on the heads topic
    advertised_address: str | None = None,
    security: ServerSecurity | None = None,
    max_shots: int = MAX_SHOTS,
    fit_precision: str = "fp32",
    signer: HeadSigner | None = None,
    reannounce_s: float = 30.0,
) -> tuple[grpc.Server, int]:
    """Start the service; returns (server, bound port). ``port=0`` picks a free port.

    With ``kafka``, active heads are announced now and every ``reannounce_s`` seconds (0: only at start and on
    changes), signed with ``signer`` when given; ``server.stop`` also stops the repeats.
    """
    security = security or ServerSecurity()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        # grpcio sets SO_REUSEPORT by default: a second calibrator on a taken port would start and share its calls
        options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.so_reuseport", 0)],
        interceptors=[MetricsInterceptor(), *security.interceptors()],
    )
    service = CalibratorService(
        store, backbone, base_head_path=base_head_path, max_shots=max_shots, fit_precision=fit_precision
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
    if not 1 <= max_shots <= 64:
        raise ConfigError(f"max_shots must be in 1..64, got {max_shots}")
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
        stop = server.stop

        def stop_all(grace: float | None) -> threading.Event:
            announcer.stop()
            return stop(grace)

        server.stop = stop_all  # type: ignore[method-assign]
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    hs.set(names[0], health_pb2.HealthCheckResponse.SERVING)
    return server, bound
