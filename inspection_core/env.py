"""Option defaults from ``CFF_INSPECT_<OPTION>`` environment variables (a flag still wins).

:func:`bind_env` is the one rule: every long option ``--foo-bar`` of every command reads
``CFF_INSPECT_FOO_BAR``, converted and checked exactly like the flag (booleans strictly, choices, repeatable
options space-separated). Nothing is bound by hand; a test walks every command to keep it so.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from inspection_core.errors import ConfigError

ENV_PREFIX = "CFF_INSPECT_"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


def env_name(name: str) -> str:
    """``max-batch`` -> ``CFF_INSPECT_MAX_BATCH``."""
    return ENV_PREFIX + name.upper().replace("-", "_")


def parse_bool(raw: str, *, name: str = "value") -> bool:
    """``1/true/yes/on`` and ``0/false/no/off`` (any case); anything else is an error, never a guess."""
    v = raw.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def add_choice(p: argparse.ArgumentParser, flag: str, choices: Sequence[str], default: str, help: str) -> None:  # noqa: A002
    """``--flag`` limited to ``choices`` (its ``CFF_INSPECT_<FLAG>`` variable is bound by :func:`bind_env`)."""
    p.add_argument(flag, choices=choices, default=default, help=help)


def _env_value(action: argparse.Action, raw: str, var: str) -> object:
    def one(v: str) -> object:
        try:
            x = action.type(v) if callable(action.type) else v
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"environment variable {var}={raw[:80]!r} is invalid ({exc})") from None
        if action.choices is not None and x not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise ConfigError(f"environment variable {var}={raw[:80]!r} is not one of {choices}")
        return x

    if isinstance(action, argparse._StoreTrueAction):
        return parse_bool(raw, name=f"environment variable {var}")
    if isinstance(action, argparse._StoreFalseAction):
        return not parse_bool(raw, name=f"environment variable {var}")
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*") or isinstance(action.nargs, int):
        return [one(v) for v in raw.split()]
    return one(raw)


def env_options(parser: argparse.ArgumentParser) -> list[tuple[argparse.ArgumentParser, argparse.Action, str]]:
    """(parser, action, variable) for every long option of ``parser`` and its subcommands."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for sub in action.choices.values():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    out.extend(env_options(sub))
            continue
        if isinstance(action, argparse._HelpAction | argparse._VersionAction) or action.dest == argparse.SUPPRESS:
            continue
        long = [o for o in action.option_strings if o.startswith("--")]
        if long:
            out.append((parser, action, env_name(long[0][2:])))
    return out


class InvalidEnv:
    """The default of an option whose variable did not parse; an error only for the command that uses it (one
    variable serves every command with that option, and their types can differ, e.g. ``--shots``)."""

    def __init__(self, error: ConfigError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"<invalid: {self.error}>"


def bind_env(
    parser: argparse.ArgumentParser, environ: dict[str, str] | None = None, *, defer_errors: bool = False
) -> argparse.ArgumentParser:
    """Set each long option's default from its ``CFF_INSPECT_<OPTION>`` variable where that is set.

    With ``defer_errors`` a variable that does not parse becomes an :class:`InvalidEnv` default, raised by
    :func:`check_env` after parsing only if the chosen command has that option and it was not given as a flag.
    """
    env = os.environ if environ is None else environ
    for _, action, var in env_options(parser):
        raw = env.get(var)
        if raw is None:
            continue
        try:
            action.default = _env_value(action, raw, var)
        except ConfigError as exc:
            if not defer_errors:
                raise
            action.default = InvalidEnv(exc)
            continue
        action.required = False  # the variable supplies it
    return parser


def check_env(args: argparse.Namespace) -> argparse.Namespace:
    for value in vars(args).values():
        if isinstance(value, InvalidEnv):
            raise value.error
    return args
