"""TLS and bearer tokens on the calibrator, over real gRPC with a real self-signed certificate."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from calibrator.client import CalibratorClient, CalibratorError
from calibrator.security import ClientSecurity, ServerSecurity
from calibrator.service import serve
from calibrator.store import HeadStore
from inspection_core.errors import ConfigError

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token-for-tests"


def _self_signed(tmp_path):  # noqa: ANN001, ANN202
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "calibrator.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("calibrator.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def test_token_required_on_every_call_but_health(tmp_path, tiny_vit, capsys) -> None:
    from cff_inspect.cli import main

    server, port = serve(HeadStore(tmp_path / "s"), tiny_vit, port=0, security=ServerSecurity(token=TOKEN))
    addr = f"127.0.0.1:{port}"
    try:
        with CalibratorClient(addr) as anon, pytest.raises(CalibratorError) as e:
            anon.list()
        assert e.value.code == "UNAUTHENTICATED" and "missing bearer token" in str(e.value)
        assert TOKEN not in str(e.value)
        with (
            CalibratorClient(addr, ClientSecurity(token="wrong-token-123")) as bad,
            pytest.raises(CalibratorError) as e,
        ):
            bad.download("widget")
        assert e.value.code == "UNAUTHENTICATED" and "invalid bearer token" in str(e.value)
        with CalibratorClient(addr, ClientSecurity(token=TOKEN)) as ok:
            assert ok.list() == []
            with pytest.raises(CalibratorError) as e:
                ok.get("widget")
            assert e.value.code == "NOT_FOUND"  # authenticated: the call itself ran
        with grpc.insecure_channel(addr) as ch:  # probes need no secret
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert st.status == health_pb2.HealthCheckResponse.SERVING
        # the CLI takes the token from a file, and never prints it
        tf = tmp_path / "token"
        tf.write_text(TOKEN + "\n")
        assert main(["heads", "list", "--calibrator", addr, "--token-file", str(tf)]) == 0
        assert main(["heads", "list", "--calibrator", addr]) == 2
        err = capsys.readouterr().err
        assert "UNAUTHENTICATED" in err and TOKEN not in err
    finally:
        server.stop(0)


def test_tls_with_token(tmp_path, tiny_vit) -> None:
    cert, key = _self_signed(tmp_path)
    sec = ServerSecurity(token=TOKEN, tls_cert=cert, tls_key=key)
    assert TOKEN not in repr(sec) and TOKEN not in repr(ClientSecurity(token=TOKEN))
    server, port = serve(HeadStore(tmp_path / "s"), tiny_vit, port=0, security=sec)
    addr = f"localhost:{port}"
    try:
        good = ClientSecurity(token=TOKEN, tls_ca=cert, tls_server_name="calibrator.test")
        with CalibratorClient(addr, good) as c:
            assert c.list() == []
        with CalibratorClient(addr, ClientSecurity(token=TOKEN), timeout_s=3) as plain, pytest.raises(CalibratorError):
            plain.list()  # a plaintext client cannot talk to the TLS port
        no_token = ClientSecurity(tls_ca=cert, tls_server_name="calibrator.test")
        with CalibratorClient(addr, no_token) as c, pytest.raises(CalibratorError) as e:
            c.list()
        assert e.value.code == "UNAUTHENTICATED"
    finally:
        server.stop(0)


def test_bad_security_configuration_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="both a certificate"):
        ServerSecurity(tls_cert="cert.pem")
    with pytest.raises(ConfigError, match="at least 8 characters"):
        ServerSecurity(token="short")
    from calibrator.security import read_token

    with pytest.raises(ConfigError, match="empty"):
        (tmp_path / "t").write_text("\n")
        read_token(None, str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="missing"):
        read_token(None, str(tmp_path / "missing"))


def test_the_plaintext_token_warning_judges_parsed_addresses(caplog) -> None:
    """``127.attacker.example`` once passed as loopback (a text prefix): the token went out without a warning."""
    sec = ClientSecurity(token=TOKEN)
    for address, warns in (
        ("127.0.0.1:50051", False),
        ("localhost:50051", False),
        ("[::1]:50051", False),
        ("127.attacker.example:50051", True),
        ("localhost.attacker.example:50051", True),
        ("cal.plant:50051", True),
    ):
        caplog.clear()
        with caplog.at_level("WARNING", logger="calibrator.security"):
            sec.channel(address).close()
        assert ("without TLS" in caplog.text) is warns, address
        assert TOKEN not in caplog.text


def test_calibrator_announcing_without_a_heads_key_refuses_to_start(tmp_path, tiny_vit) -> None:
    """Secure by default like the worker: announcing needs --heads-key-file, or the explicit opt-out (flag or
    variable); a calibrator that announces nothing needs no key."""
    from calibrator.entry import settings_from
    from cff_inspect.cli import build_parser
    from inspection_core.env import bind_env
    from inspection_core.kafka import KafkaConfig

    base = ["calibrator", "--bootstrap-servers", "127.0.0.1:9092", "--store", str(tmp_path / "s")]
    with pytest.raises(ConfigError, match="no heads key: give it one with --heads-key-file .*--allow-unsigned-heads"):
        settings_from(build_parser().parse_args(base))
    assert settings_from(build_parser().parse_args([*base, "--allow-unsigned-heads"])).allow_unsigned_heads
    env = {"CFF_INSPECT_ALLOW_UNSIGNED_HEADS": "1"}
    assert settings_from(bind_env(build_parser(), env).parse_args(base)).allow_unsigned_heads
    key = tmp_path / "heads.key"
    key.write_text("k" * 32)
    signed = settings_from(build_parser().parse_args([*base, "--heads-key-file", str(key)]))
    assert signed.heads_key == b"k" * 32 and not signed.allow_unsigned_heads
    assert settings_from(build_parser().parse_args(["calibrator", "--no-kafka"])).kafka is None
    # the service itself refuses too, before it binds a port or touches the broker (port 1 is unreachable)
    with pytest.raises(ConfigError, match="no heads key"):
        serve(HeadStore(tmp_path / "s"), tiny_vit, port=0, kafka=KafkaConfig(bootstrap_servers="127.0.0.1:1"))
