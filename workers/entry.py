"""``cff-inspect worker``: options -> a frozen :class:`WorkerConfig` and heads -> the scoring loop."""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING

from calibrator.security import add_client_security_args, client_security_from
from inspection_core.errors import ConfigError, HeadError
from inspection_core.ids import check_product_id
from inspection_core.kafka import KafkaConfig, add_kafka_args, ensure_topics, kafka_from, quiet_kafka
from inspection_core.runtime import stop_on_signals
from inspection_core.trust import HeadTrust, read_key
from monitoring.http import Check, MetricsServer, add_metrics_args, broker_check, start_metrics
from scorer.options import add_backbone_args, resolve_device, resolve_precision
from workers.config import ActiveHead, add_worker_args, config_from, head_ref

if TYPE_CHECKING:
    from scorer.backbones import Backbone
    from workers.worker import Worker

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--head",
        action="append",
        default=None,
        help="PRODUCT=PATH of a head artifact (repeatable) until the calibrator serves heads",
    )
    add_worker_args(p)
    p.add_argument(
        "--calibrator-address",
        action="append",
        default=None,
        help="HOST:PORT of a calibrator this worker may download heads from (repeatable; env: space-separated); "
        "announcements naming any other address are refused (without one, only loopback calibrators)",
    )
    p.add_argument(
        "--heads-key-file",
        default=None,
        help="accept only head announcements signed with this shared key (the calibrator's --heads-key-file); "
        "a worker that follows the heads topic needs it, or --allow-unsigned-heads",
    )
    p.add_argument(
        "--allow-unsigned-heads",
        action="store_true",
        default=False,
        help="follow the heads topic without a key: anyone who can write it can then change this worker's heads "
        "(and, without --calibrator-address, name a loopback calibrator to download from); logs a warning",
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
    add_backbone_args(p, default=None, sized=False)


def trust_from(args: argparse.Namespace) -> HeadTrust:
    """What the head follower believes; a worker that follows heads without a key (or the opt-out) fails here."""
    trust = HeadTrust(
        key=read_key(args.heads_key_file) if args.heads_key_file else None,
        addresses=tuple(args.calibrator_address or ()),
        allow_unsigned=args.allow_unsigned_heads,
    )
    if args.follow_heads:
        trust.require_key("a worker that follows the heads topic")
    return trust


def read_head_specs(specs: list[str], backbone_override: str | None) -> list[tuple[str, str, dict]]:
    """``PRODUCT=PATH`` pairs -> (product, path, manifest), checked without loading any model."""
    from scorer.artifact import read_manifest

    pairs = []
    for s in specs:
        if "=" not in s:
            raise ConfigError(f"--head expects PRODUCT=PATH, got {s!r}")
        product, path = s.split("=", 1)
        pairs.append((check_product_id(product), path, read_manifest(path)))
    if not pairs and not backbone_override:
        raise ConfigError("a worker needs --head PRODUCT=PATH (or --backbone to start without heads)")
    return pairs


def load_file_heads(
    specs: list[str], backbone_override: str | None, weights: str | None, device: str, precision: str = "fp32"
) -> tuple[Backbone, dict[str, ActiveHead]]:
    """``PRODUCT=PATH`` pairs -> (backbone, {product: ActiveHead}); heads for another backbone are skipped."""
    from scorer.artifact import file_sha256, load_head
    from scorer.backbones import load_backbone

    pairs = read_head_specs(specs, backbone_override)
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
        heads[product] = ActiveHead(h, head_ref(product, h, file_sha256(path)), bool(h.meta.get("commissioning")))
    return bb, heads


def worker_checks(kafka: KafkaConfig, worker: Worker) -> dict[str, Check]:
    """Ready = the broker answers, the worker holds at least one head, polls the broker and its results are
    acknowledged (false from the first failed publish until one succeeds)."""

    def heads() -> tuple[bool, str]:
        names = sorted(worker.heads)
        return (bool(names), ", ".join(f"{p} v{worker.heads[p].ref.version}" for p in names) or "no head loaded")

    def consuming() -> tuple[bool, str]:
        t = worker.last_poll_ok
        if t is None:
            return False, "not polling yet (joining the consumer group)"
        age = time.monotonic() - t
        return age < 30, f"last poll {age:.1f}s ago"

    def publishing() -> tuple[bool, str]:
        err = worker.publish_error
        return (err is None, "results acknowledged" if err is None else f"publishing fails: {err[:200]}")

    return {
        "broker": broker_check(kafka.bootstrap_servers),
        "heads": heads,
        "consuming": consuming,
        "publishing": publishing,
    }


def served_evidence_url(ms: MetricsServer) -> str:
    """Where the metrics server serves evidence (``/evidence/<file>``): the default base URL of defect events.

    A wildcard bind is advertised by this host's name (what another machine can resolve); ``--evidence-url``
    says otherwise (a proxy, a TLS front, a name of the orchestrator's).
    """
    host = socket.getfqdn() if ms.all_interfaces else ms.host
    return f"http://{f'[{host}]' if ':' in host else host}:{ms.port}/evidence"


def serve_evidence(w: Worker, ms: MetricsServer | None) -> None:
    """Evidence over HTTP on the metrics server, at the URL the worker's config gives defect events."""
    if w.evidence is None or ms is None:
        return
    ms.add_route("/evidence/", w.evidence.http_get)
    log.info("evidence served at %s/<file>", w.evidence.url_base)


def main(args: argparse.Namespace) -> int:
    from workers.heads import HeadFollower
    from workers.worker import Worker  # noqa: F811 - the runtime import of the TYPE_CHECKING name

    quiet_kafka()
    kafka = kafka_from(args)
    # Bound first (started once the worker exists): its address is the evidence URL the config needs.
    ms = None if args.no_metrics else MetricsServer("worker", host=args.metrics_host, port=args.metrics_port)
    try:
        url = args.evidence_url or (served_evidence_url(ms) if args.evidence_dir and ms is not None else None)
        cfg = config_from(args, evidence_url=url)
        read_head_specs(args.head or [], args.backbone)  # what to score with, then whom to trust: before any model
        trust = trust_from(args)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        dev = resolve_device(args.device)
        bb, heads = load_file_heads(args.head or [], args.backbone, args.weights, dev, resolve_precision(args, dev))
        if args.compile != "off":
            bb.enable_compile(args.compile)
        ensure_topics(kafka)
        stop = threading.Event()
        stop_on_signals(stop)
        w = Worker(kafka, cfg, heads, stop_event=stop)
        start_metrics(args, "worker", server=ms, **worker_checks(kafka, w))
        serve_evidence(w, ms)
        if args.follow_heads:
            HeadFollower(kafka, w, bb, client_security_from(args), trust).start()
        w.run()
    finally:
        if ms is not None:
            ms.stop()
    return 0
