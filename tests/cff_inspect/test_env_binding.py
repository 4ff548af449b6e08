"""Every long option of every command is also its ``CFF_INSPECT_<OPTION>`` variable, parsed like the flag."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from cff_inspect.cli import build_parser, main
from inspection_core.env import bind_env, env_options
from inspection_core.errors import ConfigError


def _sample(action: argparse.Action) -> tuple[str, object]:
    """A valid raw value for the variable and what the option's default must become."""
    if isinstance(action, argparse._StoreTrueAction):
        return "yes", True
    if isinstance(action, argparse._StoreFalseAction):
        return "1", False
    if action.choices is not None:
        c = list(action.choices)[-1]
        raw, val = str(c), c
    elif action.type is int:
        raw, val = "7", 7
    elif action.type is float:
        raw, val = "0.5", 0.5
    elif action.type is None or action.type is str:
        raw, val = "x", "x"
    else:
        raw, val = "x", action.type("x")
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
        return f"{raw} {raw}", [val, val]
    if isinstance(action.nargs, int):
        return " ".join([raw] * action.nargs), [val] * action.nargs
    return raw, val


def test_every_option_of_every_command_reads_its_variable() -> None:
    options = env_options(build_parser())
    assert len(options) > 100  # every command is walked, subcommands of heads and bench included
    checked = 0
    for parser, action, var in options:
        try:
            raw, want = _sample(action)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue  # a custom type that refuses our sample value; covered by its own tests
        bound = [
            a
            for p, a, v in env_options(bind_env(build_parser(), {var: raw}, defer_errors=True))
            if v == var and p.prog == parser.prog
        ]
        assert [a.default for a in bound] == [want], f"{parser.prog} {action.option_strings}: {var}={raw!r}"
        checked += 1
    assert checked > 100


def test_boolean_variables_are_strict() -> None:
    with pytest.raises(ConfigError, match="CFF_INSPECT_HEATMAP_IN_RESULT='maybe' is not a boolean"):
        bind_env(build_parser(), {"CFF_INSPECT_HEATMAP_IN_RESULT": "maybe"})
    (a,) = [
        a for _, a, v in env_options(bind_env(build_parser(), {"CFF_INSPECT_VERBOSE": "0"})) if v.endswith("VERBOSE")
    ]
    assert a.default is False


def test_bad_choice_and_number_in_a_variable_are_one_line_errors(capsys) -> None:
    import os

    os.environ["CFF_INSPECT_DEVICE_DECODE"] = "sometimes"
    try:
        assert main(["worker", "--backbone", "tiny-vit"]) == 2
    finally:
        del os.environ["CFF_INSPECT_DEVICE_DECODE"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CFF_INSPECT_DEVICE_DECODE='sometimes' is not one of" in err[0]


def test_version_and_json_logs() -> None:
    v = subprocess.run([sys.executable, "-m", "cff_inspect", "--version"], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and v.stdout.startswith("cff-inspect ")
    import json

    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cff_inspect",
            "--log-format",
            "json",
            "--log-level",
            "info",
            "heads",
            "list",
            "--calibrator",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 3, p.stderr  # the calibrator is unreachable: a run-time failure, not a usage error
    assert "UNAVAILABLE" in p.stderr.splitlines()[-1]
    for line in p.stderr.splitlines()[:-1]:  # log lines, if any, are JSON objects
        assert {"time", "level", "logger", "message"} <= json.loads(line).keys()
