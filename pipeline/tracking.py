"""MLflow tracking layer: DVC files are the record, MLflow is only the comparison view.

Every MLflow call goes through `Tracker._call`: the first failure emits one `TrackingWarning`
and disables the tracker, so a down server or a bad URI never breaks a stage. One parent run
per pipeline execution (found by the `pipeline_key` tag), one child run per stage; a FAILED run says why in its
`error` tag. The experiments are tagged as model training, with a view of the runs table that shows the metric
columns; `python -m pipeline.tracking` (make ui) prints that page for each experiment.
mlflow is imported lazily because importing it takes seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

DEFAULT_EXPERIMENT = "score-pipeline"
PARENT_TAG = "mlflow.parentRunId"
# The tag that says why a run FAILED (the stage's exception); on the parent, prefixed with the stage's name.
ERROR_TAG, _ERROR_MAX = "error", 5000
# MLflow's experiment kind, the tag its UI's kind selector writes (mlflow/server/js: "mlflow.experimentKind", values
# "genai_development" and "custom_model_development"): these experiments train models, they are not GenAI apps.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# A view of the runs table with the metric columns, stored where the UI's "Share" button stores one (an experiment
# tag "mlflow.sharedViewState.<key>", opened by `?viewStateShareKey=<key>`): MLflow 3 shows no metric column by
# default.
RUNS_VIEW_KEY = "metrics"
RUNS_VIEW_TAG = "mlflow.sharedViewState." + RUNS_VIEW_KEY
# Its columns: the headline metrics each next to its floor (pipeline.report.FLOORED, which this module may not import:
# every stage imports it, and it is no DVC dependency of theirs; tests/test_tracking.py keeps the two in step), the
# likelihoods and nfe. The column of a metric no run has stays hidden.
RUNS_VIEW_METRICS = ("cd", "cd_floor", "emd", "emd_floor", "fid", "fid_floor", "kid", "kid_floor", "fid_domain",
                     "fid_domain_floor", "precision", "precision_floor", "recall", "recall_floor", "density",
                     "density_floor", "coverage", "coverage_floor", "memorised", "memorised_floor", "nll", "bpd",
                     "elbo_bpd", "sample.nfe")
# MLflow's log_batch limits (mlflow.utils.validation).
_PARAMS_PER_BATCH, _METRICS_PER_BATCH, _PARAM_VALUE_MAX = 100, 1000, 6000
_FLUSH_EVERY, _FLUSH_SECONDS = 50, 5.0
# Deferred records of the stages (pipeline.spool) and the lock around parent runs, under the repo root.
SPOOL_DIR, LOCK_FILE = ".mlflow-spool", "lock"
_EXPS_DIR = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep
# MLflow's defaults (7 retries, backoff 2, 120 s timeout) turn a server that dies mid-run into
# minutes of blocking. MLflow reads these variables at request time and has no per-client
# setting, so they are set only around our own calls and restored after; values the user
# exported win.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_ENV_LOCK = threading.RLock()


class TrackingWarning(UserWarning):
    """Emitted when MLflow tracking fails; the pipeline goes on without it."""


def resolve_root(env: Mapping[str, str], cwd: Path) -> Path:
    """The repo root: DVC_ROOT (else cwd), mapped out of a queued/temp experiment copy."""
    path = os.path.abspath(env.get("DVC_ROOT") or cwd) + os.sep
    # `dvc exp run --queue/--temp` runs in <repo>/.dvc/tmp/exps/...; track into the real repo
    # so its mlflow.db and mlartifacts survive the temp copy. DVC 3 already points DVC_ROOT at
    # the real repo there; this also covers the cwd fallback and other DVC versions.
    head, found, _ = path.partition(_EXPS_DIR)
    return Path(head if found else path.rstrip(os.sep) or os.sep)


def git_commit(root: Path) -> str | None:
    """The full HEAD sha of the git repo at `root`, or None without git or commits."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def pipeline_key(root: Path, env: Mapping[str, str]) -> str:
    """DVC_EXP_NAME under `dvc exp run`, else `<git short sha|nogit>-<params.yaml sha256[:12]>`."""
    if env.get("DVC_EXP_NAME"):
        return env["DVC_EXP_NAME"]
    sha = git_commit(root)
    params = Path(root) / "params.yaml"
    digest = hashlib.sha256(params.read_bytes() if params.is_file() else b"").hexdigest()
    return f"{sha[:7] if sha else 'nogit'}-{digest[:12]}"


def run_tags(root: Path, env: Mapping[str, str]) -> dict[str, str]:
    """The tags every run of this pipeline execution carries."""
    tags = {"pipeline_key": pipeline_key(root, env), "git_commit": git_commit(root) or "nogit"}
    if env.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = env["DVC_EXP_NAME"]
    if env.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_baseline_rev"] = env["DVC_EXP_BASELINE_REV"]
    return tags


def flatten(d: Mapping, sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> flat `a.b.c` keys; lists and tuples become JSON strings."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            flat.update(flatten(v, sep, key))
        elif isinstance(v, (list, tuple, Mapping)):
            flat[key] = json.dumps(v, default=str)
        else:
            flat[key] = v
    return flat


def metric_name(stage: str, key: str) -> str:
    """The one name of a stage's metric on the parent run: the evaluate stage's as they are (the headline numbers:
    cd, fid, ...), the others prefixed by their stage (sample.nfe, train.final_loss)."""
    return key if stage == "evaluate" else f"{stage}.{key}"


def _key(k: str) -> str:
    """`k` with the characters MLflow rejects in keys replaced, cut to its 250-char limit."""
    return re.sub(r"[^\w\-. :/]", "_", k)[:250]


def finite(v: Any) -> float | None:
    """`v` as a float, or None when it is not a finite number (MLflow charts choke on those)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def experiment_tags() -> dict[str, str]:
    """The tags of the project's MLflow experiments: a model-training kind and the runs view with metric columns."""
    view = {"selectedColumns": [f"metrics.`{m}`" for m in RUNS_VIEW_METRICS]}
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, RUNS_VIEW_TAG: json.dumps(view)}


def mark_experiment(client: Any, experiment: Any) -> None:
    """Set the experiment_tags() that `experiment` (an mlflow Experiment) lacks; a value someone set stays."""
    for key, value in experiment_tags().items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)


def runs_url(base: str, experiment_id: str) -> str:
    """The UI's page of an experiment's runs table with the metric columns (Model training, the runs view)."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_KEY}")


def error_text(exc: BaseException) -> str:
    """An exception as the `error` tag holds it: `Type: message`, cut to fit MLflow's tag values."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= _ERROR_MAX else text[:_ERROR_MAX - 1] + "…"


def _reachable(uri: str, timeout: float = 2.0) -> bool:
    """Whether a server answers GET <uri>/health at all within `timeout` seconds."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:  # it answered (e.g. 401 behind auth): let MLflow judge
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _fast_http_env(active: bool) -> Iterator[None]:
    """Temporarily shorten MLflow's HTTP retries for the calls inside (see _HTTP_ENV)."""
    if not active:
        yield
        return
    with _ENV_LOCK:
        added = [k for k in _HTTP_ENV if k not in os.environ]
        os.environ.update({k: _HTTP_ENV[k] for k in added})
        try:
            yield
        finally:
            for k in added:
                os.environ.pop(k, None)


class Tracker:
    """An MlflowClient on one experiment that warns once and goes quiet on any failure."""

    def __init__(self, uri: str, experiment: str = DEFAULT_EXPERIMENT,
                 artifact_location: str | None = None, lock: str | os.PathLike | None = None):
        self.uri, self.enabled, self.experiment_id, self._client = uri, True, None, None
        self._lock = lock  # a file locked around finding-or-creating a parent (deferred replays race for it)
        self._http = uri.startswith(("http://", "https://"))
        self._parents: dict[str, str] = {}  # pipeline_key -> parent run id
        # A down server is found in ~2 s here instead of minutes of MLflow retries.
        if self._http and not _reachable(uri):
            self._disable("server does not answer GET /health")
            return
        self._call(self._connect, experiment, artifact_location)

    def _connect(self, experiment: str, artifact_location: str | None) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                client.create_experiment(experiment, artifact_location=artifact_location, tags=experiment_tags())
            except Exception:  # a parallel queued experiment may have created it first
                pass
            exp = client.get_experiment_by_name(experiment)
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        self.experiment_id, self._client = exp.experiment_id, client
        try:  # an experiment made before these tags existed gets them; a user who may not edit it keeps tracking
            mark_experiment(client, exp)
        except Exception as e:
            warnings.warn(f"MLflow experiment {experiment!r} not tagged as model training: {type(e).__name__}: {e}",
                          TrackingWarning, stacklevel=4)

    def _disable(self, why: str) -> None:
        if self.enabled:
            self.enabled = False
            warnings.warn(f"MLflow tracking to {self.uri} disabled: {why}", TrackingWarning,
                          stacklevel=4)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` unless disabled; on any error warn once, disable, and return None."""
        if not self.enabled:
            return None
        try:
            with _fast_http_env(self._http):
                return fn(*args, **kwargs)
        except Exception as e:
            self._disable(f"{type(e).__name__}: {e}")
            return None

    def parent_run(self, key: str, tags: Mapping[str, str], name: str | None = None,
                   start_time: int | None = None) -> str | None:
        """The id of the parent run tagged `pipeline_key=key`, created if missing (named `name`, else `key`)."""
        if not self.enabled or self._client is None:
            return None
        if key not in self._parents:
            with file_lock(self._lock):
                run_id = self._call(self._find_or_create_parent, key, dict(tags), name or key, start_time)
            if run_id is None:
                return None
            self._parents[key] = run_id
        return self._parents[key]

    def _find_or_create_parent(self, key: str, tags: dict[str, str], name: str, start_time: int | None) -> str:
        found = self._client.search_runs([self.experiment_id], f"tags.pipeline_key = '{key}'",
                                         order_by=["attributes.start_time ASC"])
        for run in found:
            if PARENT_TAG not in run.data.tags:  # children carry pipeline_key too
                return run.info.run_id
        run = self._client.create_run(self.experiment_id, tags={**tags, "pipeline_key": key},
                                      run_name=name, start_time=start_time)
        return run.info.run_id

    def stage(self, name: str, parent_key: str, tags: Mapping[str, str], parent_name: str | None = None) -> StageRun:
        """A context manager for the child run of stage `name` under the parent `parent_key`."""
        return StageRun(self, name, parent_key, tags, parent_name)

    def log_params(self, run_id: str | None, params: Mapping) -> None:
        """Log flattened params in batches of MLflow's size limits, values truncated to fit."""
        if run_id is None or not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(_key(k), str(v)[:_PARAM_VALUE_MAX]) for k, v in flatten(params).items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._call(self._client.log_batch, run_id, params=items[i:i + _PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str | None, metrics: Mapping, step: int | None = None) -> None:
        """Log the finite numbers of flattened `metrics`, skipping everything else."""
        now, step = int(time.time() * 1000), step or 0
        self.log_metric_entries(run_id, [(k, v, now, step) for k, v in flatten(metrics).items()])

    def log_metric_entries(self, run_id: str | None, entries: list[tuple[str, Any, int, int]]):
        """Log (key, value, timestamp_ms, step) entries, skipping non-finite values."""
        if run_id is None or not self.enabled:
            return
        from mlflow.entities import Metric

        items = [Metric(_key(k), f, ts, step) for k, v, ts, step in entries
                 if (f := finite(v)) is not None]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self._call(self._client.log_batch, run_id, metrics=items[i:i + _METRICS_PER_BATCH])

    def log_artifact(self, run_id: str | None, path: str | os.PathLike,
                     artifact_path: str | None = None) -> None:
        """Upload a file or, for a directory, its contents; a missing path only warns."""
        if run_id is None or not self.enabled:
            return
        path = Path(path)
        if not path.exists():  # a caller's missing file is not a reason to stop tracking
            warnings.warn(f"artifact {path} does not exist, not logged", TrackingWarning, 2)
            return
        fn = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        self._call(fn, run_id, str(path), artifact_path)

    def log_artifacts(self, run_id: str | None, directory: str | os.PathLike,
                      artifact_path: str | None = None) -> None:
        """Upload the contents of `directory`."""
        self.log_artifact(run_id, directory, artifact_path)

    def set_tag(self, run_id: str | None, key: str, value: str) -> None:
        """Set one tag of a run."""
        if run_id is None or not self.enabled:
            return
        self._call(self._client.set_tag, run_id, key, value)

    def clear_tag(self, run_id: str | None, key: str) -> None:
        """Delete a run's tag `key` where it has one (MLflow refuses to delete a missing tag)."""
        if run_id is None or not self.enabled:
            return
        run = self._call(self._client.get_run, run_id)
        if run is not None and key in run.data.tags:
            self._call(self._client.delete_tag, run_id, key)

    def set_status(self, run_id: str | None, status: str, end_time: int | None = None) -> None:
        """Mark a run RUNNING, or end it as FINISHED / FAILED (at `end_time` ms, default now)."""
        if run_id is None or not self.enabled:
            return
        if status == "RUNNING":
            self._call(self._client.update_run, run_id, status=status)
        else:
            self._call(self._client.set_terminated, run_id, status=status, end_time=end_time)


class StageRun:
    """The child run of one stage; every method is a no-op while tracking is disabled."""

    def __init__(self, tracker: Tracker, name: str, parent_key: str, tags: Mapping[str, str],
                 parent_name: str | None = None, start_time: int | None = None):
        self.tracker, self.name, self.parent_key, self.parent_name = tracker, name, parent_key, parent_name
        self.parent_tags = {**tags, "pipeline_key": parent_key}
        self.start_time = start_time  # ms since the epoch; None: now (a replay passes the stage's own)
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self._buffer: list[tuple[str, Any, int, int]] = []
        self._last_flush = time.monotonic()

    def __enter__(self) -> StageRun:
        return self.open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc is None:
            self.close("FINISHED")
        else:
            self.close("FAILED", error=error_text(exc))
        return False

    def open(self) -> StageRun:
        """Find or create the parent run, mark it RUNNING and create this stage's child run under it."""
        t = self.tracker
        self.parent_run_id = t.parent_run(self.parent_key, self.parent_tags, self.parent_name, self.start_time)
        if self.parent_run_id is not None:
            t.set_status(self.parent_run_id, "RUNNING")
            run = t._call(t._client.create_run, t.experiment_id, run_name=self.name, start_time=self.start_time,
                          tags={**self.parent_tags, "dvc_stage": self.name, PARENT_TAG: self.parent_run_id})
            self.run_id = run.info.run_id if run is not None else None
        return self

    def close(self, status: str, end_time: int | None = None, error: str | None = None) -> None:
        """Send buffered points and end the child run, and the parent with it, as FINISHED or FAILED; a FAILED run
        carries the reason `error` in its `error` tag (the parent's says which stage), a FINISHED parent none."""
        self.flush()
        t = self.tracker
        if status == "FAILED":
            t.set_tag(self.run_id, ERROR_TAG, error or "failed without a message")
            t.set_tag(self.parent_run_id, ERROR_TAG, f"{self.name}: {error or 'failed without a message'}")
        elif status == "FINISHED":
            t.clear_tag(self.parent_run_id, ERROR_TAG)  # an earlier stage's failure, since run again
        t.set_status(self.run_id, status, end_time)
        # The parent shows the state of the latest stage, so a finished pipeline is FINISHED.
        t.set_status(self.parent_run_id, status, end_time)

    def log_params(self, params: Mapping) -> None:
        """Log flattened params to this stage's run."""
        self.tracker.log_params(self.run_id, params)

    def log_metrics(self, metrics: Mapping, step: int | None = None) -> None:
        """Log finite metrics to this stage's run now."""
        self.tracker.log_metrics(self.run_id, metrics, step)

    def log_metric_buffered(self, key: str, value: float, step: int) -> None:
        """Queue one point of a live curve; flushed every ~50 points or ~5 s and at exit."""
        if self.run_id is None or not self.tracker.enabled:
            return
        self._buffer.append((key, value, int(time.time() * 1000), int(step)))
        due = time.monotonic() - self._last_flush >= _FLUSH_SECONDS
        if due or len(self._buffer) >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Send the buffered curve points."""
        entries, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        if entries:
            self.tracker.log_metric_entries(self.run_id, entries)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's contents) to this stage's run."""
        self.tracker.log_artifact(self.run_id, path, artifact_path)

    def log_to_parent(self, params: Mapping | None = None, metrics: Mapping | None = None,
                      artifacts: Iterable[str | os.PathLike] = (),
                      artifact_path: str | None = None) -> None:
        """Log params, metrics and files to the pipeline's parent run (for the report stage)."""
        if params:
            self.tracker.log_params(self.parent_run_id, params)
        if metrics:
            self.tracker.log_metrics(self.parent_run_id, metrics)
        for path in artifacts:
            self.tracker.log_artifact(self.parent_run_id, path, artifact_path)


class NullRun:
    """A StageRun that logs nothing and imports nothing (SCORE_PIPELINE_TRACKING=off): the DVC files are the record."""

    run_id = parent_run_id = None

    def __enter__(self) -> NullRun:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return False

    def log_params(self, params: Mapping) -> None:
        pass

    def log_metrics(self, metrics: Mapping, step: int | None = None) -> None:
        pass

    def log_metric_buffered(self, key: str, value: float, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_to_parent(self, params: Mapping | None = None, metrics: Mapping | None = None,
                      artifacts: Iterable[str | os.PathLike] = (), artifact_path: str | None = None) -> None:
        pass


def store_of(root: Path, env: Mapping[str, str], experiment: str | None = None) -> dict[str, str | None]:
    """{uri, experiment, artifact_location} of the store: MLFLOW_TRACKING_URI, else the embedded sqlite one under
    `root`; the experiment: `experiment` (tracking.experiment), else MLFLOW_EXPERIMENT_NAME, else the default."""
    root = Path(root).resolve()
    uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    # A server keeps its own artifact store; local stores get an absolute location so runs
    # from DVC's temp copies land in the real repo.
    remote = uri.startswith(("http://", "https://", "databricks"))
    return {"uri": uri, "experiment": experiment or env.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
            "artifact_location": None if remote else (root / "mlartifacts").as_uri()}


def spool_dir(root: Path) -> Path:
    """Where stages leave their deferred tracking records (pipeline.spool) and the parent-run lock."""
    return Path(root).resolve() / SPOOL_DIR


def open_tracker(root: Path, env: Mapping[str, str], experiment: str | None = None) -> Tracker:
    """A Tracker on MLFLOW_TRACKING_URI, else the embedded sqlite store under `root`."""
    store = store_of(root, env, experiment)
    return Tracker(store["uri"], store["experiment"], store["artifact_location"], lock=spool_dir(root) / LOCK_FILE)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike | None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created with its folder) inside the block; no lock for None."""
    if path is None:
        yield
        return
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ui_links(uri: str, base: str) -> list[tuple[str, str]]:
    """(name, runs_url) of each active experiment at `uri` that holds runs, each given experiment_tags() it lacks."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    links = []
    for exp in client.search_experiments(view_type=ViewType.ACTIVE_ONLY):
        if client.search_runs([exp.experiment_id], max_results=1):
            mark_experiment(client, exp)
            links.append((exp.name, runs_url(base, exp.experiment_id)))
    return links


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.tracking [--port N]` (make ui): print where the UI shows each experiment's runs."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking",
                                     description="The MLflow UI's page of each experiment's runs with their metric "
                                                 "columns, over the embedded store <root>/mlflow.db.")
    parser.add_argument("--host", default="127.0.0.1", help="the UI's host (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="the UI's port (default: 5000)")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository (default: the current folder)")
    args = parser.parse_args(argv)
    base = f"http://{args.host}:{args.port}"
    db = args.root.resolve() / "mlflow.db"
    if not db.is_file():  # MlflowClient would create an empty store
        print(f"MLflow UI: {base} (no runs yet: {db} does not exist; `make repro` makes one)")
        return 0
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    links = ui_links(f"sqlite:///{db}", base)
    print(f"MLflow UI: {base}" + ("; each experiment's runs with their metric columns:" if links else " (no runs yet)"))
    width = max((len(name) for name, _ in links), default=0)
    for name, url in links:
        print(f"  {name:<{width}}  {url}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
