"""Product ids and head ids, the names every message and artifact carries.

A product id is ``[a-z0-9][a-z0-9._-]{0,63}``; a camera view is its own id (``bottle.top``). A head id is
``<product>-v<version>``, the artifact's file stem.
"""

from __future__ import annotations

import re

from inspection_core.errors import ConfigError

PRODUCT_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def check_product_id(product: str) -> str:
    if not isinstance(product, str) or not PRODUCT_ID.fullmatch(product):
        raise ConfigError(f"invalid product id {product!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit")
    return product


def head_id(product: str, version: int) -> str:
    """``bottle.top``, 3 -> ``bottle.top-v3``."""
    return f"{product}-v{int(version)}"
