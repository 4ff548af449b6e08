"""Option defaults from CFF_INSPECT_* variables: booleans are parsed strictly, never by truthiness."""

from __future__ import annotations

import argparse

import pytest

from cff_inspect.cli import build_parser, main
from inspection_core.env import bind_env, parse_bool
from inspection_core.errors import ConfigError


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "off", ""])
def test_false_words_turn_a_flag_off(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("CFF_INSPECT_VERBOSE", raw)
    assert build_parser().parse_args(["broker"]).verbose is False


@pytest.mark.parametrize("raw", ["1", "true", "YES", "on"])
def test_true_words_turn_a_flag_on(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("CFF_INSPECT_VERBOSE", raw)
    assert build_parser().parse_args(["broker"]).verbose is True


def test_unset_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CFF_INSPECT_VERBOSE", raising=False)
    assert build_parser().parse_args(["broker"]).verbose is False
    # a store_false option: its variable says the option's meaning, not the stored value
    p = argparse.ArgumentParser()
    p.add_argument("--no-activate", dest="activate", action="store_false")
    assert bind_env(p, {}).parse_args([]).activate is True
    assert bind_env(p, {"CFF_INSPECT_NO_ACTIVATE": "yes"}).parse_args([]).activate is False


def test_anything_else_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setenv("CFF_INSPECT_VERBOSE", "maybe")
    with pytest.raises(ConfigError, match="CFF_INSPECT_VERBOSE='maybe' is not a boolean"):
        bind_env(build_parser(), {"CFF_INSPECT_VERBOSE": "maybe"})
    assert main(["heads", "list"]) == 2  # the CLI reports it as one line, exit 2, before running anything
    assert "CFF_INSPECT_VERBOSE" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="x='2'"):
        parse_bool("2", name="x")
