"""benchmarks/goal.py: stage times from a timed `dvc exp run` log, the goal's verdict, the row, bad arguments refused,
and the clone of HEAD it runs in (the run itself replaced by one that writes a finished run's metric files)."""

from __future__ import annotations

import json

import pytest

from benchmarks import goal


def test_stage_seconds_run_from_each_announcement_to_the_next_and_the_last_to_the_end():
    lines = [(0.0, "Stage 'prepare' didn't change, skipping"), (1.0, "Running stage 'fid_reference':"),
             (1.5, "> python -m stages.fid_reference"), (60.0, "Updating lock file 'dvc.lock'"),
             (61.0, "Running stage 'train':"), (300.5, "Running stage 'report':")]
    assert goal.stage_seconds(lines, end=302.0) == {"fid_reference": 60.0, "train": 239.5, "report": 1.5}
    assert goal.stage_seconds([(0.0, "Data and pipelines are up to date.")], end=1.0) == {}


def test_verdict_compares_wall_time_and_fid_over_its_floor_with_the_goal():
    inside = goal.verdict("digits", 331.4, {"fid": 28.0, "fid_floor": 25.62})
    assert inside["met"] == {"wall_s": True, "fid_ratio": True} and inside["fid_ratio"] == pytest.approx(1.0929, 1e-4)
    # the digits goal run on the AVX2-only EPYC: 671.5 s, fid 29.19 against 25.62 (docs/images.md)
    outside = goal.verdict("digits", 671.5, {"fid": 29.19, "fid_floor": 25.62})
    assert outside["met"] == {"wall_s": False, "fid_ratio": False} and outside["fid_ratio"] == 1.1393
    fashion = goal.verdict("fashion_mnist", 3557.0, {"fid": 31.63, "fid_floor": 15.59})
    assert fashion["met"] == {"wall_s": True, "fid_ratio": False} and fashion["goal"]["fid_ratio"] == 2.0


def test_row_names_the_sets_the_ratio_and_the_goals_met():
    metrics = {"fid": 31.63, "fid_floor": 15.59, "fid_domain": 0.76}
    record = {"data": "fashion_mnist", "sets": ["method.name=edm"], "wall_s": 3557.0, "metrics": metrics,
              "verdict": goal.verdict("fashion_mnist", 3557.0, metrics)}
    assert goal.row(record) == ("| fashion_mnist | -S method.name=edm | 59.3 min | 31.63 / 15.59 = 2.03x | 0.76 | "
                                "wall_s |")


@pytest.mark.parametrize("argv, words", [(["--data", "digits", "--set", "train.steps"], ["--set", "KEY=VALUE"]),
                                         (["--data", "digits", "--set", "data.name=fashion_mnist"], ["--data"]),
                                         (["--data", "cifar10"], ["--data", "cifar10"]),
                                         (["--data", "digits", "--keep", "KEEP"], ["--keep", "exists already"])])
def test_bad_arguments_are_refused_before_any_clone(argv, words, tmp_path, capsys, monkeypatch):
    (tmp_path / "clone").mkdir()
    monkeypatch.setattr(goal, "measure", lambda *a: pytest.fail("measured despite bad arguments"))
    with pytest.raises(SystemExit) as exit_:
        goal.main([str(tmp_path) if a == "KEEP" else a for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def _fake_dvc(metrics: dict, code: int = 0):
    """A stand-in for the timed `dvc exp run`: writes the metric files a finished digits run leaves in the clone."""
    def run(cmd, cwd, env):
        assert cmd[-2:] == ["-S", "train.steps=10"] and (cwd / "dvc.yaml").is_file()  # the clone of HEAD
        for name, values in metrics.items():
            (cwd / name).write_text(json.dumps(values))
        return code, [(1.0, "Running stage 'train':"), (5.0, "Running stage 'report':")], 6.0
    return run


METRICS = {"metrics/fid_reference.json": {"fid_floor": 25.62}, "metrics/classifier.json": {"fid_domain_floor": 2.5},
           "metrics/evaluate.json": {"fid": 28.0, "fid_domain": 1.7, "kid": 0.002}}


def test_measure_runs_in_a_clone_of_head_reads_its_metrics_and_removes_it(tmp_path, monkeypatch):
    (tmp_path / "t").mkdir()
    monkeypatch.setattr(goal.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "t"))
    monkeypatch.setattr(goal, "_run_timed", _fake_dvc(METRICS))
    record = goal.measure("digits", ["train.steps=10"])
    assert record["command"] == "dvc exp run -n goal -S data.name=digits -S train.steps=10"
    assert record["stage_s"] == {"train": 4.0, "report": 1.0} and record["verdict"]["fid_ratio"] == 1.0929
    assert record["metrics"] == {"fid": 28.0, "fid_floor": 25.62, "fid_domain": 1.7, "fid_domain_floor": 2.5,
                                 "kid": 0.002}
    assert len(record["commit"]) == 40 and not (tmp_path / "t").exists()


def test_measure_keeps_the_clone_when_asked_and_stops_on_a_failed_run(tmp_path, monkeypatch):
    monkeypatch.setattr(goal, "_run_timed", _fake_dvc(METRICS))
    goal.measure("digits", ["train.steps=10"], keep=tmp_path / "kept")
    assert (tmp_path / "kept" / "clone" / "metrics" / "evaluate.json").is_file()
    monkeypatch.setattr(goal, "_run_timed", _fake_dvc({}, code=1))
    with pytest.raises(SystemExit, match="exited with 1"):
        goal.measure("digits", ["train.steps=10"], keep=tmp_path / "failed")
