"""Deferred MLflow logging: a stage records its tracking calls, a detached process replays them into the store.

Importing mlflow costs ~1.8 s on a 2-core machine, more than the whole work of a short stage (report, ema). A stage
that draws no live curve therefore logs into a `Recorder` (no mlflow import); at exit the record (calls, start and
end times, status, copies of the artifacts) is written to `<repo>/.mlflow-spool/<end time>-<pid>-<stage>.json`
and `python -m pipeline.spool <dir>` starts detached, which `drain`s the folder: every pending record, in the order
the stages ended, replayed with the stage's own times under the lock that live stages also take around the parent
run. DVC files stay the record (docs/design.md, "Tracking"): a replay that fails (a server down) warns in
`replay.log`, keeps its record for the next replay, and never fails a stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from pipeline.tracking import LOCK_FILE, StageRun, Tracker, error_text, file_lock, flatten

LOG = "replay.log"


def _now_ms() -> int:
    return int(time.time() * 1000)


class Recorder:
    """A StageRun stand-in that keeps every call in memory and spools it at exit (see the module docstring)."""

    def __init__(self, spool: Path, store: Mapping[str, Optional[str]], name: str, parent_key: str,
                 tags: Mapping[str, str], parent_name: Optional[str] = None, launch: bool = True):
        self.spool, self.store, self.name, self.launch = Path(spool), dict(store), name, launch
        self.parent_key, self.parent_name, self.tags = parent_key, parent_name, dict(tags)
        self.stem = f"{time.time_ns():020d}-{os.getpid()}-{name}"
        self.ops: list[dict[str, Any]] = []
        self.start = _now_ms()
        self.run_id = self.parent_run_id = None  # known only once replayed

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc is None:
            self.save("FINISHED")
        else:
            self.save("FAILED", error=error_text(exc))
        if self.launch:
            start_replay(self.spool)
        return False

    def log_params(self, params: Mapping) -> None:
        self.ops.append({"op": "params", "to": "run", "params": _plain(flatten(params))})

    def log_metrics(self, metrics: Mapping, step: Optional[int] = None) -> None:
        now, step = _now_ms(), step or 0
        self.ops.append({"op": "metrics", "to": "run",
                         "entries": [(k, _plain(v), now, step) for k, v in flatten(metrics).items()]})

    def log_metric_buffered(self, key: str, value: float, step: int) -> None:
        self.ops.append({"op": "metrics", "to": "run", "entries": [(key, float(value), _now_ms(), int(step))]})

    def flush(self) -> None:
        """Nothing to send before the replay."""

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None, to: str = "run") -> None:
        """Copy the file (or folder) now: the stage's folder may be gone by the replay (DVC's temp experiments)."""
        path = Path(path)
        if not path.exists():
            self.ops.append({"op": "missing", "path": str(path)})
            return
        dest = self.spool / self.stem / str(len(self.ops)) / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copyfile)(path, dest)
        self.ops.append({"op": "artifact", "to": to, "file": str(dest.relative_to(self.spool)),
                         "artifact_path": artifact_path})

    def log_to_parent(self, params: Optional[Mapping] = None, metrics: Optional[Mapping] = None,
                      artifacts=(), artifact_path: Optional[str] = None) -> None:
        if params:
            self.ops.append({"op": "params", "to": "parent", "params": _plain(flatten(params))})
        if metrics:
            now = _now_ms()
            self.ops.append({"op": "metrics", "to": "parent",
                             "entries": [(k, _plain(v), now, 0) for k, v in flatten(metrics).items()]})
        for path in artifacts:
            self.log_artifact(path, artifact_path, to="parent")

    def save(self, status: str, error: Optional[str] = None) -> Path:
        """Write the record atomically (the replayer never reads half a file), with the reason `error` of a FAILED
        stage; its path."""
        record = {"stage": self.name, "parent_key": self.parent_key, "parent_name": self.parent_name,
                  "tags": self.tags, "store": self.store, "start": self.start, "end": _now_ms(), "status": status,
                  "error": error, "ops": self.ops}
        self.spool.mkdir(parents=True, exist_ok=True)
        path = self.spool / f"{self.stem}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
        return path


def _plain(v: Any) -> Any:
    """JSON-safe values (numpy scalars, paths): what MLflow would have logged, its str() for params."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def pending(spool: Path) -> list[Path]:
    """The records not yet replayed, oldest first."""
    return sorted(Path(spool).glob("*.json")) if Path(spool).is_dir() else []


def stale(spool: Path, seconds: float) -> int:
    """How many records have waited longer than `seconds` (a replay failed or never ran)."""
    now = time.time()
    return sum(1 for p in pending(spool) if now - p.stat().st_mtime > seconds)


def replay(path: Path, trackers: dict) -> bool:
    """Replay one record into its store; True when every call went through (the record is then removed)."""
    spool, record = path.parent, json.loads(path.read_text())
    store = record["store"]
    key = (store["uri"], store["experiment"], store["artifact_location"])
    if key not in trackers:
        # No lock of its own: drain holds the spool's lock already (a second flock on it would wait for ever).
        trackers[key] = Tracker(store["uri"], store["experiment"], store["artifact_location"])
    tracker = trackers[key]
    if not tracker.enabled:
        return False
    run = StageRun(tracker, record["stage"], record["parent_key"], record["tags"], record["parent_name"],
                   start_time=record["start"]).open()
    for op in record["ops"]:
        target = run.run_id if op.get("to") == "run" else run.parent_run_id
        if op["op"] == "params":
            tracker.log_params(target, op["params"])
        elif op["op"] == "metrics":
            tracker.log_metric_entries(target, [tuple(e) for e in op["entries"]])
        elif op["op"] == "artifact":
            tracker.log_artifact(target, spool / op["file"], op["artifact_path"])
        else:
            print(f"{record['stage']}: artifact {op['path']} did not exist, not logged", file=sys.stderr)
    run.close(record["status"], end_time=record["end"], error=record.get("error"))  # records before 'error': None
    if not tracker.enabled:
        return False
    shutil.rmtree(spool / path.stem, ignore_errors=True)
    path.unlink()
    return True


def drain(spool: Path) -> int:
    """Replay every pending record in order, holding the spool's lock; how many are left (0 unless a store failed).

    The lock is the one live stages take around the parent run, so nothing else creates parents meanwhile; a
    record whose store fails stays, and so do the later ones of the same store, to keep their order."""
    spool = Path(spool)
    trackers: dict = {}
    with file_lock(spool / LOCK_FILE):
        for path in pending(spool):
            if not path.exists():  # replayed by another drain that held the lock before us
                continue
            try:
                replay(path, trackers)
            except Exception as err:  # a corrupt record must not block the others forever
                print(f"replay of {path.name} failed: {type(err).__name__}: {err}", file=sys.stderr)
                path.rename(path.with_suffix(".failed"))
        return len(pending(spool))


def start_replay(spool: Path) -> None:
    """Start `python -m pipeline.spool <spool>` detached (its own session, output to replay.log), not waiting."""
    spool = Path(spool).resolve()
    env = dict(os.environ)
    # A queued experiment runs in a temp copy that DVC deletes when it ends, maybe before the replay: run the
    # repo's own copy of this module (the spool sits in the repo) from the spool folder, never from the temp copy.
    repo = spool.parent
    code_root = str(repo if (repo / "pipeline" / "spool.py").is_file() else Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (code_root, env.get("PYTHONPATH")) if p)
    with open(spool / LOG, "ab") as log:
        subprocess.Popen([sys.executable, "-m", "pipeline.spool", str(spool)], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, env=env, cwd=spool, start_new_session=True)


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m pipeline.spool DIR`: drain DIR; exit 1 when records are left (their store failed)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pipeline.spool SPOOL_DIR", file=sys.stderr)
        return 2
    left = drain(Path(argv[0]))
    if left:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {left} record(s) left in {argv[0]}: their store failed "
              "(see the warning above); the next replay tries again", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
