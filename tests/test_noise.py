"""Tests for pipeline.noise: geometric sigmas and NCSNv2 techniques 1, 2 and 4.

Golden numbers come from the NCSNv2 CIFAR-10 configuration (Song & Ermon 2020,
arXiv:2006.09011; docs/references.md, "NCSN / NCSNv2 settings"):
D = 3*32*32 = 3072, sigma_1 = 50, sigma_L = 0.01, L = 232, T = 5, eps = 6.2e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import spatial

from pipeline import noise

# CIFAR-10 configuration of NCSNv2 (docs/references.md, "NCSN / NCSNv2 settings").
CIFAR_D, CIFAR_SIGMA_MAX, CIFAR_SIGMA_MIN, CIFAR_L, CIFAR_T, CIFAR_EPS = 3072, 50.0, 0.01, 232, 5, 6.2e-6


# --------------------------------------------------------------------------- technique 2


def test_cifar_ratio_from_the_paper_configuration():
    gamma = noise.ratio_of(CIFAR_SIGMA_MAX, CIFAR_SIGMA_MIN, CIFAR_L)
    # (50 / 0.01) ** (1 / 231) = 1.03756 (docs/references.md, "NCSN / NCSNv2 settings" quotes gamma = 1.0376).
    assert gamma == pytest.approx(1.0376, abs=1e-4)
    # The geometric sequence actually has that ratio.
    sig = noise.geometric_sigmas(CIFAR_SIGMA_MAX, CIFAR_SIGMA_MIN, CIFAR_L)
    np.testing.assert_allclose(sig[:-1] / sig[1:], gamma, rtol=1e-12)


def test_cifar_criterion_is_about_one_half():
    # The paper's L = 232 gives criterion 0.567 at D = 3072 (measured): a little on the safe side
    # of the 0.5 target (more scales than the root needs), not exactly 0.5.
    c = noise.ratio_criterion(1.0376, CIFAR_D)
    assert 0.5 <= c <= 0.6


def test_ratio_criterion_matches_the_formula():
    # Phi(sqrt(2D)(g-1) + 3g) - Phi(sqrt(2D)(g-1) - 3g), written out with math.erf.
    phi = lambda u: 0.5 * (1 + math.erf(u / math.sqrt(2)))  # noqa: E731
    for gamma, dim in [(1.0376, 3072), (1.2, 10), (3.0, 2), (1.0, 7)]:
        a = math.sqrt(2 * dim) * (gamma - 1)
        assert noise.ratio_criterion(gamma, dim) == pytest.approx(phi(a + 3 * gamma) - phi(a - 3 * gamma), abs=1e-12)


def test_solve_ratio_cifar_root():
    gamma = noise.solve_ratio(CIFAR_D)
    assert gamma is not None and gamma > 1
    assert abs(noise.ratio_criterion(gamma, CIFAR_D) - 0.5) < 1e-9
    # Measured: gamma = 1.03980 -> L = 220, within 10% of the paper's 232.
    n = noise.num_scales_for_ratio(CIFAR_SIGMA_MAX, CIFAR_SIGMA_MIN, gamma)
    assert abs(n - CIFAR_L) <= 0.1 * CIFAR_L
    # num_scales_for_ratio is the smallest L whose ratio does not exceed gamma.
    assert noise.ratio_of(CIFAR_SIGMA_MAX, CIFAR_SIGMA_MIN, n) <= gamma
    assert noise.ratio_of(CIFAR_SIGMA_MAX, CIFAR_SIGMA_MIN, n - 1) > gamma


@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_solve_ratio_has_no_root_in_low_dimension(dim):
    # sqrt(2D) <= 3: the criterion never drops to 0.5 (docs/references.md, "NCSN / NCSNv2 settings", technique 2).
    assert noise.solve_ratio(dim) is None


def test_solve_ratio_root_exists_just_above_the_threshold():
    # D = 5 is the first dimension with sqrt(2D) > 3.
    gamma = noise.solve_ratio(5)
    assert gamma is not None and abs(noise.ratio_criterion(gamma, 5) - 0.5) < 1e-9


def test_criterion_in_two_dimensions_stays_above_099():
    # docs/references.md, "NCSN / NCSNv2 settings": for D = 2 the left side exceeds 0.99 for every gamma >= 1 (measured minimum
    # over this grid: 0.9973).
    grid = np.linspace(1.0, 100.0, 2000)
    assert min(noise.ratio_criterion(g, 2) for g in grid) > 0.99


# --------------------------------------------------------------------------- technique 4


def _objective_from_references(eps, sigma_l, gamma, t):
    """docs/references.md, "NCSN / NCSNv2 settings", technique 4, transcribed literally."""
    sl2 = sigma_l**2
    frac = 2 * eps / (sl2 - sl2 * (1 - eps / sl2) ** 2)
    return (1 - eps / sl2) ** (2 * t) * (gamma**2 - frac) + frac


def test_step_size_objective_matches_the_formula():
    for eps, sigma_l, gamma, t in [(6.2e-6, 0.01, 1.0376, 5), (1e-7, 0.01, 1.0376, 5), (5e-5, 0.01, 1.2, 3),
                                   (3.3e-6, 0.01, 1.017, 5), (1e-3, 0.1, 1.5, 100)]:
        want = _objective_from_references(eps, sigma_l, gamma, t)
        assert noise.step_size_objective(eps, sigma_l, gamma, t) == pytest.approx(want, rel=1e-12)


def test_solve_step_size_cifar():
    eps = noise.solve_step_size(CIFAR_SIGMA_MIN, 1.0376, CIFAR_T)
    # Measured 6.1895e-6 against the CIFAR-10 config's step_lr 6.2e-6 (rel. error 0.17%).
    assert abs(eps - CIFAR_EPS) / CIFAR_EPS < 0.02


@pytest.mark.parametrize("sigma_l, gamma, t", [(0.01, 1.0376, 5), (0.01, 1.2, 3), (0.05, 1.05, 20)])
def test_solve_step_size_minimises_distance_to_one(sigma_l, gamma, t):
    eps = noise.solve_step_size(sigma_l, gamma, t)
    assert 0 < eps < sigma_l**2
    best = abs(noise.step_size_objective(eps, sigma_l, gamma, t) - 1)
    grid = np.logspace(-14, math.log10(0.9999), 200_001) * sigma_l**2
    dense = np.abs(_objective_from_references(grid, sigma_l, gamma, t) - 1)
    # The returned eps is at least as good as every grid point (up to rounding of the objective).
    assert best <= dense.min() + 1e-12
    # ...and it is not an arbitrary point: it sits next to the grid's argmin.
    assert abs(math.log(eps) - math.log(grid[dense.argmin()])) < 1e-3


# --------------------------------------------------------------------------- technique 1


@pytest.mark.parametrize("dim, n", [(2, 500), (3, 400), (10, 300)])
def test_max_pairwise_distance_exact(dim, n):
    x = np.random.default_rng(dim).standard_normal((n, dim)) * np.arange(1, dim + 1)
    d, how = noise.max_pairwise_distance(x)
    assert d == pytest.approx(spatial.distance.pdist(x).max(), rel=1e-12)
    assert how.startswith("exact")
    assert ("convex-hull" in how) == (dim <= 6)


def test_max_pairwise_distance_brute_force_for_few_points_in_low_dimension():
    # n <= d + 1: no hull, brute force.
    x = np.random.default_rng(0).standard_normal((3, 2))
    d, how = noise.max_pairwise_distance(x)
    assert d == pytest.approx(spatial.distance.pdist(x).max(), rel=1e-12)
    assert "brute force" in how


def test_max_pairwise_distance_flat_data_falls_back():
    # Collinear 2-D points make Qhull fail; the brute-force path must still be exact.
    t = np.random.default_rng(1).standard_normal(200)
    x = np.stack([t, 2 * t + 1], axis=1)
    d, how = noise.max_pairwise_distance(x)
    assert d == pytest.approx(spatial.distance.pdist(x).max(), rel=1e-12)
    assert how.startswith("exact")


def test_max_pairwise_distance_1d():
    x = np.random.default_rng(2).standard_normal((1000, 1))
    d, how = noise.max_pairwise_distance(x)
    assert d == pytest.approx(spatial.distance.pdist(x).max(), rel=1e-12)
    assert how.startswith("exact")


def test_max_pairwise_distance_subsample_is_an_estimate_and_lower_bound():
    x = np.random.default_rng(3).standard_normal((600, 10))
    exact = spatial.distance.pdist(x).max()
    d, how = noise.max_pairwise_distance(x, max_exact=100, seed=0)
    assert how.startswith("estimate")
    assert d <= exact
    assert d > 0.5 * exact  # a real distance of the data, not zero
    # The estimate is the exact diameter of some 100-point subset, seeded.
    assert noise.max_pairwise_distance(x, max_exact=100, seed=0) == (d, how)


def test_max_pairwise_distance_accepts_image_shaped_data():
    x = np.random.default_rng(4).standard_normal((50, 1, 4, 4))
    d, _ = noise.max_pairwise_distance(x)
    assert d == pytest.approx(spatial.distance.pdist(x.reshape(50, -1)).max(), rel=1e-12)


# --------------------------------------------------------------------------- choose_noise_scales

AUTO = dict(sigma_max="auto", sigma_min=0.01, num_scales="auto", fallback_num_scales=37, steps_per_scale="auto",
            step_size="auto")


def _data_2d(n=300, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 2))


def test_ncsn_auto_is_the_hand_set_values():
    ns = noise.choose_noise_scales(_data_2d(), "ncsn", **AUTO)
    # NCSN (Song & Ermon 2019): sigma geometric 1 -> 0.01, L = 10, eps = 2e-5, T = 100 (docs/references.md, "NCSN / NCSNv2 settings").
    assert ns.sigma_max == pytest.approx(1.0)
    assert ns.sigma_min == pytest.approx(0.01)
    assert len(ns.sigmas) == 10
    assert ns.step_size == 2e-5
    assert ns.steps_per_scale == 100
    np.testing.assert_allclose(ns.sigmas, np.geomspace(1.0, 0.01, 10), rtol=1e-12)
    for key in ("sigma_max", "num_scales", "steps_per_scale", "step_size"):
        assert "NCSN hand-set" in ns.how[key]


def test_ncsnv2_on_2d_data_uses_fallback_num_scales():
    x = _data_2d()
    ns = noise.choose_noise_scales(x, "ncsnv2", **AUTO)
    assert len(ns.sigmas) == AUTO["fallback_num_scales"]
    assert "no root" in ns.how["num_scales"] and "fallback_num_scales" in ns.how["num_scales"]
    # Technique 1: sigma_1 is the data's diameter.
    assert ns.sigma_max == pytest.approx(spatial.distance.pdist(x).max(), rel=1e-12)
    assert "technique 1" in ns.how["sigma_max"]
    # T = 5 (the CIFAR-10 value) and technique 4 for the ratio actually used.
    assert ns.steps_per_scale == 5
    gamma = noise.ratio_of(ns.sigma_max, ns.sigma_min, len(ns.sigmas))
    assert ns.step_size == noise.solve_step_size(0.01, gamma, 5)


def test_ncsnv2_takes_the_image_defaults_langevin_steps_for_auto_and_solves_eps_for_them():
    """auto_steps (pipeline.defaults.langevin_steps: 10 for images up to 16 px, None elsewhere) replaces NCSNv2's
    T = 5 for 'auto' only: technique 4 solves eps for it, a set value and NCSN's hand-set T win over it."""
    from pipeline import defaults

    assert defaults.langevin_steps({"kind": "images", "shape": [1, 8, 8]}) == 10
    assert defaults.langevin_steps({"kind": "images", "shape": [3, 16, 16]}) == 10
    assert defaults.langevin_steps({"kind": "images", "shape": [1, 28, 28]}) is None
    assert defaults.langevin_steps({"kind": "points", "shape": [2]}) is None
    x = _data_2d()
    ns = noise.choose_noise_scales(x, "ncsnv2", **AUTO, auto_steps=10)
    gamma = noise.ratio_of(ns.sigma_max, ns.sigma_min, len(ns.sigmas))
    assert ns.steps_per_scale == 10 and ns.step_size == noise.solve_step_size(0.01, gamma, 10)
    assert ns.step_size < noise.choose_noise_scales(x, "ncsnv2", **AUTO).step_size  # more steps, smaller eps
    assert "image default" in ns.how["steps_per_scale"] and "T = 10" in ns.how["steps_per_scale"]
    assert noise.choose_noise_scales(x, "ncsnv2", **{**AUTO, "steps_per_scale": 7}, auto_steps=10).steps_per_scale == 7
    assert noise.choose_noise_scales(x, "ncsn", **AUTO, auto_steps=10).steps_per_scale == 100


def test_ncsnv2_with_a_root_uses_technique_2():
    x = np.random.default_rng(0).standard_normal((200, 16))
    ns = noise.choose_noise_scales(x, "ncsnv2", **AUTO)
    gamma = noise.solve_ratio(16)
    assert len(ns.sigmas) == noise.num_scales_for_ratio(ns.sigma_max, 0.01, gamma)
    assert len(ns.sigmas) != AUTO["fallback_num_scales"]
    assert "technique 2" in ns.how["num_scales"]


def test_forced_values_are_used_as_given():
    forced = dict(sigma_max=7.5, sigma_min=0.05, num_scales=12, fallback_num_scales=37, steps_per_scale=9,
                  step_size=3e-4)
    for method in ("ncsn", "ncsnv2"):
        ns = noise.choose_noise_scales(_data_2d(), method, **forced)
        assert ns.sigma_max == pytest.approx(7.5, rel=1e-12)
        assert ns.sigma_min == pytest.approx(0.05, rel=1e-12)
        assert len(ns.sigmas) == 12
        assert ns.steps_per_scale == 9
        assert ns.step_size == 3e-4
        for key in ("sigma_max", "sigma_min", "num_scales", "steps_per_scale", "step_size"):
            assert ns.how[key].startswith("set in params"), (key, ns.how[key])


@pytest.mark.parametrize("method", ["ncsn", "ncsnv2"])
def test_sigmas_are_geometric_and_descending(method):
    ns = noise.choose_noise_scales(_data_2d(), method, **AUTO)
    s = np.asarray(ns.sigmas)
    assert (np.diff(s) < 0).all()
    ratios = s[:-1] / s[1:]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-10)


def test_sigma_max_not_above_sigma_min_raises():
    with pytest.raises(ValueError, match="sigma_max"):
        noise.choose_noise_scales(_data_2d(), "ncsnv2", **{**AUTO, "sigma_max": 0.01})
    with pytest.raises(ValueError, match="sigma_max"):
        noise.choose_noise_scales(_data_2d(), "ncsnv2", **{**AUTO, "sigma_max": 0.005})
    # Technique 1 on tiny data can also fall below sigma_min.
    tiny = np.random.default_rng(0).standard_normal((20, 2)) * 1e-4
    with pytest.raises(ValueError, match="sigma_max"):
        noise.choose_noise_scales(tiny, "ncsnv2", **AUTO)


def test_noise_scales_json_round_trip():
    ns = noise.choose_noise_scales(_data_2d(), "ncsnv2", **AUTO)
    d = ns.to_json()
    assert d["num_scales"] == len(ns.sigmas) and d["sigma_max"] == ns.sigmas[0]
    assert noise.NoiseScales.from_json(d) == ns


def test_geometric_sigmas_needs_two_scales():
    with pytest.raises(ValueError):
        noise.geometric_sigmas(1.0, 0.1, 1)
