"""Fixtures for the monitoring tests (helpers live in monitoring_support.py)."""

from __future__ import annotations

import pytest
from monitoring_support import exposed_series, recording_rules


@pytest.fixture(scope="session")
def series() -> dict[str, frozenset[str]]:
    """Series names exposed by monitoring.metrics -> label names."""
    return exposed_series()


@pytest.fixture(scope="session")
def recorded() -> dict[str, str]:
    """Recording-rule names -> expressions."""
    return recording_rules()
