"""Product ids and head ids, the names every message and artifact carries.

A product id is ``[a-z0-9][a-z0-9._-]{0,63}``; a camera view is its own id (``bottle.top``). A head id is
``<product>-v<version>``, the artifact's file stem. Frame and camera ids are free-form but bounded: printable
characters only (they end up in logs, terminals, record keys and metric labels), at most ``MAX_FRAME_ID`` /
``MAX_CAMERA_ID`` of them.
"""

from __future__ import annotations

import re

from inspection_core.errors import ConfigError, quoted

MAX_PRODUCT_ID = 64
MAX_FRAME_ID = 256
MAX_CAMERA_ID = 128
PRODUCT_ID = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{MAX_PRODUCT_ID - 1}}}")


def check_product_id(product: str) -> str:
    """The id unchanged, else ConfigError; the message repeats only the id's start (ids come from the network)."""
    if isinstance(product, str) and PRODUCT_ID.fullmatch(product):
        return product
    why = "too long; " if isinstance(product, str) and len(product) > MAX_PRODUCT_ID else ""
    raise ConfigError(
        f"invalid product id {quoted(product)}: {why}use 1-{MAX_PRODUCT_ID} of a-z 0-9 . _ - "
        "starting with a letter or digit"
    )


def head_id(product: str, version: int) -> str:
    """``bottle.top``, 3 -> ``bottle.top-v3``."""
    return f"{product}-v{int(version)}"


def check_free_id(value: str, *, what: str, limit: int, required: bool = False) -> str:
    """A frame or camera id unchanged, else ConfigError naming the rule it breaks (repeating only its start)."""
    if not value:
        if required:
            raise ConfigError(f"{what} is empty")
        return value
    if len(value) > limit:
        raise ConfigError(f"{what} {quoted(value)} is too long (max {limit} characters)")
    if not value.isprintable():
        raise ConfigError(f"{what} {quoted(value)} has a control or unprintable character")
    return value


def printable_start(value: str, limit: int) -> str:
    """What of an id that broke the rules may still be shown: its printable characters, cut to ``limit``."""
    kept = "".join(c if c.isprintable() else "?" for c in value[:limit])
    return kept if len(value) <= limit else kept[: max(0, limit - 3)] + "..."
