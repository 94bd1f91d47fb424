"""Shared test helpers."""

from __future__ import annotations

import pytest


@pytest.fixture
def moment_errors():
    """moment_errors(mixture, x): mixture.moment_errors(x), (estimate - truth, standard error) per moment."""
    return lambda mixture, x: mixture.moment_errors(x)
