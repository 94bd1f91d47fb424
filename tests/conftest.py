"""Shared test helpers."""

from __future__ import annotations

import os

# `make test` runs two xdist workers on two cores: one torch thread each (also in the `dvc repro`
# subprocesses, through the environment) instead of two each, which oversubscribes the cores and slows
# small ops many times over. Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# Stages run in-process log to MLflow before they return (the default defers it to a detached replayer per stage,
# pipeline.spool: hundreds of those would cost minutes of imports here). The `dvc repro` tests take the default path.
os.environ.setdefault("SCORE_PIPELINE_TRACKING", "sync")

import pytest  # noqa: E402


@pytest.fixture
def moment_errors():
    """moment_errors(mixture, x): mixture.moment_errors(x), (estimate - truth, standard error) per moment."""
    return lambda mixture, x: mixture.moment_errors(x)
