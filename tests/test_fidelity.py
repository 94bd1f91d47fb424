"""Precision, recall, density and coverage, FID's bootstrap interval and the memorised fraction
(pipeline.metrics.fidelity) against what each must give on draws whose law is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import norm
from threadpoolctl import threadpool_limits

from pipeline.metrics.fid import fid_by_svd
from pipeline import defaults
from pipeline.metrics.fidelity import (PRDC_K, expected_coverage, fid_bootstrap, fid_over_sets, memorisation,
                                       nearest_distances, prdc)


def _gauss(rng: np.random.Generator, n: int, d: int = 8, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return rng.normal(size=(n, d)) * scale + shift


def test_two_draws_of_one_law_give_the_expected_density_and_coverage():
    """Same law: density has mean 1 and coverage 1 - prod (N - i)/(N + M - i) (Naeem et al. 2020, Lemmas 1-2);
    precision and recall are exchangeable (equal means) and high. Averaged over 10 pairs of 600 16-D draws."""
    rng = np.random.default_rng(0)
    found = [prdc(_gauss(rng, 600, 16), _gauss(rng, 600, 16)) for _ in range(10)]
    mean = {k: np.mean([f[k] for f in found]) for k in found[0]}
    se = {k: np.std([f[k] for f in found], ddof=1) / np.sqrt(len(found)) for k in found[0]}
    assert abs(mean["density"] - 1.0) < 4 * se["density"] + 0.02, (mean, se)
    assert abs(mean["coverage"] - expected_coverage(600, 600, PRDC_K)) < 4 * se["coverage"] + 0.005, (mean, se)
    assert abs(mean["precision"] - mean["recall"]) < 4 * np.hypot(se["precision"], se["recall"]) + 0.01
    assert mean["precision"] > 0.6 and mean["recall"] > 0.6


def test_disjoint_supports_give_zero_and_a_collapse_keeps_precision_but_loses_recall():
    rng = np.random.default_rng(1)
    real = _gauss(rng, 500)
    far = prdc(real, _gauss(rng, 500, shift=50.0))
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    collapsed = prdc(real, _gauss(rng, 500, scale=0.05))  # every sample at the mode: faithful, not diverse
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.1 and collapsed["coverage"] < 0.2
    with pytest.raises(ValueError, match="more than 5 items"):
        prdc(real[:5], real)


def test_expected_coverage_closed_form():
    assert expected_coverage(10, 10, 1) == pytest.approx(1 - 9 / 19)
    assert expected_coverage(10_000, 10_000, 5) == pytest.approx(1 - 0.5 ** 5, abs=1e-3)


def test_fid_bootstrap_is_centred_on_the_exact_fid():
    """The interval's centre is FID itself through the Gram identity (to float64 rounding), N below and above D."""
    rng = np.random.default_rng(2)
    reference = _gauss(rng, 400, 16)
    for n in (12, 300):
        sample = _gauss(rng, n, 16, shift=0.2, scale=1.2)
        low, high = fid_bootstrap(sample, reference, resamples=20)
        assert (low + high) / 2 == pytest.approx(fid_by_svd(sample, reference), rel=1e-10)
        assert low < high


def test_fid_bootstrap_interval_covers_at_its_stated_rates():
    """Simulation on Gaussian features with N well above D: the 95 % interval from one sample set covers the mean
    FID at that N at >= 95 % (up to Monte Carlo error), and the FID of a second independent set at
    2 Φ(1.96 / √2) - 1 = 83 %."""
    rng = np.random.default_rng(3)
    reference = _gauss(rng, 300, 2)
    draw = lambda: _gauss(rng, 150, 2, shift=0.2, scale=1.2)  # noqa: E731
    with threadpool_limits(1):  # small matrices: BLAS threads only contend
        mean_fid = np.mean([fid_by_svd(draw(), reference) for _ in range(3000)])
        trials, second, mean = 150, 0, 0
        for i in range(trials):
            low, high = fid_bootstrap(draw(), reference, resamples=30, seed=i)
            second += low <= fid_by_svd(draw(), reference) <= high
            mean += low <= mean_fid <= high
    stated = 2 * norm.cdf(norm.ppf(0.975) / np.sqrt(2)) - 1
    se = np.sqrt(stated * (1 - stated) / trials)
    assert abs(second / trials - stated) < 3 * se, (second / trials, stated)
    assert mean / trials > 0.95 - 3 * np.sqrt(0.95 * 0.05 / trials), mean / trials


def test_fid_over_sets_by_hand_and_its_spread_is_the_seed_to_seed_spread():
    """Mean, min and ddof-1 spread by hand; on Gaussian features the spread of K sets estimates the standard
    deviation of one set's FID over independent draws (here 400 draws), within its chi-square 99 % band."""
    found = fid_over_sets([3.0, 1.0, 2.0])
    assert found == {"fid_mean": 2.0, "fid_min": 1.0, "fid_std": 1.0, "fid_sets": 3,
                     "fid_per_set": {"0": 3.0, "1": 1.0, "2": 2.0}}
    with pytest.raises(ValueError, match="at least 2 sets"):
        fid_over_sets([1.0])
    rng = np.random.default_rng(5)
    reference = _gauss(rng, 300, 2)
    draw = lambda: _gauss(rng, 100, 2, shift=0.3)  # noqa: E731
    with threadpool_limits(1):
        sd = np.std([fid_by_svd(draw(), reference) for _ in range(400)], ddof=1)
        k = 30
        spread = fid_over_sets([fid_by_svd(draw(), reference) for _ in range(k)])["fid_std"]
    from scipy.stats import chi2

    low, high = np.sqrt(chi2.ppf([0.005, 0.995], k - 1) / (k - 1))  # s / sigma for k normal draws
    assert low * 0.9 < spread / sd < high * 1.1, (spread, sd)  # 10 %: sd is itself estimated from 400 draws


def test_sample_n_auto_draws_every_fid_set_and_a_short_one_is_refused():
    digits = {"kind": "images", "shape": [1, 8, 8], "n_test": 360, "n_reference": 360}
    assert defaults.sample_sizes("auto", "auto", 100, digits, fid_seeds=3)[0] == 300
    assert defaults.sample_sizes("auto", "auto", "auto", digits)[0] == 360  # fid_n auto: at most the test split
    assert defaults.sample_sizes(500, "auto", 100, digits, fid_seeds=3)[0] == 500
    with pytest.raises(ValueError, match=r"sample.n \(250\) must be >= eval.fid_seeds x eval.fid_n \(300\)"):
        defaults.sample_sizes(250, "auto", 100, digits, fid_seeds=3)


def test_fid_bootstrap_is_wider_than_the_spread_when_features_outnumber_samples():
    """With D above N (2,048-D Inception features of 2,000 images are there) resampling with replacement loses
    rank, and the bootstrap spread exceeds the true spread of FID across sample sets (2-3 x here, measured): the
    interval is conservative there, never too narrow. docs/images.md states it."""
    rng = np.random.default_rng(6)
    reference = _gauss(rng, 200, 200)
    draw = lambda: _gauss(rng, 100, 200, shift=0.2, scale=1.2)  # noqa: E731
    with threadpool_limits(1):
        true_sd = np.std([fid_by_svd(draw(), reference) for _ in range(300)], ddof=1)
        halves = [np.diff(fid_bootstrap(draw(), reference, resamples=30, seed=i))[0] / 2 for i in range(20)]
    assert np.mean(halves) / norm.ppf(0.975) > 1.5 * true_sd


def test_nearest_distances_match_brute_force_on_points_and_pixels():
    rng = np.random.default_rng(4)
    items, train = rng.normal(size=(50, 3)), rng.normal(size=(700, 3))
    np.testing.assert_allclose(nearest_distances(items, train, block=64), cdist(items, train).min(1), rtol=1e-12)
    pix, pix_train = (rng.integers(0, 256, size=(20, 1, 4, 4), dtype=np.uint8),
                      rng.integers(0, 256, size=(300, 1, 4, 4), dtype=np.uint8))
    brute = cdist(pix.reshape(20, -1).astype(float), pix_train.reshape(300, -1).astype(float)).min(1)
    np.testing.assert_allclose(nearest_distances(pix, pix_train, block=64), brute, rtol=1e-5)


def test_memorised_fraction_sees_copies_and_fresh_draws_sit_at_the_quantile():
    """Copies of training items are all memorised; fresh draws of the data's law are memorised at about the stated
    quantile (binomial error), as the reference split (the floor) is."""
    rng = np.random.default_rng(5)
    train, test, reference = _gauss(rng, 4000, 2), _gauss(rng, 2000, 2), _gauss(rng, 2000, 2)
    copies = memorisation(train[:2000], test, reference, train, 0.05)
    assert copies["memorised"] == 1.0 and copies["memorised_quantile"] == 0.05
    fresh = memorisation(_gauss(rng, 2000, 2), test, reference, train, 0.05)
    se = np.sqrt(0.05 * 0.95 / 2000)
    assert abs(fresh["memorised"] - 0.05) < 4 * se and abs(fresh["memorised_floor"] - 0.05) < 4 * se
