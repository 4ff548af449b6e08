"""Subcommands that run services on Kafka: broker, worker, ingest."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from cff_inspect.env import env_default as _env
from scorer.errors import ConfigError

log = logging.getLogger(__name__)


def add_kafka_args(p: argparse.ArgumentParser) -> None:
    import os

    p.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS; default %(default)s)",
    )
    p.add_argument("--topic-prefix", default=_env("topic_prefix", "inspection."))
    p.add_argument(
        "--partitions",
        type=int,
        default=_env("partitions", 6, kind=int),
        help="partitions for topics this process creates",
    )


def kafka_from(args: argparse.Namespace):  # noqa: ANN201
    from cff_inspect.kafka import KafkaConfig

    return KafkaConfig(
        bootstrap_servers=args.bootstrap_servers, topic_prefix=args.topic_prefix, partitions=args.partitions
    )


def _add_token_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--token", default=_env("token"), help=f"{what} (env CFF_INSPECT_TOKEN; prefer --token-file: flags show in ps)"
    )
    p.add_argument("--token-file", default=_env("token_file"), help="file whose first line is the token")


def add_client_security_args(p: argparse.ArgumentParser) -> None:
    _add_token_args(p, "bearer token for the calibrator")
    p.add_argument("--tls-ca", default=_env("tls_ca"), help="PEM root certificate: talk TLS to the calibrator")
    p.add_argument("--tls-server-name", default=_env("tls_server_name"), help="name to check the certificate for")


def client_security_from(args: argparse.Namespace):  # noqa: ANN201
    from calibrator.security import ClientSecurity, read_token

    return ClientSecurity(
        token=read_token(args.token, args.token_file), tls_ca=args.tls_ca, tls_server_name=args.tls_server_name
    )


def add_metrics_args(p: argparse.ArgumentParser, service: str) -> None:
    from monitoring.metrics import DEFAULT_PORTS

    p.add_argument(
        "--metrics-port",
        type=int,
        default=_env("metrics_port", DEFAULT_PORTS[service], kind=int),
        help="serve /metrics, /healthz and /readyz here (0 = a free port; default %(default)s)",
    )
    p.add_argument(
        "--metrics-host", default=_env("metrics_host", "0.0.0.0"), help="address for /metrics (default %(default)s)"
    )
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics, /healthz, /readyz")


def start_metrics(args: argparse.Namespace, service: str, **checks):  # noqa: ANN003, ANN201
    if args.no_metrics:
        return None
    from monitoring.http import MetricsServer

    m = MetricsServer(service, host=args.metrics_host, port=args.metrics_port).add_checks(**checks).start()
    print(f"{service}: metrics on {m.url}/metrics, health on /healthz and /readyz", file=sys.stderr, flush=True)
    return m


def worker_checks(kafka, worker) -> dict:  # noqa: ANN001
    """Ready = the broker answers and the worker holds at least one head."""
    from monitoring.http import broker_check

    def heads() -> tuple[bool, str]:
        names = sorted(worker.heads)
        return (bool(names), ", ".join(f"{p} v{worker.heads[p].ref.version}" for p in names) or "no head loaded")

    def consuming() -> tuple[bool, str]:
        t = worker.last_poll_ok
        if t is None:
            return False, "not polling yet (joining the consumer group)"
        age = time.monotonic() - t
        return age < 30, f"last poll {age:.1f}s ago"

    return {"broker": broker_check(kafka.bootstrap_servers), "heads": heads, "consuming": consuming}


def quiet_kafka() -> None:
    logging.getLogger("kafka").setLevel(logging.WARNING)


def stop_on_signals(event: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("signal %s: finishing the current batch", signum)
        event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# -- broker -------------------------------------------------------------------------
def cmd_broker(args: argparse.Namespace) -> int:
    from cff_inspect.broker import EmbeddedBroker
    from cff_inspect.kafka import KafkaConfig, ensure_topics

    quiet_kafka()
    stop = threading.Event()
    stop_on_signals(stop)
    with EmbeddedBroker(port=args.port) as b:
        ensure_topics(
            KafkaConfig(bootstrap_servers=b.bootstrap, topic_prefix=args.topic_prefix, partitions=args.partitions)
        )
        print(f"embedded broker (Tansu, memory storage, development only) on {b.bootstrap}", flush=True)
        while not stop.is_set() and b.proc is not None and b.proc.poll() is None:
            stop.wait(0.5)
    return 0


def add_broker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (Tansu, memory; for development)")
    p.add_argument("--port", type=int, default=_env("broker_port", 9092, kind=int))
    p.add_argument("--topic-prefix", default=_env("topic_prefix", "inspection."))
    p.add_argument("--partitions", type=int, default=_env("partitions", 6, kind=int))
    p.set_defaults(func=cmd_broker)


# -- worker ----------------------------------------------------------------------------
def load_file_heads(  # noqa: ANN201
    specs: list[str], backbone_override: str | None, weights: str | None, device: str, precision: str = "fp32"
):
    """``PRODUCT=PATH`` pairs -> (backbone, {product: ActiveHead}); heads for another backbone are skipped."""
    from scorer.artifact import file_sha256, load_head, read_manifest
    from scorer.backbones import load_backbone
    from scorer.errors import HeadError
    from scorer.names import check_product_id
    from workers.worker import ActiveHead, head_ref

    pairs = []
    for s in specs:
        if "=" not in s:
            raise ConfigError(f"--head expects PRODUCT=PATH, got {s!r}")
        product, path = s.split("=", 1)
        pairs.append((check_product_id(product), path, read_manifest(path)))
    if not pairs and not backbone_override:
        raise ConfigError("a worker needs --head PRODUCT=PATH (or --backbone to start without heads)")
    spec = backbone_override or pairs[0][2]["backbone"]
    size = next((m["image_size"] for _, _, m in pairs if m["backbone"] == spec), None)
    bb = load_backbone(spec, weights=weights, image_size=size, device=device).set_precision(precision)
    heads = {}
    for product, path, _m in pairs:
        try:
            h = load_head(path, bb)
        except HeadError as exc:
            log.warning("ignoring head for %s: %s", product, exc)
            continue
        heads[product] = ActiveHead(h, head_ref(product, h, file_sha256(path)))
    return bb, heads


def cmd_worker(args: argparse.Namespace) -> int:
    from cff_inspect.cli import _device, _precision
    from cff_inspect.kafka import ensure_topics
    from workers.worker import Worker, WorkerConfig

    quiet_kafka()
    kafka = kafka_from(args)
    dev = _device(args.device)
    bb, heads = load_file_heads(args.head or [], args.backbone, args.weights, dev, _precision(args, dev))
    if args.compile != "off":
        bb.enable_compile(args.compile)
    cfg = WorkerConfig(
        group_id=args.group_id,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_age_s=args.max_age_s,
        evidence_dir=args.evidence_dir,
        heatmap_in_result=args.heatmap_in_result,
        device_decode=args.device_decode,
        bank_dtype=args.bank_dtype,
        **({"worker_id": args.worker_id} if args.worker_id else {}),
    )
    ensure_topics(kafka)
    w = Worker(kafka, cfg, heads)
    ms = start_metrics(args, "worker", **worker_checks(kafka, w))
    stop_on_signals(w.stop_event)
    if args.follow_heads:
        from workers.heads import HeadFollower

        HeadFollower(kafka, w, bb, client_security_from(args)).start()
    try:
        w.run()
    finally:
        if ms is not None:
            ms.stop()
    return 0


def add_worker(sub: argparse._SubParsersAction) -> None:
    from cff_inspect.cli import _add_backbone_args

    p = sub.add_parser("worker", help="score frames from Kafka (consumer group, dynamic batching)")
    p.add_argument(
        "--head",
        action="append",
        default=_env("head", None, many=True),
        help="PRODUCT=PATH of a head artifact (repeatable) until the calibrator serves heads",
    )
    p.add_argument("--group-id", default=_env("group_id", "cff-inspect-workers"))
    p.add_argument("--worker-id", default=_env("worker_id"))
    p.add_argument("--max-batch", type=int, default=_env("max_batch", 8, kind=int))
    p.add_argument("--max-wait-ms", type=int, default=_env("max_wait_ms", 50, kind=int))
    p.add_argument(
        "--max-age-s",
        type=float,
        default=_env("max_age_s", 60.0, kind=float),
        help="frames older than this get a STALE result instead of being scored",
    )
    p.add_argument("--evidence-dir", default=_env("evidence_dir"), help="archive defect JPEGs and overlays here")
    p.add_argument("--heatmap-in-result", action="store_true", help="attach an 8-bit PNG heatmap to each result")
    p.add_argument(
        "--device-decode",
        choices=("auto", "always", "never"),
        default=_env("device_decode", "auto"),
        help="decode JPEGs with torchvision on the scoring device (auto: when it is a GPU)",
    )
    p.add_argument(
        "--bank-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default=_env("bank_dtype", "auto"),
        help="memory-bank search dtype (auto: bfloat16 on a GPU, the head's own on the CPU)",
    )
    p.add_argument(
        "--no-follow-heads",
        dest="follow_heads",
        action="store_false",
        help="do not take heads announced by the calibrator on the heads topic",
    )
    add_kafka_args(p)
    add_client_security_args(p)
    add_metrics_args(p, "worker")
    _add_backbone_args(p)
    p.set_defaults(backbone=_env("backbone", None))
    p.set_defaults(func=cmd_worker)


# -- ingest ----------------------------------------------------------------------------
def parse_camera(spec: str):  # noqa: ANN201
    """``ID=PRODUCT@SOURCE[,fps=N]`` -> CameraConfig."""
    from ingest.cameras import CameraConfig

    head, _, opts = spec.partition(",")
    if "=" not in head or "@" not in head:
        raise ConfigError(f"--camera expects ID=PRODUCT@SOURCE[,fps=N], got {spec!r}")
    cid, rest = head.split("=", 1)
    product, source = rest.split("@", 1)
    kw: dict = {}
    for kv in filter(None, opts.split(",")):
        k, _, v = kv.partition("=")
        if k == "fps":
            kw["fps"] = float(v)
        elif k == "loop":
            kw["loop"] = v.lower() in ("1", "true", "yes")
        else:
            raise ConfigError(f"--camera option {k!r} unknown (fps, loop)")
    return CameraConfig(id=cid, product=product, source=source, **kw)


def ingest_checks(kafka, ing) -> dict:  # noqa: ANN001
    """Ready = the broker answers and at least one camera delivers frames."""
    from monitoring.http import broker_check

    def cameras() -> tuple[bool, str]:
        up = [c for c, ok in ing.stats.camera_up.items() if ok]
        return bool(up), f"{len(up)}/{len(ing.cameras)} cameras up"

    return {"broker": broker_check(kafka.bootstrap_servers), "cameras": cameras}


def cmd_ingest(args: argparse.Namespace) -> int:
    from cff_inspect.kafka import ensure_topics
    from ingest.cameras import Ingest, load_cameras

    quiet_kafka()
    cams = load_cameras(args.cameras) if args.cameras else []
    cams += [parse_camera(c) for c in args.camera or []]
    if not cams:
        raise ConfigError("no cameras: give --cameras FILE.toml or --camera ID=PRODUCT@SOURCE")
    kafka = kafka_from(args)
    ensure_topics(kafka)
    ing = Ingest(kafka, cams, buffer_size=args.buffer_size, max_frames=args.max_frames)
    ms = start_metrics(args, "ingest", **ingest_checks(kafka, ing))
    ing.start()
    stop_on_signals(ing.stop_event)
    deadline = time.monotonic() + args.duration if args.duration else None
    while not ing.stop_event.is_set() and ing._threads[-1].is_alive():
        if deadline is not None and time.monotonic() > deadline:
            break
        ing.stop_event.wait(0.5)
    ing.stop()
    if ms is not None:
        ms.stop()
    st = ing.stats
    print(
        f"captured {sum(st.captured.values())}, published {sum(st.published.values())}, "
        f"dropped {sum(st.dropped.values())}, reconnects {sum(st.reconnects.values())}"
    )
    return 0


def add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="publish camera frames (folders, video files, RTSP/HTTP, USB) to Kafka")
    p.add_argument("--cameras", default=_env("cameras"), help="TOML camera list ([[camera]] id, product, source, ...)")
    p.add_argument("--camera", action="append", help="ID=PRODUCT@SOURCE[,fps=N] (repeatable)")
    p.add_argument(
        "--buffer-size",
        type=int,
        default=_env("buffer_size", 64, kind=int),
        help="bounded frame buffer; the oldest frame is dropped (and counted) when full",
    )
    p.add_argument("--max-frames", type=int, default=None, help="per camera, then stop")
    p.add_argument("--duration", type=float, default=None, help="seconds, then stop")
    add_kafka_args(p)
    add_metrics_args(p, "ingest")
    p.set_defaults(func=cmd_ingest)


# -- calibrator ------------------------------------------------------------------------
def cmd_calibrator(args: argparse.Namespace) -> int:
    from calibrator.security import ServerSecurity, read_token
    from calibrator.service import serve
    from calibrator.store import HeadStore
    from cff_inspect.cli import _backbone_from

    security = ServerSecurity(
        token=read_token(args.token, args.token_file), tls_cert=args.tls_cert, tls_key=args.tls_key
    )
    bb = _backbone_from(args)
    kafka = None
    if not args.no_kafka:
        from cff_inspect.kafka import ensure_topics

        quiet_kafka()
        kafka = kafka_from(args)
        ensure_topics(kafka)
    server, port = serve(
        HeadStore(args.store),
        bb,
        host=args.host,
        port=args.port,
        base_head_path=args.base_head,
        kafka=kafka,
        advertised_address=args.advertised_address,
        security=security,
        max_shots=args.max_shots,
        fit_precision=args.fit_precision,
    )
    checks = {"backbone": lambda: (True, bb.spec)}
    if kafka is not None:
        from monitoring.http import broker_check

        checks["broker"] = broker_check(kafka.bootstrap_servers)
    ms = start_metrics(args, "calibrator", **checks)
    print(
        f"calibrator serving {bb.spec} heads from {args.store} on {args.host}:{port} "
        f"(TLS {'on' if security.tls else 'off'}, token {'required' if security.token else 'not required'})",
        flush=True,
    )
    stop = threading.Event()
    stop_on_signals(stop)
    stop.wait()
    server.stop(grace=10).wait()
    if ms is not None:
        ms.stop()
    return 0


def add_calibrator(sub: argparse._SubParsersAction) -> None:
    from cff_inspect.cli import _add_backbone_args

    p = sub.add_parser("calibrator", help="serve the gRPC calibrator (fit, store, serve, activate heads)")
    p.add_argument("--store", default=_env("store", "heads"), help="head store folder (default: %(default)s)")
    p.add_argument("--host", default=_env("host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=_env("port", 50051, kind=int))
    p.add_argument("--base-head", default=_env("base_head"), help="base head from train-base")
    p.add_argument(
        "--advertised-address",
        default=_env("advertised_address"),
        help="host:port workers download heads from (announced on the heads topic)",
    )
    p.add_argument("--no-kafka", action="store_true", help="do not announce heads on Kafka")
    p.add_argument(
        "--max-shots", type=int, default=_env("max_shots", 16, kind=int), help="reference images per fit (limit)"
    )
    p.add_argument(
        "--fit-precision",
        choices=("fp32", "bf16", "fp16"),
        default=_env("fit_precision", "fp32"),
        help="precision of head fits, whatever --precision scoring uses (default %(default)s)",
    )
    _add_token_args(p, "require this bearer token on every call")
    p.add_argument("--tls-cert", default=_env("tls_cert"), help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", default=_env("tls_key"), help="PEM private key for --tls-cert")
    add_kafka_args(p)
    add_metrics_args(p, "calibrator")
    _add_backbone_args(p)
    p.set_defaults(func=cmd_calibrator)


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


__all__ = ["add_broker", "add_calibrator", "add_ingest", "add_worker", "sys"]
