"""The MLflow UI as a person sees it: two finished pipelines in a real store, `mlflow server` over it, and a real
headless browser (Debian's chromium; `make browser` installs it) that must show both runs, named by method, data and
experiment, with their `cd` in MLflow's run comparison. The screenshot is kept in test-artifacts/ (gitignored)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from servers import mlflow_server
from test_stages import STAGES, TINY, _deep_merge, _run, _write_params

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    """The headless browser's executable; a clear failure (never a skip) without one."""
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail(f"no headless browser ({', '.join(BROWSERS)} not on PATH): `make browser` installs Debian's "
                "chromium (root and apt), or `sudo apt-get install chromium`")


def _chromium(url: str, *args: str) -> str:
    """Run the headless browser on `url` until the page's scripts settle; its stdout (the DOM with --dump-dom)."""
    out = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--hide-scrollbars", "--virtual-time-budget=30000", *args, url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _shown(value: float) -> str:
    """A metric as MLflow's comparison table prints it (its Utils.formatMetric): 3 decimals below 10, 2 below 100,
    1 above, exponent notation below 1e-3."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent)}"  # JavaScript writes 3.777e-5
    digits = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1
    return f"{round(value, digits):.{digits}f}".rstrip("0").rstrip(".")


def _text_cells(dom: str) -> list[str]:
    """The page's visible strings in document order."""
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", dom, flags=re.S)
    return [html.unescape(t).strip() for t in re.split(r"<[^>]+>", dom) if t.strip()]


@pytest.fixture
def two_pipelines(tmp_path, monkeypatch):
    """Two finished pipelines of the tiny 2-D run in one embedded store: experiment ui-a (every stage) and ui-b
    (sample.seed 1: sample, evaluate, report), as `dvc exp run -n ...` would leave them."""
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        monkeypatch.delenv(key, raising=False)
    _write_params(tmp_path / "params.yaml", TINY)
    monkeypatch.setenv("DVC_EXP_NAME", "ui-a")
    for name in STAGES:
        assert _run(name) == 0, name
    _write_params(tmp_path / "params.yaml", _deep_merge(TINY, {"sample": {"seed": 1}}))
    monkeypatch.setenv("DVC_EXP_NAME", "ui-b")
    for name in ("sample", "evaluate", "report"):
        assert _run(name) == 0, name
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("score-pipeline")
    parents = {r.data.tags["dvc_exp_name"]: r for r in client.search_runs([exp.experiment_id])
               if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"ui-a", "ui-b"}
    return tmp_path, exp.experiment_id, [parents["ui-a"], parents["ui-b"]]


def test_the_mlflow_ui_shows_both_runs_and_their_cd(two_pipelines, tmp_path):
    root, experiment_id, runs = two_pipelines
    names = [r.info.run_name for r in runs]
    assert names == ["ncsnv2 · swissroll · ui-a", "ncsnv2 · swissroll · ui-b"]
    cds = [r.data.metrics["cd"] for r in runs]
    ids = ",".join(f'"{r.info.run_id}"' for r in runs)
    with mlflow_server(tmp_path, f"sqlite:///{root / 'mlflow.db'}") as (uri, _):
        page = f"{uri}/#/compare-runs?runs=[{ids}]&experiments=[\"{experiment_id}\"]"
        # A tall window: MLflow's grid renders only what is in view.
        cells = _text_cells(_chromium(page, "--window-size=1400,2600", "--dump-dom"))
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "mlflow-compare.png"
        shot.unlink(missing_ok=True)
        _chromium(page, "--window-size=1400,2600", f"--screenshot={shot}")
    for name in names:
        assert name in cells, f"run {name!r} not on the page"
    # The metrics table: the metric names in order, then one value per run for each.
    metrics = sorted(set(runs[0].data.metrics) | set(runs[1].data.metrics))
    start = next(i for i in range(len(cells)) if cells[i:i + len(metrics)] == metrics)
    values = cells[start + len(metrics):start + 3 * len(metrics)]
    row = metrics.index("cd")
    assert values[2 * row:2 * row + 2] == [_shown(v) for v in cds], (values[2 * row:2 * row + 2], cds)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
