"""``cff-inspect calibrator``: options -> a frozen :class:`CalibratorSettings` -> the gRPC service."""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass, field

from calibrator.config import (
    DEFAULT_LIMITS,
    UNSIGNED_HELP,
    ServiceLimits,
    add_limit_args,
    limits_from,
    refuse_unsigned,
)
from calibrator.line_config import DEFAULT_LINE, LineSettings, add_line_args, line_from
from calibrator.security import ServerSecurity, add_token_args, read_token
from inspection_core.errors import ConfigError
from inspection_core.kafka import KafkaConfig, add_kafka_args, ensure_topics, kafka_from, quiet_kafka
from inspection_core.names import MAX_SHOTS, MAX_SHOTS_CEILING
from inspection_core.runtime import stop_on_signals
from inspection_core.trust import HeadSigner, is_loopback, read_key
from monitoring.http import add_metrics_args, broker_check, start_metrics
from scorer.options import add_backbone_args, add_fit_precision_arg, backbone_from


@dataclass(frozen=True)
class CalibratorSettings:
    store: str
    host: str
    port: int
    security: ServerSecurity
    kafka: KafkaConfig | None  # None: do not announce heads
    base_head: str | None = None
    advertised_address: str | None = None
    max_shots: int = MAX_SHOTS
    fit_precision: str = "fp32"
    heads_key: bytes | None = field(default=None, repr=False)  # signs head announcements
    allow_unsigned_heads: bool = False  # announce without a key (serve() refuses that otherwise)
    reannounce_s: float = 30.0
    allow_loopback_announce: bool = False
    limits: ServiceLimits = DEFAULT_LIMITS
    line: LineSettings = DEFAULT_LINE  # the line calibrates heads (needs Kafka)

    def __post_init__(self) -> None:
        if self.reannounce_s < 0:
            raise ConfigError(f"reannounce interval must be >= 0 seconds, got {self.reannounce_s}")
        if self.kafka is None or self.allow_loopback_announce:
            return
        announced = self.advertised_address or f"{self.host}:{self.port}"
        servers = [b.strip() for b in self.kafka.bootstrap_servers.split(",") if b.strip()]
        if is_loopback(announced) and not all(is_loopback(b) for b in servers):
            raise ConfigError(
                f"the calibrator would announce {announced} on {self.kafka.bootstrap_servers}, where workers on "
                "other machines cannot download from a loopback address: set --advertised-address HOST:PORT "
                "(and --host 0.0.0.0), or --allow-loopback-announce if every worker runs on this machine"
            )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default="heads", help="head store folder (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--base-head", default=None, help="base head from train-base")
    p.add_argument(
        "--advertised-address",
        default=None,
        help="host:port workers download heads from (announced on the heads topic)",
    )
    p.add_argument("--no-kafka", action="store_true", help="do not announce heads on Kafka")
    p.add_argument(
        "--heads-key-file",
        default=None,
        help="sign head announcements with this shared key (workers verify with the same file); a calibrator "
        "that announces heads needs it, or --allow-unsigned-heads",
    )
    p.add_argument("--allow-unsigned-heads", action="store_true", default=False, help=UNSIGNED_HELP)
    p.add_argument(
        "--allow-loopback-announce",
        action="store_true",
        default=False,
        help="announce a loopback address even though Kafka is remote (every worker on this machine)",
    )
    p.add_argument(
        "--reannounce-s",
        type=float,
        default=30.0,
        help="re-announce active heads this often, so a broker that lost the heads topic is refilled "
        "(0 = only at start and on changes; default %(default)s)",
    )
    p.add_argument(
        "--max-shots",
        type=int,
        default=MAX_SHOTS,
        help=f"reference images per fit (limit, at most {MAX_SHOTS_CEILING}; default %(default)s)",
    )
    add_limit_args(p)
    add_line_args(p)
    add_fit_precision_arg(p, "precision of head fits, whatever --precision scoring uses")
    add_token_args(p, "require this bearer token on every call")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    add_kafka_args(p)
    add_metrics_args(p, "calibrator")
    add_backbone_args(p)


def settings_from(args: argparse.Namespace) -> CalibratorSettings:
    """The settings; a calibrator that would announce unsigned without the opt-out fails here, before the
    backbone loads."""
    s = CalibratorSettings(
        store=args.store,
        host=args.host,
        port=args.port,
        security=ServerSecurity(
            token=read_token(args.token, args.token_file), tls_cert=args.tls_cert, tls_key=args.tls_key
        ),
        kafka=None if args.no_kafka else kafka_from(args),
        base_head=args.base_head,
        advertised_address=args.advertised_address,
        max_shots=args.max_shots,
        fit_precision=args.fit_precision,
        heads_key=read_key(args.heads_key_file) if args.heads_key_file else None,
        allow_unsigned_heads=args.allow_unsigned_heads,
        reannounce_s=args.reannounce_s,
        allow_loopback_announce=args.allow_loopback_announce,
        limits=limits_from(args),
        line=line_from(args),
    )
    if s.kafka is not None:
        refuse_unsigned(s.heads_key is not None, s.allow_unsigned_heads)
    return s


def main(args: argparse.Namespace) -> int:
    from calibrator.service import serve
    from calibrator.store import HeadStore

    s = settings_from(args)
    bb = backbone_from(args)
    if s.kafka is not None:
        quiet_kafka()
        ensure_topics(s.kafka)
    server, port = serve(
        HeadStore(s.store),
        bb,
        host=s.host,
        port=s.port,
        base_head_path=s.base_head,
        kafka=s.kafka,
        advertised_address=s.advertised_address,
        security=s.security,
        max_shots=s.max_shots,
        fit_precision=s.fit_precision,
        signer=HeadSigner(s.heads_key) if s.heads_key is not None else None,
        allow_unsigned=s.allow_unsigned_heads,
        reannounce_s=s.reannounce_s,
        limits=s.limits,
        line=s.line,
    )
    checks = {"backbone": lambda: (True, bb.spec), "grpc": server.readiness}
    if s.kafka is not None:
        checks["broker"] = broker_check(s.kafka.bootstrap_servers)
    ms = start_metrics(args, "calibrator", **checks)
    print(
        f"calibrator serving {bb.spec} heads from {s.store} on {s.host}:{port} "
        f"(TLS {'on' if s.security.tls else 'off'}, token {'required' if s.security.token else 'not required'}, "
        + (
            "no announcements"
            if s.kafka is None
            else f"announcements signed with key {HeadSigner(s.heads_key).key_id}"
            if s.heads_key is not None
            else "announcements NOT signed (--allow-unsigned-heads)"
        )
        + ")",
        flush=True,
    )
    stop = threading.Event()
    stop_on_signals(stop)
    stop.wait()
    server.stop(grace=10).wait()
    if ms is not None:
        ms.stop()
    return 0
