"""Forward noising processes behind one abstraction; samplers and losses only ask it.

x_t = mean_coef(t) * x0 + std(t) * z. Time t is a tensor of shape (B,); `append_dims`
broadcasts it against x of shape (B, *D), so everything works on points and images.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape v of shape (B,) to (B, 1, ..., 1) with `ndim` dimensions in all."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class Process(ABC):
    """A forward process: marginals, SDE, prior, training-time distribution and sampling grid."""

    @abstractmethod
    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(mean_coef, std) of p(x_t | x0), each of shape (B,)."""

    @abstractmethod
    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(drift f(x, t) shaped like x, diffusion g(t) of shape (B,)) of dx = f dt + g dW."""

    @abstractmethod
    def prior_sample(self, shape: Sequence[int], generator: torch.Generator) -> Tensor:
        """A draw from the prior p_T of the given (B, *D) shape."""

    @abstractmethod
    def prior_logp(self, z: Tensor) -> Tensor:
        """log p_T(z), shape (B,)."""

    @abstractmethod
    def conditioning(self, t: Tensor) -> Tensor:
        """What the network is conditioned on, shape (B,)."""

    @abstractmethod
    def sample_time(self, batch: int, generator: torch.Generator) -> Tensor:
        """Training times, one per example, shape (B,)."""

    @abstractmethod
    def grid(self) -> Tensor:
        """The float64 sampling grid from the prior end to the data end, walked as zip(t[:-1], t[1:])."""

    def perturb(self, x0: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """x_t = mean_coef(t) x0 + std(t) z."""
        m, s = self.marginal(t)
        return append_dims(m, x0.ndim) * x0 + append_dims(s, x0.ndim) * z


class NoiseScaleProcess(Process):
    """NCSN's discrete noise scales as a variance-exploding process with time t = sigma.

    x_sigma = x0 + sigma z (Song & Ermon 2019, arXiv:1907.05600, eq. (5)); as an SDE,
    dx = sqrt(d sigma^2 / d sigma) dW = sqrt(2 sigma) dW, the VE SDE of Song et al. 2021
    (arXiv:2011.13456, eq. (9)) parameterised by sigma itself. The prior is N(0, sigma_1^2 I).
    """

    def __init__(self, sigmas: Sequence[float]):
        s = torch.as_tensor(list(sigmas), dtype=torch.float64)
        if s.ndim != 1 or len(s) < 1 or (s <= 0).any() or (len(s) > 1 and (s[1:] >= s[:-1]).any()):
            raise ValueError("sigmas must be a non-empty, strictly decreasing sequence of positive numbers")
        self.sigmas = s

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), t

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(x), torch.sqrt(2 * t)

    def prior_sample(self, shape: Sequence[int], generator: torch.Generator) -> Tensor:
        return float(self.sigmas[0]) * torch.randn(tuple(shape), generator=generator)

    def prior_logp(self, z: Tensor) -> Tensor:
        s = float(self.sigmas[0])
        d = z[0].numel()
        return -0.5 * (z**2).flatten(1).sum(1) / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def conditioning(self, t: Tensor) -> Tensor:
        return torch.log(t)

    def sample_time(self, batch: int, generator: torch.Generator) -> Tensor:
        """One noise scale per example, uniform over the L scales (NCSN's training distribution)."""
        idx = torch.randint(len(self.sigmas), (batch,), generator=generator)
        return self.sigmas[idx].to(torch.get_default_dtype())

    def grid(self) -> Tensor:
        return self.sigmas.clone()
