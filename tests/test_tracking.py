"""Tests for pipeline.tracking: embedded sqlite store, a real MLflow server, a down server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from servers import free_port as _free_port
from servers import mlflow_server as _server
from servers import stop as _stop

from pipeline.errors import DataError
from pipeline.tracking import (
    ERROR_TAG,
    EXPERIMENT_KIND_TAG,
    PARENT_TAG,
    RUNS_VIEW_METRICS,
    RUNS_VIEW_TAG,
    Tracker,
    TrackingWarning,
    flatten,
    open_tracker,
    pipeline_key,
    resolve_root,
    run_tags,
)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """One repo root (and so one sqlite store) for the module: creating a store costs seconds."""
    return tmp_path_factory.mktemp("repo").resolve()


def test_flatten_nests_and_serialises_lists():
    flat = flatten({"a": {"b": {"c": 1}, "l": [1, 2]}, "e": {}, "s": "x"})
    assert flat == {"a.b.c": 1, "a.l": "[1, 2]", "e": "{}", "s": "x"}
    assert flatten({"a": {"b": 1}}, sep="/") == {"a/b": 1}


def test_embedded_store_parent_children_params_metrics_artifacts(repo):
    (repo / "params.yaml").write_text("model: {width: 64}\n")
    tracker = open_tracker(repo, {})
    assert tracker.enabled
    tags = run_tags(repo, {})
    key = tags["pipeline_key"]
    many = {f"p{i:03d}": i for i in range(150)}  # > 100: forces several log_batch calls
    with tracker.stage("prepare", key, tags) as prep:
        prep.log_params({"data": {"n": 8, "dims": [2, 3]}, "long": "x" * 7000, "many": many,
                         "odd=key(1)": True})
        prep.log_metrics({"loss": 0.5, "nan": float("nan"), "inf": float("inf"),
                          "nested": {"m": 2}})
    artifact = repo / "figure.txt"
    artifact.write_text("figure")
    with tracker.stage("train", key, tags) as train:
        for step in range(120):
            train.log_metric_buffered("train.loss", 1.0 / (step + 1), step)
        train.log_metric_buffered("train.loss", float("nan"), 120)  # skipped, no crash
        train.log_artifact(artifact, artifact_path="figs")
        train.log_to_parent(params={"model": {"width": 64}}, metrics={"fid": 3.5},
                            artifacts=[artifact])

    assert prep.parent_run_id == train.parent_run_id is not None
    client = _client(tracker.uri)
    exp = client.get_experiment(tracker.experiment_id)
    assert exp.name == "score-pipeline"
    assert exp.artifact_location == (repo / "mlartifacts").as_uri()

    runs = client.search_runs([tracker.experiment_id], f"tags.pipeline_key = '{key}'")
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = {r.info.run_name: r for r in runs if PARENT_TAG in r.data.tags}
    assert len(parents) == 1 and set(children) == {"prepare", "train"}
    parent = parents[0]
    assert parent.info.run_id == prep.parent_run_id
    assert parent.info.status == "FINISHED"
    for child in children.values():
        assert child.data.tags[PARENT_TAG] == parent.info.run_id
        assert child.data.tags["git_commit"] == "nogit"
        assert child.data.tags["dvc_stage"] == child.info.run_name
        assert child.info.status == "FINISHED"

    p = children["prepare"].data
    assert p.params["data.n"] == "8" and p.params["data.dims"] == "[2, 3]"
    assert len(p.params["long"]) == 6000 and p.params["many.p149"] == "149"
    assert p.params["odd_key_1_"] == "True"  # characters MLflow rejects are replaced
    assert p.metrics == {"loss": 0.5, "nested.m": 2.0}
    history = client.get_metric_history(train.run_id, "train.loss")
    assert [m.step for m in history] == list(range(120))

    assert parent.data.params["model.width"] == "64"
    assert parent.data.metrics["fid"] == 3.5
    art = repo / "mlartifacts"
    assert (art / train.run_id / "artifacts" / "figs" / "figure.txt").read_text() == "figure"
    assert (art / parent.info.run_id / "artifacts" / "figure.txt").is_file()

    # A second process of the same pipeline (new Tracker) finds the same parent.
    again = open_tracker(repo, {})
    assert again.parent_run(key, tags) == parent.info.run_id


def test_exception_in_stage_marks_run_failed_and_propagates(repo):
    tracker = open_tracker(repo, {})
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.stage("train", "failing-key", {}) as run:
            run.log_metrics({"loss": 1.0})
            raise RuntimeError("boom")
    client = _client(tracker.uri)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(run.parent_run_id).info.status == "FAILED"
    assert client.get_run(run.run_id).data.metrics == {"loss": 1.0}


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free port, killed (whole process group) at teardown."""
    with _server(tmp_path, f"sqlite:///{tmp_path / 'srv.db'}", tmp_path / "srvart") as (uri, proc):
        yield uri, proc


def test_real_server_over_http_then_server_dies(mlflow_server, tmp_path):
    uri, proc = mlflow_server
    env_before = dict(os.environ)
    root = tmp_path / "repo"
    root.mkdir()
    tracker = open_tracker(root, {"MLFLOW_TRACKING_URI": uri})
    assert tracker.enabled
    artifact = tmp_path / "samples.txt"
    artifact.write_text("samples")
    with tracker.stage("train", "key-http", {"git_commit": "abc"}) as run:
        run.log_params({"opt": {"lr": 0.001}})
        for step in range(60):
            run.log_metric_buffered("loss", 1.0 - step / 100, step)
        run.log_metrics({"final": 0.25})
        run.log_artifact(artifact)
    assert dict(os.environ) == env_before  # the retry override is scoped to our calls

    client = _client(uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags[PARENT_TAG] == run.parent_run_id
    assert got.data.params == {"opt.lr": "0.001"}
    assert got.data.metrics["final"] == 0.25
    assert len(client.get_metric_history(run.run_id, "loss")) == 60
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["samples.txt"]
    assert not (root / "mlartifacts").exists()  # the server owns its artifacts

    # The server dying mid-stage must cost seconds and a single warning, never an exception.
    with tracker.stage("sample", "key-http", {}) as run2:
        _stop(proc)
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run2.log_metrics({"x": 1.0})
            run2.log_metrics({"y": 2.0})
            run2.log_artifact(artifact)
        assert time.monotonic() - start < 10
    assert [w.category for w in caught] == [TrackingWarning]
    assert not tracker.enabled


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "bogus-scheme://nowhere"])
def test_unreachable_or_bad_uri_only_warns_once_and_fast(tmp_path, uri):
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(uri.format(port=_free_port()))
        with tracker.stage("train", "k", {"git_commit": "x"}) as run:
            run.log_params({"a": 1})
            run.log_metrics({"m": 1.0})
            for step in range(100):
                run.log_metric_buffered("loss", 1.0, step)
            run.log_artifact(tmp_path)
            run.log_to_parent(params={"a": 1}, metrics={"m": 1.0})
        assert tracker.parent_run("k", {}) is None
    assert time.monotonic() - start < 10
    assert [w.category for w in caught] == [TrackingWarning]
    assert run.run_id is None and not tracker.enabled


def test_resolve_root_maps_dvc_temp_experiments_to_the_real_repo(tmp_path):
    repo = tmp_path / "repo"
    temp = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd" / "repo"
    assert resolve_root({"DVC_ROOT": str(temp)}, Path("/elsewhere")) == repo
    assert resolve_root({"DVC_ROOT": str(repo / ".dvc/tmp/exps/standalone/tmpx")}, tmp_path) == repo
    assert resolve_root({"DVC_ROOT": str(repo)}, tmp_path) == repo
    assert resolve_root({}, repo) == repo
    assert resolve_root({}, temp / "stages") == repo


def test_temp_experiment_logs_into_the_real_repo_store(repo):
    temp = repo / ".dvc" / "tmp" / "exps" / "tmp1" / "repo"
    temp.mkdir(parents=True)
    env = {"DVC_ROOT": str(temp), "DVC_EXP_NAME": "queued-exp"}
    root = resolve_root(env, temp)
    tracker = open_tracker(root, env)
    assert tracker.uri == f"sqlite:///{repo / 'mlflow.db'}"
    (temp / "out.txt").write_text("from the temp copy")
    with tracker.stage("train", pipeline_key(root, env), run_tags(root, env)) as run:
        run.log_artifact(temp / "out.txt")
    shutil.rmtree(repo / ".dvc")  # DVC deletes the temp copy; the artifact must survive it
    assert (repo / "mlflow.db").is_file()
    assert (repo / "mlartifacts" / run.run_id / "artifacts" / "out.txt").is_file()
    parent = _client(tracker.uri).get_run(run.parent_run_id)
    assert parent.data.tags["pipeline_key"] == parent.data.tags["dvc_exp_name"] == "queued-exp"


def test_pipeline_key_from_exp_name_or_git_and_params(tmp_path):
    env = {"DVC_EXP_NAME": "funky-pike", "DVC_EXP_BASELINE_REV": "deadbeef"}
    assert pipeline_key(tmp_path, env) == "funky-pike"
    tags = run_tags(tmp_path, env)
    assert tags["dvc_exp_name"] == "funky-pike" and tags["dvc_baseline_rev"] == "deadbeef"

    (tmp_path / "params.yaml").write_text("lr: 0.1\n")
    k1 = pipeline_key(tmp_path, {})
    assert k1.startswith("nogit-") and len(k1.split("-")[1]) == 12
    assert pipeline_key(tmp_path, {}) == k1
    (tmp_path / "params.yaml").write_text("lr: 0.2\n")
    k2 = pipeline_key(tmp_path, {})
    assert k2 != k1 and k2.startswith("nogit-")
    assert "dvc_exp_name" not in run_tags(tmp_path, {})

    assert shutil.which("git") is not None, "git is not on PATH: this test builds a git repo to check the commit key"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(git + ["add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "init"], cwd=tmp_path, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert pipeline_key(tmp_path, {}) == f"{sha[:7]}-{k2.split('-')[1]}"
    assert run_tags(tmp_path, {})["git_commit"] == sha


def test_import_is_cheap():
    code = "import sys, pipeline.tracking; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.strip() == "False"


def test_experiments_are_model_training_with_a_metrics_view(repo):
    """MLflow 3's UI treats an experiment as GenAI unless told: the project's experiments carry the experiment-kind
    tag its kind selector writes, and a runs view with the metric columns; set on creation and on an older
    experiment that lacks them, never over a value someone set."""
    import json

    tracker = open_tracker(repo, {}, experiment="kinds-new")
    client = _client(tracker.uri)
    tags = client.get_experiment(tracker.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    columns = json.loads(tags[RUNS_VIEW_TAG])["selectedColumns"]
    assert columns[:4] == ["metrics.`cd`", "metrics.`cd_floor`", "metrics.`emd`", "metrics.`emd_floor`"]
    assert "metrics.`fid`" in columns and "metrics.`sample.nfe`" in columns
    from pipeline.compare import LIKELIHOODS
    from pipeline.report import FLOORED

    assert set(RUNS_VIEW_METRICS) == {c for m in FLOORED for c in (m, f"{m}_floor")} | set(LIKELIHOODS) | {"sample.nfe"}

    old = client.create_experiment("kinds-old", artifact_location=(repo / "mlartifacts").as_uri())
    mine = client.create_experiment("kinds-mine", artifact_location=(repo / "mlartifacts").as_uri(),
                                    tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert open_tracker(repo, {}, experiment="kinds-old").experiment_id == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    open_tracker(repo, {}, experiment="kinds-mine")
    tags = client.get_experiment(mine).tags
    assert tags[EXPERIMENT_KIND_TAG] == "genai_development" and RUNS_VIEW_TAG in tags


def test_a_failed_stage_says_why_and_a_later_success_clears_the_parent(repo):
    tracker = open_tracker(repo, {})
    with pytest.raises(DataError, match="data.path"):
        with tracker.stage("prepare", "error-key", {}) as failed:
            raise DataError("data.path: points.csv row 2: 'oops' is not a number")
    client = _client(tracker.uri)
    run, parent = client.get_run(failed.run_id), client.get_run(failed.parent_run_id)
    assert run.info.status == parent.info.status == "FAILED"
    assert run.data.tags[ERROR_TAG] == "DataError: data.path: points.csv row 2: 'oops' is not a number"
    assert parent.data.tags[ERROR_TAG] == "prepare: DataError: data.path: points.csv row 2: 'oops' is not a number"

    with tracker.stage("prepare", "error-key", {}) as again:  # the data fixed, the stage run again
        again.log_metrics({"dim": 2})
    parent = client.get_run(again.parent_run_id)
    assert again.parent_run_id == failed.parent_run_id and parent.info.status == "FINISHED"
    assert ERROR_TAG not in parent.data.tags and ERROR_TAG not in client.get_run(again.run_id).data.tags
    assert ERROR_TAG in client.get_run(failed.run_id).data.tags  # the failed attempt keeps its reason


@pytest.mark.parametrize("mode", ["sync", "deferred"])
def test_a_stage_refused_for_bad_data_leaves_no_failed_run_without_a_reason(tmp_path, monkeypatch, capsys, mode):
    """prepare on a malformed data file exits 2 and writes nothing; in MLflow, live (sync) or replayed from the
    spool (deferred), every FAILED run it leaves carries the refusal in its `error` tag."""
    from test_stages import TINY, _deep_merge, _write_params

    from pipeline import spool
    from stages.common import TRACKING_ENV, run_named

    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    if mode == "sync":
        monkeypatch.setenv(TRACKING_ENV, "sync")
    else:
        monkeypatch.delenv(TRACKING_ENV, raising=False)
        monkeypatch.setattr(spool, "start_replay", lambda where: None)  # replayed below, in this process
    (tmp_path / "points.csv").write_text("1,2\n3,oops\n")
    _write_params(tmp_path / "params.yaml", _deep_merge(TINY, {"data": {"name": "file", "path": "points.csv"}}))
    assert run_named("prepare", ["--params", "params.yaml"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("prepare: ")
    assert "points.csv" in message and not (tmp_path / "data").exists()
    if mode == "deferred":
        assert spool.drain(tmp_path / ".mlflow-spool") == 0

    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("score-pipeline").experiment_id])
    assert sorted(r.info.run_name for r in runs if PARENT_TAG in r.data.tags) == ["prepare"]
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 2, [(r.info.run_name, r.info.status) for r in runs]  # the stage and its parent
    for r in failed:
        assert message in r.data.tags.get(ERROR_TAG, ""), (r.info.run_name, r.data.tags)


def test_ui_links_name_each_experiment_s_runs_page(tmp_path, capsys):
    """`python -m pipeline.tracking` (make ui) prints the runs page of each experiment that holds runs, tagging an
    older experiment on the way, and never creates a store."""
    from pipeline import tracking

    assert tracking.main(["--root", str(tmp_path), "--port", "5077"]) == 0
    assert "no runs yet" in capsys.readouterr().out and not (tmp_path / "mlflow.db").exists()

    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("score-pipeline", artifact_location=(tmp_path / "mlartifacts").as_uri())
    client.create_experiment("empty", artifact_location=(tmp_path / "mlartifacts").as_uri())
    client.create_run(exp)
    assert tracking.main(["--root", str(tmp_path), "--port", "5077"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "MLflow UI: http://127.0.0.1:5077; each experiment's runs with their metric columns:"
    assert lines[1:] == [f"  score-pipeline  http://127.0.0.1:5077/#/experiments/{exp}/runs"
                         "?workflowType=machine_learning&viewStateShareKey=metrics"]
    assert client.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
