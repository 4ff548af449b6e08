"""Who may change a worker's heads: a writer of the heads topic without the key, with a forged address, a
replayed record or a crafted head id — on the real broker and real gRPC calibrators."""

from __future__ import annotations

import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from kafka_support import poll_topic

from calibrator.client import CalibratorClient
from calibrator.security import ClientSecurity, ServerSecurity
from calibrator.service import serve
from calibrator.store import HeadStore
from inspection_core.errors import ConfigError, HeadError
from inspection_core.runtime import wait_for
from inspection_core.trust import HeadSigner, HeadTrust, TrustError
from inspection_pb.v1 import heads_pb2
from scorer.demo import make_demo_dataset
from workers.config import WorkerConfig
from workers.heads import HeadFollower
from workers.worker import Worker

pytestmark = pytest.mark.integration
KEY = b"k" * 32
TOKEN = "s3cret-token-1234"


class Recorder(grpc.ServerInterceptor):
    """What an attacker's calibrator would learn: every call's metadata."""

    def __init__(self) -> None:
        self.metadata: list[dict] = []

    def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201
        self.metadata.append(dict(details.invocation_metadata or ()))
        return continuation(details)


def _records(kafka, timeout: float = 10) -> list:  # noqa: ANN001
    return poll_topic(kafka, "heads", timeout=timeout)


@pytest.fixture
def refs(tmp_path) -> list[Path]:
    cat = make_demo_dataset(tmp_path / "d", n_train=2, n_good=0, n_bad=0)
    return sorted((cat / "train" / "good").glob("*.png"))


def test_a_topic_writer_without_the_key_cannot_steal_the_token_or_install_a_head(
    tmp_path, tiny_vit, refs, start_broker, monkeypatch
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    kafka = start_broker(partitions=1)
    security = ServerSecurity(token=TOKEN)
    server, port = serve(
        HeadStore(tmp_path / "store"), tiny_vit, port=0, kafka=kafka, security=security, signer=HeadSigner(KEY)
    )
    genuine = f"127.0.0.1:{port}"
    # The attacker runs their own calibrator (no token) with their own head for the same product.
    evil_rec = Recorder()
    evil, evil_port = serve(HeadStore(tmp_path / "evil"), tiny_vit, port=0)
    evil_server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[evil_rec])  # records who calls
    evil_port2 = evil_server.add_insecure_port("127.0.0.1:0")
    evil_server.start()
    worker = Worker(kafka, WorkerConfig())
    trust = HeadTrust(key=KEY, addresses=(genuine,))
    follower = HeadFollower(kafka, worker, tiny_vit, ClientSecurity(token=TOKEN), trust)
    follower.start()
    prod = kafka.producer()
    try:
        with CalibratorClient(genuine, ClientSecurity(token=TOKEN)) as c:
            info = c.fit("widget", refs, method="knn")
        assert wait_for(lambda: "widget" in worker.heads, 30), dict(worker.counters)
        assert worker.heads["widget"].ref.sha256 == info.head.sha256
        with CalibratorClient(f"127.0.0.1:{evil_port}") as c:
            evil_info = c.fit("widget", refs[:1], method="knn")
        forged = heads_pb2.HeadAnnouncement(backbone=tiny_vit.spec, active=True)
        forged.head.CopyFrom(evil_info.head)
        forged.head.version = 7
        forged.head.head_id = "widget-v7"
        forged.activated_time.GetCurrentTime()
        topic = kafka.topic("heads")
        # 1: unsigned, naming the attacker's server 2: signed with another key 3: genuine key's signature
        # over one announcement, attached to a record whose value names the attacker (signature mismatch)
        forged.calibrator_address = f"127.0.0.1:{evil_port2}"
        v = forged.SerializeToString()
        prod.send(topic, key=b"widget", value=v).get(10)
        prod.send(topic, key=b"widget", value=v, headers=HeadSigner(b"x" * 32).headers(b"widget", v)).get(10)
        other = heads_pb2.HeadAnnouncement.FromString(v)
        other.calibrator_address = genuine
        prod.send(topic, key=b"widget", value=v, headers=HeadSigner(KEY).headers(b"widget", other.SerializeToString()))
        prod.flush()
        assert wait_for(lambda: worker.counters["heads_bad_signature"] == 3, 30), dict(worker.counters)
        assert worker.heads["widget"].ref.sha256 == info.head.sha256  # still the genuine head
        assert evil_rec.metadata == []  # the token never left for the attacker's address
        # 4: dated 2100 and correctly signed (a key holder, or a calibrator with a wrong clock), naming the genuine
        # calibrator's v1: refused, and it must not become the replay watermark
        future = heads_pb2.HeadAnnouncement(backbone=tiny_vit.spec, calibrator_address=genuine, active=False)
        future.head.CopyFrom(info.head)
        future.activated_time.FromSeconds(4_102_444_800)  # 2100-01-01
        fv = future.SerializeToString()
        prod.send(topic, key=b"widget", value=fv, headers=HeadSigner(KEY).headers(b"widget", fv)).get(10)
        assert wait_for(lambda: worker.counters["heads_future_time"] == 1, 30), dict(worker.counters)
        assert worker.heads["widget"].ref.sha256 == info.head.sha256  # not removed
        with CalibratorClient(genuine, ClientSecurity(token=TOKEN)) as c:
            v2 = c.fit("widget", refs[:1], method="knn")
        assert wait_for(lambda: worker.heads["widget"].ref.version == v2.head.version == 2, 30), dict(
            worker.counters
        )
        assert worker.counters["heads_replayed"] == 0
    finally:
        prod.close()
        worker.stop_event.set()
        follower.join(10)
        server.stop(0)
        evil.stop(0)
        evil_server.stop(0)
    assert not list(scratch.iterdir()), "temporary head folders were left behind"


def test_pinned_addresses_replays_and_crafted_head_ids_are_refused(tmp_path, tiny_vit, refs, monkeypatch) -> None:
    from inspection_core.kafka import KafkaConfig

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    server, port = serve(HeadStore(tmp_path / "store"), tiny_vit, port=0)
    genuine = f"127.0.0.1:{port}"
    with CalibratorClient(genuine) as c:
        v1 = c.fit("widget", refs, method="knn")
        v2 = c.fit("widget", refs[:1], method="knn")
    kafka = KafkaConfig(bootstrap_servers="127.0.0.1:1")
    worker = Worker(kafka, WorkerConfig())

    def ann(info, t: int, address: str = genuine) -> heads_pb2.HeadAnnouncement:  # noqa: ANN001
        a = heads_pb2.HeadAnnouncement(backbone=tiny_vit.spec, calibrator_address=address, active=True)
        a.head.CopyFrom(info.head)
        a.activated_time.seconds = t
        return a

    unsigned = HeadTrust(allow_unsigned=True)  # the explicit opt-out: these checks hold without a key too
    try:
        # without pinned addresses only loopback calibrators are trusted, judged by the parsed address
        unpinned = HeadFollower(kafka, worker, tiny_vit, trust=unsigned)
        with pytest.raises(HeadError, match="pin it with --calibrator-address"):
            unpinned.apply(ann(v1, 100, address="cal.plant:50051"))
        with pytest.raises(HeadError, match="127.attacker.example:50051.*pin it"):
            unpinned.apply(ann(v1, 100, address="127.attacker.example:50051"))
        for bad in ("127.0.0.1@evil.example:443", "127.1:50051", "dns:///127.0.0.1:50051", "::1:50051"):
            with pytest.raises(HeadError, match="malformed calibrator address"):
                unpinned.apply(ann(v1, 100, address=bad))
        assert worker.counters["heads_untrusted_address"] == 6 and "widget" not in worker.heads
        pinned = HeadFollower(
            kafka, worker, tiny_vit, trust=HeadTrust(addresses=("cal.plant:50051",), allow_unsigned=True)
        )
        with pytest.raises(HeadError, match="not pinned"):
            pinned.apply(ann(v1, 100))
        assert worker.counters["heads_untrusted_address"] == 7 and "widget" not in worker.heads
        # a replay of an older announcement after a newer one is refused
        f = HeadFollower(kafka, worker, tiny_vit, trust=unsigned)
        f.apply(ann(v2, 200))
        assert worker.heads["widget"].ref.version == 2
        with pytest.raises(HeadError, match="older than"):
            f.apply(ann(v1, 100))
        assert worker.heads["widget"].ref.version == 2 and worker.counters["heads_replayed"] == 1
        # a head id that is a path: refused before any download, nothing written outside the follower's folder
        evil = ann(v1, 300)
        evil.head.head_id = "../../../x"
        with pytest.raises(HeadError, match="is not 'widget-v1'"):
            f.apply(evil)
        evil.head.head_id = "widget-v1"
        evil.head.product_id = "../../x"
        with pytest.raises(HeadError, match="invalid product id"):
            f.apply(evil)
        assert not list(scratch.rglob("*")) and not (tmp_path / "x.safetensors").exists()
        # an unsigned forgery dated 2100 once became the watermark: every genuine announcement was then a
        # "replay" until the worker restarted. Now it is refused, and the genuine ones keep working.
        g = HeadFollower(kafka, worker, tiny_vit, trust=unsigned)
        now = int(time.time())
        with pytest.raises(HeadError, match="ahead of this worker's clock"):
            g.apply(ann(v1, 4_102_444_800))
        soon = ann(v1, now + 60)  # within the clock skew allowance
        g.apply(soon)
        assert worker.heads["widget"].ref.version == 1
        g.apply(ann(v2, now + 61))
        assert worker.heads["widget"].ref.version == 2
        assert worker.counters["heads_future_time"] == 1 and worker.counters["heads_replayed"] == 1
    finally:
        server.stop(0)


def test_a_worker_without_a_key_needs_the_explicit_opt_out(tmp_path, tiny_vit, capsys, caplog) -> None:
    from cff_inspect.cli import build_parser, main
    from inspection_core.kafka import KafkaConfig
    from workers.entry import trust_from

    kafka = KafkaConfig(bootstrap_servers="127.0.0.1:1")
    worker = Worker(kafka, WorkerConfig(worker_id="w-nokey"))
    with pytest.raises(ConfigError, match="worker w-nokey has no heads key.*--allow-unsigned-heads"):
        HeadFollower(kafka, worker, tiny_vit)

    def parse(*argv: str):  # noqa: ANN202
        return build_parser().parse_args(["worker", "--backbone", "tiny-vit", *argv])

    assert trust_from(parse("--no-follow-heads")).signed is False  # follows nothing: no key needed
    key = tmp_path / "k"
    key.write_bytes(KEY)
    assert trust_from(parse("--heads-key-file", str(key))).signed
    opted = trust_from(parse("--allow-unsigned-heads"))
    assert opted.allow_unsigned and not opted.signed
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CFF_INSPECT_ALLOW_UNSIGNED_HEADS", "1")
        assert trust_from(parse()).allow_unsigned  # the variable says the same
    with caplog.at_level("WARNING", logger="workers.heads"):
        HeadFollower(kafka, worker, tiny_vit, trust=opted)
    assert "--allow-unsigned-heads: head announcements are not authenticated" in caplog.text
    # the command line: refused in one line that names both ways out, before any model is loaded
    assert main(["worker", "--backbone", "tiny-vit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--heads-key-file" in err[0] and "--allow-unsigned-heads" in err[0], err


def test_addresses_are_parsed_not_matched_as_text() -> None:
    from inspection_core.trust import is_loopback, normalise_address

    for loopback in ("127.0.0.1:50051", "127.8.9.10:1", "localhost:50051", "LOCALHOST:1", "[::1]:50051"):
        assert is_loopback(loopback), loopback
    for remote in ("127.attacker.example:50051", "localhost.attacker.example:1", "10.0.0.1:1", "[::2]:1"):
        assert not is_loopback(remote), remote
    for malformed in (
        "127.0.0.1@evil.example:443",
        "user@127.0.0.1:1",
        "127.0.0.1:50051/x",
        "http://127.0.0.1:1",
        "127.1:50051",
        "0x7f000001:50051",
        "[127.0.0.1]:1",
        "::1:50051",
        "cal plant:1",
        "cal.plant:0",
        "cal.plant:65536",
        "cal.plant:5e4",
    ):
        assert not is_loopback(malformed), malformed
        with pytest.raises(ConfigError, match="calibrator address"):
            normalise_address(malformed)
    assert normalise_address("Cal.Plant:050051") == "cal.plant:50051"
    assert normalise_address("[0:0:0:0:0:0:0:1]:7") == "[::1]:7"
    trust = HeadTrust(addresses=("[::1]:7", "Cal.Plant:50051"), allow_unsigned=True)
    assert trust.check_address("[0::1]:7") == "[::1]:7" and trust.check_address("cal.plant:50051")
    with pytest.raises(TrustError, match="not pinned"):
        trust.check_address("cal.plant.attacker.example:50051")


def test_cff_inspect_run_keeps_its_heads_key_private(tmp_path) -> None:
    import stat

    from cff_inspect.run import heads_key_file
    from inspection_core.trust import read_key

    path = heads_key_file(tmp_path / "state")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.parent == tmp_path / "state"
    key = read_key(path)
    assert len(key) == 64 and heads_key_file(tmp_path / "state") == path and read_key(path) == key  # kept
    path.chmod(0o644)
    heads_key_file(tmp_path / "state")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_key(path) == key


def test_trust_settings_refuse_bad_input(tmp_path) -> None:
    from inspection_core.trust import read_key

    short = tmp_path / "short.key"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        read_key(short)
    with pytest.raises(ConfigError, match="No such file"):
        read_key(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="must be HOST:PORT"):
        HeadTrust(addresses=("cal.plant",))
    t = HeadTrust(key=KEY)
    sig = HeadSigner(KEY).headers(b"widget", b"v")
    t.check_signature(b"widget", b"v", sig)
    with pytest.raises(TrustError, match="does not verify"):
        t.check_signature(b"gadget", b"v", sig)  # the signature binds the record key too
    assert "k" * 8 not in repr(HeadSigner(KEY)) + repr(t)


def test_cli_worker_rejects_a_bad_key_file_in_one_line(tmp_path) -> None:
    import subprocess
    import sys

    key = tmp_path / "k"
    key.write_text("short")
    p = subprocess.run(
        [sys.executable, "-m", "cff_inspect", "worker", "--heads-key-file", str(key), "--backbone", "tiny-vit"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "at least 16 bytes" in p.stderr and "Traceback" not in p.stderr
