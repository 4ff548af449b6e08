"""Product ids: ``[a-z0-9][a-z0-9._-]{0,63}``; a camera view is its own id (``bottle.top``)."""

from __future__ import annotations

import re

from scorer.errors import ConfigError

PRODUCT_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def check_product_id(product: str) -> str:
    if not isinstance(product, str) or not PRODUCT_ID.fullmatch(product):
        raise ConfigError(f"invalid product id {product!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit")
    return product
