"""Product ids: the rule holds, and a refusal repeats only the start of what was sent (ids come from the network)."""

from __future__ import annotations

import pytest

from inspection_core.errors import ECHO_LIMIT, ConfigError, cut, quoted
from inspection_core.ids import check_product_id


def test_valid_ids_pass_and_invalid_ones_are_named() -> None:
    for ok in ("bottle", "bottle.top", "a", "x" * 64, "9-gear_2"):
        assert check_product_id(ok) == ok
    for bad in ("Bad Id", "-lead", "", "x" * 65, None):
        with pytest.raises(ConfigError, match="invalid product id"):
            check_product_id(bad)  # type: ignore[arg-type]


def test_a_10kb_id_is_cut_in_the_message() -> None:
    with pytest.raises(ConfigError) as e:
        check_product_id("a" * 10_000)
    msg = str(e.value)
    assert len(msg) < 300 and "too long" in msg and "(10000 chars)" in msg
    assert "'" + "a" * ECHO_LIMIT + "'..." in msg
    with pytest.raises(ConfigError) as e:
        check_product_id("Bad Id")
    assert "'Bad Id'" in str(e.value) and "too long" not in str(e.value)


def test_quoted_and_cut_keep_short_input_whole() -> None:
    assert quoted("abc") == "'abc'" and cut("abc") == "abc"
    assert quoted(None) == "None"
    assert quoted("é" * 100) == "'" + "é" * ECHO_LIMIT + "'... (100 chars)"
    assert cut("z" * 1000, 10) == "zzzzzzzzzz... (1000 chars)"
    assert len(quoted(b"\x00" * 5000)) < 300  # non-strings are cut after repr
