"""Group assignment counts each consumer once: a restarted embedded broker keeps member ids of joins whose
answers never arrived, and plain range assignment handed them (and so nobody) most of a lone worker's partitions."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from inspection_core.kafka import KafkaConfig, one_assignment_per_consumer


class _Cluster:
    def __init__(self, partitions: dict[str, int]) -> None:
        self.partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self.partitions.get(topic)
        return None if n is None else set(range(n))


def _member(member_id: str, identity: bytes, topics: tuple[str, ...] = ("f",)) -> SimpleNamespace:
    meta = SimpleNamespace(topics=list(topics), user_data=identity)
    return SimpleNamespace(member_id=member_id, group_instance_id=None, metadata=meta)


def _parts(assignment) -> list[int]:  # noqa: ANN001 - a ConsumerProtocolAssignment
    return sorted(p for tp in assignment.partitions() for p in [tp.partition])


def test_stale_member_ids_of_one_consumer_share_its_partitions() -> None:
    a = one_assignment_per_consumer()
    members = [_member("m1", b"w1"), _member("m2", b"w1"), _member("m3", b"w1"), _member("m4", b"w2")]
    out = a.assign(_Cluster({"f": 4}), members)
    assert set(out) == {"m1", "m2", "m3", "m4"}  # every member id gets an answer
    assert _parts(out["m1"]) == _parts(out["m2"]) == _parts(out["m3"]) == [0, 1]  # w1 counted once
    assert _parts(out["m4"]) == [2, 3]


def test_a_lone_consumer_with_stale_member_ids_reads_every_partition() -> None:
    """The failure seen: one worker, three kept member ids, 4 partitions; plain range gave the worker 1 of 4."""
    from kafka.coordinator.assignors.range import RangePartitionAssignor

    members = [_member(f"m{i}", b"w1") for i in range(4)]
    plain = RangePartitionAssignor.assign(_Cluster({"f": 4}), members)
    assert [_parts(plain[f"m{i}"]) for i in range(4)] == [[0], [1], [2], [3]]
    out = one_assignment_per_consumer().assign(_Cluster({"f": 4}), members)
    assert all(_parts(out[f"m{i}"]) == [0, 1, 2, 3] for i in range(4))


def test_members_without_an_identity_count_one_each() -> None:
    members = [_member("a", b""), _member("b", b""), _member("c", b"w1"), _member("d", b"w1")]
    out = one_assignment_per_consumer().assign(_Cluster({"f": 3}), members)
    assert [_parts(out[m]) for m in "abcd"] == [[0], [1], [2], [2]]


def test_each_consumer_has_its_own_identity_in_its_subscription() -> None:
    a, b = one_assignment_per_consumer(), one_assignment_per_consumer()
    ma, mb = a.metadata({"f"}), b.metadata({"f"})
    assert ma.user_data != mb.user_data and ma.user_data == a.metadata({"f"}).user_data  # stable per consumer
    assert ma.topics == ["f"]


@pytest.mark.integration
def test_on_the_real_broker_member_ids_of_one_consumer_share_and_others_split(start_broker) -> None:
    """Two consumers sharing one identity stand for one consumer whose earlier member id the broker kept: each
    gets the whole topic; a third, its own consumer, then splits the partitions with them."""
    kafka: KafkaConfig = start_broker(partitions=4)
    topic = kafka.topics["frames"]
    shared = one_assignment_per_consumer()
    stop = threading.Event()
    consumers = [kafka.consumer(topic, group_id="g", partition_assignment_strategy=(shared,)) for _ in range(2)]

    def spin(c) -> None:  # noqa: ANN001
        while not stop.is_set():
            c.poll(timeout_ms=200)

    threads = [threading.Thread(target=spin, args=(c,), daemon=True) for c in consumers]

    def assignments() -> list[list[int]]:
        return [sorted(tp.partition for tp in c.assignment()) for c in consumers]

    def settle(ok, timeout: float = 60) -> list[list[int]]:  # noqa: ANN001 - a predicate on assignments()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ok(assignments()):
            time.sleep(0.2)
        return assignments()

    def split(got: list[list[int]]) -> bool:
        return len(got) == 3 and got[0] == got[1] and len(got[0]) == 2 and sorted(got[0] + got[2]) == [0, 1, 2, 3]

    try:
        for t in threads:
            t.start()
        whole = [[0, 1, 2, 3], [0, 1, 2, 3]]
        assert settle(lambda got: got == whole) == whole
        other = kafka.consumer(topic, group_id="g")  # its own identity: a second consumer
        consumers.append(other)
        threads.append(threading.Thread(target=spin, args=(other,), daemon=True))
        threads[-1].start()
        got = settle(split)
        assert split(got), got
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for c in consumers:
            c.close()
