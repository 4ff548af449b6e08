"""A broker that lost its log (the embedded broker restarted, an unclean leader election) counts offsets from 0
again; Tansu answers a fetch past the end with nothing instead of OFFSET_OUT_OF_RANGE, so consumers must notice."""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka_support import poll_records

from inspection_core.kafka import KafkaConfig, LostLogRewind

pytestmark = pytest.mark.integration


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _consumer_at(kafka: KafkaConfig, tp: TopicPartition, offset: int) -> KafkaConsumer:
    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
    c.assign([tp])
    c.seek(tp, offset)
    return c


def _produce(kafka: KafkaConfig, tp: TopicPartition, n: int) -> None:
    p = kafka.producer()
    for i in range(n):
        p.send(tp.topic, value=b"%d" % i)
    p.flush()
    p.close()


def _setup(start_broker, produced: int, at: int) -> tuple[KafkaConsumer, TopicPartition, _Clock, LostLogRewind]:  # noqa: ANN001
    """A one-partition frames topic holding ``produced`` records, a consumer standing at offset ``at`` and a
    rewind with a 2 s settle time on a clock the test moves."""
    kafka = start_broker(partitions=1)
    tp = TopicPartition(kafka.topics["frames"], 0)
    _produce(kafka, tp, produced)
    clock = _Clock()
    return _consumer_at(kafka, tp, at), tp, clock, LostLogRewind("test", settle_s=2.0, clock=clock)


def _poll_until_highwater(c: KafkaConsumer, tp: TopicPartition) -> list:
    got = poll_records(c, until=lambda _: c.highwater(tp) is not None, timeout=20)
    assert c.highwater(tp) is not None, "no fetch response arrived"
    return got


def test_a_consumer_past_the_end_is_rewound_once_it_stays_there(start_broker) -> None:
    c, tp, clock, rewind = _setup(start_broker, 10, 500)  # where it stood before the broker lost its log
    try:
        assert _poll_until_highwater(c, tp) == []  # Tansu: no error, no records
        assert c.highwater(tp) == 10 and c.position(tp) == 500
        assert rewind.check(c) == []  # first sight: could be a stale high-water mark
        clock.t = 1.0
        assert rewind.check(c) == []
        clock.t = 2.5
        assert rewind.check(c) == [tp]
        got = poll_records(c, until=lambda recs: len(recs) >= 10, timeout=20)
        assert [r.value for r in got] == [b"%d" % i for i in range(10)]  # nothing of the new log is skipped
        assert rewind.rewinds == 1
    finally:
        c.close()


def test_a_consumer_at_or_before_the_end_is_left_alone(start_broker) -> None:
    c, tp, clock, rewind = _setup(start_broker, 5, 0)
    try:
        got = poll_records(c, until=lambda recs: len(recs) >= 5 and c.highwater(tp) is not None, timeout=20)
        assert len(got) == 5 and c.position(tp) == 5 == c.highwater(tp)
        for t in (0.0, 3.0, 10.0):
            clock.t = t
            assert rewind.check(c) == []
        assert c.position(tp) == 5 and rewind.rewinds == 0
    finally:
        c.close()


def test_a_position_that_moves_is_not_rewound(start_broker) -> None:
    """Past the end but moving (a high-water mark that lags a fetch): the settle clock starts again."""
    c, tp, clock, rewind = _setup(start_broker, 1, 100)
    try:
        _poll_until_highwater(c, tp)
        assert rewind.check(c) == []
        c.seek(tp, 101)
        clock.t = 3.0
        assert rewind.check(c) == []  # a different position: first sight again
        clock.t = 4.0
        assert rewind.check(c) == []
        clock.t = 5.5
        assert rewind.check(c) == [tp]
    finally:
        c.close()
