"""Tests for pipeline.compare and `python -m stages.compare`: a real MLflow sqlite store and `dvc exp show` JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from pipeline import compare
from pipeline.tracking import PARENT_TAG
from stages import compare as cli

# One worker builds the module's MLflow store once (`make test` runs `-n 2 --dist loadgroup`).
pytestmark = pytest.mark.xdist_group("compare")
REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
PARAMS_YAML = """\
seed: 0
data: {name: swissroll}
method: {name: ncsnv2}
train: {ema: true}
sample: {seed: 0, steps: auto}
eval: {seed: 0, rtol: 1.0e-5}
tracking: {experiment: score-pipeline}
"""
# The params as the report stage logs them to the parent run: flattened, every value a string.
MLFLOW_PARAMS = {"seed": "0", "data.name": "swissroll", "method.name": "ncsnv2", "train.ema": "True",
                 "sample.seed": "0", "sample.steps": "auto", "eval.seed": "0", "eval.rtol": "1e-05",
                 "tracking.experiment": "score-pipeline"}

# `dvc exp show --json` of dvc 3.67 in a scratch repo (workspace, the baseline `main`, its experiments: two run from
# the queue, one more, one failed, one still queued), trimmed: a few params and metrics, deps emptied, logs cut;
# the experiments renamed for this test, @SHA@ stands for the baseline commit.
EXP_SHOW = """[
 {"rev": "workspace", "name": null, "error": null, "experiments": null,
  "data": {"rev": "workspace", "timestamp": null, "deps": {}, "outs": {}, "meta": {},
   "params": {"params.yaml": {"data": {"seed": 0, "data": {"name": "swissroll"}, "method": {"name": "ncsnv2"},
     "train": {"ema": true}, "sample": {"seed": 0, "steps": "auto"}, "eval": {"seed": 0, "rtol": 1e-05},
     "tracking": {"experiment": "score-pipeline"}}}},
   "metrics": {"metrics/train.json": {"data": {"final_loss": 0.5, "steps": 5000}},
     "metrics/sample.json": {"data": {"nfe": 251, "n": 10000}},
     "metrics/evaluate.json": {"data": {"cd": 0.1, "cd_floor": 0.1, "emd": 0.17, "emd_floor": 0.08}}}}},
 {"rev": "@SHA@", "name": "main", "error": null,
  "data": {"rev": "@SHA@", "timestamp": "2026-11-26T03:25:32", "deps": {}, "outs": {}, "meta": {},
   "params": {"params.yaml": {"data": {"seed": 0, "data": {"name": "swissroll"}, "method": {"name": "ncsnv2"},
     "train": {"ema": true}, "sample": {"seed": 0, "steps": "auto"}, "eval": {"seed": 0, "rtol": 1e-05},
     "tracking": {"experiment": "score-pipeline"}}}},
   "metrics": {"metrics/train.json": {"data": {"final_loss": 0.5, "steps": 5000}},
     "metrics/sample.json": {"data": {"nfe": 251, "n": 10000}},
     "metrics/evaluate.json": {"data": {"cd": 0.1, "cd_floor": 0.1, "emd": 0.17, "emd_floor": 0.08}}}},
  "experiments": [
   {"name": "seed-one",
    "executor": {"state": "success", "name": "dvc-task", "local": {"root": null, "log": null, "pid": 27169,
      "returncode": 0, "task_id": "e70cc17d3d33556ec35863a4ae2fd03732251af3"}},
    "revs": [{"rev": "55da4cea053a62fc61e8e2b4237fe50b5234d9bd", "name": "seed-one", "error": null,
      "experiments": null,
      "data": {"rev": "55da4cea053a62fc61e8e2b4237fe50b5234d9bd", "timestamp": "2026-11-26T03:25:48",
       "deps": {}, "outs": {}, "meta": {},
       "params": {"params.yaml": {"data": {"seed": 1, "data": {"name": "swissroll"}, "method": {"name": "ncsnv2"},
         "train": {"ema": true}, "sample": {"seed": 1, "steps": "auto"}, "eval": {"seed": 0, "rtol": 1e-05},
         "tracking": {"experiment": "score-pipeline"}}}},
       "metrics": {"metrics/train.json": {"data": {"final_loss": 0.5, "steps": 5000}},
         "metrics/sample.json": {"data": {"nfe": 251, "n": 10000}},
         "metrics/evaluate.json": {"data": {"cd": 0.12, "cd_floor": 0.1, "emd": 0.18, "emd_floor": 0.08}}}}}]},
   {"name": "seed-two",
    "executor": {"state": "success", "name": "dvc-task", "local": {"root": null, "log": null, "pid": 27247,
      "returncode": 0, "task_id": "d94ed59768d5ec4f44b5a345659e612150927750"}},
    "revs": [{"rev": "4a32cb270719047845f86f7433eb7e85ba7cc590", "name": "seed-two", "error": null,
      "experiments": null,
      "data": {"rev": "4a32cb270719047845f86f7433eb7e85ba7cc590", "timestamp": "2026-11-26T03:25:53",
       "deps": {}, "outs": {}, "meta": {},
       "params": {"params.yaml": {"data": {"seed": 2, "data": {"name": "swissroll"}, "method": {"name": "ncsnv2"},
         "train": {"ema": true}, "sample": {"seed": 2, "steps": "auto"}, "eval": {"seed": 0, "rtol": 1e-05},
         "tracking": {"experiment": "score-pipeline"}}}},
       "metrics": {"metrics/train.json": {"data": {"final_loss": 0.5, "steps": 5000}},
         "metrics/sample.json": {"data": {"nfe": 251, "n": 10000}},
         "metrics/evaluate.json": {"data": {"cd": 0.11, "cd_floor": 0.1, "emd": 0.19, "emd_floor": 0.08}}}}}]},
   {"name": "seed-three",
    "executor": {"state": "success", "name": "dvc-task", "local": {"root": null, "log": null, "pid": 29044,
      "returncode": 0, "task_id": "165b85f5a1ca9b65df4ba65e70a49598c3a3a9d7"}},
    "revs": [{"rev": "d780d24085a850543d3f1068d472f0808800422d", "name": "seed-three", "error": null,
      "experiments": null,
      "data": {"rev": "d780d24085a850543d3f1068d472f0808800422d", "timestamp": "2026-11-26T03:26:13",
       "deps": {}, "outs": {}, "meta": {},
       "params": {"params.yaml": {"data": {"seed": 3, "data": {"name": "swissroll"}, "method": {"name": "ncsnv2"},
         "train": {"ema": true}, "sample": {"seed": 3, "steps": "auto"}, "eval": {"seed": 0, "rtol": 1e-05},
         "tracking": {"experiment": "score-pipeline"}}}},
       "metrics": {"metrics/train.json": {"data": {"final_loss": 0.5, "steps": 5000}},
         "metrics/sample.json": {"data": {"nfe": 251, "n": 10000}},
         "metrics/evaluate.json": {"data": {"cd": 0.13, "cd_floor": 0.1, "emd": 0.2, "emd_floor": 0.08}}}}}]},
   {"name": "broken",
    "executor": {"state": "failed", "name": null, "local": {"root": null, "log": null, "pid": 29095,
      "returncode": 255, "task_id": "c001b900b3ef7c5097621476a76f8b9cedd4f0cd"}},
    "revs": [{"rev": "c001b900b3ef7c5097621476a76f8b9cedd4f0cd", "name": "broken", "experiments": null,
      "error": {"msg": "Experiment run failed", "type": ""},
      "data": {"rev": "c001b900b3ef7c5097621476a76f8b9cedd4f0cd", "timestamp": "2026-11-26T03:28:01",
       "deps": {}, "outs": {}, "meta": {},
       "params": {"params.yaml": {"data": {"seed": "abc", "data": {"name": "swissroll"},
         "method": {"name": "ncsnv2"}, "train": {"ema": true}, "sample": {"seed": "abc", "steps": "auto"},
         "eval": {"seed": 0, "rtol": 1e-05}, "tracking": {"experiment": "score-pipeline"}}}},
       "metrics": {"metrics/evaluate.json": {"data": {"cd": 0.1, "cd_floor": 0.1, "emd": 0.17, "emd_floor": 0.08}}}}}]},
   {"name": "queued-one",
    "executor": {"state": "queued", "name": "dvc-task", "local": {"root": null, "log": null, "pid": null,
      "returncode": null, "task_id": "5119e0e4593a0f91eb7036be8a0ded671c80fb6f"}},
    "revs": [{"rev": "5119e0e4593a0f91eb7036be8a0ded671c80fb6f", "name": "queued-one", "error": null,
      "experiments": null,
      "data": {"rev": "5119e0e4593a0f91eb7036be8a0ded671c80fb6f", "timestamp": "2026-11-26T03:26:14",
       "deps": {}, "outs": {}, "meta": {}, "metrics": {},
       "params": {"params.yaml": {"data": {"seed": 4, "data": {"name": "swissroll"}, "method": {"name": "ncsnv2"},
         "train": {"ema": true}, "sample": {"seed": 4, "steps": "auto"}, "eval": {"seed": 0, "rtol": 1e-05},
         "tracking": {"experiment": "score-pipeline"}}}}}}]}
  ]}
]"""

# By hand: cd of the seed group {main, seed-one, seed-two, seed-three} is 0.10, 0.12, 0.11, 0.13: mean 0.115,
# squared deviations 0.000225 + 0.000025 + 0.000025 + 0.000225 = 0.0005, s = sqrt(0.0005 / 3), and
# t(0.975, 3 dof) = 3.182446 (t tables), so the half-width is 3.182446 * s / sqrt(4) = 0.020543.
CD_MEAN, CD_CI = 0.115, 3.182446305284263 * math.sqrt(0.0005 / 3) / 2
# sample seconds are known for seed-one (20 s) and seed-two (22 s) only: mean 21, s = sqrt(2),
# t(0.975, 1 dof) = 12.706205, half-width 12.706205 * sqrt(2) / sqrt(2).
SAMPLE_CI = 12.706204736174707


def _git(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _log_run(client, exp_id: str, name: str, tags: dict, params: dict, metrics: dict, t0: int,
             stages: list[tuple[str, float, dict, dict]]) -> str:
    """A parent run with a child run per stage (start/end = the stage's wall time), as the pipeline logs them."""
    from mlflow.entities import Metric, Param

    parent = client.create_run(exp_id, run_name=name, start_time=t0, tags=tags).info.run_id
    t = t0
    for stage, seconds, sparams, smetrics in stages:
        child = client.create_run(exp_id, run_name=stage, start_time=t,
                                  tags={**tags, "dvc_stage": stage, PARENT_TAG: parent}).info.run_id
        client.log_batch(child, params=[Param(k, str(v)) for k, v in sparams.items()],
                         metrics=[Metric(k, float(v), t, 0) for k, v in smetrics.items()])
        client.set_terminated(child, "FINISHED", end_time=t + int(seconds * 1000))
        t += int(seconds * 1000) + 500
    client.log_batch(parent, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(v), t, 0) for k, v in metrics.items()])
    client.set_terminated(parent, "FINISHED", end_time=t)
    return parent


def _report_metrics(cd: float, emd: float, nfe: int, steps: int, **more: float) -> dict:
    """The metrics the report stage logs to the parent, each once: the evaluate ones as they are, the others
    prefixed by their stage."""
    return {"cd": cd, "cd_floor": 0.1, "emd": emd, "emd_floor": 0.08, **more, "sample.nfe": nfe, "sample.n": 10000,
            "train.steps": steps, "train.final_loss": 0.5}


def _stages(train: float, sample: float, evaluate: float, sampler: str, seed: int) -> list:
    return [("prepare", 2.0, {"seed": seed, "data.name": "swissroll"}, {"dim": 2}),
            ("train", train, {"seed": seed, "method.name": "ncsnv2", "resolved.steps": 5000}, {"final_loss": 0.5}),
            ("sample", sample, {"sample.seed": seed, "sampler": sampler}, {"nfe": 251}),
            ("evaluate", evaluate, {"eval.seed": 0}, {"cd": 0.1}),
            ("report", 1.0, {}, {})]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> SimpleNamespace:
    """A git repo with params.yaml, and an MLflow sqlite store (built once: creating one costs seconds) holding the
    runs of the report stage's format: two DVC experiments that differ only in seed and sample.seed, a plain
    `dvc repro` of another method with likelihoods, a pipeline whose report never ran, a run in a second
    experiment."""
    from mlflow.tracking import MlflowClient

    base = tmp_path_factory.mktemp("compare").resolve()
    root = base / "repo"
    root.mkdir()
    (root / "params.yaml").write_text(PARAMS_YAML)
    _git(["init", "-q"], root)
    _git(["add", "params.yaml"], root)
    _git(["commit", "-q", "-m", "params"], root)
    sha = _git(["rev-parse", "HEAD"], root)
    other = "0123456789abcdef0123456789abcdef01234567"  # a commit of another clone
    uri = f"sqlite:///{base / 'store' / 'mlflow.db'}"
    (base / "store").mkdir()
    client = MlflowClient(tracking_uri=uri)
    art = (base / "store" / "artifacts").as_uri()
    main_id = client.create_experiment("score-pipeline", artifact_location=art)
    sandbox_id = client.create_experiment("sandbox", artifact_location=art)
    t0 = 1_790_000_000_000
    for i, (name, seed, cd, emd, train, sample) in enumerate([("seed-one", 1, 0.12, 0.18, 60, 20),
                                                              ("seed-two", 2, 0.11, 0.19, 62, 22)]):
        tags = {"pipeline_key": name, "git_commit": sha, "dvc_exp_name": name, "dvc_baseline_rev": sha}
        _log_run(client, main_id, name, tags, {**MLFLOW_PARAMS, "seed": str(seed), "sample.seed": str(seed),
                                               "fid_mode": "n/a"},
                 _report_metrics(cd, emd, 251, 5000), t0 + i * 1_000_000,
                 _stages(train, sample, 10.0, "annealed_langevin", seed))
    ddpm = f"{other[:7]}-0123456789ab"
    _log_run(client, main_id, ddpm, {"pipeline_key": ddpm, "git_commit": other},
             {**MLFLOW_PARAMS, "method.name": "ddpm", "sample.steps": "100"},
             _report_metrics(0.2, 0.3, 100, 3000, nll=1.5, bpd=2.164), t0 + 3_000_000,
             [("train", 30.0, {}, {}), ("sample", 5.0, {"sampler": "ancestral"}, {"nfe": 100}),
              ("evaluate", 3.0, {}, {})])
    partial = f"{sha[:7]}-deadbeef0000"
    _log_run(client, main_id, partial, {"pipeline_key": partial, "git_commit": sha}, {}, {}, t0 + 4_000_000,
             [("train", 40.0, {"seed": 0, "method.name": "ncsnv2", "train.ema": True}, {"final_loss": 0.5})])
    _log_run(client, sandbox_id, "sandbox-run", {"pipeline_key": "sandbox-run", "git_commit": sha},
             {**MLFLOW_PARAMS, "tracking.experiment": "sandbox", "sample.steps": "500"},
             _report_metrics(0.3, 0.4, 251, 5000),
             t0 + 5_000_000, [])
    return SimpleNamespace(root=root, uri=uri, sha=sha, other=other, ddpm=ddpm, partial=partial,
                           dvc=json.loads(EXP_SHOW.replace("@SHA@", sha)))


@pytest.fixture(scope="module")
def frame(repo):
    records, note = compare.load_mlflow(repo.uri)
    assert note is None
    return compare.runs_frame(records, repo.dvc, compare.load_base_params(repo.root))


def _row(df, name):
    rows = df[df["name"] == name]
    assert len(rows) == 1, f"{name}: {len(rows)} rows"
    return rows.iloc[0]


def test_canon_makes_mlflow_strings_and_yaml_values_comparable():
    for logged, typed in [("1e-05", 1.0e-5), ("True", True), ("5000", 5000.0), ("None", None),
                          ("[0.4, 0.6]", [0.4, 0.6]), ("[[2.0, 1.0]]", [[2, 1]]), ("auto", "auto")]:
        assert compare.canon(logged) == compare.canon(typed), (logged, typed)
    assert compare.canon("0.1") != compare.canon(0.01)
    assert [k for k in ("seed", "sample.seed", "eval.seed", "data.seeds", "seeded") if compare.is_seed_key(k)] \
        == ["seed", "sample.seed", "eval.seed"]


def test_rows_merged_by_experiment_name(frame, repo):
    assert sorted(frame["name"]) == sorted(["main", "seed-one", "seed-two", "seed-three", "broken", repo.ddpm,
                                            repo.partial, "sandbox-run"])  # workspace == main, queued-one left out
    assert frame.attrs["queued"] == 1
    assert dict(zip(frame["name"], frame["source"])) == {
        "main": "dvc", "seed-one": "both", "seed-two": "both", "seed-three": "dvc", "broken": "dvc",
        repo.ddpm: "mlflow", repo.partial: "mlflow", "sandbox-run": "mlflow"}
    one = _row(frame, "seed-one")
    assert (one.cd, one.cd_floor, one["cd/floor"], one.nfe, one.train_steps) == (0.12, 0.1, 0.12 / 0.1, 251, 5000)
    assert one.sampler == "annealed_langevin"  # resolved, from the sample stage's run
    assert (one.train_s, one.sample_s, one.evaluate_s, one.total_s) == (60, 20, 10, 2 + 60 + 20 + 10 + 1)
    assert one.commit == repo.sha[:7] and one.status == "finished"
    three = _row(frame, "seed-three")
    assert three.cd == 0.13 and math.isnan(three.train_s)  # DVC only: no stage times
    broken = _row(frame, "broken")
    assert broken.status == "failed" and math.isnan(broken.cd)  # DVC shows the baseline's files for it
    ddpm = _row(frame, repo.ddpm)
    assert (ddpm.method, ddpm.sampler, ddpm.nll, ddpm.bpd, ddpm.commit) == ("ddpm", "ancestral", 1.5, 2.164,
                                                                           repo.other[:7])
    assert math.isnan(_row(frame, "main").nll)


def test_changed_params(frame, repo):
    changed = dict(zip(frame["name"], frame["changed"]))
    assert changed["main"] == "" and changed["seed-three"] == "sample.seed=3, seed=3"
    assert changed["seed-one"] == "sample.seed=1, seed=1"
    assert changed[repo.ddpm] == "method.name=ddpm, sample.steps=100"
    # Where a run is logged (tracking.*) is no difference between runs: not listed, not a group of its own.
    assert changed["sandbox-run"] == "sample.steps=500"
    assert changed[repo.partial] == "(partial: 3/8 params logged)"  # its train stage's seed, method, ema (of 8: tracking.* left out)


def test_seed_groups_mean_and_confidence_interval(frame, repo):
    groups = compare.seed_groups(frame)
    assert len(groups) == 3  # the workspace's params, ddpm, sandbox; partial and failed runs left out
    g = groups[groups["group"] == "as params.yaml"].iloc[0]
    assert (g.n, g.runs, g.method, g.data, g.sampler) == (4, 4, "ncsnv2", "swissroll", "annealed_langevin")
    assert g.seeds == "seed/sample.seed = 0/0, 1/1, 2/2, 3/3"
    assert g.cd_mean == pytest.approx(CD_MEAN) and g.cd_ci95 == pytest.approx(CD_CI)
    assert g.emd_mean == pytest.approx(0.185) and g.emd_ci95 == pytest.approx(CD_CI)  # same spread
    assert g.sample_s_mean == pytest.approx(21) and g.sample_s_ci95 == pytest.approx(SAMPLE_CI)
    single = groups[groups["group"] == "method.name=ddpm, sample.steps=100"].iloc[0]
    assert single.n == 1 and single.cd_mean == 0.2 and math.isnan(single.cd_ci95)
    # Runs repeating the same seeds are one deterministic computation: they count once, averaged.
    twice = frame[frame["name"].isin(["seed-one", "main"])].copy()
    twice["_seeds"] = [{"seed": "0"}, {"seed": "0"}]
    again = compare.seed_groups(twice)
    assert (again.n[0], again.runs[0]) == (1, 2) and again.cd_mean[0] == pytest.approx(0.11)


def test_method_labels_name_the_sde():
    assert compare.frame.method_label({"method.name": "sde", "method.sde": "ve"}) == "sde-ve"
    assert compare.frame.method_label({"method.name": "sde", "method.sde": "auto"}) == "sde-vp"
    assert compare.frame.method_label({"method.name": "exact_score", "method.sde": "subvp"}) == "exact_score-subvp"
    assert compare.frame.method_label({"method.name": "ncsnv2", "method.sde": "auto"}) == "ncsnv2"
    df = pd.DataFrame({"method": ["sde-vp", "sde-ve", "ddpm"], "data": ["swissroll"] * 3})
    assert list(compare.filter_runs(df, method="sde")["method"]) == ["sde-vp", "sde-ve"]
    assert list(compare.filter_runs(df, method="sde-ve")["method"]) == ["sde-ve"]


def test_filters(frame, repo):
    assert list(compare.filter_runs(frame, method="ddpm")["name"]) == [repo.ddpm]
    assert list(compare.filter_runs(frame, rev=repo.other[:7])["name"]) == [repo.ddpm]
    assert list(compare.filter_runs(frame, experiment="sandbox")["name"]) == ["sandbox-run"]
    both = compare.filter_runs(frame, data="swissroll", method="ncsnv2", rev=repo.sha)
    assert repo.ddpm not in set(both["name"]) and "seed-one" in set(both["name"])
    with pytest.raises(compare.CompareError, match=r"unknown data set 'mnist'; the runs have: swissroll"):
        compare.filter_runs(frame, data="mnist")
    with pytest.raises(compare.CompareError, match="no run has git commit ffff"):
        compare.filter_runs(frame, rev="ffff")
    with pytest.raises(compare.CompareError, match="unknown MLflow experiment 'nope'.*sandbox, score-pipeline"):
        compare.load_mlflow(repo.uri, "nope")


def test_figures_and_markdown(frame, tmp_path):
    groups = compare.seed_groups(frame)
    md, figures = compare.write_report(tmp_path / "compare.md", frame, groups, store="`sqlite:///x.db`", dvc="test",
                                       filters={"data": None}, command="python -m stages.compare")
    assert sorted(p.name for p in figures) == ["likelihood_steps.png", "quality_nfe.png", "quality_time.png"]
    for p in figures:
        assert p.parent == tmp_path / "compare" and p.read_bytes()[:8] == PNG
    assert not [p for p in (tmp_path / "compare").iterdir() if p.suffix != ".png"]  # no temp files left
    text = md.read_text()
    assert "](compare/quality_nfe.png)" in text and "](compare/likelihood_steps.png)" in text
    assert "| name" in text and "changed params" in text and "| seed-one" in text
    assert "| group" in text and f"{CD_MEAN:.4g} ± {CD_CI:.2g}" in text and "1 (no CI)" in text
    assert compare.SWEEP in text and "Queued DVC experiments not shown: 1" in text

    # Without any likelihood the figure is skipped, with the reason in the markdown (and an old one removed).
    ncsn = compare.filter_runs(frame, method="ncsnv2")
    md, figures = compare.write_report(tmp_path / "compare.md", ncsn, compare.seed_groups(ncsn), store="s", dvc="d",
                                       filters={"method": "ncsnv2"}, command="c")
    assert "likelihood_steps.png" not in {p.name for p in figures}
    assert not (tmp_path / "compare" / "likelihood_steps.png").exists()
    assert "_Skipped: no run has bpd or nll together with train_steps._" in md.read_text()


def test_markdown_table_without_tabulate(monkeypatch):
    monkeypatch.setitem(sys.modules, "tabulate", None)  # import fails
    table = compare.markdown_table(pd.DataFrame({"a": ["1", None], "b": ["x|y", "z"]}))
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "|  | z |"]


@pytest.fixture
def in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo.root)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", repo.uri)
    return repo


def test_cli_end_to_end(in_repo, monkeypatch, tmp_path, capsys):
    repo = in_repo
    monkeypatch.setattr(compare, "load_dvc", lambda root, rev=None: (repo.dvc, None))
    assert cli.main(["--out", str(tmp_path / "out" / "compare.md")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "8 runs, 3 seed groups" in out and "3 figure(s)" in out
    text = (tmp_path / "out" / "compare.md").read_text()
    assert f"MLflow store: `{repo.uri}`" in text and "Runs: 8 (both 2, dvc 3, mlflow 3); filters: none" in text
    assert f"{CD_MEAN:.4g} ± {CD_CI:.2g}" in text
    assert (tmp_path / "out" / "compare" / "quality_nfe.png").read_bytes()[:8] == PNG

    # --rev through git rev-parse: HEAD is the commit of every run but the ddpm one.
    assert cli.main(["--rev", "HEAD", "--method", "ncsnv2", "--out", str(tmp_path / "rev.md")]) == 0
    text = (tmp_path / "rev.md").read_text()
    assert f"rev={repo.sha}" in text and "| seed-one" in text and repo.ddpm not in text


def test_cli_without_dvc_and_bad_input(in_repo, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "compare.md")
    assert cli.main(["--out", out]) == 0  # the tmp repo has no .dvc: MLflow only
    captured = capsys.readouterr()
    assert "is not a DVC repository; MLflow runs only" in captured.err
    assert "5 runs" in captured.out

    assert cli.main(["--method", "nope", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "compare: error: unknown method 'nope'; the runs have: ddpm, ncsnv2"
    assert cli.main(["--rev", "no-such-branch", "--out", out]) == 2
    assert "unknown rev 'no-such-branch'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse: status 2
        cli.main(["--out", str(tmp_path)])
    assert refused.value.code == 2
    assert f"--out names the markdown file, e.g. --out reports/compare.md (got '{tmp_path}')" in capsys.readouterr().err

    empty = tmp_path / "empty.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{empty}")
    assert cli.main(["--out", out]) == 2
    assert f"no runs found; looked in no MLflow store at sqlite:///{empty}" in capsys.readouterr().err
    assert not empty.exists()  # reading never creates a store


def test_default_output_is_gitignored():
    """`make compare` writes reports/compare.md and reports/compare/*.png, which .gitignore keeps out of git
    (--no-index: whether or not an older clone still tracks them)."""
    assert cli.DEFAULT_OUT == "reports/compare.md"
    for path in ("reports/compare.md", "reports/compare/quality_nfe.png", "reports/compare/likelihood_steps.png"):
        out = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO, check=False)
        assert out.returncode == 0, f"{path} is not ignored by git: `make compare` would dirty the tree"


def test_compare_leaves_git_status_unchanged(repo, tmp_path, monkeypatch, capsys):
    """`python -m stages.compare` with its defaults in a clean git repo holding the project's .gitignore files writes
    its report and figures, and `git status --porcelain` stays empty."""
    clone = tmp_path / "clone"
    (clone / "reports").mkdir(parents=True)
    for name in (".gitignore", "reports/.gitignore", "params.yaml"):
        (clone / name).write_bytes((REPO / name).read_bytes())
    _git(["init", "-q"], clone)
    _git(["add", "-A"], clone)
    _git(["commit", "-q", "-m", "project"], clone)
    assert _git(["status", "--porcelain", "--untracked-files=all"], clone) == ""
    monkeypatch.chdir(clone)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", repo.uri)
    monkeypatch.setattr(compare, "load_dvc", lambda root, rev=None: (repo.dvc, None))
    assert cli.main([]) == 0
    assert "wrote reports/compare.md" in capsys.readouterr().out
    assert (clone / "reports" / "compare" / "quality_nfe.png").read_bytes()[:8] == PNG
    assert _git(["status", "--porcelain", "--untracked-files=all", "--ignored=no"], clone) == ""


# Image runs of one method on digits at three FID protocols, and a point run: params as the report stage logs them.
IMAGE_BASE = {"seed": 0, "data": {"name": "digits"}, "method": {"name": "edm"},
              "eval": {"fid_n": "auto", "fid_against": "test", "fid_seeds": 1}}


def _image_run(name: str, fid: float, fid_n: int, start: int, **params: str) -> dict:
    flat = {"seed": "0", "data.name": "digits", "method.name": "edm", "eval.fid_n": "auto",
            "eval.fid_against": "test", "eval.fid_seeds": "1", **params}
    metrics = {"fid": fid, "fid_floor": 4.0, "kid": fid / 1000, "kid_floor": 0.001, "precision": 0.7, "fid_n": fid_n,
               "sample.nfe": 35}
    if flat["eval.fid_seeds"] != "1":
        metrics |= {"fid_mean": fid + 1, "fid_min": fid, "fid_std": 0.5, "fid_sets": int(flat["eval.fid_seeds"])}
    return {"run_id": name, "name": name, "experiment": "1", "status": "FINISHED", "start": start, "end": start + 1,
            "tags": {}, "params": flat, "metrics": metrics}


@pytest.fixture
def protocols() -> pd.DataFrame:
    runs = [_image_run("test-2000-a", 10.0, 2000, 1),
            _image_run("test-2000-b", 12.0, 2000, 2, seed="1"),
            _image_run("test-500", 30.0, 500, 3, **{"eval.fid_n": "500"}),
            _image_run("train-2000", 8.0, 2000, 4, **{"eval.fid_against": "train", "eval.fid_seeds": "3"}),
            # the same params as test-2000-a, but a FID at another N (a param newer than the run changed it)
            _image_run("test-1000-old", 50.0, 1000, 5, seed="2"),
            {"run_id": "points", "name": "points", "experiment": "1", "status": "FINISHED", "start": 6, "end": 7,
             "tags": {}, "params": {"seed": "0", "data.name": "swissroll", "method.name": "edm",
                                    "eval.fid_n": "auto", "eval.fid_against": "test", "eval.fid_seeds": "1"},
             "metrics": {"cd": 0.1, "cd_floor": 0.1, "sample.nfe": 35}}]
    return compare.runs_frame(runs, None, IMAGE_BASE)


def test_every_fid_carries_its_protocol_and_groups_never_pool_two(protocols):
    by_name = {n: p if isinstance(p, str) else None for n, p in zip(protocols["name"], protocols["fid_protocol"])}
    assert by_name == {"test-2000-a": "N=2000 vs test", "test-2000-b": "N=2000 vs test", "test-500": "N=500 vs test",
                       "train-2000": "N=2000 vs train", "test-1000-old": "N=1000 vs test", "points": None}
    assert compare.frame.fid_protocol({}, {"fid": 1.0, "fid_n": 50}) == "N=50 vs test"  # older than fid_against
    train = _row(protocols, "train-2000")
    assert (train.fid_mean, train.fid_min, train.fid_std) == (9.0, 8.0, 0.5)
    groups = compare.seed_groups(protocols)
    pooled = groups[groups["fid_protocol"] == "N=2000 vs test"].iloc[0]
    assert (pooled.n, pooled.fid_mean) == (2, 11.0)  # test-2000-a and -b; never test-1000-old's 50
    assert list(groups[groups["fid_protocol"] == "N=1000 vs test"]["names"]) == ["test-1000-old"]


def _sections(text: str) -> dict[str, str]:
    """The markdown's `#### ` sections by title."""
    parts = text.split("\n#### ")[1:]
    return {p.split("\n", 1)[0]: p.split("\n", 1)[1].split("\n## ")[0].split("\n### ")[0] for p in parts}


def test_the_report_gives_each_fid_protocol_its_own_tables_and_panels(protocols, tmp_path, monkeypatch):
    from pipeline.compare import render

    titles = []
    monkeypatch.setattr(render, "_save", lambda fig, path: titles.extend(ax.get_title() for ax in fig.axes))
    groups = compare.seed_groups(protocols)
    md, _ = compare.write_report(tmp_path / "c.md", protocols, groups, store="s", dvc="d", filters={}, command="c")
    text = md.read_text()
    assert "FIDs of 4 protocols" in text
    sections = _sections(text)
    # two tables per protocol (runs, seed groups) under headings of the same title: the later one wins here
    assert set(sections) == {"FID protocol N=1000 vs test", "FID protocol N=2000 vs test", "FID protocol N=500 vs test",
                             "FID protocol N=2000 vs train", "without FID"}
    runs_part = text.split("## Seed groups")[0]
    for title, names in (("N=2000 vs test", ["test-2000-a", "test-2000-b"]), ("N=500 vs test", ["test-500"]),
                         ("N=2000 vs train", ["train-2000"]), ("N=1000 vs test", ["test-1000-old"])):
        table = runs_part.split(f"#### FID protocol {title}\n")[1].split("####")[0]
        rows = [line for line in table.splitlines() if line.startswith("| ") and "name" not in line]
        assert [r.split("|")[1].strip() for r in rows] == names, title
        assert all([c.strip() for c in r.split("|")].count(title) == 1 for r in rows)
    assert "fid_min" in runs_part.split("#### FID protocol N=2000 vs train\n")[1].split("####")[0]
    assert "swissroll" in runs_part.split("#### without FID\n")[1]
    assert {"digits (N=2000 vs test): fid", "digits (N=500 vs test): fid", "digits (N=2000 vs train): fid",
            "digits (N=1000 vs test): fid", "swissroll: cd"} <= set(titles)

    # One protocol: one table, the protocol in a column of its own.
    one = compare.filter_runs(protocols, data="digits")
    one = one[one["fid_protocol"] == "N=2000 vs test"].reset_index(drop=True)
    md, _ = compare.write_report(tmp_path / "d.md", one, compare.seed_groups(one), store="s", dvc="d", filters={},
                                 command="c")
    text = md.read_text()
    assert "#### " not in text and "| FID protocol" in text
    assert [c.strip() for line in text.splitlines() for c in line.split("|")].count("N=2000 vs test") == 3
