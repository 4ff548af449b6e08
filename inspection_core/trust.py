"""Who may tell a worker which head to load: signed head announcements and pinned calibrator addresses.

Anyone who can write the ``heads`` topic could otherwise name their own calibrator (and receive the workers'
bearer token) or announce their own artifact. Two checks close that:

- **Signature.** The calibrator signs each announcement with HMAC-SHA256 under a key shared with the workers
  (``--heads-key-file``); the signature covers the record key and the exact value bytes and travels in the
  ``signature`` header. A worker holding the key drops every unsigned or wrongly signed record. The
  announcement carries the artifact's sha256, so the signature also authenticates the artifact the worker
  downloads.
- **Pinned addresses.** A worker only downloads from (and sends its token to) calibrator addresses in its own
  configuration (``--calibrator-address``); with none configured, only loopback addresses are accepted.

HMAC is symmetric: a worker's key could sign too, so the key belongs to machines you trust as much as the
calibrator. Replays of an older signed announcement are refused by the worker (its announcement time must not
go backwards for a product).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

from inspection_core.errors import ConfigError

SIGNATURE_HEADER = "signature"
KEY_ID_HEADER = "key-id"
_CONTEXT = b"cff-inspect heads v1\x00"
MIN_KEY_BYTES = 16


class TrustError(ConfigError):
    """An announcement is not signed by the key this worker holds, or names an address it does not trust."""


def read_key(path: str | Path) -> bytes:
    """The shared key: the file's bytes without surrounding whitespace (hex, base64 or raw — any >= 16 bytes)."""
    p = Path(path)
    try:
        key = p.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"heads key file {p}: {exc.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"heads key file {p}: the key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    return key


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def normalise_address(address: str) -> str:
    a = address.strip()
    host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"calibrator address {address!r} must be HOST:PORT")
    return f"{host.lower()}:{int(port)}"


@dataclass(frozen=True)
class HeadSigner:
    """The calibrator's side: headers to send with an announcement."""

    key: bytes = field(repr=False)

    @property
    def key_id(self) -> str:
        """A fingerprint that names the key in logs without revealing it."""
        return hashlib.sha256(b"key-id\x00" + self.key).hexdigest()[:12]

    def signature(self, record_key: bytes, value: bytes) -> str:
        mac = hmac.new(self.key, _CONTEXT + len(record_key).to_bytes(4, "big") + record_key + value, hashlib.sha256)
        return mac.hexdigest()

    def headers(self, record_key: bytes, value: bytes) -> list[tuple[str, bytes]]:
        return [
            (SIGNATURE_HEADER, self.signature(record_key, value).encode()),
            (KEY_ID_HEADER, self.key_id.encode()),
        ]


@dataclass(frozen=True)
class HeadTrust:
    """The worker's side: which announcements it believes."""

    key: bytes | None = field(default=None, repr=False)
    addresses: tuple[str, ...] = ()  # pinned HOST:PORT; empty = loopback only

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(normalise_address(a) for a in self.addresses))
        if self.key is not None and len(self.key) < MIN_KEY_BYTES:
            raise ConfigError(f"the heads key must be at least {MIN_KEY_BYTES} bytes")

    @property
    def signed(self) -> bool:
        return self.key is not None

    def check_signature(self, record_key: bytes | None, value: bytes, headers: list | None) -> None:
        if self.key is None:
            return
        got = dict(headers or ()).get(SIGNATURE_HEADER)
        if not got:
            raise TrustError("announcement is not signed (this worker requires signed announcements)")
        want = HeadSigner(self.key).signature(record_key or b"", value)
        if not hmac.compare_digest(want.encode(), got if isinstance(got, bytes) else str(got).encode()):
            kid = dict(headers or ()).get(KEY_ID_HEADER, b"?")
            kid = kid.decode(errors="replace") if isinstance(kid, bytes) else str(kid)
            raise TrustError(
                f"announcement signature does not verify (signed with key {kid[:12]}, "
                f"this worker holds {HeadSigner(self.key).key_id})"
            )

    def check_address(self, address: str) -> str:
        try:
            a = normalise_address(address)
        except ConfigError:
            raise TrustError(f"announcement names an invalid calibrator address {address[:80]!r}") from None
        if self.addresses:
            if a not in self.addresses:
                raise TrustError(
                    f"announcement names calibrator {a}, which is not pinned (--calibrator-address: "
                    f"{', '.join(self.addresses)})"
                )
        elif not is_loopback(a):
            raise TrustError(
                f"announcement names calibrator {a}; pin it with --calibrator-address to download from it "
                "(without pinned addresses only loopback calibrators are trusted)"
            )
        return a
