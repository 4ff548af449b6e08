"""Option defaults from ``CFF_INSPECT_<OPTION>`` environment variables (a flag still wins)."""

from __future__ import annotations

import os
from collections.abc import Callable

from scorer.errors import ConfigError

ENV_PREFIX = "CFF_INSPECT_"


def env_default(
    name: str, default: object = None, *, kind: Callable[[str], object] = str, many: bool = False
) -> object:
    var = ENV_PREFIX + name.upper().replace("-", "_")
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        return [kind(v) for v in raw.split()] if many else kind(raw)
    except ValueError:
        raise ConfigError(f"environment variable {var}={raw!r} is invalid") from None
