"""Tests for pipeline.metrics.pointcloud: chamfer distance and exact W1."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from pipeline.metrics import (
    chamfer_clouds,
    chamfer_distance,
    earth_movers_distance,
    pointcloud_metrics,
)


def _points(n: int, seed: int, d: int = 2) -> np.ndarray:
    """(n, d) standard normal points."""
    return np.random.default_rng(seed).standard_normal((n, d))


def test_chamfer_self_is_zero():
    x = _points(50, 0)
    assert chamfer_distance(x, x) == 0.0


def test_chamfer_hand_computed():
    # x = {(0,0), (2,0)}, y = {(1,1)}: every squared distance is 1 + 1 = 2.
    # x -> y: mean(2, 2) = 2; y -> x: min(2, 2) = 2; total 4.
    x = np.array([[0.0, 0.0], [2.0, 0.0]])
    y = np.array([[1.0, 1.0]])
    assert chamfer_distance(x, y) == 4.0
    # x = {(0,0), (3,0)}, y = {(1,0)}: x -> y mean(1, 4) = 2.5; y -> x min(1, 4) = 1.
    assert chamfer_distance(np.array([[0.0, 0.0], [3.0, 0.0]]), np.array([[1.0, 0.0]])) == 3.5


def test_chamfer_symmetric_and_blocked_matches_brute_force():
    x, y = _points(700, 1), _points(300, 2) + 0.5
    assert chamfer_distance(x, y) == pytest.approx(chamfer_distance(y, x), rel=1e-14)
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    brute = d2.min(1).mean() + d2.min(0).mean()
    assert chamfer_distance(x, y) == pytest.approx(brute, rel=1e-14)


def test_chamfer_clouds_is_mean_over_paired_clouds():
    gen, ref = _points(1050, 3), _points(1050, 4)
    # 1050 // 100 = 10 clouds; the last 50 points are dropped.
    manual = np.mean(
        [chamfer_distance(gen[i * 100 : (i + 1) * 100], ref[i * 100 : (i + 1) * 100])
         for i in range(10)]
    )
    assert chamfer_clouds(gen, ref, cloud_size=100) == pytest.approx(manual, rel=1e-14)
    assert chamfer_clouds(gen, gen) == 0.0


def test_chamfer_clouds_size_errors():
    with pytest.raises(ValueError, match="equal sizes"):
        chamfer_clouds(_points(200, 0), _points(300, 0))
    with pytest.raises(ValueError, match="cloud_size"):
        chamfer_clouds(_points(50, 0), _points(50, 1), cloud_size=100)
    with pytest.raises(ValueError, match="dimensions"):
        chamfer_distance(_points(5, 0, d=2), _points(5, 0, d=3))


def test_emd_identical_is_zero():
    x = _points(200, 5)
    assert earth_movers_distance(x, x) == pytest.approx(0.0, abs=1e-12)


def test_emd_translation_is_shift_norm():
    # W1(mu, mu + v) = |v| exactly: the translation coupling achieves it and the
    # 1-Lipschitz potential f(x) = <x, v/|v|> shows nothing does better.
    x = _points(300, 6)
    v = np.array([0.3, -0.4])
    assert earth_movers_distance(x, x + v) == pytest.approx(0.5, rel=1e-10)


def test_emd_matches_scipy_in_1d():
    x = np.array([[0.0], [1.0], [3.0], [7.5]])
    y = np.array([[2.0], [2.5], [-1.0], [4.0]])
    expected = scipy.stats.wasserstein_distance(x[:, 0], y[:, 0])
    assert earth_movers_distance(x, y) == pytest.approx(expected, rel=1e-12)


def test_emd_raises_when_solver_stops_early():
    with pytest.raises(RuntimeError, match="optimal"):
        earth_movers_distance(_points(200, 7), _points(200, 8), num_itermax=5)


def test_emd_shape_errors():
    with pytest.raises(ValueError, match="dimensions"):
        earth_movers_distance(_points(5, 0, d=2), _points(5, 0, d=1))
    with pytest.raises(ValueError, match="shape"):
        earth_movers_distance(np.zeros(5), np.zeros(5))


def test_pointcloud_metrics_keys_and_floors():
    gen, test, ref = _points(400, 9) + 1.0, _points(400, 10), _points(400, 11)
    m = pointcloud_metrics(gen, test, ref, cloud_size=100, emd_n=200)
    assert set(m) == {"cd", "cd_floor", "emd", "emd_floor"}
    assert m["cd"] == pytest.approx(chamfer_clouds(gen, test))
    assert m["cd_floor"] == pytest.approx(chamfer_clouds(ref, test))
    assert m["emd"] == pytest.approx(earth_movers_distance(gen[:200], test[:200]))
    assert m["emd_floor"] == pytest.approx(earth_movers_distance(ref[:200], test[:200]))
    # A shifted model is worse than two samples of the truth.
    assert m["cd"] > m["cd_floor"] and m["emd"] > m["emd_floor"]
