"""Deferred tracking (pipeline.spool): what a stage records is what MLflow holds after the replay, in the order the
stages ended, with their own times; a failing store keeps the records; the short stages import neither torch nor
mlflow (their fixed cost, docs/tracking.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pipeline.spool import Recorder, drain, pending, stale
from pipeline.tracking import PARENT_TAG, TrackingWarning, spool_dir, store_of

REPO = Path(__file__).resolve().parents[1]


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _record(root: Path, stage: str, key: str, status_error: bool = False) -> Recorder:
    rec = Recorder(spool_dir(root), store_of(root, {}), stage, key, {"git_commit": "abc"},
                   parent_name=f"ddpm · swissroll · {key}", launch=False)
    try:
        with rec:
            yield_ops(rec, root, stage)
            if status_error:
                raise RuntimeError("boom")
    except RuntimeError:
        pass
    return rec


def yield_ops(rec: Recorder, root: Path, stage: str) -> None:
    rec.log_params({"sample": {"steps": 50, "dims": [2, 3]}, "odd=key": True})
    rec.log_metrics({"nfe": 51, "nested": {"m": 0.5}, "nan": float("nan")})
    for step in range(3):
        rec.log_metric_buffered("loss", 1.0 / (step + 1), step)
    figure = root / f"{stage}.txt"
    figure.write_text(stage)
    rec.log_artifact(figure)
    figures = root / f"{stage}_figs"
    figures.mkdir(exist_ok=True)
    (figures / "a.txt").write_text("a")
    rec.log_to_parent(params={"method": {"name": "ddpm"}}, metrics={"cd": 0.08, "cd_floor": 0.078},
                      artifacts=[figure])
    rec.log_to_parent(artifacts=[figures], artifact_path="figures")
    # The stage's folder may be gone before the replay (DVC's temp experiments): the record holds copies.
    figure.unlink()
    (figures / "a.txt").unlink()
    figures.rmdir()


def test_a_replayed_record_is_what_the_stage_logged(tmp_path):
    first = _record(tmp_path, "evaluate", "exp-1")
    second = _record(tmp_path, "report", "exp-1", status_error=True)
    assert len(pending(spool_dir(tmp_path))) == 2
    assert drain(spool_dir(tmp_path)) == 0
    assert pending(spool_dir(tmp_path)) == [] and not any(spool_dir(tmp_path).glob("*-evaluate"))

    store = store_of(tmp_path, {})
    client = _client(store["uri"])
    exp = client.get_experiment_by_name(store["experiment"])
    runs = client.search_runs([exp.experiment_id], "tags.pipeline_key = 'exp-1'")
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = {r.info.run_name: r for r in runs if PARENT_TAG in r.data.tags}
    assert len(parents) == 1 and set(children) == {"evaluate", "report"}
    parent = parents[0]
    assert parent.info.run_name == "ddpm · swissroll · exp-1"
    assert parent.info.status == "FAILED"  # the latest stage to end decides, as when logging live
    assert parent.info.start_time == first.start
    for rec, status in ((first, "FINISHED"), (second, "FAILED")):
        run = children[rec.name]
        saved = rec.start
        assert run.info.status == status and run.info.start_time == saved and run.info.end_time >= saved
        assert run.data.tags[PARENT_TAG] == parent.info.run_id and run.data.tags["dvc_stage"] == rec.name
        assert run.data.params == {"sample.steps": "50", "sample.dims": "[2, 3]", "odd_key": "True"}
        assert run.data.metrics == {"nfe": 51.0, "nested.m": 0.5, "loss": 1 / 3}
        assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 1 / 3]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"{rec.name}.txt"]
    assert parent.data.params == {"method.name": "ddpm"}
    assert parent.data.metrics == {"cd": 0.08, "cd_floor": 0.078}
    art = tmp_path / "mlartifacts" / parent.info.run_id / "artifacts"
    assert (art / "report.txt").read_text() == "report" and (art / "figures" / "a.txt").is_file()  # a folder: its contents


def test_a_failing_store_keeps_its_records_for_the_next_replay(tmp_path):
    rec = Recorder(spool_dir(tmp_path), {"uri": "bogus-scheme://nowhere", "experiment": "x",
                                         "artifact_location": None}, "report", "k", {}, launch=False)
    with rec:
        rec.log_metrics({"cd": 1.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert drain(spool_dir(tmp_path)) == 1
    assert [w.category for w in caught] == [TrackingWarning]
    assert len(pending(spool_dir(tmp_path))) == 1
    assert stale(spool_dir(tmp_path), 0) == 1 and stale(spool_dir(tmp_path), 3600) == 0
    record = json.loads(pending(spool_dir(tmp_path))[0].read_text())
    assert record["stage"] == "report" and record["ops"][0]["entries"][0][:2] == ["cd", 1.0]


def test_the_spool_command_drains_and_says_what_is_left(tmp_path):
    with Recorder(spool_dir(tmp_path), store_of(tmp_path, {}), "ema", "k2", {}, launch=False) as rec:
        rec.log_params({"train": {"ema": True}})
    out = subprocess.run([sys.executable, "-m", "pipeline.spool", str(spool_dir(tmp_path))], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert pending(spool_dir(tmp_path)) == []
    bad = subprocess.run([sys.executable, "-m", "pipeline.spool"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_one_lingering_replayer_takes_the_records_of_the_later_stages(tmp_path, monkeypatch):
    """A pipeline's stages share one replayer: while it lingers, a stage's record is taken by it and the stage starts
    no other (each would import mlflow again); once it has exited, the next stage starts one."""
    import time

    from pipeline import spool

    spool_path = spool_dir(tmp_path)
    _record(tmp_path, "prepare", "k3")
    # 6 s of linger: ample for the next record to arrive here, even on a loaded machine
    server = subprocess.Popen([sys.executable, "-m", "pipeline.spool", "--linger", "6", str(spool_path)], cwd=REPO)
    started = []
    monkeypatch.setattr(spool.subprocess, "Popen", lambda *a, **k: started.append(a[0]))
    deadline = time.monotonic() + 60
    while pending(spool_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pending(spool_path) == [] and spool.replayer_alive(spool_path)
    for stage in ("ema", "sample"):  # each stage's exit: its record, then start_replay
        _record(tmp_path, stage, "k3")
        spool.start_replay(spool_path)
        while pending(spool_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pending(spool_path) == [] and started == []
    assert server.wait(timeout=60) == 0 and not spool.replayer_alive(spool_path)
    spool.start_replay(spool_path, linger=7.0)
    assert len(started) == 1 and started[0][-3:] == ["--linger", "7.0", str(spool_path.resolve())]
    monkeypatch.undo()  # the patch is subprocess's own Popen, which importing mlflow calls
    store = store_of(tmp_path, {})
    client = _client(store["uri"])
    runs = client.search_runs([client.get_experiment_by_name(store["experiment"]).experiment_id])
    assert sorted(r.info.run_name for r in runs if PARENT_TAG in r.data.tags) == ["ema", "prepare", "sample"]


def test_a_replayer_leaves_at_once_when_another_serves_and_counts_only_the_records_it_tried(tmp_path, monkeypatch):
    """A second replayer started in a race exits without waiting; a record that arrives during a drain is not
    reported as left by a failing store (the replayer that takes it decides)."""
    from pipeline import spool

    spool_path = spool_dir(tmp_path)
    _record(tmp_path, "ema", "k4")
    with spool._alive(spool_path) as mine:
        assert mine and spool.serve(spool_path, linger=3600) == [] and len(pending(spool_path)) == 1
    real_replay = spool.replay

    def replay_then_a_new_record(path, trackers):
        if path.name.endswith("-ema.json"):
            _record(tmp_path, "sample", "k4")
        return real_replay(path, trackers)

    monkeypatch.setattr(spool, "replay", replay_then_a_new_record)
    assert drain(spool_path) == 0 and [p.name.rsplit("-", 1)[1] for p in pending(spool_path)] == ["sample.json"]
    assert spool.serve(spool_path, linger=0) == [] and pending(spool_path) == []


@pytest.mark.parametrize("stage", ["report", "ema"])
def test_short_stages_import_neither_torch_nor_mlflow(stage):
    """The fixed cost of a short stage (docs/tracking.md: report ≤ 2 s): importing it and loading params.yaml must not pull
    in torch (~2 s here) or mlflow (~1.8 s, deferred to the replay)."""
    code = (f"import sys; import stages.{stage}; from pipeline import config; config.load('params.yaml'); "
            "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_stage_records_its_calls_and_says_when_older_records_wait(tmp_path, monkeypatch, capsys):
    """stages.common._tracked without SCORE_PIPELINE_TRACKING=sync: the stage's calls go to a record (no mlflow
    import in the stage), a replay is started, and records older than STALE_SECONDS are reported on stderr."""
    import os
    import time

    from pipeline import config, spool
    from stages import common

    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "SCORE_PIPELINE_TRACKING"):
        monkeypatch.delenv(key, raising=False)
    started = []
    monkeypatch.setattr(spool, "start_replay", lambda where: started.append(where))
    old = spool_dir(tmp_path) / "00000000000000000001-1-prepare.json"
    old.parent.mkdir(parents=True)
    old.write_text("{}")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    cfg = config.load(REPO / "params.yaml")
    assert common._tracked("report", cfg, lambda run: run.log_metrics({"cd": 0.5})) == 0
    assert "1 MLflow record(s) of earlier stages wait in" in capsys.readouterr().err
    new = [p for p in pending(spool_dir(tmp_path)) if p != old]
    assert len(new) == 1 and started == [spool_dir(tmp_path)]
    record = json.loads(new[0].read_text())
    assert record["stage"] == "report" and record["status"] == "FINISHED"
    assert record["parent_name"].startswith("ncsnv2 · swissroll · workspace ")
    assert record["ops"][0]["entries"][0][:2] == ["cd", 0.5]


def test_tracking_off_logs_nothing_and_imports_no_mlflow(tmp_path):
    """SCORE_PIPELINE_TRACKING=off: a stage, the live train stage included, runs with a NullRun: no record, no store,
    no replayer, no mlflow import; the body's calls go nowhere."""
    code = ("import os, sys; from pathlib import Path; from pipeline import config; from stages import common; "
            f"cfg = config.load({str(REPO / 'params.yaml')!r}); os.chdir({str(tmp_path)!r}); "
            "calls = lambda run: (run.log_params({'a': 1}), run.log_metrics({'cd': 0.5}), "
            "run.log_metric_buffered('loss', 1.0, 0), run.flush(), run.log_to_parent(metrics={'cd': 0.5})); "
            "codes = [common._tracked(name, cfg, calls) for name in ('train', 'report')]; "
            "print(codes, 'mlflow' in sys.modules, sorted(p.name for p in Path('.').iterdir()))")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**env, "SCORE_PIPELINE_TRACKING": "off"})
    assert out.stdout.strip() == "[0, 0] False []", out.stdout + out.stderr


def test_parent_run_names_say_method_sampler_data_and_experiment():
    from pipeline import config
    from stages.common import parent_run_name

    raw = config.to_dict(config.load(REPO / "params.yaml"))
    assert parent_run_name(config.validate(raw), "k", {"DVC_EXP_NAME": "e1"}) == "ncsnv2 · swissroll · e1"
    raw["method"].update(name="sde", sde="auto")
    raw["sample"].update(sampler="ode")
    assert parent_run_name(config.validate(raw), "abc-123", {}) == "sde-vp ode · swissroll · workspace abc-123"
    raw["method"].update(sde="ve")
    assert parent_run_name(config.validate(raw), "k", {"DVC_EXP_NAME": "e2"}) == "sde-ve ode · swissroll · e2"
