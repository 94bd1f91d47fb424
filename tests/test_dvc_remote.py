"""Trained models shared between machines through a DVC remote and its run-cache.

Machine A runs the tiny pipeline (the session fixture `dvc_baseline`, tests/conftest.py) and pushes its outputs and
run-cache; machine B, a fresh clone whose dvc.lock records nothing (a params variant nobody committed),
restores every stage from the run-cache and runs none. This works only because every output in dvc.yaml is
cached and none is persistent: DVC's run-cache neither saves nor restores a stage with a `persist: true` or
`cache: false` output, so those stages (and everything after them) would run again on B.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_stages import BASELINE_FILES, STAGES, _back_to_baseline, _dvc_env, _sh

DVC = [sys.executable, "-m", "dvc"]
# Beyond BASELINE_FILES: one output of every stage that writes something for 2-D data, and the plots.
ALSO_RESTORED = ["data/train.npy", "data/record.json", "outputs/noise_scales.json", "models/raw.pt", "models/ema.pt",
                 "metrics/sample.json", "plots/train_loss.csv", "plots/train_eval.csv", "reports/report.md"]


@pytest.mark.xdist_group("dvc")
def test_fresh_clone_restores_every_stage_from_the_pushed_run_cache(dvc_repo, dvc_baseline, tmp_path):
    remote, machine_b = tmp_path / "remote", tmp_path / "b"
    env_a = _dvc_env(dvc_repo)
    _back_to_baseline(dvc_repo, env_a)  # the shared repo, as the other tests of the "dvc" group leave it
    # --local: the remote goes to .dvc/config.local, so the shared fixture's git history is left alone.
    _sh(DVC + ["remote", "add", "--local", "-f", "-d", "shared", str(remote)], dvc_repo, env_a)
    _sh(DVC + ["push", "--run-cache"], dvc_repo, env_a)
    also = {f: (dvc_repo / f).read_bytes() for f in ALSO_RESTORED}

    _sh(["git", "clone", "-q", str(dvc_repo), str(machine_b)], tmp_path, env_a)
    env_b = _dvc_env(machine_b)
    _sh(DVC + ["remote", "add", "--local", "-d", "shared", str(remote)], machine_b, env_b)
    # The same code and params, but no dvc.lock entry: only the pushed run-cache can restore the stages.
    (machine_b / "dvc.lock").unlink()
    assert not (machine_b / "models" / "model.pt").exists()

    log = _sh(DVC + ["repro", "--pull"], machine_b, env_b)
    assert "Running stage" not in log, log
    for name in STAGES:
        assert f"Stage '{name}' is cached - skipping run" in log, (name, log)
    assert "Data and pipelines are up to date" in _sh(DVC + ["status"], machine_b, env_b)
    assert {f: (machine_b / f).read_bytes() for f in BASELINE_FILES} == dvc_baseline["files"]
    assert {f: (machine_b / f).read_bytes() for f in ALSO_RESTORED} == also
    # Metrics are DVC-cached, not in git: `dvc metrics show` reads them on B.
    shown = _sh(DVC + ["metrics", "show", "--json"], machine_b, env_b)
    assert '"cd_floor"' in shown and '"final_loss"' in shown, shown
    # Nothing the pipeline writes is left for git to track.
    untracked = subprocess.run(["git", "status", "--porcelain"], cwd=machine_b, env=env_b, capture_output=True,
                               text=True, check=True).stdout
    assert set(untracked.split()) <= {"M", "D", "dvc.lock"}, untracked


@pytest.mark.xdist_group("dvc")
def test_nodes_sharing_one_cache_directory_restore_every_stage_with_a_plain_repro(dvc_repo, dvc_baseline, tmp_path):
    """Nodes on one filesystem need no remote: with `dvc cache dir` pointing at one shared cache, its run
    records (cache/runs) and outputs are already there, and a plain `dvc repro` restores every stage."""
    machine_b = tmp_path / "b"
    env_a = _dvc_env(dvc_repo)
    _back_to_baseline(dvc_repo, env_a)
    _sh(["git", "clone", "-q", str(dvc_repo), str(machine_b)], tmp_path, env_a)
    env_b = _dvc_env(machine_b)
    _sh(DVC + ["cache", "dir", "--local", str(dvc_repo / ".dvc" / "cache")], machine_b, env_b)
    (machine_b / "dvc.lock").unlink()

    log = _sh(DVC + ["repro"], machine_b, env_b)
    assert "Running stage" not in log, log
    for name in STAGES:
        assert f"Stage '{name}' is cached - skipping run" in log, (name, log)
    assert {f: (machine_b / f).read_bytes() for f in BASELINE_FILES} == dvc_baseline["files"]
