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

- **Time.** An announcement's time must not go backwards for a product (no replays of older ones), and must not
  lie more than :data:`MAX_CLOCK_SKEW_S` in the future: a record dated years ahead would otherwise become the
  replay watermark and block every genuine announcement until the worker restarts.

A worker without a key refuses to follow the heads topic unless told so explicitly (``allow_unsigned``,
``--allow-unsigned-heads``). HMAC is symmetric: a worker's key could sign too, so the key belongs to machines you
trust as much as the calibrator. Addresses are parsed, never matched as text: ``127.attacker.example`` is a host
name (not loopback) and ``user@host`` forms are refused as malformed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from inspection_core.errors import ConfigError

SIGNATURE_HEADER = "signature"
KEY_ID_HEADER = "key-id"
_CONTEXT = b"cff-inspect heads v1\x00"
MIN_KEY_BYTES = 16
# How far ahead of this worker's clock an announcement may be dated (clocks of NTP-synchronised hosts differ by
# far less; a calibrator whose clock is further ahead has its announcements refused until it is fixed).
MAX_CLOCK_SKEW_S = 120.0
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")  # "_": Compose service names


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


def split_host_port(address: str, *, port_required: bool = True) -> tuple[str, int | None]:
    """``HOST:PORT`` -> (canonical host, port): an IP address in its canonical form (IPv6 in brackets in the
    text), or a lower-case DNS name. Anything else — user info (``user@host``), a scheme or path, an unbracketed
    IPv6 address, a dotted name that is neither a valid IPv4 address nor a DNS name — raises ConfigError."""
    a = address.strip()
    shown = repr(address[:80])
    if not a or any(c.isspace() or c in "@/\\?#%" for c in a) or not a.isascii():
        raise ConfigError(f"address {shown} must be HOST:PORT (no user info, scheme, path or spaces)")
    if a.startswith("["):
        host, sep, rest = a[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"address {shown} must be [IPV6]:PORT")
        port_text = rest[1:] if rest else None
    elif a.count(":") == 1:
        host, port_text = a.split(":")
    elif ":" in a:
        raise ConfigError(f"address {shown}: write an IPv6 address in brackets, [IPV6]:PORT")
    else:
        host, port_text = a, None
    if port_text is None:
        if port_required:
            raise ConfigError(f"address {shown} must be HOST:PORT")
        port = None
    elif not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"address {shown} must be HOST:PORT with a port in 1..65535")
    else:
        port = int(port_text)
    return _canonical_host(host, shown, bracketed=a.startswith("[")), port


def _canonical_host(host: str, shown: str, *, bracketed: bool) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if bracketed != (ip.version == 6):
            raise ConfigError(f"address {shown}: only IPv6 addresses go in brackets")
        return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    if bracketed:
        raise ConfigError(f"address {shown}: {host[:60]!r} in brackets is not an IPv6 address")
    name = host.lower().removesuffix(".")
    labels = name.split(".")
    # IPv4 shorthand ("127.1", "0x7f000001") is no DNS name: a resolver reads it as 127.0.0.1 while a check of
    # the text saw a name. An all-numeric last label is never a DNS name either.
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(x) for x in labels) or labels[-1].isdigit():
        raise ConfigError(f"address {shown}: {host[:60]!r} is neither an IP address nor a DNS name")
    try:
        socket.inet_aton(name)
    except OSError:
        return name
    raise ConfigError(f"address {shown}: {host[:60]!r} is IPv4 shorthand; write the address in full (a.b.c.d)")


def is_loopback(address: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (port optional); any other or malformed address is not."""
    try:
        host, _ = split_host_port(address, port_required=False)
    except ConfigError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def normalise_address(address: str) -> str:
    """The canonical ``HOST:PORT`` of a calibrator address (what pinned and announced addresses compare as)."""
    try:
        host, port = split_host_port(address)
    except ConfigError as exc:
        raise ConfigError(f"calibrator {exc}") from None
    return f"{host}:{port}"


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
    # Without a key, a follower refuses to run unless this says unauthenticated announcements are accepted.
    allow_unsigned: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(normalise_address(a) for a in self.addresses))
        if self.key is not None and len(self.key) < MIN_KEY_BYTES:
            raise ConfigError(f"the heads key must be at least {MIN_KEY_BYTES} bytes")

    @property
    def signed(self) -> bool:
        return self.key is not None

    def require_key(self, what: str = "this worker") -> None:
        """Refuse to follow announcements without a key unless unsigned ones were explicitly allowed."""
        if self.key is None and not self.allow_unsigned:
            raise ConfigError(
                f"{what} has no heads key: give it the calibrator's key with --heads-key-file "
                "(env CFF_INSPECT_HEADS_KEY_FILE), or --allow-unsigned-heads to accept head announcements from "
                "anyone who can write the heads topic"
            )

    def check_time(self, announced_s: float, now_s: float | None = None) -> None:
        """An announcement dated beyond the clock skew allowance is invalid (it must never become the replay
        watermark)."""
        now = time.time() if now_s is None else now_s
        if announced_s > now + MAX_CLOCK_SKEW_S:
            ahead = announced_s - now
            raise TrustError(
                f"announcement is dated {ahead:.0f} s ahead of this worker's clock (at most "
                f"{MAX_CLOCK_SKEW_S:.0f} s allowed): forged, or the calibrator's clock is wrong"
            )

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
        except ConfigError as exc:
            raise TrustError(f"announcement names a malformed calibrator address: {exc}") from None
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
