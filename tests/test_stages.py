"""Smoke tier: every stage's main on tiny params in a temp dir, bad input refused before work,
and a real `dvc repro` (twice, for bit-reproducibility) plus `dvc exp run -S` of a tiny pipeline.
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
from pipeline.spool import drain, pending
from pipeline.tracking import spool_dir
from stages.common import STAGE_BODIES, run_named

STAGES = tuple(STAGE_BODIES)

TINY_OVERRIDES = {
    "seed": 0,
    "data": {"name": "swissroll", "n_train": 600, "n_test": 300, "n_reference": 300},
    "noise": {"fallback_num_scales": 8},
    "model": {"hidden": 16, "blocks": 1, "emb_dim": 8},
    "train": {"steps": 30, "batch_size": 64, "checkpoint_every": 10, "log_every": 10},
    "sample": {"n": 300, "batch_size": 300},
    "eval": {"n": 300, "cloud_size": 100, "emd_n": 300, "likelihood_n": 300, "elbo_slices": 2},
}


def _write_params(path: Path, params: dict) -> None:
    """Write a complete params.yaml (DVC refuses a stage whose listed keys are missing)."""
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def prepared_project(path: Path, params: dict, monkeypatch) -> Path:
    """`path` as the working directory of a tiny project with `params`, its prepare and noise_scales run, and no
    tracking or DVC variables from the environment."""
    monkeypatch.chdir(path)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    _write_params(path / "params.yaml", params)
    for name in ("prepare", "noise_scales"):
        assert run_named(name, ["--params", "params.yaml"]) == 0
    return path


def _deep_merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in extra.items():
        out[k] = _deep_merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


# The repo's params with tiny sizes: every key present, as DVC requires.
TINY = _deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_OVERRIDES)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory with tiny params; stages run in-process against it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    _write_params(tmp_path / "params.yaml", TINY)
    return tmp_path


def _run(name: str, params: str = "params.yaml") -> int:
    return run_named(name, ["--params", params])


def test_stage_modules_import_no_library_they_may_not_need():
    """Every stage is a process of its own: importing its module leaves out POT (which imports scikit-learn and
    pandas, ~2 s), scipy.stats and scipy.integrate (the ODE sampler's and the likelihood's solver), which the
    functions that use them import; prepare leaves out torch too (the gmm mixture imports it where it is asked for)."""
    code = ("import importlib, sys; from stages.common import STAGE_BODIES; "
            "importlib.import_module('stages.prepare'); print('torch' in sys.modules); "
            "[importlib.import_module(f'stages.{name}') for name in STAGE_BODIES]; "
            "print(sorted(m for m in ('ot', 'sklearn', 'scipy.stats', 'scipy.integrate') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split() == ["False", "[]"], out.stdout + out.stderr


def test_a_points_run_never_imports_the_image_metrics(workdir):
    """The image machinery (torchvision, clean-fid, POT, the classifier's code: ~5 s of imports) stays out of a points
    run's fid_reference and classifier stages, which write their empty records, and torchvision and clean-fid out of
    the evaluate stage's nearest-neighbour figure: each stage is a process of its own under DVC."""
    for name in ("prepare", "noise_scales"):
        assert _run(name) == 0, name
    heavy = "('torchvision', 'cleanfid', 'ot', 'pipeline.metrics.domain')"
    code = ("import sys; from stages.common import run_named; "
            "codes = [run_named(n, ['--params', 'params.yaml']) for n in ('fid_reference', 'classifier')]; "
            f"print(codes, sorted(m for m in {heavy} if m in sys.modules)); "
            "from pipeline.kinds import kind_of; import json, numpy as np; "
            "kind_of(json.load(open('data/record.json'))).nearest(np.zeros((3, 2)), np.ones((5, 2))); "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCORE_PIPELINE_TRACKING": "off"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    # the nearest-neighbour figure needs the metrics package on points, not torchvision, clean-fid or POT (which
    # the evaluate stage imports when it computes emd)
    assert out.stdout.strip().splitlines()[-2:] == ["[0, 0] []", "['pipeline.metrics.domain']"], \
        out.stdout + out.stderr


def test_every_stage_in_process(workdir, capsys):
    for name in STAGES:
        assert _run(name) == 0, name
    # long stages say how far they are: the sample stage's bar over the samples (rate and time left)
    bars = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("samples:")]
    assert bars and "300/300" in bars[-1] and "sample/s" in bars[-1] and re.search(r"<\d\d:\d\d", bars[-1]), bars
    train, test = np.load("data/train.npy"), np.load("data/test.npy")
    assert train.shape == (600, 2) and test.shape == (300, 2)
    scales = json.loads(Path("outputs/noise_scales.json").read_text())
    assert scales["num_scales"] == 8 and "no root" in scales["how"]["num_scales"]
    model = torch.load("models/model.pt", weights_only=True)
    assert set(model) == {"config", "state_dict"} and model["config"]["parameterization"] == "score_over_sigma"
    # ema.method: decay -> the final model is the EMA file, and without a reflow distill passes it on as it is
    assert Path("models/model.pt").read_bytes() == Path("models/ema.pt").read_bytes()
    assert Path("models/final.pt").read_bytes() == Path("models/model.pt").read_bytes()
    assert json.loads(Path("outputs/reflow/record.json").read_text()) == {"reflows": 0, "runs": []}
    samples = np.load("outputs/samples.npz")["x"]
    assert samples.shape == (300, 2) and np.isfinite(samples).all()
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert set(metrics) >= {"cd", "cd_floor", "emd", "emd_floor"}
    # the memorised fraction on points: eval.n samples, test and reference items against every training point
    from pipeline.metrics.fidelity import memorisation
    n = min(len(samples), len(test))
    expected = memorisation(samples[:n], test[:n], np.load("data/reference.npy")[:n], train, 0.01)
    assert {k: metrics[k] for k in expected} == expected and 0 < metrics["memorised_distance"]
    assert Path("plots/train_loss.csv").read_text().splitlines()[0] == "step,loss"
    assert len(Path("plots/train_loss.csv").read_text().splitlines()) == 1 + 3
    report = Path("reports/report.md").read_text()
    assert "cd" in report and "figures/samples.png" in report
    assert "### Samples against held-out data" in report and "### Densities" in report  # the kind's figure titles
    for fig in ("loss.png", "samples.png", "noise_scales.png", "density.png"):
        assert (Path("reports/figures") / fig).stat().st_size > 1000
    # one parent run with every param and metric, one child per stage
    db = sqlite3.connect("mlflow.db")
    parents = db.execute("select run_uuid from runs where run_uuid not in "
                         "(select run_uuid from tags where key = 'mlflow.parentRunId')").fetchall()
    assert len(parents) == 1
    children = db.execute("select count(*) from tags where key = 'mlflow.parentRunId'").fetchone()[0]
    assert children == len(STAGES)
    keys = {k for (k,) in db.execute("select key from metrics where run_uuid = ?", parents[0])}
    assert {"cd", "cd_floor", "emd", "emd_floor", "train.final_loss", "sample.nfe"} <= keys
    params = {k for (k,) in db.execute("select key from params where run_uuid = ?", parents[0])}
    assert {"train.lr", "data.name", "noise.sigma_min", "sample.n"} <= params


def test_the_ema_stage_makes_each_final_model(workdir):
    """ema.method after one training (30 steps, snapshots every 10): decay copies models/ema.pt, none
    models/raw.pt, posthoc writes the reconstruction, which for a tracked width is that profile's last snapshot
    and for a width between the two lies between them."""
    from pipeline.posthoc import reconstruct

    params = _deep_merge(TINY, {"train": {"posthoc": {"snapshot_every": 10}}})
    _write_params(Path("params.yaml"), params)
    for name in STAGES[:STAGES.index("ema") + 1]:
        assert _run(name) == 0, name
    assert Path("models/model.pt").read_bytes() == Path("models/ema.pt").read_bytes()
    assert sorted(p.name for p in Path("models/posthoc").iterdir()) == [f"{s:09d}.pt" for s in (10, 20, 30)]
    _write_params(Path("params.yaml"), _deep_merge(params, {"ema": {"method": "none"}}))
    assert _run("ema") == 0 and Path("models/model.pt").read_bytes() == Path("models/raw.pt").read_bytes()
    last = torch.load("models/posthoc/000000030.pt", weights_only=True)
    weights = {}
    for sigma_rel in (0.05, 0.07, 0.10):
        _write_params(Path("params.yaml"), _deep_merge(params, {"ema": {"method": "posthoc", "sigma_rel": sigma_rel}}))
        assert _run("ema") == 0
        model = torch.load("models/model.pt", weights_only=True)
        assert model["config"] == torch.load("models/ema.pt", weights_only=True)["config"]
        weights[sigma_rel] = model["state_dict"]
        assert all(torch.equal(v, reconstruct("models/posthoc", sigma_rel)[0][k]) for k, v in model["state_dict"].items())
    for i, sigma_rel in enumerate((0.05, 0.10)):
        for k, v in last["states"][i].items():
            torch.testing.assert_close(weights[sigma_rel][k], v, rtol=1e-6, atol=1e-7)
    key = next(iter(last["states"][0]))
    a, b, mid = weights[0.05][key], weights[0.10][key], weights[0.07][key]
    assert not torch.equal(a, b) and 0.5 * (a - b).abs().max() > (mid - 0.5 * (a + b)).abs().max()


# Digits end to end on tiny sizes: a 16-wide U-Net, 20 FID images (Inception ~0.15 s an image here).
TINY_IMAGES = {"data": {"name": "digits", "n_train": 200, "n_test": 20, "n_reference": 20},
               "model": {"channels": 16}, "train": {"steps": 4, "batch_size": 16, "checkpoint_every": 2, "log_every": 2,
                                                    "eval_every": 2},
               "sample": {"n": 20, "batch_size": 8}, "eval": {"fid_n": 20, "classifier_steps": 20}}


def test_image_training_is_the_same_whatever_the_global_rng_held(workdir):
    """The U-Net's dropout draws from the global RNG, which the train stage seeds: two trainings in one process,
    with the global RNG left anywhere between them, write the same bytes (before the seed they did not, and
    neither did two fresh processes)."""
    params = _deep_merge(TINY, _deep_merge(TINY_IMAGES, {"method": {"name": "ddpm", "num_steps": 20}}))
    _write_params(Path("params.yaml"), params)
    for name in ("prepare", "noise_scales"):
        assert _run(name) == 0, name
    digests = []
    for draws in (0, 7):
        torch.randn(draws)
        shutil.rmtree("checkpoints", ignore_errors=True)
        assert _run("train") == 0
        digests.append(hashlib.sha256(Path("models/raw.pt").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def _train_with_bf16_hardware(monkeypatch, native: bool) -> tuple[dict, str]:
    """The train stage as on a device with (native True) or without native bf16: metrics/train.json, raw.pt's
    sha256."""
    import stages.train

    monkeypatch.setattr(stages.train, "bf16_native", lambda device: native)
    assert _run("train") == 0
    return (json.loads(Path("metrics/train.json").read_text()),
            hashlib.sha256(Path("models/raw.pt").read_bytes()).hexdigest())


def test_precision_auto_is_bf16_for_images_on_bf16_hardware_through_the_train_stage(workdir, monkeypatch, capsys):
    """train.precision auto: an image model trains under bf16 where the device has it natively, fp32 elsewhere,
    the resolved value in metrics/train.json; the checkpoint of one does not resume under the other (the
    fingerprint holds the resolved precision), the same one does."""
    params = _deep_merge(TINY, _deep_merge(TINY_IMAGES, {"method": {"name": "ddpm", "num_steps": 20},
                                                         "train": {"eval_every": 0}}))
    _write_params(Path("params.yaml"), params)
    for name in ("prepare", "noise_scales"):
        assert _run(name) == 0, name
    bf16, bf16_model = _train_with_bf16_hardware(monkeypatch, True)
    fp32, fp32_model = _train_with_bf16_hardware(monkeypatch, False)
    assert (bf16["precision"], fp32["precision"]) == ("bf16", "fp32")
    assert bf16["lr_decay"] == fp32["lr_decay"] == "cosine"  # train.lr_decay auto on images
    assert "resumed" not in capsys.readouterr().out and bf16_model != fp32_model
    again, again_model = _train_with_bf16_hardware(monkeypatch, False)
    assert "resumed from the checkpoint at step 4" in capsys.readouterr().out and again_model == fp32_model


def test_precision_auto_keeps_points_in_fp32(workdir, monkeypatch):
    """On points train.precision auto is fp32 whatever the device: the same bytes on bf16 hardware, and the 2-D
    record of metrics/train.json keeps its keys."""
    for name in ("prepare", "noise_scales"):
        assert _run(name) == 0, name
    with_bf16, model = _train_with_bf16_hardware(monkeypatch, True)
    shutil.rmtree("checkpoints")
    without, same = _train_with_bf16_hardware(monkeypatch, False)
    assert model == same and with_bf16 == without and "precision" not in with_bf16 and "lr_decay" not in with_bf16


@pytest.mark.parametrize("method", [{"name": "ncsnv2"}, {"name": "ddpm", "num_steps": 20}, {"name": "edm"}])
def test_every_stage_on_images(workdir, method):
    params = _deep_merge(TINY, _deep_merge(TINY_IMAGES, {"method": method}))
    if method["name"] == "ddpm":
        params = _deep_merge(params, {"eval": {"likelihood": True, "likelihood_n": 8}, "method": {"loss": "elbo"}})
    against = "train" if method["name"] == "edm" else "test"  # EDM's papers compare against the training set
    params = _deep_merge(params, {"eval": {"fid_against": against}})
    sets = 2 if method["name"] == "edm" else 1  # and the best of several sample sets
    if sets > 1:
        params = _deep_merge(params, {"eval": {"fid_seeds": sets}, "sample": {"n": "auto"}})
    # against train, FID's reference holds the Inception features of every training image (0.15 s each here)
    n_train = 60 if against == "train" else 200
    params = _deep_merge(params, {"data": {"n_train": n_train}})
    _write_params(Path("params.yaml"), params)
    for name in STAGES:
        assert _run(name) == 0, name
    _check_fid_against(against)
    record = json.loads(Path("data/record.json").read_text())
    assert record["kind"] == "images" and record["shape"] == [1, 8, 8] and record["num_classes"] == 10
    for split, n in (("train", n_train), ("test", 20), ("reference", 20)):
        x, y = np.load(f"data/{split}.npy"), np.load(f"data/{split}_labels.npy")
        assert x.dtype == np.uint8 and x.shape == (n, 1, 8, 8) and y.shape == (n,) and y.dtype == np.int64
    if method["name"] == "ncsnv2":  # images up to 16 px: T = 10 Langevin steps per scale (pipeline.defaults)
        scales = json.loads(Path("outputs/noise_scales.json").read_text())
        assert scales["steps_per_scale"] == 10 and "image default" in scales["how"]["steps_per_scale"]
    assert json.loads(Path("metrics/train.json").read_text())["lr_decay"] == "cosine"  # train.lr_decay auto
    model = torch.load("models/model.pt", weights_only=True)
    net = model["config"]["net"] if method["name"] == "edm" else model["config"]  # EDM's preconditioning wraps it
    assert net["kind"] == "unet" and net["channels"] == 16
    if method["name"] == "edm":
        assert model["config"]["kind"] == "edm" and model["config"]["parameterization"] == "x0"
        assert 0.5 < model["config"]["sigma_data"] < 1.0  # the std of 8x8 digits in [-1, 1]
    # post-hoc EMA on images: 4 steps, a snapshot each; a tracked width comes back as its last snapshot, in the
    # same model file format (EDM's preconditioning spec included)
    assert sorted(p.name for p in Path("models/posthoc").iterdir()) == [f"{s:09d}.pt" for s in (1, 2, 3, 4)]
    _write_params(Path("params.yaml"), _deep_merge(params, {"ema": {"method": "posthoc", "sigma_rel": 0.05}}))
    assert _run("ema") == 0
    posthoc = torch.load("models/model.pt", weights_only=True)
    last = torch.load("models/posthoc/000000004.pt", weights_only=True)["states"][0]
    assert posthoc["config"] == model["config"] and set(posthoc["state_dict"]) == set(last)
    for k, v in last.items():
        torch.testing.assert_close(posthoc["state_dict"][k], v, rtol=1e-6, atol=1e-7)
    _write_params(Path("params.yaml"), params)
    assert _run("ema") == 0
    samples = np.load("outputs/samples.npz")["x"]
    assert samples.dtype == np.uint8 and samples.shape == (20 * sets, 1, 8, 8)  # sample.n: auto draws every set
    scaling = json.loads(Path("outputs/noise_scales.json").read_text())["scaling"]
    assert scaling == ("zero_one" if method["name"] == "ncsnv2" else "minus_one_one")
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    for key in ("fid", "fid_floor", "kid", "kid_floor", "fid_domain", "fid_domain_floor", "memorised_floor"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fid_ci_low"] < metrics["fid"] < metrics["fid_ci_high"]
    for name in ("precision", "recall", "density", "coverage"):  # on both feature sets, each with its floor
        for key in (name, f"{name}_floor", f"{name}_domain", f"{name}_domain_floor"):
            assert metrics[key] >= 0 and (name == "density" or metrics[key] <= 1), key
    assert 0 <= metrics["memorised"] <= 1 and metrics["memorised_quantile"] == 0.01
    assert metrics["fid_n"] == 20 and metrics["fid_mode"] == "clean" and "sha256" in metrics["fid_weights"]
    _check_fid_sets(metrics, samples, sets, against)
    assert sum(metrics["class_histogram"].values()) == pytest.approx(1.0)
    if method["name"] == "ddpm":
        assert np.isfinite(metrics["elbo_bpd"]) and metrics["elbo_bpd"] > 0
    rows = Path("plots/train_eval.csv").read_text().splitlines()
    assert rows[0] == "step,value,se,unit" and len(rows) == 3
    assert rows[1].endswith("bits/dim" if method["name"] == "ddpm" else "loss/dim")
    grids = sorted(p.name for p in Path("mlartifacts").rglob("train_samples/*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png"]  # the EMA network's samples during training
    train_metrics = json.loads(Path("metrics/train.json").read_text())
    assert train_metrics["arch"] == "unet" and train_metrics["batch_size"] == 16
    report = Path("reports/report.md").read_text()
    assert "FID protocol" in report and "fid_domain" in report
    assert (f"Over {sets} sample sets of N (eval.fid_seeds)" in report) == (sets > 1)
    assert "### Samples\n" in report and "### Classes of the samples" in report  # the kind's figure titles
    assert "fid_reference.fid_floor" in report  # the reference stages' records, read for images
    for fig in ("samples.png", "trajectory.png", "neighbours.png", "density.png"):
        assert (Path("reports/figures") / fig).stat().st_size > 1000


def _check_fid_against(against: str) -> None:
    """eval.fid_against: the reference features hold every training image for train; FID, KID and the floor are
    computed against that split (the first N for precision and the others); the protocol says which."""
    from pipeline.metrics.fid import fid_from_features, inception_features

    feats, ref_record = np.load("outputs/fid_reference.npz"), json.loads(Path("metrics/fid_reference.json").read_text())
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert ref_record["fid_against"] == metrics["fid_against"] == against
    assert ("train" in feats.files) == (against == "train")
    real = feats[against]
    assert len(real) == (len(np.load("data/train.npy")) if against == "train" else 20)
    assert ref_record["fid_floor"] == pytest.approx(fid_from_features(feats["reference"], real), rel=1e-12)
    samples = np.load("outputs/samples.npz")["x"][:20]
    assert metrics["fid"] == pytest.approx(fid_from_features(inception_features(samples), real), rel=1e-9)
    assert metrics["fid_reference"].startswith(f"{against} split")


def _check_fid_sets(metrics: dict, samples: np.ndarray, sets: int, against: str) -> None:
    """eval.fid_seeds: set k is samples k N to (k + 1) N - 1, each scored against FID's split; fid is the first."""
    from pipeline.metrics.fid import fid_from_features, inception_features

    if sets == 1:
        assert not {"fid_mean", "fid_min", "fid_std", "fid_sets", "fid_per_set"} & set(metrics)
        return
    real = np.load("outputs/fid_reference.npz")[against]
    # set 0 is fid, which _check_fid_against recomputes; the later sets here
    fids = [metrics["fid"]] + [fid_from_features(inception_features(samples[k * 20:(k + 1) * 20]), real)
                               for k in range(1, sets)]
    assert metrics["fid_sets"] == sets and metrics["fid_per_set"]["0"] == metrics["fid"]
    assert [metrics["fid_per_set"][str(k)] for k in range(sets)] == pytest.approx(fids, rel=1e-9)
    assert metrics["fid_mean"] == pytest.approx(np.mean(fids), rel=1e-9)
    assert metrics["fid_min"] == pytest.approx(min(fids), rel=1e-9)
    assert metrics["fid_std"] == pytest.approx(np.std(fids, ddof=1), rel=1e-6)


def test_image_samples_do_not_depend_on_the_batch_size(workdir):
    params = _deep_merge(TINY, TINY_IMAGES)
    _write_params(Path("params.yaml"), params)
    for name in ("prepare", "noise_scales", "train", "ema", "distill", "sample"):
        assert _run(name) == 0, name
    first = Path("outputs/samples.npz").read_bytes()
    _write_params(Path("params.yaml"), _deep_merge(params, {"sample": {"batch_size": 20}}))
    assert _run("sample") == 0
    assert Path("outputs/samples.npz").read_bytes() == first


def test_train_resumes_from_its_checkpoint(workdir):
    for name in ("prepare", "noise_scales", "train"):
        assert _run(name) == 0
    once = Path("models/raw.pt").read_bytes()
    # Stop at step 20, then continue to 30: the same bits as the uninterrupted run.
    shutil.rmtree("checkpoints")
    _write_params(Path("params.yaml"), _deep_merge(TINY, {"train": {"steps": 20}}))
    assert _run("train") == 0
    _write_params(Path("params.yaml"), TINY)
    assert _run("train") == 0
    assert Path("models/raw.pt").read_bytes() == once


def test_exact_score_on_gmm_needs_no_training(workdir):
    params = _deep_merge(TINY, {"data": {"name": "gmm"}, "method": {"name": "exact_score"}})
    _write_params(Path("params.yaml"), params)
    for name in STAGES:
        assert _run(name) == 0, name
    model = torch.load("models/model.pt", weights_only=True)
    assert model["config"]["kind"] == "gmm_exact"
    assert Path("models/posthoc").is_dir() and not any(Path("models/posthoc").iterdir())  # nothing trained
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert {"gmm_weights_err", "gmm_means_err", "gmm_covs_err", "gmm_weights_z", "gmm_means_z", "gmm_covs_z"} <= set(metrics)
    assert json.loads(Path("metrics/train.json").read_text())["steps"] == 0
    from pipeline.gmm import GaussianMixture

    g = GaussianMixture.from_params(**params["data"]["gmm"])
    test = torch.from_numpy(np.load("data/test.npy")[:300]).double()
    assert metrics["nll_true"] == pytest.approx(float(-g.log_prob(test).mean()) / 2, rel=1e-12)


# Every method through the same stages on tiny params: (overrides, expected nfe, likelihood keys).
METHOD_RUNS = {
    "ddpm-ancestral": ({"method": {"name": "ddpm", "num_steps": 50}}, 50, set()),
    "ddpm-vlb-ddim": ({"method": {"name": "ddpm", "loss": "elbo", "num_steps": 50},
                       "sample": {"sampler": "ddim", "steps": 10, "eta": 0.5}, "eval": {"likelihood": True}},
                      10, {"elbo_nll", "elbo_nll_se", "elbo_bpd"}),
    "sohl_dickstein": ({"method": {"name": "sohl_dickstein"}, "eval": {"likelihood": True}},
                       40, {"elbo_nll", "elbo_bpd"}),
    "vp-pc": ({"method": {"name": "sde"}, "sample": {"steps": 20}, "eval": {"likelihood": True, "elbo_slices": 2}},
              39, {"nll", "bpd", "nll_se", "elbo_nll", "elbo_nll_importance", "elbo_nll_importance_se"}),
    "ve-ode-heun": ({"method": {"name": "sde", "sde": "ve", "parameterization": "x0"},
                     "sample": {"sampler": "ode", "ode_method": "heun", "steps": 10}}, 20, set()),
    "subvp-plugin": ({"method": {"name": "sde", "sde": "subvp", "weighting": "likelihood", "loss": "ssm"},
                      "sample": {"steps": 20, "predictor": "euler_maruyama", "corrector": "none", "lam": 0.5}}, 20, set()),
    "vp-huang-importance": ({"method": {"name": "sde", "loss": "elbo", "t_sampling": "importance"},
                             "sample": {"sampler": "ancestral", "steps": 20}}, 20, set()),
    "ddpm-dpm-solver": ({"method": {"name": "ddpm", "num_steps": 50}, "sample": {"sampler": "dpm_solver", "steps": 8}},
                        8, set()),
    "edm-churn": ({"method": {"name": "edm"}, "sample": {"steps": 5, "churn": 10.0, "s_tmin": 0.01, "s_tmax": 50.0},
                   "eval": {"likelihood": True, "elbo_slices": 2}}, 9, {"nll", "bpd", "elbo_nll"}),
    "ou-ism-ald": ({"method": {"name": "sde", "sde": "ou", "loss": "ism"},
                    "sample": {"steps": 10, "corrector": "ald", "corrector_steps": 2}}, 28, set()),
    "flow_matching-ot-heun": ({"method": {"name": "flow_matching", "fm": {"coupling": "minibatch_ot"}},
                               "sample": {"sampler": "ode", "ode_method": "heun", "steps": 5},
                               "eval": {"likelihood": True}}, 10, {"nll", "bpd", "nll_se"}),
    # a consistency model distilled from a score model (a flow's: tests/test_consistency.py, and the reflow test)
    "edm-consistency-2": ({"method": {"name": "edm"}, "distill": {"method": "cd", "num_scales": 6},
                           "sample": {"steps": 2}}, 2, set()),
    # and one by easy consistency tuning from a flow (no teacher step)
    "flow_matching-ect-1": ({"method": {"name": "flow_matching"}, "distill": {"method": "ect", "steps": 20}}, 1,
                            set()),
}


@pytest.mark.parametrize("name", list(METHOD_RUNS))
def test_every_method_runs_through_the_same_stages(workdir, name):
    overrides, nfe, keys = METHOD_RUNS[name]
    _write_params(Path("params.yaml"), _deep_merge(TINY, overrides))
    for stage in STAGES:
        assert _run(stage) == 0, stage
    x = np.load("outputs/samples.npz")["x"]
    assert x.shape == (300, 2) and np.isfinite(x).all()
    assert json.loads(Path("metrics/sample.json").read_text())["nfe"] == nfe
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert keys <= set(metrics) and all(np.isfinite(metrics[k]) for k in keys)
    assert Path("reports/report.md").is_file()


def test_reflow_trains_each_flow_on_the_pairs_of_the_one_before(workdir, capsys):
    """method.fm.reflow 2: the distill stage draws pairs from flow 0 (the ema stage's model) by RK45, trains reflow 1
    on them, draws from reflow 1, trains reflow 2; the pairs are outputs, and pair i is the flow's ODE from noise i.
    Asking for one more reflow in the same workspace resumes the finished ones from their checkpoints."""
    from pipeline import io, models
    from pipeline.processes import process_from_spec
    from pipeline.reflow import draw_pairs

    params = _deep_merge(TINY, {"method": {"name": "flow_matching", "fm": {"reflow": 1, "pairs": 64}},
                                "sample": {"ode_method": "euler", "steps": 1}})
    _write_params(Path("params.yaml"), params)
    for name in ("prepare", "noise_scales", "train", "ema", "distill"):
        assert _run(name) == 0, name
    one = Path("models/final.pt").read_bytes()
    _write_params(Path("params.yaml"), _deep_merge(params, {"method": {"fm": {"reflow": 2}}}))
    capsys.readouterr()
    assert _run("distill") == 0
    assert "distill: reflow 1 resumed from its checkpoint at step 30" in capsys.readouterr().out
    record = json.loads(Path("outputs/reflow/record.json").read_text())
    assert [r["reflow"] for r in record["runs"]] == [1, 2] and record["runs"][0]["resumed_from"] == 30
    assert Path("models/final.pt").read_bytes() != one != Path("models/model.pt").read_bytes()
    process = process_from_spec(json.loads(Path("outputs/noise_scales.json").read_text())["process"])
    _, velocity = models.load_model("models/model.pt", process)
    pairs = io.load_npz("outputs/reflow/pairs_1.npz")
    assert pairs["z"].shape == pairs["x"].shape == (64, 2)
    z, x = draw_pairs(velocity, process, 64, (2,), params["seed"] + 1, params["train"]["batch_size"])
    assert np.array_equal(z.numpy(), pairs["z"]) and np.array_equal(x.numpy(), pairs["x"])
    assert not np.array_equal(pairs["x"], io.load_npz("outputs/reflow/pairs_2.npz")["x"])
    for name in ("sample", "evaluate"):
        assert _run(name) == 0, name
    assert json.loads(Path("metrics/sample.json").read_text())["nfe"] == 1


@pytest.mark.parametrize("sde", ["vp", "ve", "subvp"])
def test_exact_score_ode_nll_matches_the_true_nll(workdir, sde):
    """The issue's oracle through the stages: held-out ODE nll within 0.01 nats/dim of the truth."""
    params = _deep_merge(TINY, {"data": {"name": "gmm"}, "method": {"name": "exact_score", "sde": sde},
                                "sample": {"steps": 20}, "eval": {"likelihood": True, "likelihood_n": 300,
                                                                  "elbo_slices": 2}})
    _write_params(Path("params.yaml"), params)
    for stage in STAGES:
        assert _run(stage) == 0, stage
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert abs(metrics["nll_gap"]) < 0.01, metrics


@pytest.mark.parametrize("bad, words", [
    ({"train": {"lr": -1.0}}, ["train.lr", "'auto' or a number > 0"]),
    ({"train": {"learning_rate": 0.1}}, ["train.learning_rate: unknown key"]),
    ({"sample": {"n": "many"}}, ["sample.n", "integer"]),
    ({"data": {"name": "file", "path": "missing.npy"}}, ["data.path", "does not exist"]),
    ({"data": {"target": "moons"}}, ["data.target", "schrodinger_bridge"]),
    ({"method": {"name": "schrodinger_bridge"}}, ["data.target", "the distribution at t = 1"]),
])
def test_bad_params_refused_before_any_work(workdir, capsys, bad, words):
    assert _run("prepare") == 0
    before = {p: p.read_bytes() for p in Path("data").iterdir()}
    _write_params(Path("params.yaml"), _deep_merge(TINY, bad))
    for name in STAGES:
        assert _run(name) == 2, name
    err = capsys.readouterr().err
    for w in words:
        assert w in err
    assert {p: p.read_bytes() for p in Path("data").iterdir()} == before


@pytest.mark.parametrize("content, words", [
    ("1,2\n3,oops\n", ["row", "not a number"]),
    ("", ["no data rows"]),
])
def test_malformed_data_file_refused_and_nothing_overwritten(workdir, capsys, content, words):
    assert _run("prepare") == 0
    before = {p: p.read_bytes() for p in Path("data").iterdir()}
    Path("points.csv").write_text(content)
    _write_params(Path("params.yaml"), _deep_merge(TINY, {"data": {"name": "file", "path": "points.csv"}}))
    assert _run("prepare") == 2
    err = capsys.readouterr().err.lower()
    assert "points.csv" in err and any(w in err for w in words), err
    assert {p: p.read_bytes() for p in Path("data").iterdir()} == before


# --------------------------------------------------------------------------- dvc


def _dvc_env(tmp: Path, tracking: bool = True) -> dict:
    """The environment of a `dvc` command in the tiny repo: the stages' default tracking (recorded, then replayed by
    a detached process, pipeline.spool; conftest sets sync for in-process stages), or with tracking False none at all
    (SCORE_PIPELINE_TRACKING=off), for the tests that check what DVC re-runs or stores and not what MLflow holds:
    the baseline run, the `dvc exp run` and the queue tests keep the default path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "SCORE_PIPELINE_TRACKING"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(tmp)
    if not tracking:
        env["SCORE_PIPELINE_TRACKING"] = "off"
    return env


def _sh(args: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def make_dvc_repo(tmp_path_factory) -> Path:
    """A git + DVC repo holding a copy of the project with tiny params (the session's `dvc_repo`, conftest.py)."""
    tmp = tmp_path_factory.mktemp("dvcrepo")
    for item in ("pipeline", "stages", "families"):
        shutil.copytree(REPO / item, tmp / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / item, tmp / item)
    for sub in ("data", "models", "outputs", "reports"):
        (tmp / sub).mkdir()
        shutil.copy(REPO / sub / ".gitignore", tmp / sub / ".gitignore")
    (tmp / "data" / "raw").mkdir()  # the default data.path, a dependency of prepare
    shutil.copy(REPO / "data" / "raw" / "README.md", tmp / "data" / "raw" / "README.md")
    _write_params(tmp / "params.yaml", TINY)
    env = _dvc_env(tmp)
    _sh(["git", "init", "-q"], tmp, env)
    _sh(["git", "config", "user.email", "t@example.com"], tmp, env)
    _sh(["git", "config", "user.name", "t"], tmp, env)
    _sh([sys.executable, "-m", "dvc", "init", "-q"], tmp, env)
    _sh([sys.executable, "-m", "dvc", "config", "core.autostage", "true"], tmp, env)
    _sh(["git", "add", "-A"], tmp, env)
    _sh(["git", "commit", "-qm", "tiny"], tmp, env)
    return tmp


BASELINE_FILES = ["outputs/samples.npz", "metrics/evaluate.json", "metrics/train.json", "models/model.pt"]


def run_dvc_baseline(dvc_repo) -> dict:
    """The tiny repo after its first `dvc repro`, committed: the baseline every `dvc exp run` test starts from (the
    session's `dvc_baseline`, conftest.py: a fixture, not a test, so the tests do not depend on their order across
    xdist workers; built once per session, since every test of the "dvc" group runs on one worker)."""
    env = _dvc_env(dvc_repo)
    log = _sh([sys.executable, "-m", "dvc", "repro"], dvc_repo, env)
    files = {f: (dvc_repo / f).read_bytes() for f in BASELINE_FILES}
    _sh(["git", "add", "-A"], dvc_repo, env)
    _sh(["git", "commit", "-qm", "baseline run"], dvc_repo, env)
    return {"log": log, "files": files}


@pytest.mark.xdist_group("dvc")
def test_dvc_repro_twice_is_bit_identical(dvc_repo, dvc_baseline):
    env = _dvc_env(dvc_repo, tracking=False)
    _back_to_baseline(dvc_repo, env)
    for name in STAGES:
        assert f"Running stage '{name}'" in dvc_baseline["log"]
    assert (dvc_repo / "reports" / "report.md").is_file()
    shutil.rmtree(dvc_repo / "checkpoints")  # a forced re-run must retrain from scratch, not resume
    _sh([sys.executable, "-m", "dvc", "repro", "--force"], dvc_repo, env)
    assert {f: (dvc_repo / f).read_bytes() for f in BASELINE_FILES} == dvc_baseline["files"]
    _back_to_baseline(dvc_repo, env)


@pytest.mark.xdist_group("dvc")
def test_dvc_exp_run_sample_key_reruns_only_sample_evaluate_report(dvc_repo, dvc_baseline):
    env = _dvc_env(dvc_repo)
    dvc = [sys.executable, "-m", "dvc"]
    _back_to_baseline(dvc_repo, env)
    log = _sh(dvc + ["exp", "run", "-S", "sample.seed=1", "-n", "seed1"], dvc_repo, env)
    ran = {name for name in STAGES if f"Running stage '{name}'" in log}
    assert ran == {"sample", "evaluate", "report"}, log
    shown = _sh(dvc + ["exp", "show", "--json"], dvc_repo, env)
    assert "seed1" in shown and "cd_floor" in shown
    # The experiment's MLflow parent run is tagged with its DVC experiment name.
    assert drain(spool_dir(dvc_repo)) == 0
    db = sqlite3.connect(dvc_repo / "mlflow.db")
    tagged = db.execute("select count(*) from tags where key = 'dvc_exp_name' and value = 'seed1'").fetchone()[0]
    assert tagged >= 1


def _wait_for_replays(repo: Path, timeout: float = 120) -> None:
    """Wait until the stages' detached replayers have put every record into the store (pipeline.spool)."""
    deadline = time.monotonic() + timeout
    while pending(spool_dir(repo)) and time.monotonic() < deadline:
        time.sleep(1)
    log = spool_dir(repo) / "replay.log"
    assert not pending(spool_dir(repo)), log.read_text() if log.exists() else "no replay.log"


def _back_to_baseline(repo: Path, env: dict) -> None:
    """`dvc exp run` leaves its experiment in the workspace; start each test from the committed baseline."""
    _sh(["git", "checkout", "-f", "--", "."], repo, env)
    _sh([sys.executable, "-m", "dvc", "checkout", "-f", "-q"], repo, env)


@pytest.mark.xdist_group("dvc")
@pytest.mark.parametrize("sets, expected", [
    (["method.loss=ssm"], {"train", "ema", "distill", "sample", "evaluate", "report"}),
    # a sample key: test_dvc_exp_run_sample_key_reruns_only_sample_evaluate_report; a new post-hoc EMA width from
    # the finished run's snapshots: no training
    (["ema.method=posthoc", "ema.sigma_rel=0.08"], {"ema", "distill", "sample", "evaluate", "report"}),
    (["method.name=ddpm", "method.num_steps=20"],
     {"noise_scales", "train", "ema", "distill", "sample", "evaluate", "report"}),
    (["method.name=schrodinger_bridge", "data.target=moons", "method.sb.iterations=1"],
     {"prepare", "noise_scales", "train", "ema", "distill", "sample", "evaluate", "report"}),
])
def test_dvc_exp_run_reruns_only_the_stages_whose_keys_changed(dvc_repo, dvc_baseline, sets, expected):
    env = _dvc_env(dvc_repo, tracking=False)
    _back_to_baseline(dvc_repo, env)
    args = [a for kv in sets for a in ("-S", kv)]
    log = _sh([sys.executable, "-m", "dvc", "exp", "run", *args], dvc_repo, env)
    assert {name for name in STAGES if f"Running stage '{name}'" in log} == expected, log


@pytest.mark.xdist_group("dvc")
def test_dvc_exp_run_refuses_an_undefined_combination_before_work(dvc_repo, dvc_baseline):
    env = _dvc_env(dvc_repo, tracking=False)
    _back_to_baseline(dvc_repo, env)
    outputs = ["outputs/samples.npz", "models/model.pt"]
    before = {f: (dvc_repo / f).read_bytes() for f in outputs}
    out = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", "eval.likelihood=true"], cwd=dvc_repo,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    log = out.stdout + out.stderr
    assert "NCSN's noise scales have neither" in log and "method.name: sde" in log, log
    assert "exited with 2" in log and "Running stage 'train'" not in log and "Running stage 'sample'" not in log, log
    assert {f: (dvc_repo / f).read_bytes() for f in outputs} == before
    _back_to_baseline(dvc_repo, env)  # a failed `dvc exp run` leaves its -S values in params.yaml


@pytest.mark.xdist_group("dvc")
def test_dvc_queue_keeps_mlflow_artifacts_and_skips_training(dvc_repo, dvc_baseline):
    """`dvc exp run --queue` + `dvc queue start`: runs in a temp copy, tracks into the real repo."""
    env = _dvc_env(dvc_repo)
    dvc = [sys.executable, "-m", "dvc"]
    _back_to_baseline(dvc_repo, env)
    _sh(dvc + ["exp", "run", "--queue", "-S", "sample.seed=2", "-n", "queued2"], dvc_repo, env)
    _sh(dvc + ["queue", "start", "-j", "1"], dvc_repo, env)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = _sh(dvc + ["queue", "status"], dvc_repo, env)
        line = next(ln for ln in status.splitlines() if "queued2" in ln)
        if "Success" in line or "Failed" in line:
            break
        time.sleep(3)
    assert "Success" in line, _sh(dvc + ["queue", "logs", "queued2"], dvc_repo, env)
    # DVC has deleted the temp copy by now: the detached replays (no drain here) must still land every record,
    # the artifacts from the records' own copies.
    _wait_for_replays(dvc_repo)
    db = sqlite3.connect(dvc_repo / "mlflow.db")
    runs = db.execute("select r.run_uuid, r.name, r.artifact_uri from runs r join tags t on t.run_uuid = r.run_uuid "
                      "where t.key = 'dvc_exp_name' and t.value = 'queued2'").fetchall()
    parent = "ncsnv2 · swissroll · queued2"  # method, data set, experiment (stages.common.parent_run_name)
    assert {name for _, name, _ in runs} == {parent, "sample", "evaluate", "report"}  # no retraining
    parent_uri = next(uri for _, name, uri in runs if name == parent)
    assert parent_uri.startswith((dvc_repo / "mlartifacts").resolve().as_uri())
    artifacts = Path(parent_uri.removeprefix("file://"))
    assert (artifacts / "report.md").is_file() and (artifacts / "figures" / "samples.png").is_file()


# --------------------------------------------------------------------------- class-conditional models (issue 9)


def test_exact_class_scores_sample_each_gmm_component(workdir, moment_errors):
    """Oracle through the stages: exact_score + method.conditional on gmm, w = 0, classes cycled: the samples of
    class k follow component k (moments within 5 standard errors), samples.npz records each sample's class, and
    cond_accuracy is the Bayes accuracy of the mixture on exact component draws (within 4 standard errors)."""
    from pipeline.gmm import GaussianMixture
    from pipeline.metrics.conditional import mixture_class_predictions

    params = _deep_merge(TINY, {"data": {"name": "gmm"}, "method": {"name": "exact_score", "conditional": True},
                                "sample": {"n": 2000, "batch_size": 500}, "eval": {"n": 300}})
    _write_params(Path("params.yaml"), params)
    for name in ("prepare", "noise_scales", "train", "ema", "distill", "sample", "evaluate"):
        assert _run(name) == 0, name
    out = np.load("outputs/samples.npz")
    x, y = torch.from_numpy(out["x"]).double(), out["y"]
    assert y.tolist() == [i % 2 for i in range(2000)]
    g = params["data"]["gmm"]
    mixture = GaussianMixture.from_params(g["weights"], g["means"], g["covs"])
    bayes = []  # the Bayes classifier's accuracy on each component's own draws (Monte Carlo, 100,000 each)
    for k in (0, 1):
        component = GaussianMixture.from_params([1.0], [g["means"][k]], [g["covs"][k]])
        moments = moment_errors(component, x[y == k])
        del moments["weights"]  # one component: its weight is 1 with no error
        for key, (err, se) in moments.items():
            assert float((err.abs() / se).max()) < 5, (k, key)
        draws = component.sample(100_000, torch.Generator().manual_seed(k)).numpy()
        bayes.append(float((mixture_class_predictions(mixture, draws) == k).mean()))
    # cond_accuracy (evaluate: the Bayes classifier of the true mixture on the guided samples) is the mean of the two
    expected = sum(bayes) / 2
    accuracy = json.loads(Path("metrics/evaluate.json").read_text())["cond_accuracy"]
    assert abs(accuracy - expected) < 4 * (expected * (1 - expected) / 2000) ** 0.5, (accuracy, expected)


@pytest.mark.parametrize("data, overrides, nfe", [
    ("8gaussians", {"method": {"name": "ddpm", "num_steps": 20}, "sample": {"guidance": 2.0, "classes": [3, 5]}}, 40),
    ("moons", {"method": {"name": "sde"}, "sample": {"steps": 10, "sampler": "ode", "ode_method": "euler"}}, 10),
])
def test_conditional_training_and_guidance_through_the_stages(workdir, data, overrides, nfe):
    params = _deep_merge(TINY, _deep_merge({"data": {"name": data}, "method": {"conditional": True}}, overrides))
    _write_params(Path("params.yaml"), params)
    for name in STAGES:
        assert _run(name) == 0, name
    model = torch.load("models/model.pt", weights_only=True)
    classes = 8 if data == "8gaussians" else 2
    assert model["config"]["num_classes"] == classes and model["state_dict"]["label_emb.weight"].shape[0] == classes + 1
    out = np.load("outputs/samples.npz")
    want = overrides["sample"].get("classes", list(range(classes)))
    assert out["y"].tolist() == [want[i % len(want)] for i in range(300)] and np.isfinite(out["x"]).all()
    assert json.loads(Path("metrics/sample.json").read_text())["nfe"] == nfe  # guided: two evaluations a step


def test_conditional_images_and_refusals(workdir, capsys):
    params = _deep_merge(TINY, _deep_merge(TINY_IMAGES, {"method": {"name": "ddpm", "num_steps": 20,
                                                                    "conditional": True},
                                                         "sample": {"guidance": 1.0}}))
    _write_params(Path("params.yaml"), params)
    for name in ("prepare", "noise_scales", "train", "ema", "distill", "sample"):
        assert _run(name) == 0, name
    out = np.load("outputs/samples.npz")
    assert out["x"].shape == (20, 1, 8, 8) and out["y"].tolist() == [i % 10 for i in range(20)]
    for name in ("fid_reference", "classifier", "evaluate"):
        assert _run(name) == 0, name
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    from pipeline.metrics.domain import load_classifier, predict

    predicted = predict(load_classifier("models/classifier.pt"), out["x"])
    assert metrics["cond_accuracy"] == pytest.approx(float((predicted == out["y"]).mean()))
    test_y = np.load("data/test_labels.npy")
    # per class: min(2 samples, the class's test images among the 20) each side, None below 2
    want = [None if min(2, int((test_y == k).sum())) < 2 else pytest.approx(metrics["fid_per_class"][str(k)])
            for k in range(10)]
    assert list(metrics["fid_per_class"].values()) == want
    _write_params(Path("params.yaml"), _deep_merge(params, {"sample": {"classes": [10]}}))
    assert _run("sample") == 2
    assert "sample.classes [10] are not classes of this data (0..9)" in capsys.readouterr().err


# A Schrödinger bridge through the stages on tiny sizes: 2 iterations of 10 updates per network, 5 grid steps.
TINY_BRIDGE = {"data": {"name": "8gaussians", "target": "moons"},
               "method": {"name": "schrodinger_bridge", "sb": {"iterations": 2, "num_steps": 5}},
               "train": {"steps": 40}, "eval": {"ot_n": 200}}


@pytest.mark.parametrize("solver", ["ipf", "dsbm"])
def test_schrodinger_bridge_through_the_stages(workdir, solver):
    """Every stage, both directions: the target's splits, the per-iteration rows, the ends and the coupling's cost
    next to POT's, the paths figure, and the MLflow rows of each iteration."""
    bridge = _deep_merge(TINY_BRIDGE, {"method": {"sb": {"solver": solver}}})
    _write_params(Path("params.yaml"), _deep_merge(TINY, bridge))
    for stage in STAGES:
        assert _run(stage) == 0, stage
    target = np.load("data/target.npz")
    assert {k: target[k].shape for k in target.files} == {"train": (600, 2), "test": (300, 2), "reference": (300, 2)}
    assert "target" not in json.loads(Path("data/record.json").read_text())  # the source's record, as without one
    rows = Path("plots/train_eval.csv").read_text().splitlines()
    assert rows[0] == "step,value,se,unit,iteration,cd_source,emd_target,emd_source" and len(rows) == 1 + 2
    train = json.loads(Path("metrics/train.json").read_text())
    assert train["steps"] == 40 and {"cd_target", "cd_source", "emd_target", "emd_source"} <= set(train)
    samples = np.load("outputs/samples.npz")
    assert samples["x"].shape == (300, 2) and np.isfinite(samples["x"]).all()
    np.testing.assert_array_equal(samples["x_start"], np.load("data/test.npy"))  # forward: from the source
    assert float(samples["denoised_variance"]) == pytest.approx(1.0 / 5)  # sigma^2 / N, left out of the last step
    assert json.loads(Path("metrics/sample.json").read_text())["nfe"] == 5
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert {"cd", "cd_floor", "emd", "emd_floor", "ot_cost", "ot_cost_sinkhorn", "ot_cost_gap"} <= set(metrics)
    assert metrics["ot_n"] == 200 and all(np.isfinite(v) for v in metrics.values())
    assert "8gaussians -> moons" in Path("reports/report.md").read_text()
    assert Path("outputs/trajectory.png").stat().st_size > 1000
    db = sqlite3.connect("mlflow.db")
    steps = {s for (s,) in db.execute("select step from metrics where key = 'iteration_cd_target'")}
    assert steps == {1, 2}
    # backward: from the target's held-out points to the source, on the same bridge
    _write_params(Path("params.yaml"), _deep_merge(TINY, _deep_merge(bridge, {"sample": {"direction": "backward"}})))
    for stage in ("sample", "evaluate"):
        assert _run(stage) == 0, stage
    samples = np.load("outputs/samples.npz")
    np.testing.assert_array_equal(samples["x_start"], target["test"])
    backward = json.loads(Path("metrics/evaluate.json").read_text())
    assert backward["cd_floor"] != metrics["cd_floor"]  # compared with the source's held-out points now


def _stale(repo: Path, env: dict) -> str:
    """`dvc status` of the repo: '' when every stage is up to date."""
    out = _sh([sys.executable, "-m", "dvc", "status"], repo, env)
    return "" if "up to date" in out else out


@pytest.mark.xdist_group("dvc")
def test_editing_another_family_leaves_the_run_up_to_date_and_a_shared_file_does_not(dvc_repo, dvc_baseline):
    """The baseline is an ncsnv2 run: every Schrödinger-bridge file edited leaves `dvc status` clean (its package
    is a dependency of bridge runs only, families/${method.name}); an edit of pipeline/rng.py, the noise of every
    loss and sampler, marks train and what follows it changed."""
    env = _dvc_env(dvc_repo, tracking=False)
    _back_to_baseline(dvc_repo, env)
    assert _stale(dvc_repo, env) == ""
    bridge = sorted((dvc_repo / "families" / "schrodinger_bridge").glob("*.py"))
    assert len(bridge) >= 4
    for path in [*bridge, dvc_repo / "families" / "ddpm" / "__init__.py"]:
        path.write_text(path.read_text() + "\n# an edit of another family\n")
    assert _stale(dvc_repo, env) == ""
    rng = dvc_repo / "pipeline" / "rng.py"
    rng.write_text(rng.read_text() + "\n# an edit of a shared file\n")
    stale = _stale(dvc_repo, env)
    assert all(f"{stage}:" in stale for stage in ("train", "sample", "evaluate")), stale
    assert "prepare:" in stale  # every stage loads params through stages/common.py, which may import it
    _back_to_baseline(dvc_repo, env)


@pytest.mark.xdist_group("dvc")
def test_a_folder_of_images_is_a_dependency_of_prepare(dvc_repo, dvc_baseline):
    """data.name: folder: adding an image to the folder makes `dvc status` report prepare changed."""
    from PIL import Image

    env = _dvc_env(dvc_repo, tracking=False)
    _back_to_baseline(dvc_repo, env)
    folder = dvc_repo.parent / f"{dvc_repo.name}-images"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            Image.new("L", (8, 8), 40 * i + (100 if c == "b" else 0)).save(folder / c / f"{i}.png")
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    params["data"].update(name="folder", path=str(folder), n_train="auto", n_test=2, n_reference=2)
    params["eval"].update(n="auto", emd_n=2000, cloud_size=100, likelihood_n=1000)
    params["sample"].update(n="auto", batch_size="auto")
    _write_params(dvc_repo / "params.yaml", params)
    _sh([sys.executable, "-m", "dvc", "repro", "prepare"], dvc_repo, env)
    assert "prepare:" not in _stale(dvc_repo, env)
    Image.new("L", (8, 8), 7).save(folder / "a" / "new.png")
    assert "prepare:" in _stale(dvc_repo, env)
    _back_to_baseline(dvc_repo, env)


@pytest.mark.xdist_group("dvc")
def test_a_labels_file_and_a_target_file_are_dependencies_of_prepare(dvc_repo, dvc_baseline):
    """data.labels_path (file images) and data.target_path (the bridge's target) are dependencies of prepare:
    changing either file makes `dvc status` report prepare changed; data/raw, the default, stands for none."""
    env = _dvc_env(dvc_repo, tracking=False)
    _back_to_baseline(dvc_repo, env)
    base = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    assert base["data"]["labels_path"] == base["data"]["target_path"] == "data/raw"
    inputs = dvc_repo.parent / f"{dvc_repo.name}-inputs"
    inputs.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(inputs / "x.npy", rng.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8))
    np.save(inputs / "y.npy", np.arange(12) % 2)
    np.save(inputs / "target.npy", rng.normal(size=(2000, 2)))
    images = _deep_merge(base, {"data": {"name": "file", "path": str(inputs / "x.npy"),
                                         "labels_path": str(inputs / "y.npy"), "n_train": "auto", "n_test": 2,
                                         "n_reference": 2},
                                "eval": {"n": "auto", "emd_n": 2000, "cloud_size": 100, "likelihood_n": 1000},
                                "sample": {"n": "auto", "batch_size": "auto"}})
    bridge = _deep_merge(base, _deep_merge(TINY_BRIDGE, {"data": {"target": "file",
                                                                  "target_path": str(inputs / "target.npy")}}))
    for params, changed in ((images, inputs / "y.npy"), (bridge, inputs / "target.npy")):
        _write_params(dvc_repo / "params.yaml", params)
        _sh([sys.executable, "-m", "dvc", "repro", "prepare"], dvc_repo, env)
        assert "prepare:" not in _stale(dvc_repo, env)
        values = np.load(changed)
        np.save(changed, values[::-1].copy())
        assert "prepare:" in _stale(dvc_repo, env), changed.name
    _back_to_baseline(dvc_repo, env)
