"""TLS and bearer-token settings for the calibrator and its clients.

The token is checked on every Calibrator and reflection call; the standard health
service stays open so load balancers and orchestrators can probe without a secret.
A token never appears in a repr, a log line or an error message.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from inspection_core.errors import ConfigError
from inspection_core.trust import is_loopback

log = logging.getLogger(__name__)
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def read_token(token: str | None, token_file: str | None) -> str | None:
    """A token from a flag/env value or from a file (first line); the file wins when both are given."""
    if token_file:
        p = Path(token_file)
        try:
            text = p.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"token file {p}: {exc.strerror}") from None
        if not text:
            raise ConfigError(f"token file {p} is empty")
        return text.splitlines()[0].strip()
    return token or None


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class ServerSecurity:
    token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None  # PEM certificate chain
    tls_key: str | None = field(default=None, repr=False)  # PEM private key path (the path is not secret, the habit is)

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.token is not None and (len(self.token) < 8 or any(c.isspace() for c in self.token)):
            raise ConfigError("the bearer token must be at least 8 characters without whitespace")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials([(_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))])

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenInterceptor(self.token)] if self.token else []


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (constant-time compare)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201
        if details.method.startswith(OPEN_PREFIXES):
            return continuation(details)
        md = dict(details.invocation_metadata or ())
        got = md.get("authorization", "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._expected):
            return continuation(details)
        handler = continuation(details)
        reason = "missing bearer token" if not got else "invalid bearer token"

        def deny(request, context):  # noqa: ANN001, ANN202
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{details.method}: {reason}")

        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


class _AuthClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):  # noqa: ANN001, ANN202
        md = list(d.metadata or []) + [self._md]
        return _Details(d.method, d.timeout, md, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _Details(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: list | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


@dataclass(frozen=True)
class ClientSecurity:
    """How a client (CLI, worker) reaches the calibrator."""

    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None  # PEM root certificate(s); enables TLS
    tls_server_name: str | None = None  # override the name checked against the certificate

    @classmethod
    def from_env(cls) -> ClientSecurity:
        return cls(
            token=read_token(os.environ.get("CFF_INSPECT_TOKEN"), os.environ.get("CFF_INSPECT_TOKEN_FILE")),
            tls_ca=os.environ.get("CFF_INSPECT_TLS_CA") or None,
        )

    def channel(self, address: str) -> grpc.Channel:
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        if self.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
        if self.tls_ca:
            ch = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=_read(self.tls_ca, "TLS CA")), options=opts
            )
        else:
            if self.token and not is_loopback(address):
                log.warning("sending the calibrator token to %s without TLS; set --tls-ca", address)
            ch = grpc.insecure_channel(address, options=opts)
        if self.token:
            ch = grpc.intercept_channel(ch, _AuthClientInterceptor(self.token))
        return ch


def add_token_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--token",
        default=None,
        help=f"{what} (env CFF_INSPECT_TOKEN; prefer --token-file: flags show in ps)",
    )
    p.add_argument("--token-file", default=None, help="file whose first line is the token")


def add_client_security_args(p: argparse.ArgumentParser) -> None:
    """Token and TLS options of a calibrator client (``heads`` commands, workers that download heads)."""
    add_token_args(p, "bearer token for the calibrator")
    p.add_argument("--tls-ca", default=None, help="PEM root certificate: talk TLS to the calibrator")
    p.add_argument(
        "--tls-server-name", default=None, help="name to check the certificate for"
    )


def client_security_from(args: argparse.Namespace) -> ClientSecurity:
    return ClientSecurity(
        token=read_token(args.token, args.token_file), tls_ca=args.tls_ca, tls_server_name=args.tls_server_name
    )
