"""A team's MLflow server with authentication (docs/tracking.md, "A team server with authentication"): `mlflow server --app-name basic-auth` on a
database backend with an artifact store, on 127.0.0.1; the pipeline logs to it with credentials from the
environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), live and deferred, and never from params.yaml."""

from __future__ import annotations

import base64
import json
import urllib.request
import warnings

import pytest

from pipeline import config
from pipeline.spool import Recorder, drain
from pipeline.tracking import PARENT_TAG, TrackingWarning, open_tracker, spool_dir, store_of
from servers import mlflow_server

ADMIN = ("admin", "admin-pw-for-tests")
USER = ("researcher", "researcher-pw-1")


def _api(uri: str, path: str, auth: tuple[str, str], body: dict | None = None) -> dict:
    """A call of MLflow's REST API with basic auth; the decoded JSON answer."""
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    """The team server of docs/tracking.md: basic auth (users in their own sqlite db), runs in a sqlite backend, artifacts
    served from a folder; a `researcher` account made by the admin. One for the module: it takes seconds to start."""
    tmp_path = tmp_path_factory.mktemp("team")
    ini = tmp_path / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp_path / 'users.db'}\n"
                   f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests-only-secret"}
    with mlflow_server(tmp_path, f"sqlite:///{tmp_path / 'runs.db'}", tmp_path / "artifacts",
                       ("--app-name", "basic-auth"), env) as (uri, _):
        _api(uri, "users/create", ADMIN, {"username": USER[0], "password": USER[1]})
        yield uri


def test_the_pipeline_logs_to_an_authenticated_server_with_credentials_from_the_environment(
        team_server, tmp_path, monkeypatch):
    uri = team_server
    root = tmp_path / "repo"
    root.mkdir()
    env = {"MLFLOW_TRACKING_URI": uri, "DVC_EXP_NAME": "team-exp"}
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])
    figure = root / "samples.png"
    figure.write_bytes(b"\x89PNG not really")
    tracker = open_tracker(root, env)
    with tracker.stage("train", "team-exp", {"dvc_exp_name": "team-exp"}, "ddpm · swissroll · team-exp") as live:
        for step in range(5):
            live.log_metric_buffered("train_loss", 1.0 / (step + 1), step)
    with Recorder(spool_dir(root), store_of(root, env), "report", "team-exp", {"dvc_exp_name": "team-exp"},
                  "ddpm · swissroll · team-exp", launch=False) as deferred:
        deferred.log_to_parent(params={"method": {"name": "ddpm"}}, metrics={"cd": 0.08}, artifacts=[figure])
    assert drain(spool_dir(root)) == 0
    assert tracker.enabled

    found = _api(uri, "runs/search", ADMIN, {"experiment_ids": [tracker.experiment_id]})["runs"]
    by_name = {r["info"]["run_name"]: r for r in found}
    assert set(by_name) == {"ddpm · swissroll · team-exp", "train", "report"}
    parent = by_name["ddpm · swissroll · team-exp"]
    assert {m["key"]: m["value"] for m in parent["data"]["metrics"]} == {"cd": 0.08}
    for child in ("train", "report"):
        tags = {t["key"]: t["value"] for t in by_name[child]["data"]["tags"]}
        assert tags[PARENT_TAG] == parent["info"]["run_id"]
    arts = _api(uri, f"artifacts/list?run_id={parent['info']['run_id']}", ADMIN)
    assert [f["path"] for f in arts["files"]] == ["samples.png"]


@pytest.mark.parametrize("password", [None, "wrong-password"])
def test_missing_or_wrong_credentials_warn_once_and_never_stop_a_stage(team_server, tmp_path, monkeypatch, password):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    if password:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = open_tracker(tmp_path, {"MLFLOW_TRACKING_URI": team_server})
        with tracker.stage("train", "k", {}) as run:
            run.log_metrics({"loss": 1.0})
    assert [w.category for w in caught] == [TrackingWarning]
    assert "401" in str(caught[0].message) or "403" in str(caught[0].message) or "auth" in str(caught[0].message).lower()
    assert not tracker.enabled and run.run_id is None


def test_credentials_are_refused_in_params_yaml():
    raw = config.to_dict(config.load("params.yaml"))
    raw["tracking"]["password"] = "hunter2"
    with pytest.raises(config.ConfigError, match="tracking.password"):
        config.validate(raw)
