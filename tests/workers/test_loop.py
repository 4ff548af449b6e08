"""Stage 2 of the worker, the Kafka loop, on the real embedded broker."""

from __future__ import annotations

import threading

import pytest

from inspection_core.errors import InspectionError, KafkaError
from workers.config import WorkerConfig
from workers.worker import Worker

pytestmark = pytest.mark.integration


def test_a_batch_the_broker_refuses_stops_the_worker_with_a_kafka_error(start_broker) -> None:
    """kafka-python's own exceptions never leave ``Worker.run``: the CLI prints one line and exits 2."""
    kafka = start_broker(partitions=1)
    prod = kafka.producer(max_request_size=24 << 20)
    # Not a Frame, so it is dead-lettered as it is, and over the worker producer's 16 MiB request limit.
    prod.send(kafka.topic("frames"), key=b"cam", value=b"\xff" * (17 << 20)).get(30)
    prod.close()
    w = Worker(kafka, WorkerConfig(max_wait_ms=10, publish_timeout_s=5))
    raised: list[BaseException] = []

    def run() -> None:
        try:
            w.run()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            raised.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(90)
    if t.is_alive():
        w.stop_event.set()
        t.join(30)
        pytest.fail("the worker kept running after the broker refused its batch")
    assert len(raised) == 1 and isinstance(raised[0], KafkaError) and isinstance(raised[0], InspectionError)
    assert kafka.bootstrap_servers in str(raised[0]) and "MessageSizeTooLarge" in str(raised[0])
    assert w.counters["batches"] == 0 and w.counters["published"] == 0  # nothing acknowledged, nothing committed
