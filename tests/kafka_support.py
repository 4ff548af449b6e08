"""Reading a topic in tests, the one way: from the start, until a condition holds or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable

from inspection_core.kafka import KafkaConfig


def poll_topic(
    kafka: KafkaConfig,
    topic: str,
    *,
    keep: Callable[[object], bool] = lambda rec: True,
    until: Callable[[list], bool] = bool,
    timeout: float = 30.0,
) -> list:
    """Records of ``topic`` (short name) that ``keep`` accepts, read until ``until(records)`` or ``timeout``.

    ``until`` defaults to "at least one". A fresh group-less consumer each call, so every call sees the whole
    topic; the caller asserts on what came back (a timeout is not an error here).
    """
    c = kafka.consumer(kafka.topic(topic), group_id=None)
    try:
        return poll_records(c, keep=keep, until=until, timeout=timeout)
    finally:
        c.close()


def poll_records(
    consumer,  # noqa: ANN001 - a kafka-python KafkaConsumer, subscribed or assigned
    *,
    keep: Callable[[object], bool] = lambda rec: True,
    until: Callable[[list], bool] = bool,
    timeout: float = 30.0,
) -> list:
    """Records of ``consumer`` that ``keep`` accepts, polled until ``until(records)`` or ``timeout``."""
    got: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        for msgs in consumer.poll(timeout_ms=500).values():
            got.extend(m for m in msgs if keep(m))
    return got
