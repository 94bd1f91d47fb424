"""Discrete-time variational bounds: Sohl-Dickstein et al. 2015 and DDPM's L_vlb, and the ELBO loss.

-log p(x0) <= L_T + sum_i L_i with L_T = KL(q(x_T | x0) || p_T), L_i = KL(q(x_s | x_t, x0) || p(x_s | x_t))
for each step t -> s of the process's grid, and the decoder term -log p(x0 | x_t) on the step that
ends at clean data (Sohl-Dickstein et al. 2015, arXiv:1503.03585, eq. (14); Ho et al. 2020,
arXiv:2006.11239, eq. (5)). The reverse kernel p(x_s | x_t) = N(mean, diag(var)) comes from a
`kernel_fn(x_t, t, s)` (pipeline.parameterization): learned (Sohl-Dickstein) or the posterior at
Tweedie's x0_hat with a fixed variance (DDPM). Values are nats per example, (B,).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from pipeline.parameterization import KernelFn, kernel_from_score, make_kernel_fn, make_score_fn
from pipeline.processes import Process, append_dims

LOG_2PI = math.log(2 * math.pi)


def _sum(v: Tensor) -> Tensor:
    return v.flatten(1).sum(1)


def check_has_elbo(process: Process) -> None:
    """Refuse a process whose grid does not end at clean data: its chain has no decoder, so no bound on log p(x0)."""
    grid = process.grid() if not process.continuous else None
    if grid is None or float(process.marginal(grid[-1:])[1][0]) != 0.0:
        raise ValueError(f"a discrete ELBO needs a discrete chain that ends at clean data (DDPM, Sohl-Dickstein); "
                         f"{type(process).__name__} has none. Continuous SDEs have Huang et al.'s ELBO (method.loss: elbo with method.name: sde)")


def prior_term(process: Process, x0: Tensor) -> Tensor:
    """L_T = KL(N(m_T x0, std_T^2 I) || N(0, prior_std^2 I)) summed over dimensions, (B,)."""
    t = torch.full((x0.shape[0],), float(process.t_max), dtype=x0.dtype)
    m, std = process.marginal(t)
    var_p, d = process.prior_std() ** 2, x0[0].numel()
    var_q = (std**2).to(x0.dtype)
    return 0.5 * (d * (math.log(var_p) - torch.log(var_q) + var_q / var_p - 1)
                  + _sum((append_dims(m, x0.ndim).to(x0.dtype) * x0) ** 2) / var_p)


def step_term(kernel_fn: KernelFn, process: Process, x0: Tensor, t: Tensor, s: Tensor,
              generator: Optional[torch.Generator]) -> Tensor:
    """L_i for steps t -> s (each (B,)) at one draw x_t ~ q(x_t | x0): the KL, or the decoder's -log p(x0 | x_t)."""
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = process.perturb(x0, t, z)
    mean_p, var_p = kernel_fn(x_t, t, s)
    mean_q, var_q = process.posterior(x0, x_t, t, s)
    clean = process.marginal(s)[1] == 0
    var_q = append_dims(torch.where(clean, torch.ones_like(var_q), var_q), x0.ndim).to(x0.dtype)
    kl = 0.5 * _sum(torch.log(var_p) - torch.log(var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1)
    decoder = 0.5 * _sum(LOG_2PI + torch.log(var_p) + (x0 - mean_p) ** 2 / var_p)
    return torch.where(clean, decoder, kl)


def _steps(process: Process) -> tuple[Tensor, Tensor]:
    grid = process.grid()
    return grid[:-1], grid[1:]


def negative_elbo(kernel_fn: KernelFn, process: Process, x0: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """-ELBO(x0) in nats, (B,): L_T plus every step's term, each at its own draw of x_t."""
    check_has_elbo(process)
    total = prior_term(process, x0)
    for t_i, s_i in zip(*_steps(process)):
        t = torch.full((x0.shape[0],), float(t_i), dtype=x0.dtype)
        s = torch.full((x0.shape[0],), float(s_i), dtype=x0.dtype)
        total = total + step_term(kernel_fn, process, x0, t, s, generator)
    return total


class DiscreteELBO:
    """The negative ELBO as a training loss with one random step per example: L_T + N L_i, (B,).

    Unbiased for -ELBO (Ho et al. 2020, sec. 3.3, "L_vlb"; Sohl-Dickstein et al. 2015 train the full
    bound). parameterization "kernel" is the learned mean and variance of Sohl-Dickstein et al.; any
    score parameterization gives DDPM's kernel with a fixed `variance` (beta_tilde or beta).
    """

    def __init__(self, process: Process, parameterization: str, variance: str = "beta_tilde"):
        check_has_elbo(process)
        self.process, self.parameterization, self.variance = process, parameterization, variance
        kernel_from_score(lambda x, t: x, process, variance)  # refuse an unknown variance now

    def kernel_fn(self, model: nn.Module) -> KernelFn:
        if self.parameterization == "kernel":
            return make_kernel_fn(model, self.process)
        return kernel_from_score(make_score_fn(model, self.process, self.parameterization), self.process, self.variance)

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        if cond is not None:
            raise NotImplementedError("class-conditional networks are not wired in yet; pass cond=None")
        ts, ss = _steps(self.process)
        idx = torch.randint(len(ts), (x.shape[0],), generator=generator)
        t, s = ts[idx].to(x.dtype), ss[idx].to(x.dtype)
        return prior_term(self.process, x) + len(ts) * step_term(self.kernel_fn(model), self.process, x, t, s, generator)
