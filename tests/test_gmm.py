"""Tests for pipeline.gmm: closed-form log-density and score of a perturbed Gaussian mixture.

The perturbed mixture is sum_k pi_k N(m mu_k, m^2 Sigma_k + s^2 I) (docs/references.md, "Exact
scores for testing"); scipy gives the reference density, autograd the reference score.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from pipeline.gmm import GaussianMixture

MIX3 = dict(
    weights=[0.2, 0.5, 0.3],
    means=[[-2.0, 0.5], [1.0, 1.0], [0.5, -2.5]],
    covs=[[[1.0, 0.6], [0.6, 0.8]], [[0.5, -0.2], [-0.2, 1.5]], [0.3, 0.7]],
)
MIX1 = dict(weights=[0.3, 0.7], means=[[-1.5], [2.0]], covs=[[0.4], [[1.3]]])


def _scipy_logpdf(params, x, m, s):
    """log sum_k pi_k N(x; m mu_k, m^2 Sigma_k + s^2 I) with scipy, x (B, D) numpy."""
    g = GaussianMixture.from_params(**params)
    w, mu, cov = g.weights.numpy(), g.means.numpy(), g.covs.numpy()
    eye = np.eye(g.dim)
    m = np.broadcast_to(np.asarray(m, dtype=np.float64), (len(x),))
    s = np.broadcast_to(np.asarray(s, dtype=np.float64), (len(x),))
    out = np.empty(len(x))
    for b in range(len(x)):
        comps = [np.log(w[k]) + stats.multivariate_normal(m[b] * mu[k], m[b] ** 2 * cov[k] + s[b] ** 2 * eye).logpdf(x[b])
                 for k in range(len(w))]
        out[b] = logsumexp(comps)
    return out


@pytest.mark.parametrize("params", [MIX3, MIX1], ids=["3comp-2d", "2comp-1d"])
@pytest.mark.parametrize("m, s", [(1.0, 0.0), (0.7, 0.5), (1.0, 2.0)])
def test_log_prob_matches_scipy(params, m, s):
    g = GaussianMixture.from_params(**params)
    x = torch.randn(64, g.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    got = g.log_prob(x, m, s)
    assert got.shape == (64,)
    np.testing.assert_allclose(got.numpy(), _scipy_logpdf(params, x.numpy(), m, s), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("params", [MIX3, MIX1], ids=["3comp-2d", "2comp-1d"])
def test_log_prob_per_example_mean_coef_and_std(params):
    g = GaussianMixture.from_params(**params)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, g.dim, generator=gen, dtype=torch.float64)
    m = torch.rand(32, generator=gen, dtype=torch.float64) * 0.9 + 0.1
    s = torch.rand(32, generator=gen, dtype=torch.float64) * 2
    got = g.log_prob(x, m, s)
    assert got.shape == (32,)
    np.testing.assert_allclose(got.numpy(), _scipy_logpdf(params, x.numpy(), m.numpy(), s.numpy()), rtol=1e-10, atol=1e-10)


def test_log_prob_keeps_dtype():
    g = GaussianMixture.from_params(**MIX3)
    x = torch.randn(8, 2)
    assert g.log_prob(x, 0.7, 0.5).dtype == torch.float32
    assert g.score(x, 0.7, 0.5).dtype == torch.float32


def _autograd_score(g, x, m, s):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(g.log_prob(x, m, s).sum(), x)
    return grad


@pytest.mark.parametrize("params", [MIX3, MIX1], ids=["3comp-2d", "2comp-1d"])
@pytest.mark.parametrize("m, s", [(1.0, 0.0), (0.7, 0.5), (0.3, 1.5), (1.0, 0.01)])
def test_score_is_gradient_of_log_prob(params, m, s):
    g = GaussianMixture.from_params(**params)
    x = torch.randn(50, g.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    np.testing.assert_allclose(g.score(x, m, s).numpy(), _autograd_score(g, x, m, s).numpy(), rtol=1e-9, atol=1e-9)


def test_score_per_example_tensors():
    g = GaussianMixture.from_params(**MIX3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 2
    m = torch.rand(40, generator=gen, dtype=torch.float64) + 0.1
    s = torch.rand(40, generator=gen, dtype=torch.float64) * 3
    np.testing.assert_allclose(g.score(x, m, s).numpy(), _autograd_score(g, x, m, s).numpy(), rtol=1e-9, atol=1e-9)
    # Per-example values are really used: example b equals the scalar call at (m_b, s_b).
    b = 7
    np.testing.assert_allclose(g.score(x[b:b + 1], float(m[b]), float(s[b])).numpy(), g.score(x, m, s)[b:b + 1].numpy(),
                               rtol=1e-12)


def test_score_on_image_shaped_x():
    gen = torch.Generator().manual_seed(4)
    d = 64
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    cov_full = (a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)).tolist()
    g = GaussianMixture.from_params([0.6, 0.4], torch.randn(2, d, generator=gen, dtype=torch.float64).tolist(),
                                    [cov_full, [0.7] * d])
    x = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    sc = g.score(x, 0.8, 0.3)
    assert sc.shape == x.shape
    np.testing.assert_allclose(sc.numpy(), _autograd_score(g, x, 0.8, 0.3).numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sc.reshape(6, -1).numpy(), g.score(x.reshape(6, -1), 0.8, 0.3).numpy(), rtol=0, atol=0)
    assert g.log_prob(x, 0.8, 0.3).shape == (6,)


def test_wrong_feature_count_raises():
    g = GaussianMixture.from_params(**MIX3)
    with pytest.raises(ValueError, match="dimension"):
        g.score(torch.zeros(4, 3))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=[0.5, 0.6], means=[[0.0], [1.0]], covs=[[1.0], [1.0]]), "sum to 1"),
    (dict(weights=[1.2, -0.2], means=[[0.0], [1.0]], covs=[[1.0], [1.0]]), "> 0"),
    (dict(weights=[0.5, 0.5], means=[[0.0, 0.0]], covs=[[1.0, 1.0], [1.0, 1.0]]), "K weights"),
    (dict(weights=[0.5, 0.5], means=[[0.0, 0.0], [1.0, 1.0]], covs=[[1.0, 1.0]]), "one covariance per component"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[1.0, 1.0, 1.0]]), "2 entries"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[[1.0, 0.0, 0.0]] * 3]), "2x2"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[1.0, -1.0]]), "> 0"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[[1.0, 2.0], [2.0, 1.0]]]), "positive definite"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[[1.0, 0.5], [0.0, 1.0]]]), "symmetric"),
])
def test_from_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture.from_params(**kwargs)


def test_from_params_accepts_diagonal_and_full():
    g = GaussianMixture.from_params(**MIX3)
    assert g.dim == 2 and g.covs.shape == (3, 2, 2) and g.covs.dtype == torch.float64
    torch.testing.assert_close(g.covs[2], torch.diag(torch.tensor([0.3, 0.7], dtype=torch.float64)))


# --------------------------------------------------------------------------- sampling


def test_sample_moments():
    g = GaussianMixture.from_params(**MIX3)
    n = 200_000
    x = g.sample(n, torch.Generator().manual_seed(5))
    assert x.shape == (n, 2) and x.dtype == torch.float64
    w, mu, cov = g.weights, g.means, g.covs
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0)
    total_cov = second - mean[:, None] * mean[None]
    # Standard error of the sample mean: sqrt(diag(total_cov) / n) ~ 0.004; allow 5 SE.
    se = torch.sqrt(torch.diagonal(total_cov) / n)
    assert ((x.mean(0) - mean).abs() < 5 * se).all()
    # Covariance: entries within 0.03 (SE of a variance of ~3 with n=2e5 and these tails is ~0.01).
    torch.testing.assert_close(torch.cov(x.T), total_cov, atol=0.03, rtol=0)


def test_sample_same_seed_same_bits():
    g = GaussianMixture.from_params(**MIX3)
    a = g.sample(1000, torch.Generator().manual_seed(6))
    b = g.sample(1000, torch.Generator().manual_seed(6))
    c = g.sample(1000, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------- responsibility moments


def test_responsibility_moments_recover_the_mixture():
    """Estimates from true samples lie within 4 empirical standard errors of the truth.

    The SE of each estimate comes from R independent repeats (its spread across repeats),
    and the test checks the pooled mean of the repeats against the truth with SE/sqrt(R).
    """
    g = GaussianMixture.from_params(**MIX3)
    reps, n = 8, 20_000
    ests = [g.responsibility_moments(g.sample(n, torch.Generator().manual_seed(100 + r))) for r in range(reps)]
    for i, truth in enumerate((g.weights, g.means, g.covs)):
        e = torch.stack([est[i] for est in ests])  # (R, ...)
        se = e.std(0) / reps**0.5  # SE of the mean of R repeats
        z = (e.mean(0) - truth).abs() / se
        assert (z < 4).all(), (i, z)
        # The estimator is precise, not just unbiased: a single run is within 0.05 of the truth.
        assert (e - truth).abs().max() < 0.05


def test_responsibility_moments_detect_wrong_samples():
    g = GaussianMixture.from_params(**MIX3)
    x = g.sample(20_000, torch.Generator().manual_seed(8))
    w, mu, cov = g.responsibility_moments(1.15 * x)  # a slightly over-dispersed sample
    assert (cov - g.covs).abs().max() > 0.1


def test_moment_errors_standard_errors_are_calibrated():
    """Across repeats of true samples, error / SE has about unit spread; a wrong sample is many SE off."""
    g = GaussianMixture.from_params(**MIX3)
    z = []
    for r in range(20):
        errs = g.moment_errors(g.sample(4000, torch.Generator().manual_seed(200 + r)))
        z.append(torch.cat([(e / se).flatten() for e, se in errs.values()]))
    z = torch.stack(z)  # (repeats, moments)
    spread = z.std(0)
    assert (spread > 0.6).all() and (spread < 1.5).all(), spread
    wrong = g.moment_errors(1.15 * g.sample(4000, torch.Generator().manual_seed(9)))
    assert max(float((e.abs() / se).max()) for e, se in wrong.values()) > 5


def test_mixture_metrics_keys_and_nll_true():
    from pipeline.gmm import mixture_metrics

    g = GaussianMixture.from_params(**MIX3)
    gen = g.sample(4000, torch.Generator().manual_seed(10))
    test = g.sample(300, torch.Generator().manual_seed(11))
    m = mixture_metrics(g, gen, test)
    assert set(m) == {f"gmm_{k}_{s}" for k in ("weights", "means", "covs") for s in ("err", "z")} | {"nll_true"}
    assert m["nll_true"] == pytest.approx(float(-g.log_prob(test).mean()) / 2, rel=1e-12)
    assert max(m[f"gmm_{k}_z"] for k in ("weights", "means", "covs")) < 5
