"""Topic settings for a real cluster: replication factor, partitions and configs per topic, checked before any
request, and what reaches the (real, embedded) broker."""

from __future__ import annotations

import subprocess
import sys

import pytest

from inspection_core.errors import ConfigError
from inspection_core.kafka import KafkaConfig, ensure_topics, parse_topic_setting


def _spec(cfg: KafkaConfig, short: str):  # noqa: ANN202
    return next(t for t in cfg.topic_specs() if t.name == cfg.topic(short))


def test_defaults_leave_replication_to_the_broker_and_bound_frames_retention() -> None:
    cfg = KafkaConfig(bootstrap_servers="k1:9092")
    frames = _spec(cfg, "frames")
    assert frames.replication_factor == -1 and frames.partitions == 6
    assert frames.configs["retention.ms"] == str(6 * 3600 * 1000)
    assert _spec(cfg, "heads").configs == {"cleanup.policy": "compact"}
    assert _spec(cfg, "results").configs == {}


def test_topic_settings_override_per_topic() -> None:
    cfg = KafkaConfig(
        bootstrap_servers="k1:9092",
        replication_factor=3,
        topic_settings=tuple(
            parse_topic_setting(s)
            for s in ("frames.retention.ms=600000", "results.partitions=12", "frames.dlq.replication.factor=2")
        ),
    )
    assert _spec(cfg, "frames").configs["retention.ms"] == "600000" and _spec(cfg, "frames").replication_factor == 3
    assert _spec(cfg, "results").partitions == 12
    dlq = _spec(cfg, "frames.dlq")  # "frames.dlq." is matched before "frames."
    assert dlq.replication_factor == 2 and "dlq.replication.factor" not in _spec(cfg, "frames").configs


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("retention.ms=1", "TOPIC one of"),
        ("orders.retention.ms=1", "TOPIC one of"),
        ("frames.retention.ms=", "TOPIC.KEY=VALUE"),
        ("frames.Retention Ms=1", "not a Kafka topic config name"),
        ("results.partitions=many", "must be an integer"),
        ("results.partitions=0", "must be >= 1"),
        ("heads.replication.factor=0", "must be >= 1"),
    ],
)
def test_bad_topic_settings_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_topic_setting(spec)


def test_bad_replication_factor_and_prefix() -> None:
    with pytest.raises(ConfigError, match="replication factor must be >= 1 or -1"):
        KafkaConfig(bootstrap_servers="k1:9092", replication_factor=0)
    with pytest.raises(ConfigError, match="invalid topic names"):
        KafkaConfig(bootstrap_servers="k1:9092", topic_prefix="plant 3/")


@pytest.mark.integration
def test_partitions_and_replication_reach_the_broker() -> None:
    from kafka.admin import KafkaAdminClient

    from inspection_core.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        cfg = KafkaConfig(
            bootstrap_servers=b.bootstrap,
            topic_prefix="ts.",
            partitions=4,
            replication_factor=1,
            topic_settings=(parse_topic_setting("defects.partitions=3"),),
        )
        created = ensure_topics(cfg)
        assert sorted(created) == sorted(cfg.topics.values())
        admin = KafkaAdminClient(**cfg.client_kwargs())
        try:
            desc = {t["name"]: t for t in admin.describe_topics(list(cfg.topics.values()))}
        finally:
            admin.close()
        parts = {short: len(desc[cfg.topic(short)]["partitions"]) for short in cfg.topics}
        assert parts == {"frames": 4, "results": 4, "defects": 3, "frames.dlq": 1, "heads": 1, "feedback": 1}
        assert all(len(p["replica_nodes"]) == 1 for t in desc.values() for p in t["partitions"])
        assert ensure_topics(cfg) == []  # existing topics are left as they are


def test_calibrator_refuses_to_announce_loopback_to_a_remote_kafka(tmp_path) -> None:
    base = [sys.executable, "-m", "cff_inspect", "calibrator", "--store", str(tmp_path / "s"), "--backbone", "tiny-vit"]
    p = subprocess.run([*base, "--bootstrap-servers", "kafka-1.plant:9092"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "cannot download from a loopback address" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    from calibrator.entry import CalibratorSettings
    from calibrator.security import ServerSecurity

    remote = KafkaConfig(bootstrap_servers="kafka-1.plant:9092")
    ok = dict(store="s", port=50051, security=ServerSecurity(), kafka=remote)
    CalibratorSettings(host="0.0.0.0", advertised_address="cal.plant:50051", **ok)
    CalibratorSettings(host="127.0.0.1", allow_loopback_announce=True, **ok)
    CalibratorSettings(host="127.0.0.1", **{**ok, "kafka": KafkaConfig(bootstrap_servers="127.0.0.1:9092")})
