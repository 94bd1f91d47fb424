"""Smoke and oracle tier of sample.task (inpaint, interpolate, edit) through the sample, evaluate and report stages.

The library is tested by its oracles in test_inpaint.py, test_interpolate.py and test_edit.py; here the stages:
what samples.npz holds, that the known part is the held-out items exactly, the metrics and figures of each task,
and the exact-score inpainting oracle (the KS statistic of the PIT) through the stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_stages import STAGES, TINY, TINY_IMAGES, _deep_merge, _run, _write_params, workdir  # noqa: F401

GMM_VP = {"data": {"name": "gmm", "gmm": {"weights": [0.4, 0.6], "means": [[2.0, 2.0], [-1.0, -2.0]],
                                          "covs": [[1.0, 1.0], [0.5, 1.0]]}},
          "method": {"name": "exact_score", "sde": "vp"}}


def _stages(params: dict, names=STAGES) -> None:
    _write_params(Path("params.yaml"), params)
    for name in names:
        assert _run(name) == 0, name


def test_inpaint_gmm_exact_score_through_the_stages(workdir):
    """Oracle through the stages: exact score, mask `first`, n = 1,000 test points: x_0 is each test point's exactly,
    and the PIT of x_1 under the exact conditional is near uniform for replace (PC with the Langevin corrector) and
    repaint: KS < 0.08, where ignoring x_0 (drawing x_1 from its marginal) gives 0.18 (test_inpaint.py). The
    methods' accuracy at the 5 % level is test_inpaint.py's oracle; the benchmark measures it at n = 2,000."""
    params = _deep_merge(TINY, _deep_merge(GMM_VP, {
        "data": {"n_test": 1000}, "sample": {"task": "inpaint", "n": 1000, "batch_size": 1000, "sampler": "pc",
                                             "steps": 200, "inpaint": {"method": ["replace", "repaint"], "jump": 5,
                                                                       "resamples": 3}}}))
    _stages(params)
    out = np.load("outputs/samples.npz")
    test = np.load("data/test.npy")[:1000]
    assert out["x"].shape == (2, 1000, 2) and out["methods"].tolist() == ["replace", "repaint"]
    assert (out["x_known"] == test).all() and (out["mask"] == [1, 0]).all()
    assert (out["x"][:, :, 0] == test[:, 0]).all()  # the known coordinate, exactly
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert metrics["ks_critical"] == pytest.approx(0.0428, abs=5e-4)
    for method in ("replace", "repaint"):
        assert metrics[f"ks_{method}"] < 0.08, method
    sample = json.loads(Path("metrics/sample.json").read_text())
    assert sample["task"] == "inpaint" and sample["nfe_repaint"] > sample["nfe_replace"]
    report = Path("reports/report.md").read_text()
    assert "Inpainting side by side" in report and "ks_replace" in report


@pytest.fixture
def digits_model(workdir):
    """A tiny digits DDPM (20-step chain) trained once through every stage; the test then re-runs sample onward."""
    params = _deep_merge(TINY, _deep_merge(TINY_IMAGES, {"method": {"name": "ddpm", "num_steps": 20}}))
    _stages(params)
    return params


def test_image_tasks_through_the_stages(digits_model):
    """On one tiny digits model: inpainting (box mask, three methods side by side), interpolation and SDEdit, each
    with its samples.npz contract, its metrics and its report figures."""
    base = digits_model
    after = ("sample", "evaluate", "report")
    test = np.load("data/test.npy")[:20]

    _stages(_deep_merge(base, {"sample": {"task": "inpaint", "inpaint": {"method": ["replace", "repaint", "mcg"],
                                                                         "resamples": 2}}}), after)
    out = np.load("outputs/samples.npz")
    assert out["x"].shape == (3, 20, 1, 8, 8) and out["x"].dtype == np.uint8
    box = np.ones((1, 8, 8), np.uint8)
    box[:, 2:6, 2:6] = 0
    assert (out["mask"] == box).all() and (out["x_known"] == test).all()
    assert (out["x"][:, :, box == 1] == test[:, box == 1]).all()  # the known pixels are the test pixels
    assert (out["x"][:, :, box == 0] != test[:, box == 0]).any()
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    for method in ("replace", "repaint", "mcg"):
        assert np.isfinite(metrics[f"fid_{method}"]) and 0 < metrics[f"rmse_{method}"] < 1, method
    assert "Inpainting side by side" in Path("reports/report.md").read_text()

    # super-resolution x2 (8x8 -> 4x4 means): replace ends on the measurement inside the pixel range, so after the
    # rounding to pixels every block's mean is within half a grey level of the original's (this 4-step model's
    # outputs spread far outside the range: projecting and then clipping would miss by many levels)
    _stages(_deep_merge(base, {"sample": {"task": "inverse", "inverse": {"operator": "downsample", "factor": 2,
                                                                         "method": ["replace", "dps"]}}}), after)
    out = np.load("outputs/samples.npz")
    assert out["x"].shape == (2, 20, 1, 8, 8) and out["y"].shape == (20, 1, 4, 4) and "mask" not in out
    assert json.loads(str(out["operator"])) == {"operator": "downsample", "factor": 2, "noise": 0.0}
    blocks = lambda v: v.astype(float).reshape(20, 1, 4, 2, 4, 2)  # noqa: E731
    clipped = ((blocks(out["x"][0]) == 0) | (blocks(out["x"][0]) == 255)).any((3, 5))
    error = np.abs(blocks(out["x"][0]).mean((3, 5)) - blocks(test).mean((3, 5)))
    assert clipped.sum() > 40 and error.max() <= 0.5
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert metrics["consistency_max_replace"] <= 0.5 / 255 < metrics["consistency_max_dps"]
    for method in ("replace", "dps"):
        assert np.isfinite(metrics[f"fid_{method}"]) and 0 < metrics[f"rmse_{method}"] < 1, method
    assert "Inverse problem side by side" in Path("reports/report.md").read_text()

    _stages(_deep_merge(base, {"sample": {"task": "interpolate", "sampler": "ddim", "steps": 10,
                                          "interpolate": {"pairs": 3, "frames": 5}}}), after)
    out = np.load("outputs/samples.npz")
    assert out["x"].shape == (3, 5, 1, 8, 8) and str(out["scheme"]) == "slerp"
    ends = out["x"][:, [0, -1]].reshape(6, 1, 8, 8)
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert metrics["max_step_ratio"] >= 1.0 and metrics["endpoint_distance"] > 0
    _stages(_deep_merge(base, {"sample": {"sampler": "ddim", "steps": 10}}), ["sample"])
    plain = np.load("outputs/samples.npz")["x"][:6]
    # frame 0 and frame K - 1 of row j are samples 2j and 2j + 1 of the plain run (up to a pixel level: the network
    # runs on another number of rows)
    assert np.abs(ends.astype(int) - plain.astype(int)).max() <= 1

    _stages(_deep_merge(base, {"sample": {"task": "edit", "edit": {"t0": [0.1, 0.5, 1.0]}}}), after)
    out = np.load("outputs/samples.npz")
    assert out["x"].shape == (3, 20, 1, 8, 8) and out["t0"].tolist() == [0.1, 0.5, 1.0]
    assert (out["x_known"] == test).all()
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    distance = [metrics[f"distance_t0_{t:g}"] for t in (0.1, 0.5, 1.0)]
    assert distance[0] < distance[1] < distance[2], distance
    assert json.loads(Path("metrics/sample.json").read_text())["nfe_t0_0.5"] == 10  # half of the 20-step chain
    assert "SDEdit side by side" in Path("reports/report.md").read_text()


def test_point_interpolation_endpoints_are_the_plain_samples(workdir):
    """On points with the exact score and the deterministic Euler ODE: frame 0 and frame K - 1 of row j equal
    samples 2j and 2j + 1 of sample.task: generate (float32, a few ulps: another number of rows)."""
    params = _deep_merge(TINY, _deep_merge(GMM_VP, {"sample": {"sampler": "ode", "ode_method": "euler",
                                                               "steps": 20}}))
    _stages(_deep_merge(params, {"sample": {"task": "interpolate", "interpolate": {"pairs": 4, "frames": 6}}}))
    x = np.load("outputs/samples.npz")["x"]
    assert x.shape == (4, 6, 2)
    _stages(params, ["sample"])
    plain = np.load("outputs/samples.npz")["x"][:8]
    np.testing.assert_allclose(x[:, [0, -1]].reshape(8, 2), plain, rtol=0, atol=1e-5)


# test_inverse.py's mixture: x_0 + x_1 tells the components apart, and they differ along x_0 - x_1
GMM_SUM = {"data": {"name": "gmm", "gmm": {"weights": [0.4, 0.6], "means": [[3.0, -1.0], [-3.0, -1.0]],
                                           "covs": [[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 1.0]]]}},
           "method": {"name": "exact_score", "sde": "vp"}}


def test_inverse_gmm_exact_score_through_the_stages(workdir):
    """Oracle through the stages: exact score, A = [[1, 1]] on 600 test points, sample.inverse.noise 0.5 with MCG
    and DPS side by side: samples.npz's contract, the measurement's noise (item i's own generator), MCG's
    projection ending on the noisy y to float32 precision, DPS near it, and the PIT along A's null space near
    uniform under the exact posterior (KS < 0.08 at n = 600, where the 5 % critical value is 0.055;
    test_inverse.py holds the 5 % bar at n = 2,000 in the library, noiseless replace included)."""
    inverse = {"operator": "matrix", "matrix": [[1.0, 1.0]], "noise": 0.5, "method": ["mcg", "dps"]}
    params = _deep_merge(TINY, _deep_merge(GMM_SUM, {
        "data": {"n_test": 600}, "sample": {"task": "inverse", "n": 600, "batch_size": 300, "sampler": "pc",
                                            "steps": 150, "inverse": inverse}}))
    _stages(params)
    out = np.load("outputs/samples.npz")
    test = np.load("data/test.npy")[:600]
    assert out["x"].shape == (2, 600, 2) and out["methods"].tolist() == ["mcg", "dps"]
    assert (out["x_known"] == test).all() and out["y"].shape == (600, 1)
    assert (out["y"][:, 0] - test.sum(1)).std() == pytest.approx(0.5, rel=0.1)  # the measurement's noise
    assert json.loads(str(out["operator"])) == {"operator": "matrix", "matrix": [[1.0, 1.0]], "noise": 0.5}
    np.testing.assert_allclose(out["x"][0].sum(1), out["y"][:, 0], atol=1e-5)  # MCG projects onto y
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert metrics["consistency_mcg"] < 1e-5 and metrics["measurement_noise"] == 0.5
    assert 0.05 < metrics["consistency_dps"] < 1.0
    for method in ("mcg", "dps"):
        assert metrics[f"ks_{method}"] < 0.08 and 0 < metrics[f"rmse_{method}"], method
    assert "Inverse problem side by side" in Path("reports/report.md").read_text()
