"""Gaussian mixtures with closed-form log-density and score at every noise level.

A mixture sum_k pi_k N(mu_k, Sigma_k) pushed through x_t = m(t) x0 + s(t) z is again
a mixture sum_k pi_k N(m mu_k, m^2 Sigma_k + s^2 I) (docs/references.md, "Exact scores for
testing"), so samplers and likelihoods can be checked without training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from pipeline.mixture import mixture_arrays


@dataclass(frozen=True)
class GaussianMixture:
    """A Gaussian mixture in R^D: weights (K,), means (K, D), covs (K, D, D), float64."""

    weights: Tensor
    means: Tensor
    covs: Tensor

    @classmethod
    def from_params(cls, weights: Sequence[float], means: Sequence[Sequence[float]], covs: Sequence) -> "GaussianMixture":
        """Build and validate a mixture (pipeline.mixture); each cov is a length-D diagonal or a DxD matrix."""
        w, mu, cov = mixture_arrays(weights, means, covs)
        return cls(torch.from_numpy(w), torch.from_numpy(mu), torch.from_numpy(cov))

    @property
    def dim(self) -> int:
        """The data dimension D."""
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw n points, shape (n, D), float64."""
        return self.sample_labelled(n, generator)[0]

    def sample_labelled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n points (n, D) float64 and the component each came from (n,) int64 (its class label)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[k] + torch.einsum("nij,nj->ni", chol[k], z), k

    def _components(self, x: Tensor, mean_coef: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """Per-component log pi_k N(x; m mu_k, m^2 Sigma_k + s^2 I) (B, K) and Sigma_t^-1 (x - m mu_k) (B, K, D)."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        m = mean_coef.reshape(-1, 1, 1, 1)
        s = std.reshape(-1, 1, 1, 1)
        diff = x[:, None, :] - m[..., 0] * self.means[None]  # (B, K, D)
        if (mean_coef == mean_coef[0]).all() and (std == std[0]).all():
            m, s = m[:1], s[:1]  # one time for the whole batch (samplers): factor K matrices, not B*K
        cov_t = m**2 * self.covs[None] + s**2 * eye  # (B or 1, K, D, D)
        chol = torch.linalg.cholesky(cov_t).expand(x.shape[0], -1, -1, -1)
        prec_diff = torch.cholesky_solve(diff[..., None], chol)[..., 0]
        maha = (diff * prec_diff).sum(-1)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_n = -0.5 * (maha + logdet + self.dim * math.log(2 * math.pi))
        return torch.log(self.weights)[None] + log_n, prec_diff

    def _broadcast(self, x: Tensor, mean_coef, std) -> tuple[Tensor, Tensor, Tensor]:
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        if x64.shape[1] != self.dim:
            raise ValueError(f"mixture has dimension {self.dim}, x has {x64.shape[1]} features")
        b = x.shape[0]
        m = torch.as_tensor(mean_coef, dtype=torch.float64).expand(b) if torch.as_tensor(mean_coef).ndim == 0 else torch.as_tensor(mean_coef, dtype=torch.float64).reshape(b)
        s = torch.as_tensor(std, dtype=torch.float64).expand(b) if torch.as_tensor(std).ndim == 0 else torch.as_tensor(std, dtype=torch.float64).reshape(b)
        return x64, m, s

    def log_prob(self, x: Tensor, mean_coef=1.0, std=0.0) -> Tensor:
        """log p_t(x) of the perturbed mixture, x of shape (B, *D) with prod(D) = dim; returns (B,)."""
        x64, m, s = self._broadcast(x, mean_coef, std)
        log_comp, _ = self._components(x64, m, s)
        return torch.logsumexp(log_comp, dim=1).to(x.dtype)

    def score(self, x: Tensor, mean_coef=1.0, std=0.0) -> Tensor:
        """grad_x log p_t(x) = -sum_k r_k(x) Sigma_{t,k}^-1 (x - m mu_k); same shape and dtype as x."""
        x64, m, s = self._broadcast(x, mean_coef, std)
        log_comp, prec_diff = self._components(x64, m, s)
        resp = torch.softmax(log_comp, dim=1)
        return (-(resp[..., None] * prec_diff).sum(1)).reshape(x.shape).to(x.dtype)

    def denoise(self, x: Tensor, mean_coef=1.0, std=0.0) -> Tensor:
        """E[x0 | x_t = x] for x_t = m x0 + s z: sum_k r_k(x) (mu_k + m Sigma_k Sigma_{t,k}^-1 (x − m mu_k)), the
        Gaussian posterior mean of each component weighted by its responsibility; same shape and dtype as x.
        Defined at m = 0 (the mixture's mean), where Tweedie's (x + s² score) / m is not."""
        x64, m, s = self._broadcast(x, mean_coef, std)
        log_comp, prec_diff = self._components(x64, m, s)
        resp = torch.softmax(log_comp, dim=1)
        post = self.means[None] + m[:, None, None] * torch.einsum("kij,bkj->bki", self.covs, prec_diff)
        return (resp[..., None] * post).sum(1).reshape(x.shape).to(x.dtype)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities r_k(x) under the clean mixture, (B, K)."""
        x64, m, s = self._broadcast(x, 1.0, 0.0)
        log_comp, _ = self._components(x64, m, s)
        return torch.softmax(log_comp, dim=1)

    def responsibility_moments(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Estimates of (weights, means, covs) from samples x (N, D) using the true responsibilities.

        For x ~ p: E[r_k] = pi_k, E[r_k x] / pi_k = mu_k and E[r_k (x-mu_k)(x-mu_k)^T] / pi_k = Sigma_k
        exactly, so these sample averages recover the mixture within sampling error iff x ~ p.
        """
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        r = self.responsibilities(x64)  # (N, K)
        w = r.mean(0)
        mu = (r[..., None] * x64[:, None, :]).mean(0) / w[:, None]
        d = x64[:, None, :] - self.means[None]
        cov = torch.einsum("nk,nki,nkj->kij", r, d, d) / x64.shape[0] / w[:, None, None]
        return w, mu, cov

    def moment_errors(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """For weights, means, covs: (estimate - truth, standard error) of responsibility_moments(x).

        The estimates are ratios of sample means A_bar / B_bar with B = r_k; the delta method gives
        their standard error std(a_i - (A_bar / B_bar) b_i) / (B_bar sqrt(N)) (for the weights,
        std(r_k) / sqrt(N)). Valid when x holds N independent draws; |error| / SE is then about N(0, 1).
        """
        w, mu, cov = self.responsibility_moments(x)
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        n = x64.shape[0]
        r = self.responsibilities(x64)  # (N, K)
        se_w = r.std(0) / n**0.5
        infl_mu = r[..., None] * (x64[:, None, :] - mu[None])  # (N, K, D)
        se_mu = infl_mu.std(0) / (w[:, None] * n**0.5)
        d = x64[:, None, :] - self.means[None]
        infl_cov = r[..., None, None] * (d[..., :, None] * d[..., None, :] - cov[None])  # (N, K, D, D)
        se_cov = infl_cov.std(0) / (w[:, None, None] * n**0.5)
        return {"weights": (w - self.weights, se_w), "means": (mu - self.means, se_mu), "covs": (cov - self.covs, se_cov)}


def mixture_metrics(mixture: GaussianMixture, generated: Tensor, test: Tensor) -> dict[str, float]:
    """What evaluate reports on gmm data: generated (N, D) against the mixture, test (M, D) under it.

    gmm_<moment>_err: the largest error of the weights, means and covariances estimated from the
    generated points; gmm_<moment>_z: the same in standard errors (about N(0, 1) for exact samples);
    nll_true: the held-out points' true negative log-likelihood in nats/dim, a model's nll target.
    """
    out = {}
    for key, (err, se) in mixture.moment_errors(generated).items():
        out[f"gmm_{key}_err"] = float(err.abs().max())
        out[f"gmm_{key}_z"] = float((err.abs() / se).max())
    out["nll_true"] = float(-mixture.log_prob(test.to(torch.float64)).mean()) / mixture.dim
    return out


def likelihood_gaps(mixture: GaussianMixture, x: Tensor, likelihoods: dict[str, float]) -> dict[str, float]:
    """The true nats/dim of the points x (N, *D) a model's likelihoods were computed on (`nll_true_subset`),
    and each of the model's `nll` / `elbo_nll` minus it (`nll_gap`, `elbo_nll_gap`)."""
    true = float(-mixture.log_prob(x.reshape(len(x), -1).to(torch.float64)).mean()) / mixture.dim
    out = {"nll_true_subset": true}
    out.update({f"{key}_gap": likelihoods[key] - true for key in ("nll", "elbo_nll") if key in likelihoods})
    return out
