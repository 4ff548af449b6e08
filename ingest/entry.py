"""``cff-inspect ingest``: options -> a frozen :class:`IngestSettings` -> cameras publishing to Kafka."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inspection_core.errors import ConfigError
from inspection_core.kafka import KafkaConfig, add_kafka_args, ensure_topics, kafka_from, quiet_kafka
from inspection_core.runtime import stop_on_signals
from monitoring.http import Check, add_metrics_args, broker_check, start_metrics

if TYPE_CHECKING:
    from ingest.cameras import CameraConfig, Ingest


@dataclass(frozen=True)
class IngestSettings:
    kafka: KafkaConfig
    cameras: tuple[CameraConfig, ...]
    buffer_size: int = 64
    max_frames: int | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if not self.cameras:
            raise ConfigError("no cameras: give --cameras FILE.toml or --camera ID=PRODUCT@SOURCE")

    def check_sources(self) -> None:
        """ConfigError (exit 2) when a camera's folder or file is missing on this host: checked when ingest starts,
        not when the settings are built, since a deployment's paths exist only where it runs."""
        from ingest.cameras import check_source

        for cam in self.cameras:
            check_source(cam)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cameras", default=None, help="TOML camera list ([[camera]] id, product, source, ...)")
    p.add_argument(
        "--camera", action="append", help="ID=PRODUCT@SOURCE[,fps=N][,loop=0|1][,attr.KEY=VALUE] (repeatable)"
    )
    p.add_argument(
        "--attribute",
        action="append",
        metavar="KEY=VALUE",
        help="attribute every camera's frames carry into their results and defect events, e.g. line=L3 "
        "(repeatable; a camera's own attributes win; per camera: attributes = { ... } in the TOML list)",
    )
    p.add_argument(
        "--buffer-size",
        type=int,
        default=64,
        help="bounded frame buffer; the oldest frame is dropped (and counted) when full",
    )
    p.add_argument("--max-frames", type=int, default=None, help="per camera, then stop")
    p.add_argument("--duration", type=float, default=None, help="seconds, then stop")
    add_kafka_args(p)
    add_metrics_args(p, "ingest")


def settings_from(args: argparse.Namespace) -> IngestSettings:
    from ingest.cameras import load_cameras, parse_attribute, parse_camera, with_attributes

    cams = load_cameras(args.cameras) if args.cameras else []
    cams += [parse_camera(c) for c in args.camera or []]
    cams = with_attributes(cams, dict(parse_attribute(a) for a in args.attribute or []))
    return IngestSettings(
        kafka=kafka_from(args),
        cameras=tuple(cams),
        buffer_size=args.buffer_size,
        max_frames=args.max_frames,
        duration_s=args.duration,
    )


def ingest_checks(kafka: KafkaConfig, ing: Ingest) -> dict[str, Check]:
    """Ready = the broker answers, at least one camera delivers frames and the last publish was acknowledged."""

    def cameras() -> tuple[bool, str]:
        up = [c for c, ok in ing.stats.camera_up.items() if ok]
        return bool(up), f"{len(up)}/{len(ing.cameras)} cameras up"

    def publishing() -> tuple[bool, str]:
        err = ing.publish_error
        return (err is None, f"{len(ing.buffer)} frames buffered" if err is None else f"publishing fails: {err[:200]}")

    return {"broker": broker_check(kafka.bootstrap_servers), "cameras": cameras, "publishing": publishing}


def main(args: argparse.Namespace) -> int:
    from ingest.cameras import Ingest  # noqa: F811 - the runtime import of the TYPE_CHECKING name

    quiet_kafka()
    s = settings_from(args)
    s.check_sources()
    ensure_topics(s.kafka)
    ing = Ingest(s.kafka, list(s.cameras), buffer_size=s.buffer_size, max_frames=s.max_frames)
    ms = start_metrics(args, "ingest", **ingest_checks(s.kafka, ing))
    ing.start()
    stop_on_signals(ing.stop_event)
    deadline = time.monotonic() + s.duration_s if s.duration_s else None
    while not ing.stop_event.is_set() and ing.running:
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
