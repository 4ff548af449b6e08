"""Stage 2 of the worker, the Kafka loop, on the real embedded broker."""

from __future__ import annotations

import threading
import time

import pytest

from inspection_core.runtime import wait_for
from workers.config import WorkerConfig
from workers.worker import Worker

pytestmark = pytest.mark.integration


def test_a_record_over_the_brokers_limit_is_dead_lettered_cut_and_committed_past(start_broker) -> None:
    """A 17 MiB record used to crash-loop the worker: its dead letter was over the producer's 16 MiB limit,
    so the batch never committed and every restart met it again."""
    kafka = start_broker(partitions=1)
    prod = kafka.producer(max_request_size=24 << 20)
    big = b"\xff" * (17 << 20)  # not a Frame: dead-lettered as it came
    prod.send(kafka.topic("frames"), key=b"cam", value=big).get(30)
    prod.close()
    cfg = WorkerConfig(max_wait_ms=10, publish_timeout_s=10, group_id="g-big")
    w = Worker(kafka, cfg)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        assert wait_for(lambda: w.counters["batches"] >= 1, 60), f"no batch went through: {dict(w.counters)}"
        assert t.is_alive(), "the worker stopped"
    finally:
        w.stop_event.set()
        t.join(30)
    assert w.counters["dlq_truncated"] == 1 and w.counters["dlq_unparseable"] == 1
    dlq = kafka.consumer(kafka.topic("frames.dlq"), group_id=None)
    try:
        got: list = []
        deadline = time.monotonic() + 15
        while not got and time.monotonic() < deadline:
            for msgs in dlq.poll(timeout_ms=500).values():
                got.extend(msgs)
    finally:
        dlq.close()
    (m,) = got
    headers = dict(m.headers)
    assert len(m.value) == cfg.dlq_max_bytes and m.value == big[: cfg.dlq_max_bytes]
    assert headers["truncated-from-bytes"] == str(len(big)).encode() and b"Frame" in headers["reason"]
    # committed past it: the group's next member starts after the record, not on it again
    from kafka import TopicPartition

    c = kafka.consumer(group_id="g-big")
    try:
        assert c.committed(TopicPartition(kafka.topic("frames"), 0)) == 1
    finally:
        c.close()
