"""Deferred MLflow logging: a stage records its tracking calls, a detached process replays them into the store.

Importing mlflow costs ~1.8 s on a 2-core machine, more than the whole work of a short stage (report, ema). A stage
that draws no live curve therefore logs into a `Recorder` (no mlflow import); at exit the record (calls, start and
end times, status, copies of the artifacts) is written to `<repo>/.mlflow-spool/<end time>-<pid>-<stage>.json`
and, unless a replayer is alive, `python -m pipeline.spool --linger S <dir>` starts detached. The replayer `drain`s
the folder: every pending record, in the order the stages ended, replayed with the stage's own times under the lock
that live stages also take around the parent run; then it waits S seconds for the next stage's record before it
exits, so that a pipeline's stages share one replayer (one mlflow import) instead of starting one each. DVC files
stay the record (docs/design.md, "Tracking"): a replay that fails (a server down) warns in `replay.log`, keeps its
record for the next replay, and never fails a stage.

Who takes a record: a replayer holds `replayer.lock` while it serves. A stage writes its record, then starts a
replayer only if that lock is free. A replayer, after releasing the lock, looks once more for records it has not
tried: a stage that found the lock held wrote its record before that look, so no record waits for a later stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from pipeline.tracking import LOCK_FILE, StageRun, Tracker, error_text, file_lock, flatten

LOG = "replay.log"
# Held by the replayer serving the folder (see the module docstring); a stage starts a replayer only when it is free.
ALIVE_LOCK = "replayer.lock"
# How long a detached replayer waits for the next stage's record (the stages of a pipeline end seconds apart).
LINGER_SECONDS = 30.0


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


def _drain(spool: Path) -> list[Path]:
    """Replay every pending record in order, holding the spool's lock; the records it tried and left (their store
    failed), not those that arrived meanwhile.

    The lock is the one live stages take around the parent run, so nothing else creates parents meanwhile; a
    record whose store fails stays, and so do the later ones of the same store, to keep their order."""
    trackers: dict = {}
    left = []
    with file_lock(spool / LOCK_FILE):
        for path in pending(spool):
            if not path.exists():  # replayed by another drain that held the lock before us
                continue
            try:
                replay(path, trackers)
            except Exception as err:  # a corrupt record must not block the others forever
                print(f"replay of {path.name} failed: {type(err).__name__}: {err}", file=sys.stderr)
                path.rename(path.with_suffix(".failed"))
            if path.exists():
                left.append(path)
    return left


def drain(spool: Path) -> int:
    """Replay every pending record (see _drain); how many of them are left (0 unless a store failed)."""
    return len(_drain(Path(spool)))


@contextlib.contextmanager
def _alive(spool: Path) -> Iterator[bool]:
    """Hold the folder's replayer lock inside the block if it is free; yields whether this process holds it."""
    import fcntl

    spool.mkdir(parents=True, exist_ok=True)
    with open(spool / ALIVE_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def replayer_alive(spool: Path) -> bool:
    """Whether a replayer serves `spool` now (and so will take any record written before this call)."""
    with _alive(Path(spool)) as mine:
        return not mine


def serve(spool: Path, linger: float, poll: float = 0.25) -> list[Path]:
    """Drain `spool`, then drain what arrives until `linger` seconds pass without a new record, holding the
    replayer lock; exits at once when another replayer holds it. The records it tried and left (their store failed).

    After releasing the lock it looks once more for untried records (a stage that found the lock held has written
    its record by then) and serves again if it can take the lock; else their replayer does."""
    spool = Path(spool)
    tried: set[Path] = set()
    left: list[Path] = []
    while True:
        with _alive(spool) as mine:
            if not mine:
                return left
            idle_since = time.monotonic()
            while time.monotonic() - idle_since < linger or _untried(spool, tried):
                if _untried(spool, tried):
                    left = _drain(spool)
                    tried.update(left)
                    idle_since = time.monotonic()
                else:
                    time.sleep(poll)
        if not _untried(spool, tried):
            return left


def _untried(spool: Path, tried: set[Path]) -> list[Path]:
    return [p for p in pending(spool) if p not in tried]


def start_replay(spool: Path, linger: float = LINGER_SECONDS) -> None:
    """Start `python -m pipeline.spool --linger S <spool>` detached (its own session, output to replay.log), not
    waiting; nothing when a replayer is alive, since it takes the record written before this call."""
    spool = Path(spool).resolve()
    if replayer_alive(spool):
        return
    env = dict(os.environ)
    # A queued experiment runs in a temp copy that DVC deletes when it ends, maybe before the replay: run the
    # repo's own copy of this module (the spool sits in the repo) from the spool folder, never from the temp copy.
    repo = spool.parent
    code_root = str(repo if (repo / "pipeline" / "spool.py").is_file() else Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (code_root, env.get("PYTHONPATH")) if p)
    with open(spool / LOG, "ab") as log:
        subprocess.Popen([sys.executable, "-m", "pipeline.spool", "--linger", str(linger), str(spool)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=spool,
                         start_new_session=True)


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m pipeline.spool [--linger S] DIR`: drain DIR (and, with --linger, what arrives in the next S
    seconds); exit 1 when records are left (their store failed)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.spool", description="Replay the stages' MLflow records.")
    parser.add_argument("--linger", type=float, default=None, metavar="S",
                        help="serve as the folder's replayer, waiting S seconds for new records before exiting")
    parser.add_argument("spool", type=Path, metavar="SPOOL_DIR")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    left = len(serve(args.spool, args.linger)) if args.linger is not None else drain(args.spool)
    if left:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {left} record(s) left in {args.spool}: their store failed "
              "(see the warning above); the next replay tries again", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
