"""Tests for pipeline.metrics.conditional: class fidelity, per-class FID at equal N, the point classifiers, the table.

FIDs are of low-dimensional Gaussian features (D = 4), where the Fréchet distance is known: ‖μa − μb‖² for
equal covariances, plus a bias of order D²/N. The Bayes accuracies are computed independently of
pipeline.gmm: in closed form in 1-D (equal variances, one threshold) and by quadrature on a grid in 2-D.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from pipeline.data.toy2d import eight_gaussians_labelled, moons_labelled
from pipeline.gmm import GaussianMixture
from pipeline.metrics import conditional
from pipeline.metrics.fid import fid_by_svd, fid_from_features

# sqrtm warns that the covariance product of a few points is singular; expected for the 3-point class.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Matrix is singular:scipy.linalg.LinAlgWarning"),
]

D = 4


def test_cond_accuracy_known_values():
    assert conditional.cond_accuracy(np.array([0, 1, 2, 1]), np.array([0, 1, 1, 1])) == 0.75
    assert conditional.cond_accuracy(np.array([3]), np.array([3])) == 1.0
    assert conditional.cond_accuracy(np.array([0, 0]), np.array([1, 1])) == 0.0
    assert conditional.cond_accuracy([2, 0, 1], np.array([2, 0, 1], dtype=np.int32)) == 1.0


@pytest.mark.parametrize("predicted, requested", [
    (np.array([0, 1]), np.array([0, 1, 1])),        # lengths differ
    (np.array([], dtype=np.int64), np.array([], dtype=np.int64)),  # no sample
    (np.array([[0, 1]]), np.array([[0, 1]])),        # not (N,)
    (np.array([0.0, 1.0]), np.array([0, 1])),        # not integers
])
def test_cond_accuracy_refusals(predicted, requested):
    with pytest.raises(ValueError):
        conditional.cond_accuracy(predicted, requested)


def _labelled_gaussians(rng, counts: dict[int, int], means: dict[int, np.ndarray]):
    """Features (N, D) of N(means[k], I) for counts[k] rows of each class k, rows shuffled, and their labels."""
    labels = np.concatenate([np.full(n, k, dtype=np.int64) for k, n in counts.items()])
    labels = labels[rng.permutation(labels.size)]
    feats = np.stack([means[k] for k in labels]) + rng.standard_normal((labels.size, D))
    return feats, labels


@pytest.fixture(scope="module")
def per_class_sets():
    """Samples, test and reference features of 5 classes: class 0's samples shifted by (2, 2, 2, 2) from its
    test features, class 1's from the same Gaussian; class 2 has 3 samples (50 test), class 3 one sample,
    class 4 ten samples but one reference row."""
    rng = np.random.default_rng(0)
    means = {k: np.eye(D)[k % D] * 5 * k for k in range(5)}
    sample_means = dict(means)
    sample_means[0] = means[0] + 2.0
    samples = _labelled_gaussians(rng, {0: 400, 1: 400, 2: 3, 3: 1, 4: 10}, sample_means)
    test = _labelled_gaussians(rng, {0: 450, 1: 400, 2: 50, 3: 50, 4: 10}, means)
    reference = _labelled_gaussians(rng, {0: 400, 1: 400, 2: 50, 3: 50, 4: 1}, means)
    return samples, test, reference


def test_per_class_fid_shifted_class_is_far_and_matched_class_at_its_floor(per_class_sets):
    (sx, sy), (tx, ty), (rx, ry) = per_class_sets
    out = conditional.per_class_fid(sx, sy, tx, ty, rx, ry, num_classes=5)
    fid, floor = out["fid_per_class"], out["fid_per_class_floor"]
    assert out["fid_per_class_n"] == [400, 400, 3, 1, 10]
    assert out["fid_per_class_floor_n"] == [400, 400, 3, 1, 1]
    # Class 0: ‖Δμ‖² = 4 · 2² = 16; the estimate's sampling std is ~0.6 at N = 400, its bias ~0.05.
    assert abs(fid[0] - 16.0) < 2.5
    assert floor[0] < 0.3
    # Class 1: samples and test from one Gaussian, so its FID is the floor's noise.
    assert fid[1] < 0.3 and floor[1] < 0.3
    assert abs(fid[1] - floor[1]) < 0.2
    assert fid[3] is None and floor[3] is None  # one sample: no covariance
    assert fid[4] is not None and floor[4] is None  # one reference row: no floor
    assert out["fid_class_mean"] == pytest.approx(np.mean([fid[0], fid[1], fid[2], fid[4]]))
    assert out["fid_class_mean_floor"] == pytest.approx(np.mean([floor[0], floor[1], floor[2]]))


def test_per_class_fid_equal_n(per_class_sets):
    """Class 2 has 3 samples and 50 test rows: its FID and floor use the first 3 rows of each side."""
    (sx, sy), (tx, ty), (rx, ry) = per_class_sets
    out = conditional.per_class_fid(sx, sy, tx, ty, rx, ry, num_classes=5)
    expected = fid_by_svd(sx[sy == 2], tx[ty == 2][:3])
    assert out["fid_per_class"][2] == pytest.approx(expected, rel=1e-12)
    assert out["fid_per_class_floor"][2] == pytest.approx(fid_by_svd(rx[ry == 2][:3], tx[ty == 2][:3]), rel=1e-12)
    # Against all 50 test rows the value differs: the equal-N rule is what was applied.
    assert abs(fid_by_svd(sx[sy == 2], tx[ty == 2]) - expected) > 1e-3
    assert out["fid_per_class"][0] == pytest.approx(fid_from_features(sx[sy == 0], tx[ty == 0][:400]), rel=1e-9)


@pytest.mark.parametrize("n, m, d", [(400, 300, 6), (30, 50, 64), (3, 3, 4)])
def test_fid_by_svd_is_clean_fids_fid(n, m, d):
    """The singular-value form of Tr((Σa Σb)^½) is clean-fid's sqrtm FID: to 1e-9 with full-rank covariances
    (N > D), and to sqrtm's own accuracy (~1e-6 relative, docs/design.md, "Metrics, defined once") when N <= D makes them singular."""
    g = np.random.default_rng(n + d)
    a = g.normal(size=(n, d)) @ g.normal(size=(d, d))
    b = g.normal(size=(m, d)) @ g.normal(size=(d, d)) + 0.5
    rel = 1e-9 if min(n, m) > d else 1e-5
    assert fid_by_svd(a, b) == pytest.approx(fid_from_features(a, b), rel=rel)


def test_per_class_fid_without_reference_and_min_n(per_class_sets):
    (sx, sy), (tx, ty), _ = per_class_sets
    out = conditional.per_class_fid(sx, sy, tx, ty, num_classes=5, min_n=5)
    assert out["fid_per_class_floor"] == [None] * 5
    assert out["fid_class_mean_floor"] is None
    assert out["fid_per_class"][2] is None  # 3 < min_n
    assert out["fid_class_mean"] == pytest.approx(np.mean([out["fid_per_class"][k] for k in (0, 1, 4)]))
    # A class absent from the samples has n 0 and no FID; with none present the mean is None.
    none = conditional.per_class_fid(sx[sy == 3], sy[sy == 3], tx, ty, num_classes=5)
    assert none["fid_per_class"] == [None] * 5 and none["fid_class_mean"] is None
    assert none["fid_per_class_n"] == [0, 0, 0, 1, 0]


def test_per_class_fid_refusals(per_class_sets):
    (sx, sy), (tx, ty), (rx, ry) = per_class_sets
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        conditional.per_class_fid(sx, sy, tx, ty, num_classes=4)  # label 4 out of range
    with pytest.raises(ValueError, match="sample_labels"):
        conditional.per_class_fid(sx, sy[:-1], tx, ty, num_classes=5)
    with pytest.raises(ValueError, match="together"):
        conditional.per_class_fid(sx, sy, tx, ty, rx, None, num_classes=5)
    with pytest.raises(ValueError, match="min_n"):
        conditional.per_class_fid(sx, sy, tx, ty, num_classes=5, min_n=1)
    with pytest.raises(ValueError, match="dimensions"):
        conditional.per_class_fid(sx[:, :3], sy, tx, ty, num_classes=5)
    with pytest.raises(ValueError, match="integer"):
        conditional.per_class_fid(sx, sy.astype(float), tx, ty, num_classes=5)


def test_knn_on_separated_blobs():
    rng = np.random.default_rng(1)
    centres = np.array([[-4.0, 0.0], [4.0, 0.0]])
    train_y = np.repeat([0, 1], 200)
    train_x = centres[train_y] + 0.5 * rng.standard_normal((400, 2))
    requested = np.repeat([0, 1], 100)
    x = centres[requested] + 0.5 * rng.standard_normal((200, 2))
    pred = conditional.point_class_predictions(train_x, train_y, x)
    assert pred.dtype == np.int64 and pred.shape == (200,)
    assert conditional.cond_accuracy(pred, requested) == 1.0
    assert conditional.cond_accuracy(pred, 1 - requested) == 0.0  # every sample of the other class
    assert conditional.point_class_predictions(train_x, train_y, np.empty((0, 2))).shape == (0,)
    with pytest.raises(ValueError, match="k must"):
        conditional.point_class_predictions(train_x, train_y, x, k=401)
    with pytest.raises(ValueError, match="coordinates"):
        conditional.point_class_predictions(train_x, train_y, x[:, :1])
    with pytest.raises(ValueError, match="train_y"):
        conditional.point_class_predictions(train_x, train_y[:-1], x)


def test_knn_on_toy_sets_reaches_the_bayes_accuracy():
    """moons (noise 0.05) are separable; 8gaussians' Bayes accuracy is E[max_k p(k | x)] of its mixture."""
    x_train, y_train = moons_labelled(2000, seed=0, noise=0.05)
    x_test, y_test = moons_labelled(1000, seed=1, noise=0.05)
    assert conditional.cond_accuracy(conditional.point_class_predictions(x_train, y_train, x_test), y_test) > 0.99

    x_train, y_train = eight_gaussians_labelled(4000, seed=0)
    x_test, y_test = eight_gaussians_labelled(4000, seed=1)
    h = 1.0 / math.sqrt(2.0)
    centres = 4.0 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (h, h), (h, -h), (-h, h), (-h, -h)]) / 1.414
    mixture = GaussianMixture.from_params([1 / 8] * 8, centres.tolist(), [[(0.5 / 1.414) ** 2] * 2] * 8)
    big = mixture.sample(40000, torch.Generator().manual_seed(2))
    bayes = float(mixture.responsibilities(big).max(dim=1).values.mean())
    knn = conditional.cond_accuracy(conditional.point_class_predictions(x_train, y_train, x_test), y_test)
    se = math.sqrt(bayes * (1 - bayes) / len(y_test))
    assert bayes - 0.01 < knn < bayes + 4 * se


def _phi(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_mixture_predictions_1d_threshold_and_bayes_accuracy():
    """π = (0.3, 0.7), μ = (−1, 1), σ = 1: the Bayes rule is x < x* = ln(π0 / π1) / 2 -> class 0, accuracy
    π0 Φ(x* + 1) + π1 (1 − Φ(x* − 1))."""
    mixture = GaussianMixture.from_params([0.3, 0.7], [[-1.0], [1.0]], [[1.0], [1.0]])
    x, y = mixture.sample_labelled(40000, torch.Generator().manual_seed(0))
    pred = conditional.mixture_class_predictions(mixture, x.numpy())
    threshold = 0.5 * math.log(0.3 / 0.7)
    np.testing.assert_array_equal(pred, (x.numpy()[:, 0] >= threshold).astype(np.int64))
    bayes = 0.3 * _phi(threshold + 1.0) + 0.7 * (1.0 - _phi(threshold - 1.0))
    se = math.sqrt(bayes * (1 - bayes) / len(y))
    assert abs(conditional.cond_accuracy(pred, y.numpy()) - bayes) < 4 * se


def test_mixture_predictions_2d_argmax_and_bayes_accuracy():
    """Unequal covariances (a curved boundary); the Bayes accuracy ∫ max_k π_k N_k(x) dx by a grid sum."""
    weights, means = [0.4, 0.6], [[0.0, 0.0], [1.5, 0.5]]
    covs = [[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.6], [0.6, 0.8]]]
    mixture = GaussianMixture.from_params(weights, means, covs)
    x, y = mixture.sample_labelled(40000, torch.Generator().manual_seed(1))
    pred = conditional.mixture_class_predictions(mixture, x.numpy())
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred, mixture.responsibilities(x).argmax(dim=1).numpy())

    step = 0.02
    g = np.arange(-10.0, 12.0, step)
    grid = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)
    dens = np.stack([w * multivariate_normal(m, c).pdf(grid) for w, m, c in zip(weights, means, covs)])
    assert dens.sum() * step**2 == pytest.approx(1.0, abs=1e-6)  # the grid holds the whole mass
    bayes = float(dens.max(axis=0).sum() * step**2)
    se = math.sqrt(bayes * (1 - bayes) / len(y))
    assert abs(conditional.cond_accuracy(pred, y.numpy()) - bayes) < 4 * se
    with pytest.raises(ValueError, match="dimension"):
        conditional.mixture_class_predictions(mixture, x.numpy()[:, :1])


def test_guidance_table_formats_and_sorts():
    rows = [
        {"w": 3.0, "cond_accuracy": 0.98765, "fid": 12.345678, "fid_domain": 1.5, "kid": 0.00123456,
         "fid_class_mean": 20.0, "other": "ignored"},
        {"w": 0, "cond_accuracy": 0.5, "fid": None, "kid": 0.002},
        {"w": -1.0, "fid_domain": float("nan"), "fid_class_mean": 7},
    ]
    assert conditional.guidance_table(rows) == (
        "| w | cond_accuracy | fid | fid_domain | kid | fid_class_mean |\n"
        "|---:|---:|---:|---:|---:|---:|\n"
        "| -1 | — | — | — | — | 7 |\n"
        "| 0 | 0.5 | — | — | 0.002 | — |\n"
        "| 3 | 0.9877 | 12.35 | 1.5 | 0.001235 | 20 |\n"
    )
    with pytest.raises(ValueError, match="at least one row"):
        conditional.guidance_table([])
    with pytest.raises(ValueError, match="'w'"):
        conditional.guidance_table([{"fid": 1.0}])
