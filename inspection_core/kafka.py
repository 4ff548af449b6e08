"""Kafka settings, topic names and topic creation, shared by ingest, workers and calibrator.

Code talks to any Kafka cluster through kafka-python; SASL and TLS settings pass
through from configuration. Secrets are never part of ``repr`` or logs.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field

from inspection_core.env import env_default, env_name
from inspection_core.errors import ConfigError, KafkaError

log = logging.getLogger(__name__)
TOPICS = ("frames", "results", "defects", "frames.dlq", "heads")


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

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ConfigError("bootstrap servers are empty (set --bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS)")
        valid = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if self.security_protocol not in valid:
            raise ConfigError(f"security protocol {self.security_protocol!r} is not one of {', '.join(valid)}")
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ConfigError(f"security protocol {self.security_protocol} needs a SASL mechanism")
        if self.partitions < 1:
            raise ConfigError(f"partitions must be >= 1, got {self.partitions}")

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
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            max_poll_interval_ms=300000,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=32 * 1024 * 1024,
        )
        kw.update(extra)
        try:
            return KafkaConsumer(*topics, **self.client_kwargs(), **kw)
        except Exception as exc:
            raise KafkaError(f"cannot create a consumer for {self.bootstrap_servers}: {exc}") from None


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


def ensure_topics(cfg: KafkaConfig) -> list[str]:
    """Create the system's topics that are missing; returns the names created."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    try:
        admin = KafkaAdminClient(**cfg.client_kwargs(), request_timeout_ms=15000)
    except Exception as exc:
        raise KafkaError(f"cannot reach Kafka at {cfg.bootstrap_servers}: {exc}") from None
    try:
        existing = set(admin.list_topics())
        parts = {
            "frames": cfg.partitions,
            "results": cfg.partitions,
            "defects": max(1, cfg.partitions // 2),
            "frames.dlq": 1,
            "heads": 1,
        }
        new = []
        for short, name in cfg.topics.items():
            if name in existing:
                continue
            conf = {"cleanup.policy": "compact"} if short == "heads" else {}
            new.append(NewTopic(name, num_partitions=parts[short], replication_factor=1, topic_configs=conf))
        created = []
        for t in new:
            try:
                admin.create_topics([t])
                created.append(t.name)
            except TopicAlreadyExistsError:
                pass
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
    p.add_argument("--topic-prefix", default=env_default("topic_prefix", "inspection."))
    p.add_argument(
        "--partitions",
        type=int,
        default=env_default("partitions", 6, kind=int),
        help="partitions for topics this process creates",
    )


def kafka_from(args: argparse.Namespace) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=args.bootstrap_servers, topic_prefix=args.topic_prefix, partitions=args.partitions
    )


def quiet_kafka() -> None:
    """kafka-python logs every reconnect (at ERROR, once a second while a broker is down); the services report
    broker trouble themselves, rate-limited, and in readiness. ``CFF_INSPECT_KAFKA_LOG_LEVEL=INFO`` brings the
    client's own lines back for debugging."""
    level = os.environ.get(env_name("kafka_log_level"), "CRITICAL").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{env_name('kafka_log_level')}={level!r} is not a log level (DEBUG ... CRITICAL)")
    logging.getLogger("kafka").setLevel(level)
