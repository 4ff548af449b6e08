"""``cff-inspect tail results|defects|dlq|frames|heads``: a topic's records as JSON lines on stdout.

What an MES developer runs first: it shows the exact messages a consumer will get, in protobuf's canonical JSON
mapping whatever the topic's encoding (each record's ``content-type`` header says which), and pipes into ``jq``.
Image bytes are left out unless ``--with-bytes``: a frame's JPEG in base64 is no use on a terminal.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import time
from typing import TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from inspection_core.errors import ConfigError
from inspection_core.kafka import KafkaConfig, LostLogRewind, add_kafka_args, kafka_from, quiet_kafka
from inspection_core.wire import CONTENT_TYPE, WireError, decode, header, parse_content_type
from inspection_pb.v1 import feedback_pb2, frames_pb2, heads_pb2, results_pb2

log = logging.getLogger(__name__)
MESSAGES: dict[str, type[Message]] = {
    "results": results_pb2.InspectionResult,
    "defects": results_pb2.DefectEvent,
    "frames": frames_pb2.Frame,
    "heads": heads_pb2.HeadAnnouncement,
    "feedback": feedback_pb2.Feedback,
}
TOPIC_CHOICES = ("results", "defects", "dlq", "frames", "heads", "feedback")
BYTES_FIELDS = ("image", "heatmapPng")


def add_tail(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tail",
        help="print a topic's records as JSON lines (results, defects, dlq, frames, heads, feedback); verdicts of a "
        'commissioning head version show "provisional": true',
        description=__doc__.splitlines()[0],
    )
    p.add_argument("topic", choices=TOPIC_CHOICES)
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest record (default: new ones)")
    p.add_argument("-n", "--max-messages", type=int, default=None, help="stop after this many records")
    p.add_argument(
        "--idle-timeout", type=float, default=None, help="stop after this many quiet seconds (default: follow)"
    )
    p.add_argument("--product", default=None, help="only records of this product")
    p.add_argument("--camera", default=None, help="only records of this camera")
    p.add_argument("--envelope", action="store_true", help="wrap each message with topic, offset, key and headers")
    p.add_argument("--with-bytes", action="store_true", help="keep image and heatmap bytes (base64)")
    add_kafka_args(p)
    p.set_defaults(func=main)


def _strip_bytes(d: dict) -> dict:
    for k in BYTES_FIELDS:
        if d.get(k):
            d[k] = None
    return d


def _headers(rec) -> dict[str, str]:  # noqa: ANN001 - kafka ConsumerRecord
    return {k: v.decode("utf-8", "replace") for k, v in rec.headers or ()}


def _as_dict(m: Message, rec) -> dict | None:  # noqa: ANN001
    """protobuf's JSON mapping of ``m``; None (logged) when it has no JSON form, e.g. a time past year 9999."""
    try:
        return json_format.MessageToDict(m, always_print_fields_with_no_presence=True)
    except (json_format.Error, ValueError, OverflowError) as exc:
        log.warning(
            "%s partition %d offset %d: the record decodes but cannot be shown as JSON (%s); skipped",
            rec.topic,
            rec.partition,
            rec.offset,
            str(exc)[:200],
        )
        return None


def render(topic: str, rec, *, envelope: bool = False, with_bytes: bool = False) -> dict | None:  # noqa: ANN001
    """One record as the JSON object ``tail`` prints (None when it does not decode or has no JSON form; the reason
    is logged and tail goes on: one bad record must not end it)."""
    hdrs = rec.headers or []
    if topic == "dlq":
        enc, _ = parse_content_type(header(hdrs, CONTENT_TYPE))
        frame = None
        try:
            frame = decode(rec.value or b"", frames_pb2.Frame, hdrs) if enc is not None else None
        except WireError:
            pass
        msg: dict = {
            "reason": (header(hdrs, "reason") or b"").decode("utf-8", "replace"),
            "reasonCode": (header(hdrs, "reason-code") or b"").decode("utf-8", "replace"),
            "worker": (header(hdrs, "worker") or b"").decode("utf-8", "replace"),
            "sizeBytes": len(rec.value or b""),
            "truncatedFromBytes": int(header(hdrs, "truncated-from-bytes") or 0) or None,
            "frame": None if frame is None or (shown := _as_dict(frame, rec)) is None else _strip_bytes(shown),
        }
        if with_bytes:
            msg["value"] = base64.b64encode(rec.value or b"").decode()
        envelope = True  # a dead letter is its headers as much as its bytes
    else:
        try:
            m = decode(rec.value or b"", MESSAGES[topic], hdrs)
        except WireError as exc:
            log.warning("%s partition %d offset %d: %s", rec.topic, rec.partition, rec.offset, exc)
            return None
        shown = _as_dict(m, rec)
        if shown is None:
            return None
        msg = shown
        if not with_bytes:
            msg = _strip_bytes(msg)
    if not envelope:
        return msg
    return {
        "topic": rec.topic,
        "partition": rec.partition,
        "offset": rec.offset,
        "timestamp": rec.timestamp,
        "key": None if rec.key is None else rec.key.decode("utf-8", "replace"),
        "headers": _headers(rec),
        "message": msg,
    }


def _wanted(topic: str, obj: dict, product: str | None, camera: str | None) -> bool:
    m = obj.get("message", obj) if topic != "dlq" else (obj["message"].get("frame") or {})
    if product is not None and m.get("productId", (m.get("head") or {}).get("productId")) != product:
        return False
    return camera is None or m.get("cameraId") == camera


def tail(kafka: KafkaConfig, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Print records until ``--max-messages`` or ``--idle-timeout``; returns how many were printed."""
    short = "frames.dlq" if args.topic == "dlq" else args.topic
    consumer = kafka.consumer(
        kafka.topic(short), group_id=None, auto_offset_reset="earliest" if args.from_beginning else "latest"
    )
    printed = 0
    last = time.monotonic()
    rewind = LostLogRewind("tail")
    try:
        while args.max_messages is None or printed < args.max_messages:
            polled = consumer.poll(timeout_ms=500)
            rewind.check(consumer)
            if not polled:
                if args.idle_timeout is not None and time.monotonic() - last > args.idle_timeout:
                    break
                continue
            last = time.monotonic()
            for rec in sorted((r for rs in polled.values() for r in rs), key=lambda r: (r.timestamp, r.offset)):
                obj = render(args.topic, rec, envelope=args.envelope, with_bytes=args.with_bytes)
                if obj is None or not _wanted(args.topic, obj, args.product, args.camera):
                    continue
                out.write(json.dumps(obj, separators=(",", ":")) + "\n")
                out.flush()
                printed += 1
                if args.max_messages is not None and printed >= args.max_messages:
                    break
    except BrokenPipeError:  # `tail ... | head`: the reader is done, so are we
        pass
    finally:
        consumer.close()
    return printed


def main(args: argparse.Namespace) -> int:
    if args.max_messages is not None and args.max_messages < 1:
        raise ConfigError(f"--max-messages must be >= 1, got {args.max_messages}")
    if args.idle_timeout is not None and not args.idle_timeout > 0:
        raise ConfigError(f"--idle-timeout must be > 0 seconds, got {args.idle_timeout}")
    quiet_kafka()
    tail(kafka_from(args), args)
    return 0
