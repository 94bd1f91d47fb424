"""Where the runs come from: the MLflow store pipeline.tracking writes to (MlflowClient.search_runs) and
`dvc exp show --json`, the workspace's params.yaml, git revisions; nothing private."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from pipeline.compare.frame import CompareError, run_record
from pipeline.tracking import _fast_http_env, store_of


def store_uri(root: Path, env: Mapping[str, str]) -> str:
    """The MLflow store the pipeline tracks into (pipeline.tracking.store_of)."""
    return str(store_of(root, env)["uri"])


# ---------------------------------------------------------------------------------------------------------- sources

def load_mlflow(uri: str, experiment: str | None = None) -> tuple[list[dict], str | None]:
    """All active runs at `uri` (only `experiment`'s, if given) as run_record dicts, and a note if none are readable."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        if experiment:
            raise CompareError(f"unknown MLflow experiment {experiment!r}: there is no store at {uri}")
        return [], f"no MLflow store at {uri}"  # MlflowClient would create an empty one
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        with _fast_http_env(uri.startswith(("http://", "https://"))):  # a down server fails in seconds
            experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    except Exception as e:  # noqa: BLE001 - any store error: go on with DVC alone
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        return [], f"cannot read the MLflow store at {uri}: {why if len(why) <= 120 else why[:119] + '…'}"
    names = {e.experiment_id: e.name for e in experiments}
    if experiment is not None:
        ids = [i for i, n in names.items() if n == experiment]
        if not ids:
            raise CompareError(f"unknown MLflow experiment {experiment!r}; {uri} has: "
                               + (", ".join(sorted(names.values())) or "none"))
    else:
        ids = list(names)
    records, token = [], None
    while ids:
        with _fast_http_env(uri.startswith(("http://", "https://"))):
            page = client.search_runs(ids, "", ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        records += [run_record(r, names.get(r.info.experiment_id)) for r in page]
        token = page.token
        if not token:
            break
    return records, None


def find_dvc() -> str | None:
    """The dvc executable: on PATH, else next to this Python (a venv run without activating it)."""
    found = shutil.which("dvc")
    beside = Path(sys.executable).parent / "dvc"
    return found or (str(beside) if beside.is_file() else None)


def load_dvc(root: Path, rev: str | None = None, timeout: float = 600) -> tuple[list | None, str | None]:
    """The JSON of `dvc exp show --json [--rev REV]` run in `root` (without the workspace for a REV), or (None, why)."""
    root = Path(root)
    if not (root / ".dvc").is_dir():
        return None, f"{root} is not a DVC repository"
    exe = find_dvc()
    if exe is None:
        return None, "dvc is not installed"
    cmd = [exe, "exp", "show", "--json"] + (["--rev", rev] if rev else [])
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"`dvc exp show --json` failed: {e}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return None, f"`dvc exp show --json` failed: {last}"
    try:
        shown = json.loads(proc.stdout)
    except ValueError:
        return None, "`dvc exp show --json` printed no JSON"
    # With --rev the workspace (based on HEAD) is not of that commit.
    return [e for e in shown if not rev or e.get("rev") != "workspace"], None


def load_base_params(root: Path) -> dict | None:
    """The workspace's params.yaml (the reference of the changed params), or None without one."""
    path = Path(root) / "params.yaml"
    if not path.is_file():
        return None
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def resolve_rev(root: Path, rev: str) -> str | None:
    """`git rev-parse` of `rev` in `root` (the full sha of a commit), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=root,
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


