"""Product ids and head ids, the names every message and artifact carries.

A product id is ``[a-z0-9][a-z0-9._-]{0,63}``; a camera view is its own id (``bottle.top``). A head id is
``<product>-v<version>``, the artifact's file stem.
"""

from __future__ import annotations

import re

from inspection_core.errors import ConfigError, quoted

MAX_PRODUCT_ID = 64
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
