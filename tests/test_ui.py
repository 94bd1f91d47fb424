"""The MLflow UI as a person sees it: two finished pipelines in a real store, `mlflow server` over it, and a real
headless browser (Debian's chromium; `make browser` installs it). The page `make ui` prints for the experiment must
open on its runs table with the runs, named by method, data and experiment, and their `cd` and `emd`; MLflow's run
comparison must show both runs with their `cd`. The screenshots are kept in test-artifacts/ (gitignored)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.tracking import flatten, runs_url
from servers import mlflow_server
from test_stages import STAGES, TINY, _deep_merge, _run, _write_params

# One worker runs the module's tests, so the pipelines and the server are made once (`make test`: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("ui")
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# A tall window: MLflow's grids render only what is in view.
WINDOW = "--window-size=1400,2600"


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


def _page(url: str, screenshot: str) -> str:
    """The DOM of `url` after its scripts ran, and its screenshot kept as test-artifacts/<screenshot>."""
    dom = _chromium(url, WINDOW, "--dump-dom")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / screenshot
    shot.unlink(missing_ok=True)
    _chromium(url, WINDOW, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    return dom


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


def _javascript(value: float) -> str:
    """A number as JavaScript's String() writes it, which the runs table shows: the shortest round-trip digits, as
    Python's repr, for the plain-decimal range checked here."""
    assert 1e-4 <= abs(value) < 1e16, f"{value}: outside the range where repr and String() agree"
    return repr(value)


def _text_cells(dom: str) -> list[str]:
    """The page's visible strings in document order."""
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", dom, flags=re.S)
    return [html.unescape(t).strip() for t in re.split(r"<[^>]+>", dom) if t.strip()]


def _grid(dom: str) -> dict[str, dict[str, str]]:
    """The runs table's cells: {run id: {column id: text}} from the grid's rows (row-id is the run's id, col-id
    the column's, e.g. metrics.`cd`)."""
    rows: dict[str, dict[str, str]] = {}
    for row in re.finditer(r'row-id="(\w+)"(.*?)(?=row-id="|$)', dom, flags=re.S):
        cells = rows.setdefault(row.group(1), {})
        for cell in re.finditer(r'role="gridcell"[^>]*?col-id="([^"]+)"[^>]*>(.*?)</div></div>', row.group(2),
                                flags=re.S):
            cells[html.unescape(cell.group(1))] = " ".join(_text_cells(cell.group(2)))
    return rows


@pytest.fixture(scope="module")
def two_pipelines(tmp_path_factory):
    """Two finished pipelines of the tiny 2-D run in one embedded store: experiment ui-a (every stage) and ui-b
    (sample.seed 1: sample, evaluate, report), as `dvc exp run -n ...` would leave them."""
    root = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
            mp.delenv(key, raising=False)
        _write_params(root / "params.yaml", TINY)
        mp.setenv("DVC_EXP_NAME", "ui-a")
        for name in STAGES:
            assert _run(name) == 0, name
        _write_params(root / "params.yaml", _deep_merge(TINY, {"sample": {"seed": 1}}))
        mp.setenv("DVC_EXP_NAME", "ui-b")
        for name in ("sample", "evaluate", "report"):
            assert _run(name) == 0, name
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("score-pipeline")
    parents = {r.data.tags["dvc_exp_name"]: r for r in client.search_runs([exp.experiment_id])
               if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"ui-a", "ui-b"}
    return root, exp.experiment_id, [parents["ui-a"], parents["ui-b"]]


@pytest.fixture(scope="module")
def ui(two_pipelines):
    """`mlflow server` over the two pipelines' store, as `make ui` runs it (one worker, no job runners)."""
    root = two_pipelines[0]
    with mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}") as (uri, _):
        yield uri


def test_each_metric_is_logged_once_per_run(two_pipelines):
    """The parent run holds every metric of the stages' metrics/*.json under one name: the evaluate stage's as they
    are (cd, emd, ...), the others prefixed by their stage (sample.nfe, ...), and the noise record's noise.*."""
    root, _, runs = two_pipelines
    latest = runs[1].data.metrics  # ui-b ran last: metrics/*.json are its own
    expected = {}
    for path in sorted((root / "metrics").glob("*.json")):
        for key, value in flatten(json.loads(path.read_text())).items():
            if isinstance(value, (int, float)):
                expected[key if path.stem == "evaluate" else f"{path.stem}.{key}"] = float(value)
    assert {k: v for k, v in latest.items() if not k.startswith("noise.")} == expected
    assert {"cd", "emd", "sample.nfe", "train.final_loss"} <= set(latest)
    assert not [k for r in runs for k in r.data.metrics if k.startswith("evaluate.")]


def test_the_experiment_page_shows_the_runs_with_their_metrics(two_pipelines, ui):
    root, experiment_id, runs = two_pipelines
    dom = _page(runs_url(ui, experiment_id), "mlflow-runs.png")
    cells = _text_cells(dom)
    assert cells[0].startswith("Runs - Experiment"), cells[:3]  # the runs table, not MLflow 3's GenAI overview
    grid = _grid(dom)
    for run in runs:
        assert run.info.run_name in cells, f"run {run.info.run_name!r} not on the page"
        shown = grid.get(run.info.run_id, {})
        for metric in ("cd", "cd_floor", "emd"):
            value = _javascript(run.data.metrics[metric])
            assert shown.get(f"metrics.`{metric}`") == value, (run.info.run_name, metric, value, shown)


def test_the_run_comparison_shows_both_runs_and_their_cd(two_pipelines, ui):
    root, experiment_id, runs = two_pipelines
    names = [r.info.run_name for r in runs]
    assert names == ["ncsnv2 · swissroll · ui-a", "ncsnv2 · swissroll · ui-b"]
    cds = [r.data.metrics["cd"] for r in runs]
    ids = ",".join(f'"{r.info.run_id}"' for r in runs)
    page = f"{ui}/#/compare-runs?runs=[{ids}]&experiments=[\"{experiment_id}\"]"
    cells = _text_cells(_page(page, "mlflow-compare.png"))
    for name in names:
        assert name in cells, f"run {name!r} not on the page"
    # The metrics table: the metric names in order, then one value per run for each.
    metrics = sorted(set(runs[0].data.metrics) | set(runs[1].data.metrics))
    start = next(i for i in range(len(cells)) if cells[i:i + len(metrics)] == metrics)
    values = cells[start + len(metrics):start + 3 * len(metrics)]
    row = metrics.index("cd")
    assert values[2 * row:2 * row + 2] == [_shown(v) for v in cds], (values[2 * row:2 * row + 2], cds)
