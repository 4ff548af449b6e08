"""Option defaults from ``CFF_INSPECT_<OPTION>`` environment variables (a flag still wins)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

from inspection_core.errors import ConfigError

ENV_PREFIX = "CFF_INSPECT_"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


def env_name(name: str) -> str:
    """``max-batch`` -> ``CFF_INSPECT_MAX_BATCH``."""
    return ENV_PREFIX + name.upper().replace("-", "_")


def env_default(
    name: str, default: object = None, *, kind: Callable[[str], object] = str, many: bool = False
) -> object:
    var = env_name(name)
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        return [kind(v) for v in raw.split()] if many else kind(raw)
    except ValueError:
        raise ConfigError(f"environment variable {var}={raw!r} is invalid") from None


def parse_bool(raw: str, *, name: str = "value") -> bool:
    """``1/true/yes/on`` and ``0/false/no/off`` (any case); anything else is an error, never a guess."""
    v = raw.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_flag(name: str, default: bool = False) -> bool:
    """Default of a store_true flag; ``CFF_INSPECT_VERBOSE=0`` is False (``bool("0")`` would be True)."""
    var = env_name(name)
    raw = os.environ.get(var)
    return default if raw is None else parse_bool(raw, name=f"environment variable {var}")


def add_choice(p: argparse.ArgumentParser, flag: str, choices: Sequence[str], default: str, help: str) -> None:  # noqa: A002
    """``--flag`` limited to ``choices``; its default from ``CFF_INSPECT_<FLAG>``, else ``default``."""
    p.add_argument(flag, choices=choices, default=env_default(flag.lstrip("-"), default), help=help)
