"""Discrete-time variational bounds: Sohl-Dickstein et al. 2015 and DDPM's L_vlb, and the ELBO loss.

-log p(x0) <= L_T + sum_i L_i with L_T = KL(q(x_T | x0) || p_T), L_i = KL(q(x_s | x_t, x0) || p(x_s | x_t))
for each step t -> s of the process's grid, and the decoder term -log p(x0 | x_t) on the step that
ends at clean data (Sohl-Dickstein et al. 2015, arXiv:1503.03585, eq. (14); Ho et al. 2020,
arXiv:2006.11239, eq. (5)). The reverse kernel p(x_s | x_t) = N(mean, diag(var)) comes from a
`kernel_fn(x_t, t, s)` (pipeline.parameterization): learned (Sohl-Dickstein) or the posterior at
Tweedie's x0_hat with a fixed variance (DDPM). Values are nats per example, (B,).

The decoder is a Gaussian density for continuous data (bin_width None), or for 8-bit images the
discretised Gaussian of Ho et al. 2020, eq. (13): the mass of N(mean, var) on each pixel's bin of
width `bin_width` (2/255 on [-1, 1]), the outer bins open; the bound is then on -log P(x0) of the
discrete data. bin_width, low and high for a pixel scaling: pipeline.pixels.discrete_decoder.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from pipeline.parameterization import KernelFn, bind_labels, kernel_from_score, make_kernel_fn, make_score_fn
from pipeline.processes import Process, append_dims

LOG_2PI = math.log(2 * math.pi)


def _sum(v: Tensor) -> Tensor:
    return v.flatten(1).sum(1)


# the floor of each pixel's probability in the official DDPM code (diffusion_utils_2.py,
# discretized_gaussian_log_likelihood: log(max(p, 1e-12))); it keeps log and its gradient finite
LOG_MIN_PROB = math.log(1e-12)


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012); each branch gets only its own
    inputs, so the one torch.where drops cannot send a NaN gradient back."""
    near = a > -math.log(2)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, a, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, a))))


def log_normal_interval(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for standardised lo < hi, elementwise, stable in both tails.

    Flipped to the lower tail (Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)) where the interval's centre
    is positive, then log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))) with log Phi = log_ndtr.
    """
    flip = lo + hi > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return lb + _log1mexp(torch.clamp(la - lb, max=-torch.finfo(la.dtype).tiny))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, var: Tensor, bin_width: float, low: float,
                                        high: float) -> Tensor:
    """log P(x) elementwise for x on the grid low, low + bin_width, ..., high under N(mean, var)
    discretised to bins [x - bin/2, x + bin/2], the lowest bin open to -inf and the highest to +inf.

    Ho et al. 2020 (arXiv:2006.11239) eq. (13); each log-probability floored at log(1e-12) as in their
    code. Pixels below low + bin/2 take the lower open bin, above high - bin/2 the upper one.
    """
    std = torch.sqrt(var)
    lo = (x - bin_width / 2 - mean) / std
    hi = (x + bin_width / 2 - mean) / std
    log_probs = torch.where(x < low + bin_width / 2, torch.special.log_ndtr(hi),
                            torch.where(x > high - bin_width / 2, torch.special.log_ndtr(-lo),
                                        log_normal_interval(lo, hi)))
    return torch.clamp(log_probs, min=LOG_MIN_PROB)


def _check_decoder(bin_width: Optional[float], low: Optional[float], high: Optional[float]) -> None:
    if bin_width is None:
        if low is not None or high is not None:
            raise ValueError("low and high describe the discretised decoder's grid; give them with bin_width")
        return
    if low is None or high is None:
        raise ValueError("the discretised decoder needs the data range: low and high with bin_width "
                         "(pipeline.pixels.discrete_decoder(scaling) gives all three)")
    if not (bin_width > 0 and high > low):
        raise ValueError(f"the discretised decoder needs bin_width > 0 and high > low, got {bin_width}, {low}, {high}")


def check_has_elbo(process: Process) -> None:
    """Refuse a process whose grid does not end at clean data: its chain has no decoder, so no bound on log p(x0)."""
    if not process.has_discrete_elbo:
        raise ValueError(f"a discrete ELBO needs a discrete chain that ends at clean data (DDPM, Sohl-Dickstein); "
                         f"{type(process).__name__} has none. Continuous SDEs have Huang et al.'s ELBO (method.loss: elbo with method.name: sde)")


def prior_term(process: Process, x0: Tensor) -> Tensor:
    """L_T = KL(N(m_T x0, std_T^2 I) || N(0, prior_std^2 I)) summed over dimensions, (B,)."""
    t = torch.full((x0.shape[0],), float(process.t_max), dtype=x0.dtype, device=x0.device)
    m, std = process.marginal(t)
    var_p, d = process.prior_std() ** 2, x0[0].numel()
    var_q = (std**2).to(x0.dtype)
    return 0.5 * (d * (math.log(var_p) - torch.log(var_q) + var_q / var_p - 1)
                  + _sum((append_dims(m, x0.ndim).to(x0.dtype) * x0) ** 2) / var_p)


def step_term(kernel_fn: KernelFn, process: Process, x0: Tensor, t: Tensor, s: Tensor,
              generator: Optional[torch.Generator], bin_width: Optional[float] = None,
              low: Optional[float] = None, high: Optional[float] = None) -> Tensor:
    """L_i for steps t -> s (each (B,)) at one draw x_t ~ q(x_t | x0): the KL, or the decoder's -log p(x0 | x_t).

    The decoder is the Gaussian density (bin_width None), or the discretised Gaussian on bins of
    width bin_width over [low, high] (x0 on that grid; Ho et al. 2020, eq. (13)).
    """
    _check_decoder(bin_width, low, high)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = process.perturb(x0, t, z)
    mean_p, var_p = kernel_fn(x_t, t, s)
    mean_q, var_q = process.posterior(x0, x_t, t, s)
    clean = process.marginal(s)[1] == 0
    var_q = append_dims(torch.where(clean, torch.ones_like(var_q), var_q), x0.ndim).to(x0.dtype)
    kl = 0.5 * _sum(torch.log(var_p) - torch.log(var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1)
    if bin_width is None:
        decoder = 0.5 * _sum(LOG_2PI + torch.log(var_p) + (x0 - mean_p) ** 2 / var_p)
    else:
        decoder = -_sum(discretized_gaussian_log_likelihood(x0, mean_p, var_p, bin_width, low, high))
    return torch.where(clean, decoder, kl)


def _steps(process: Process) -> tuple[Tensor, Tensor]:
    grid = process.grid()
    return grid[:-1], grid[1:]


def negative_elbo(kernel_fn: KernelFn, process: Process, x0: Tensor, generator: Optional[torch.Generator],
                  bin_width: Optional[float] = None, low: Optional[float] = None,
                  high: Optional[float] = None) -> Tensor:
    """-ELBO(x0) in nats, (B,): L_T plus every step's term, each at its own draw of x_t.

    With bin_width (and low, high) the decoder is discretised and the bound is on -log P(x0) of
    data on that grid, e.g. 8-bit pixels: bits/dim = value / (D ln 2), no dequantisation offset.
    """
    check_has_elbo(process)
    _check_decoder(bin_width, low, high)
    total = prior_term(process, x0)
    for t_i, s_i in zip(*_steps(process)):
        t = torch.full((x0.shape[0],), float(t_i), dtype=x0.dtype, device=x0.device)
        s = torch.full((x0.shape[0],), float(s_i), dtype=x0.dtype, device=x0.device)
        total = total + step_term(kernel_fn, process, x0, t, s, generator, bin_width, low, high)
    return total


class DiscreteELBO:
    """The negative ELBO as a training loss with one random step per example: L_T + N L_i, (B,).

    Unbiased for -ELBO (Ho et al. 2020, sec. 3.3, "L_vlb"; Sohl-Dickstein et al. 2015 train the full
    bound). parameterization "kernel" is the learned mean and variance of Sohl-Dickstein et al.; any
    score parameterization gives DDPM's kernel with a fixed `variance` (beta_tilde or beta).
    bin_width, low, high: the discretised decoder for data on that grid (8-bit images:
    pipeline.pixels.discrete_decoder(scaling)); None, the Gaussian density.
    """

    def __init__(self, process: Process, parameterization: str, variance: str = "beta_tilde",
                 bin_width: Optional[float] = None, low: Optional[float] = None, high: Optional[float] = None):
        check_has_elbo(process)
        _check_decoder(bin_width, low, high)
        self.process, self.parameterization, self.variance = process, parameterization, variance
        self.bin_width, self.low, self.high = bin_width, low, high
        kernel_from_score(lambda x, t: x, process, variance)  # refuse an unknown variance now

    def kernel_fn(self, model: nn.Module) -> KernelFn:
        if self.parameterization == "kernel":
            return make_kernel_fn(model, self.process)
        return kernel_from_score(make_score_fn(model, self.process, self.parameterization), self.process, self.variance)

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        ts, ss = _steps(self.process)
        idx = torch.randint(len(ts), (x.shape[0],), generator=generator)
        t, s = ts[idx].to(x.device, x.dtype), ss[idx].to(x.device, x.dtype)
        kernel_fn = self.kernel_fn(bind_labels(model, cond))
        step = step_term(kernel_fn, self.process, x, t, s, generator, self.bin_width, self.low, self.high)
        return prior_term(self.process, x) + len(ts) * step
