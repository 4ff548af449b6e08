"""Kafka settings, topic names and topic creation, shared by ingest, workers and calibrator.

Code talks to any Kafka cluster through kafka-python; SASL and TLS settings pass
through from configuration. Secrets are never part of ``repr`` or logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from inspection_core.env import env_name
from inspection_core.errors import ConfigError, KafkaError

log = logging.getLogger(__name__)
TOPICS = ("frames", "results", "defects", "frames.dlq", "heads", "feedback")
# Topic configs this system sets when it creates a topic (a --topic-setting overrides them; everything else is
# the broker's default). Frames carry JPEGs: 6 h of them is a replay window, not an archive.
TOPIC_DEFAULTS: dict[str, dict[str, str]] = {
    "frames": {"retention.ms": str(6 * 3600 * 1000)},
    "frames.dlq": {"retention.ms": str(7 * 24 * 3600 * 1000)},
    "heads": {"cleanup.policy": "compact"},
}
# Output topics whose encoding a deployment may choose (--topic-encoding); frames stay protobuf (they carry
# images), the heads topic too (its signatures cover the exact protobuf bytes), dead letters keep what came in.
# Feedback is written by operator tools (cff-inspect feedback, an MES) and read back in either encoding.
ENCODABLE_TOPICS = ("results", "defects", "feedback")
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_CONFIG_KEY = re.compile(r"[a-z][a-z0-9.]*[a-z0-9]")


def parse_topic_encoding(spec: str) -> tuple[str, str]:
    """``defects=json`` -> ("defects", "json")."""
    from inspection_core.wire import ENCODINGS

    topic, eq, enc = spec.partition("=")
    if not eq or topic not in ENCODABLE_TOPICS or enc not in ENCODINGS:
        raise ConfigError(
            f"--topic-encoding {spec[:120]!r}: expected TOPIC=ENCODING with TOPIC one of {', '.join(ENCODABLE_TOPICS)} "
            f"and ENCODING one of {', '.join(ENCODINGS)} (e.g. defects=json)"
        )
    return topic, enc


def parse_topic_setting(spec: str) -> tuple[str, str, str]:
    """``frames.retention.ms=3600000`` -> ("frames", "retention.ms", "3600000"); the topic is one of TOPICS."""
    name, eq, value = spec.partition("=")
    topic = next((t for t in sorted(TOPICS, key=len, reverse=True) if name.startswith(t + ".")), None)
    if not eq or topic is None or not value.strip():
        raise ConfigError(
            f"--topic-setting {spec[:120]!r}: expected TOPIC.KEY=VALUE with TOPIC one of {', '.join(TOPICS)} "
            "(e.g. frames.retention.ms=3600000, results.partitions=12, defects.replication.factor=3)"
        )
    key = name[len(topic) + 1 :]
    if not _CONFIG_KEY.fullmatch(key):
        raise ConfigError(f"--topic-setting {spec[:120]!r}: {key!r} is not a Kafka topic config name")
    if key in ("partitions", "replication.factor"):
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(f"--topic-setting {spec[:120]!r}: {key} must be an integer") from None
        if n < 1 and not (key == "replication.factor" and n == -1):
            raise ConfigError(
                f"--topic-setting {spec[:120]!r}: {key} must be >= 1 (replication.factor -1: broker default)"
            )
    return topic, key, value.strip()


_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]+\]")


def check_server(server: str) -> None:
    """``HOST:PORT`` (``[IPv6]:PORT``; a bare HOST means port 9092, as Kafka clients read it); anything else is a
    ConfigError naming the entry, before any client tries to connect."""
    host, colon, port = server.rpartition(":") if not server.endswith("]") else (server, "", "")
    if not colon:
        host, port = server, "9092"
    ok = bool(_HOST.fullmatch(host)) and port.isdigit() and 1 <= int(port) <= 65535
    if not ok:
        raise ConfigError(
            f"bootstrap server {server[:120]!r} is not HOST:PORT (a comma-separated list, e.g. "
            "kafka-1:9092,kafka-2:9092; set by --bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS)"
        )


@dataclass(frozen=True)
class TopicSpec:
    """What :func:`ensure_topics` asks the broker for when it creates one topic."""

    name: str
    partitions: int
    replication_factor: int  # -1: the broker's default.replication.factor
    configs: dict[str, str]


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = field(default_factory=lambda: _env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092") or "")
    topic_prefix: str = field(default_factory=lambda: _env("CFF_INSPECT_TOPIC_PREFIX", "inspection.") or "")
    client_id: str = "cff-inspect"
    security_protocol: str = field(default_factory=lambda: _env("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT") or "PLAINTEXT")
    sasl_mechanism: str | None = field(default_factory=lambda: _env("KAFKA_SASL_MECHANISM"))
    sasl_username: str | None = field(default_factory=lambda: _env("KAFKA_SASL_USERNAME"))
    sasl_password: str | None = field(default_factory=lambda: _env("KAFKA_SASL_PASSWORD"), repr=False)
    ssl_cafile: str | None = field(default_factory=lambda: _env("KAFKA_SSL_CAFILE"))
    ssl_certfile: str | None = field(default_factory=lambda: _env("KAFKA_SSL_CERTFILE"))
    ssl_keyfile: str | None = field(default_factory=lambda: _env("KAFKA_SSL_KEYFILE"))
    partitions: int = 6
    replication_factor: int = -1  # -1: the broker's default (3 on a typical production cluster)
    topic_settings: tuple[tuple[str, str, str], ...] = ()  # (topic, key, value) from --topic-setting
    topic_encodings: tuple[tuple[str, str], ...] = ()  # (topic, protobuf | json) from --topic-encoding

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ConfigError("bootstrap servers are empty (set --bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS)")
        for server in self.bootstrap_servers.split(","):
            check_server(server.strip())
        valid = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if self.security_protocol not in valid:
            raise ConfigError(f"security protocol {self.security_protocol!r} is not one of {', '.join(valid)}")
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ConfigError(f"security protocol {self.security_protocol} needs a SASL mechanism")
        if self.partitions < 1:
            raise ConfigError(f"partitions must be >= 1, got {self.partitions}")
        if self.replication_factor < 1 and self.replication_factor != -1:
            raise ConfigError(f"replication factor must be >= 1 or -1 (broker default), got {self.replication_factor}")
        for topic, enc in self.topic_encodings:
            parse_topic_encoding(f"{topic}={enc}")
        if not _TOPIC_NAME.fullmatch(self.topic("frames.dlq")):
            raise ConfigError(
                f"topic prefix {self.topic_prefix[:80]!r} makes invalid topic names (Kafka allows a-z A-Z 0-9 . _ -, "
                "up to 249 characters)"
            )

    def topic_specs(self) -> list[TopicSpec]:
        """Every topic of the system as it would be created: defaults, then --partitions and
        --replication-factor, then each --topic-setting."""
        parts = {"frames": self.partitions, "results": self.partitions, "defects": max(1, self.partitions // 2)}
        specs = []
        for short in TOPICS:
            n, rf = parts.get(short, 1), self.replication_factor
            configs = dict(TOPIC_DEFAULTS.get(short, {}))
            for topic, key, value in self.topic_settings:
                if topic != short:
                    continue
                if key == "partitions":
                    n = int(value)
                elif key == "replication.factor":
                    rf = int(value)
                else:
                    configs[key] = value
            specs.append(TopicSpec(self.topic(short), n, rf, configs))
        return specs

    def encoding(self, short: str) -> str:
        """How records of topic ``short`` are written (the last --topic-encoding for it wins)."""
        return next((e for t, e in reversed(self.topic_encodings) if t == short), "protobuf")

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def topics(self) -> dict[str, str]:
        return {n: self.topic(n) for n in TOPICS}

    def client_kwargs(self) -> dict:
        """Keyword arguments common to kafka-python producers, consumers and admin clients."""
        kw: dict = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kw.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        for k in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, k):
                kw[k] = getattr(self, k)
        return kw

    def producer(self, **extra: object):  # noqa: ANN201 - kafka-python type
        """Idempotent, acks=all producer (acks=0 loses messages on the embedded broker)."""
        from kafka import KafkaProducer

        kw = dict(
            allow_auto_create_topics=False,  # see consumer()
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            max_request_size=16 * 1024 * 1024,
            retries=5,
            request_timeout_ms=30000,
        )
        kw.update(extra)
        try:
            return KafkaProducer(**self.client_kwargs(), **kw)
        except Exception as exc:  # kafka-python raises its own hierarchy
            raise KafkaError(f"cannot create a producer for {self.bootstrap_servers}: {exc}") from None

    def consumer(self, *topics: str, group_id: str | None = None, **extra: object):  # noqa: ANN201
        from kafka import KafkaConsumer

        kw = dict(
            # A topic is made by ensure_topics with its partitions, retention and compaction, so clients ask for
            # no auto-creation. Tansu auto-creates on any metadata request all the same (4 partitions): after a
            # memory-storage broker restart the frames topic may come back with more partitions than before,
            # so metadata is refreshed every 10 s (not 5 min) and the group rebalances onto them soon.
            allow_auto_create_topics=False,
            metadata_max_age_ms=10000,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            # Also the rebalance timeout: how long the coordinator waits for every member to rejoin. Members of
            # rejoins that failed while a restarted embedded broker came up never rejoin; with 300 s the group
            # handed them 3 of the 4 partitions (or stalled) for 5 minutes. A worker polls between batches,
            # seconds apart; one that could not poll for 30 s (publishing to a broker that is down) rejoins.
            max_poll_interval_ms=30000,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=32 * 1024 * 1024,
        )
        if group_id is not None:
            from kafka.coordinator.assignors.range import RangePartitionAssignor

            # range while any member runs an older version (the broker picks a strategy every member has)
            kw["partition_assignment_strategy"] = (one_assignment_per_consumer(), RangePartitionAssignor)
        kw.update(extra)
        try:
            return KafkaConsumer(*topics, **self.client_kwargs(), **kw)
        except Exception as exc:
            raise KafkaError(f"cannot create a consumer for {self.bootstrap_servers}: {exc}") from None


IDENTITY_PREFIX = b"cff-inspect/"  # what every consumer of the range-per-consumer protocol puts in its user data


def one_assignment_per_consumer():  # noqa: ANN201 - a kafka-python AbstractPartitionAssignor
    """The range assignor, counting each consumer once however many member ids the broker keeps for it.

    A restarted embedded broker keeps the member ids of joins whose answers it never delivered, and includes
    them in every rebalance without expiring them: a worker alone in its group was handed 1 of 4 partitions
    and the other 3, holding every frame of its camera, went to its own stale member ids for good. Each
    consumer puts a random identity in its subscription's user data (the same in every join it sends), so the
    leader sees those member ids as one consumer, assigns partitions per consumer and gives every member id of a
    consumer the same partitions; only the live one fetches them. One instance per consumer.

    A member can only be assigned by this protocol when every member offered it, and everything that offers it sends
    an identity; a member id without one is what the broker kept of a join whose metadata it lost. Such ids get no
    partitions while any member has an identity (seen: a lone worker handed 1 of 4 partitions, no consumer sharing
    member ids, after the embedded broker restarted); only if none has one does plain range apply.
    """
    import uuid

    from kafka.coordinator.assignors.abstract import ConsumerProtocolAssignment
    from kafka.coordinator.assignors.range import RangePartitionAssignor
    from kafka.protocol.consumer.metadata import ConsumerProtocolSubscription

    class OneAssignmentPerConsumer(RangePartitionAssignor):
        name = "range-per-consumer"

        def __init__(self) -> None:
            self.identity = IDENTITY_PREFIX + uuid.uuid4().hex.encode()
            # when this consumer, as leader, found itself the group's only consumer: the partitions per topic it
            # assigned (to itself); None otherwise. ``assignment_shortfall`` compares what arrives with it.
            self.sole_assignment: dict[str, set[int]] | None = None

        def metadata(self, topics):  # noqa: ANN001, ANN201 - kafka-python's signature
            return ConsumerProtocolSubscription(self.version, list(topics), self.identity)

        def assign(self, cluster, members):  # noqa: ANN001, ANN201
            by_consumer: dict[bytes, list] = {}
            anonymous = []
            for m in members:
                ident = bytes(getattr(m.metadata, "user_data", None) or b"")
                if ident.startswith(IDENTITY_PREFIX):
                    by_consumer.setdefault(ident, []).append(m)
                else:
                    anonymous.append(m)
            if not by_consumer:  # nobody sent an identity: plain range over every member id
                return RangePartitionAssignor.assign(cluster, members)
            if anonymous:
                log.warning(
                    "the group lists %d member ids without a consumer identity (joins a restarted broker kept without "
                    "their metadata); they get no partitions, the %d identified consumers share them",
                    len(anonymous),
                    len(by_consumer),
                )
            groups = [sorted(ms, key=lambda m: m.member_id) for ms in by_consumer.values()]
            stale = [g for g in groups if len(g) > 1]
            if stale:
                log.warning(
                    "the group lists %d member ids for %d consumers (joins a restarted broker kept); each consumer "
                    "is assigned once and its member ids share its partitions",
                    len(members),
                    len(groups),
                )
            # the lowest member id of each consumer stands for it; its assignment is what all of them get
            per_consumer = RangePartitionAssignor.assign(cluster, [g[0] for g in groups])
            out = {m.member_id: per_consumer[g[0].member_id] for g in groups for m in g}
            self.sole_assignment = None
            if len(groups) == 1:
                self.sole_assignment = {t: set(ps) for t, ps in per_consumer[groups[0][0].member_id].assignment}
            nothing = ConsumerProtocolAssignment(self.version, [], b"")
            return {**out, **{m.member_id: nothing for m in anonymous}}

    return OneAssignmentPerConsumer()


def assignment_shortfall(consumer, assigned) -> str | None:  # noqa: ANN001 - a KafkaConsumer, TopicPartitions
    """Why a lone group leader should rejoin: it received fewer partitions than the topic has.

    After the embedded broker restarted, a worker alone in its group and its leader read 1 of the 4 partitions
    its metadata listed for a topic that had come back with 4 (most likely the broker answered its sync with an
    older assignment, or it assigned from metadata the client never revisited); no member id was stale, the client
    never rejoined, and the camera's partition went unread. A leader that found itself the only consumer must
    read every partition it knows of.
    """
    strategies = getattr(consumer, "config", {}).get("partition_assignment_strategy", ())
    mine = next((a for a in strategies if hasattr(a, "sole_assignment")), None)
    coordinator = getattr(consumer, "_coordinator", None)
    if mine is None or mine.sole_assignment is None or not getattr(coordinator, "_is_leader", False):
        return None
    got: dict[str, set[int]] = {}
    for tp in assigned:
        got.setdefault(tp.topic, set()).add(tp.partition)
    for topic in sorted(consumer.subscription() or ()):
        known = set(consumer.partitions_for_topic(topic) or ()) | mine.sole_assignment.get(topic, set())
        if known - got.get(topic, set()):
            return (
                f"alone in the group, it received {sorted(got.get(topic, ()))} of {topic}'s partitions {sorted(known)}"
            )
    return None


def discard_producer(producer) -> None:  # noqa: ANN001 - a kafka-python KafkaProducer
    """Throw away a producer whose broker failed it, without waiting for what it still holds.

    kafka-python's ``close(0)`` flushes first and raises ``KafkaTimeoutError`` while records are pending, before
    it stops its sender thread, and its ``__del__`` then tries (and fails) again. The caller keeps the records
    itself and sends them with a new producer, so here the sender is stopped at once.
    """
    try:
        producer.close(0)
        return
    except Exception:  # noqa: BLE001 - pending records or a dead connection: force it below
        pass
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        try:
            sender.force_close()
        except Exception:  # noqa: BLE001
            pass
    producer._closed = True  # what close() sets last; stops __del__ from closing again


class Reconnector:
    """What a publisher does when the broker did not take a record, shared by ingest and the workers.

    Keep the record (the caller's job), drop the producer (a restarted broker fails the old one's idempotent
    session for good), back off up to ``max_delay_s``, then recreate lost topics and a fresh producer. The
    warning is rate-limited (the first failure and every tenth), ``error`` says why while it keeps failing
    (readiness), and ``on_failure`` counts each one (a metric).
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        who: str,
        stop: threading.Event,
        on_failure: Callable[[], None] = lambda: None,
        max_delay_s: float = 30.0,
    ) -> None:
        self.kafka = kafka
        self.who = who
        self.stop = stop
        self.on_failure = on_failure
        self.max_delay_s = max_delay_s
        self.failures = 0
        self.error: str | None = None

    def failed(self, why: Exception, producer: object | None) -> bool:
        """Record a failure, discard ``producer`` and wait out the backoff; False when stopped meanwhile."""
        self.failures += 1
        self.error = f"{type(why).__name__}: {why}"
        delay = min(self.max_delay_s, 0.5 * 2 ** min(self.failures - 1, 6))
        if self.failures == 1 or self.failures % 10 == 0:
            log.warning(
                "%s: %s did not take what was sent (%s); keeping it, new producer in %.1fs (attempt %d)",
                self.who,
                self.kafka.bootstrap_servers,
                self.error,
                delay,
                self.failures,
            )
        self.on_failure()
        if producer is not None:
            discard_producer(producer)
        return not self.stop.wait(delay)

    def producer(self):  # noqa: ANN201 - kafka-python type
        """A fresh producer; after a failure the topics a restarted broker lost are created first."""
        if self.failures:
            ensure_topics(self.kafka)
        return self.kafka.producer()

    def succeeded(self) -> None:
        if self.failures:
            log.info("%s: publishing again after %d failed attempts", self.who, self.failures)
        self.failures = 0
        self.error = None


def fetched_positions(consumer) -> list[tuple[object, int, int]]:  # noqa: ANN001 - a kafka-python KafkaConsumer
    """(partition, fetched high-water mark, position) of each assigned partition that has both, from the
    consumer's local state; a partition mid-rebalance or reconnecting is left out until next time."""
    out = []
    for tp in consumer.assignment():
        hw = consumer.highwater(tp)
        if hw is None:
            continue
        try:
            pos = consumer.position(tp, timeout_ms=1000)
        except Exception:  # noqa: BLE001 - mid-rebalance or reconnecting: look again next time
            continue
        if pos is not None:
            out.append((tp, hw, pos))
    return out


class LostLogRewind:
    """Rewinds partitions whose position is past the log end: the broker lost its log and counts from 0 again.

    A restarted embedded broker (memory storage), or a cluster after an unclean leader election, starts a
    partition's offsets again below where a consumer stood. Kafka answers such a fetch with OFFSET_OUT_OF_RANGE
    and the client resets; Tansu answers with an empty batch, so without this the consumer would wait, silently,
    until the new log grew past its old position (a worker 200 frames in stops scoring for 50 s at 4 fps).
    Positions only move to offsets below a fetched high-water mark, so ``position > highwater`` cannot happen
    otherwise; it must hold for ``settle_s`` (several fetches, each refreshing the high-water mark) with the
    position unchanged before the partition is rewound to its beginning, where the new log's first record is.
    Call :meth:`check` after every poll; it reads only the consumer's local state.
    """

    def __init__(self, who: str, settle_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.who = who
        self.settle_s = settle_s
        self.clock = clock
        self._suspect: dict[object, tuple[int, float]] = {}  # partition -> (position, first seen past the end)
        self.rewinds = 0

    def check(self, consumer) -> list:  # noqa: ANN001 - a kafka-python KafkaConsumer
        """Rewind what has stayed past the end for ``settle_s``; returns the partitions rewound."""
        now = self.clock()
        due: list[tuple[object, int, int]] = []  # (partition, position, high-water mark)
        seen: dict[object, tuple[int, float]] = {}
        for tp, hw, pos in fetched_positions(consumer):
            if pos <= hw:
                continue
            first = self._suspect.get(tp)
            since = first[1] if first is not None and first[0] == pos else now
            if now - since >= self.settle_s:
                due.append((tp, pos, hw))
            else:
                seen[tp] = (pos, since)
        self._suspect = seen
        if not due:
            return []
        log.warning(
            "%s: %s past the end of the log (the broker lost its data); reading them again from their beginning",
            self.who,
            ", ".join(f"{tp.topic}[{tp.partition}] at {pos} > end {hw}" for tp, pos, hw in due),
        )
        rewound = [tp for tp, _, _ in due]
        consumer.seek_to_beginning(*rewound)
        self.rewinds += len(rewound)
        return rewound


def ensure_topics(cfg: KafkaConfig) -> list[str]:
    """Create the system's topics that are missing (:meth:`KafkaConfig.topic_specs`); returns the names created.

    Existing topics are left as they are: partitions, replication and configs of a live topic are the
    cluster operator's. A refused creation (too few brokers for the replication factor, a policy, an
    authorisation) is a :class:`KafkaError` naming the topic, what was asked and the broker's answer.
    """
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError as ClientError
    from kafka.errors import TopicAlreadyExistsError

    try:
        admin = KafkaAdminClient(**cfg.client_kwargs(), request_timeout_ms=15000)
    except Exception as exc:
        raise KafkaError(f"cannot reach Kafka at {cfg.bootstrap_servers}: {exc}") from None
    try:
        try:
            existing = set(admin.list_topics())
        except ClientError as exc:
            raise KafkaError(f"cannot list topics on {cfg.bootstrap_servers}: {exc}") from None
        created = []
        for t in cfg.topic_specs():
            if t.name in existing:
                continue
            options = {"num_partitions": t.partitions, "replication_factor": t.replication_factor, "configs": t.configs}
            request = {t.name: options}
            try:
                admin.create_topics(request)
                created.append(t.name)
            except TopicAlreadyExistsError:
                pass
            except ClientError as exc:
                rf = "broker default" if t.replication_factor == -1 else t.replication_factor
                raise KafkaError(
                    f"{cfg.bootstrap_servers} refused to create topic {t.name} (partitions {t.partitions}, replication "
                    f"factor {rf}, configs {t.configs or 'none'}): {type(exc).__name__}: {exc}; adjust "
                    "--replication-factor / --topic-setting, or create the topic yourself"
                ) from None
        if created:
            log.info("created topics %s", ", ".join(created))
        return created
    finally:
        admin.close()


def add_kafka_args(p: argparse.ArgumentParser) -> None:
    """``--bootstrap-servers``, ``--topic-prefix``, ``--partitions``, read back by :func:`kafka_from`."""
    p.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS; default %(default)s)",
    )
    add_topic_args(p)


def add_topic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topic-prefix", default="inspection.")
    p.add_argument(
        "--partitions",
        type=int,
        default=6,
        help="partitions of frames and results (defects: half) for topics this process creates",
    )
    p.add_argument(
        "--replication-factor",
        type=int,
        default=-1,
        help="replication factor of topics this process creates (-1 = the broker's default; default %(default)s)",
    )
    p.add_argument(
        "--topic-setting",
        action="append",
        default=None,
        metavar="TOPIC.KEY=VALUE",
        help="per-topic partitions, replication.factor or any Kafka topic config for topics this process creates, "
        "e.g. frames.retention.ms=3600000 results.partitions=12 (repeatable; env: space-separated; defaults: "
        "frames 6 h retention, frames.dlq 7 days, heads compacted)",
    )
    p.add_argument(
        "--topic-encoding",
        action="append",
        default=None,
        metavar="TOPIC=ENCODING",
        help="write results or defects as protobuf (default) or json (protobuf's canonical JSON mapping); every "
        "record names its encoding in a content-type header (repeatable, e.g. defects=json)",
    )


def kafka_from(args: argparse.Namespace) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=args.bootstrap_servers,
        topic_prefix=args.topic_prefix,
        partitions=args.partitions,
        replication_factor=args.replication_factor,
        topic_settings=tuple(parse_topic_setting(t) for t in args.topic_setting or ()),
        topic_encodings=tuple(parse_topic_encoding(t) for t in getattr(args, "topic_encoding", None) or ()),
    )


def quiet_kafka() -> None:
    """kafka-python logs every reconnect (at ERROR, once a second while a broker is down); the services report
    broker trouble themselves, rate-limited, and in readiness. ``CFF_INSPECT_KAFKA_LOG_LEVEL=INFO`` brings the
    client's own lines back for debugging."""
    level = os.environ.get(env_name("kafka_log_level"), "CRITICAL").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{env_name('kafka_log_level')}={level!r} is not a log level (DEBUG ... CRITICAL)")
    logging.getLogger("kafka").setLevel(level)
