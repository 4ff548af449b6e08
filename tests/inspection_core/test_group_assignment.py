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


W1, W2 = b"cff-inspect/w1", b"cff-inspect/w2"


def test_stale_member_ids_of_one_consumer_share_its_partitions() -> None:
    a = one_assignment_per_consumer()
    members = [_member("m1", W1), _member("m2", W1), _member("m3", W1), _member("m4", W2)]
    out = a.assign(_Cluster({"f": 4}), members)
    assert set(out) == {"m1", "m2", "m3", "m4"}  # every member id gets an answer
    assert _parts(out["m1"]) == _parts(out["m2"]) == _parts(out["m3"]) == [0, 1]  # w1 counted once
    assert _parts(out["m4"]) == [2, 3]


def test_a_lone_consumer_with_stale_member_ids_reads_every_partition() -> None:
    """The failure seen: one worker, three kept member ids, 4 partitions; plain range gave the worker 1 of 4."""
    from kafka.coordinator.assignors.range import RangePartitionAssignor

    members = [_member(f"m{i}", W1) for i in range(4)]
    plain = RangePartitionAssignor.assign(_Cluster({"f": 4}), members)
    assert [_parts(plain[f"m{i}"]) for i in range(4)] == [[0], [1], [2], [3]]
    out = one_assignment_per_consumer().assign(_Cluster({"f": 4}), members)
    assert all(_parts(out[f"m{i}"]) == [0, 1, 2, 3] for i in range(4))


def test_member_ids_without_an_identity_get_nothing_while_a_consumer_has_one() -> None:
    """The failure seen after a broker restart: a lone worker got 1 of 4 partitions and logged no shared member ids,
    so the other three went to kept member ids without metadata. Everything that offers this protocol sends an
    identity, so an id without one is such a leftover."""
    members = [_member("a", b""), _member("b", b"other"), _member("c", W1), _member("d", W1), _member("e", b"")]
    out = one_assignment_per_consumer().assign(_Cluster({"f": 4}), members)
    assert set(out) == set("abcde")  # every member id gets an answer
    assert [_parts(out[m]) for m in "abcde"] == [[], [], [0, 1, 2, 3], [0, 1, 2, 3], []]
    # nobody identified (not this protocol's members): plain range over every member id
    plain = one_assignment_per_consumer().assign(_Cluster({"f": 3}), [_member(m, b"") for m in "abc"])
    assert [_parts(plain[m]) for m in "abc"] == [[0], [1], [2]]


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


def test_a_lone_leader_short_of_partitions_is_told_to_rejoin() -> None:
    """Seen after a broker restart: the lone leader assigned itself all 4 partitions, the broker answered with an
    older assignment of 1, and the client saw nothing to rejoin for."""
    from kafka.structs import TopicPartition

    from inspection_core.kafka import assignment_shortfall

    mine = one_assignment_per_consumer()
    mine.assign(_Cluster({"f": 4}), [_member("m1", W1), _member("m2", W1)])  # alone (one consumer, two ids)
    assert mine.sole_assignment == {"f": {0, 1, 2, 3}}
    consumer = SimpleNamespace(
        config={"partition_assignment_strategy": (mine,)},
        _coordinator=SimpleNamespace(_is_leader=True),
        subscription=lambda: {"f"},
        partitions_for_topic=lambda t: {0, 1, 2, 3},
    )
    why = assignment_shortfall(consumer, {TopicPartition("f", 0)})
    assert why is not None and "[0]" in why and "[0, 1, 2, 3]" in why
    assert assignment_shortfall(consumer, {TopicPartition("f", p) for p in range(4)}) is None
    # not the leader, or not alone: splitting is the other consumers' business
    consumer._coordinator._is_leader = False
    assert assignment_shortfall(consumer, {TopicPartition("f", 0)}) is None
    consumer._coordinator._is_leader = True
    mine.assign(_Cluster({"f": 4}), [_member("m1", W1), _member("m3", W2)])
    assert mine.sole_assignment is None and assignment_shortfall(consumer, {TopicPartition("f", 0)}) is None
