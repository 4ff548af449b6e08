"""``cff-inspect feedback FRAME_ID good|defect|unsure``: an operator's label on a verdict, for the line to learn from.

Writes one ``inspection.v1.Feedback`` record to the ``feedback`` topic (key = product id), in the topic's encoding
(``--topic-encoding feedback=json`` for canonical JSON). Without ``--product`` the frame's result is looked up on
the results topic, and its product, head and frame reference go into the record. The calibrator checks every
record (docs/line-calibration.md) and says in its log and metrics why one was refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from inspection_core.errors import ConfigError
from inspection_core.ids import MAX_FRAME_ID, check_free_id, check_product_id
from inspection_core.kafka import KafkaConfig, add_kafka_args, ensure_topics, kafka_from, quiet_kafka
from inspection_core.wire import WireError, decode, encode, to_json
from inspection_pb.v1 import feedback_pb2, results_pb2

LABELS = {"good": feedback_pb2.LABEL_GOOD, "defect": feedback_pb2.LABEL_DEFECT, "unsure": feedback_pb2.LABEL_UNSURE}


def add_feedback(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "feedback",
        help="label a scored frame good, defect or unsure (the line refits its head from labels)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("frame_id", help="the frame id of the result being labelled")
    p.add_argument("label", choices=tuple(LABELS), help="good: a false alarm; defect: a real defect (or a miss)")
    p.add_argument("--product", default=None, help="the frame's product (default: read from its result)")
    p.add_argument("--who", default="", help="operator or station, kept with the label")
    p.add_argument(
        "--lookup-timeout", type=float, default=10.0, help="seconds to look for its result (default %(default)s)"
    )
    add_kafka_args(p)
    p.set_defaults(func=main)


def find_result(kafka: KafkaConfig, frame_id: str, timeout_s: float) -> results_pb2.InspectionResult | None:
    """The newest OK result of ``frame_id`` on the results topic, read from its start (None if not found)."""
    c = kafka.consumer(kafka.topic("results"), group_id=None)
    found = None
    deadline = time.monotonic() + timeout_s
    quiet = 0
    try:
        while time.monotonic() < deadline and quiet < 3:
            polled = c.poll(timeout_ms=500)
            quiet = 0 if polled else quiet + 1
            for recs in polled.values():
                for rec in recs:
                    try:
                        r = decode(rec.value or b"", results_pb2.InspectionResult, rec.headers)
                    except WireError:
                        continue
                    if r.frame_id == frame_id and r.status == results_pb2.STATUS_OK:
                        found = r
    finally:
        c.close()
    return found


def build(args: argparse.Namespace, kafka: KafkaConfig) -> feedback_pb2.Feedback:
    frame_id = check_free_id(args.frame_id, what="frame id", limit=MAX_FRAME_ID, required=True)
    fb = feedback_pb2.Feedback(frame_id=frame_id, label=LABELS[args.label], who=args.who[:200])
    fb.time.GetCurrentTime()
    if args.product:
        fb.product_id = check_product_id(args.product)
        return fb
    r = find_result(kafka, frame_id, args.lookup_timeout)
    if r is None:
        raise ConfigError(
            f"no OK result of frame {frame_id!r} on {kafka.topic('results')} (looked {args.lookup_timeout:g} s): "
            "check the frame id, or give --product"
        )
    fb.product_id = r.product_id
    fb.head.CopyFrom(r.head)
    if r.HasField("frame_ref"):
        fb.frame_ref.CopyFrom(r.frame_ref)
    return fb


def main(args: argparse.Namespace) -> int:
    if not args.lookup_timeout > 0:
        raise ConfigError(f"--lookup-timeout must be > 0 seconds, got {args.lookup_timeout}")
    quiet_kafka()
    kafka = kafka_from(args)
    fb = build(args, kafka)
    ensure_topics(kafka)
    value, headers = encode(fb, kafka.encoding("feedback"))
    producer = kafka.producer()
    try:
        producer.send(kafka.topic("feedback"), key=fb.product_id.encode(), value=value, headers=headers).get(30)
    finally:
        producer.close(10)
    print(json.dumps(json.loads(to_json(fb))), file=sys.stdout)
    return 0
