"""Shared test helpers."""

from __future__ import annotations

import pytest
import torch


def responsibility_moment_errors(mixture, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each of weights, means, covs: (estimate - truth, standard error) of mixture.responsibility_moments(x).

    The estimates are ratios of sample means, A_bar / B_bar with B = r_k; the delta method gives
    their standard error from the per-sample contributions, std(a_i - (A_bar/B_bar) b_i) / (B_bar sqrt(N))
    (for the weights, std(r_k) / sqrt(N)). Valid when x are N independent draws.
    """
    w, mu, cov = mixture.responsibility_moments(x)
    x64 = x.reshape(x.shape[0], -1).to(torch.float64)
    n = x64.shape[0]
    r = mixture.responsibilities(x64)  # (N, K)
    se_w = r.std(0) / n**0.5
    # means: a_i = r_ik x_i
    infl_mu = r[..., None] * (x64[:, None, :] - mu[None])  # (N, K, D)
    se_mu = infl_mu.std(0) / (w[:, None] * n**0.5)
    # covs: a_i = r_ik d_ik d_ik^T with d = x - true mean
    d = x64[:, None, :] - mixture.means[None]
    infl_cov = r[..., None, None] * (d[..., :, None] * d[..., None, :] - cov[None])  # (N, K, D, D)
    se_cov = infl_cov.std(0) / (w[:, None, None] * n**0.5)
    return {
        "weights": (w - mixture.weights, se_w),
        "means": (mu - mixture.means, se_mu),
        "covs": (cov - mixture.covs, se_cov),
    }


@pytest.fixture
def moment_errors():
    """The function responsibility_moment_errors(mixture, x)."""
    return responsibility_moment_errors
