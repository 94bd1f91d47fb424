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


@pytest.fixture(scope="session")
def dvc_repo(tmp_path_factory):
    """A git + DVC repo holding a copy of the project with tiny params (test_stages.make_dvc_repo), shared by the
    modules whose tests carry the "dvc" xdist group: a session fixture here is built once, a module one per module."""
    from test_stages import make_dvc_repo

    return make_dvc_repo(tmp_path_factory)


@pytest.fixture(scope="session")
def dvc_baseline(dvc_repo):
    """dvc_repo after its first `dvc repro`, committed (test_stages.run_dvc_baseline)."""
    from test_stages import run_dvc_baseline

    return run_dvc_baseline(dvc_repo)


@pytest.fixture
def moment_errors():
    """moment_errors(mixture, x): mixture.moment_errors(x), (estimate - truth, standard error) per moment."""
    return lambda mixture, x: mixture.moment_errors(x)


def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup` (make test) runs the tests of one xdist_group on one worker by naming them `<id>@<group>`;
    pytest-xdist 3.8 writes that name to Node._nodeid, which pytest 9 no longer reads (Node.nodeid is str(Node._id)),
    so every group was spread over both workers and built its shared fixtures (a tiny DVC repo and its run) on each.
    Set the name where pytest 9 reads it."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        groups = "_".join(sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                                  for m in item.iter_markers("xdist_group")}))
        if groups and not item.nodeid.endswith(f"@{groups}"):
            item._id = coerce_node_id(f"{item.nodeid}@{groups}")
