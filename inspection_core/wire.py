"""How a message sits in a Kafka record: protobuf (the default) or protobuf's canonical JSON mapping.

Every record this system writes carries a ``content-type`` header naming the encoding and the message type
(``application/x-protobuf; messageType=inspection.v1.DefectEvent``), so a consumer in any language knows
what it holds without guessing, and a topic can change encoding without breaking a reader that looks.
The message schemas themselves live only in ``proto/``; this module only encodes and decodes them.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from inspection_core.errors import ConfigError, InspectionError

ENCODINGS = ("protobuf", "json")
CONTENT_TYPE = "content-type"
_MEDIA = {"protobuf": "application/x-protobuf", "json": "application/json"}
OCTETS = "application/octet-stream"
M = TypeVar("M", bound=Message)


def finite(x: float | None, missing: float | None = None) -> float | None:
    """``x`` as a float where it is a finite number, else ``missing``: JSON has no NaN or infinity (None, null,
    there), a proto3 number field no null (0.0 there)."""
    return float(x) if x is not None and math.isfinite(float(x)) else missing


class WireError(InspectionError):
    """A record whose bytes are not the message its header (or its topic) says."""


def descriptor_set_path() -> Path:
    """The shipped FileDescriptorSet of every message (with imports), for consumers in other languages."""
    spec = importlib.util.find_spec("inspection_pb")  # located, not imported: the contracts sit above this layer
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the inspection_pb package is not installed")
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "v1" / "inspection.binpb"


def check_encoding(encoding: str, *, what: str = "encoding") -> str:
    if encoding not in ENCODINGS:
        raise ConfigError(f"{what} {encoding[:40]!r} is not one of {', '.join(ENCODINGS)}")
    return encoding


def content_type(message: Message | type[Message], encoding: str = "protobuf") -> str:
    return f"{_MEDIA[check_encoding(encoding)]}; messageType={message.DESCRIPTOR.full_name}"


def parse_content_type(value: str | bytes | None) -> tuple[str | None, str | None]:
    """``(encoding, message type)`` of a header value; ``(None, None)`` when absent, unknown media type kept as None."""
    if value is None:
        return None, None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    media, _, params = text.partition(";")
    encoding = next((k for k, v in _MEDIA.items() if v == media.strip().lower()), None)
    mtype = None
    for p in params.split(";"):
        k, _, v = p.strip().partition("=")
        if k.lower() == "messagetype":
            mtype = v.strip()
    return encoding, mtype


def header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> bytes | None:
    for k, v in headers or ():
        if k.lower() == name:
            return v
    return None


def to_json(message: Message) -> str:
    """Canonical proto3 JSON on one line: lowerCamelCase names, enums by name, Timestamps in RFC 3339, bytes in
    base64, 64-bit integers as strings; every field present, so a consumer never has to know proto defaults."""
    return json.dumps(
        json_format.MessageToDict(message, always_print_fields_with_no_presence=True), separators=(",", ":")
    )


def encode(message: Message, encoding: str = "protobuf") -> tuple[bytes, list[tuple[str, bytes]]]:
    """The record value and its ``content-type`` header."""
    value = to_json(message).encode() if check_encoding(encoding) == "json" else message.SerializeToString()
    return value, [(CONTENT_TYPE, content_type(message, encoding).encode())]


def decode(value: bytes, cls: type[M], headers: Sequence[tuple[str, bytes]] | None = None) -> M:
    """``value`` as a ``cls``, in the encoding its header names (protobuf when there is none).

    A header naming another message type is refused: a record for another topic must not be half-read.
    """
    encoding, mtype = parse_content_type(header(headers, CONTENT_TYPE))
    raw = header(headers, CONTENT_TYPE)
    if raw is not None and encoding is None:
        raise WireError(f"content-type {raw[:80]!r} is neither protobuf nor JSON")
    want = cls.DESCRIPTOR.full_name
    if mtype is not None and mtype != want:
        raise WireError(f"record holds {mtype[:80]!r}, expected {want}")
    try:
        if encoding == "json":
            return json_format.Parse(value.decode("utf-8"), cls())
        return cls.FromString(value)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError, RuntimeWarning) as exc:
        how = "JSON" if encoding == "json" else "protobuf"
        raise WireError(f"{len(value)} bytes are not a {how} {want}: {str(exc)[:160]}") from None
