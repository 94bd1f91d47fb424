"""Ancestral (DDPM), DDIM and learned-kernel steps, written for any process through its marginals.

Each steps from t_cur to an earlier t_next on the process's float64 grid using only `marginal` and
`transition`, so the same code serves DDPM's discrete chain, VP, sub-VP, VE and NCSN scales. x0_hat is
Tweedie's estimate from the score, eps_hat = -std * score. The samplers are these steps walked over
process.grid(steps) by pipeline.samplers.walk; every draw goes through pipeline.rng, so a step takes a
torch.Generator or per-sample SampleGenerators, and each sample's result depends on its own noise only.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor

from pipeline import rng
from pipeline.parameterization import KernelFn, ScoreFn, eps_from_score, x0_from_score
from pipeline.processes import Process, append_dims
from pipeline.samplers.walk import SampleResult, prior_walk

VARIANCES = ("beta_tilde", "beta")


def _times(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def is_clean(process: Process, t: float) -> bool:
    """Whether time t (a grid float) is clean data, std(t) = 0: decided on the CPU in float64, no device sync."""
    return float(process.marginal(torch.tensor([t], dtype=torch.float64))[1][0]) == 0.0


def ancestral_posterior(x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
                        variance: str = "beta_tilde") -> tuple[Tensor, Tensor]:
    """Mean (B, *D) and std (B,) of q(x_s | x_t, x0_hat) for s = t_next < t = t_cur.

    process.posterior at x0_hat: its variance sigma_ts^2 std_s^2 / std_t^2 ("beta_tilde", Ho et al. 2020,
    eq. (6)-(7)) or sigma_ts^2 ("beta", their other choice, sec. 3.2), sigma_ts from process.transition.
    For DDPM's chain the mean equals eq. (11); for VE it is Song et al. 2021's ancestral predictor (eq. (47)).
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown ancestral variance {variance!r}; allowed: {', '.join(VARIANCES)}")
    t, s = _times(x, t_cur), _times(x, t_next)
    x0_hat = x0_from_score(x, score_fn(x, t), t, process)
    mean, var = process.posterior(x0_hat, x, t, s)
    if variance == "beta":
        var = process.transition(t, s)[1] ** 2
    # the clean end of DDPM's grid (std_s = 0) takes the mean: Algorithm 2 adds no noise at t = 1
    var = torch.where(process.marginal(s)[1] > 0, var, torch.zeros_like(var))
    return mean, var.sqrt()


def ancestral_step(x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
                   generator: rng.Generator, variance: str = "beta_tilde") -> Tensor:
    """One draw from q(x_s | x_t, x0_hat) (see ancestral_posterior), x of shape (B, *D)."""
    mean, std = ancestral_posterior(x, t_cur, t_next, score_fn, process, variance)
    return mean + append_dims(std, x.ndim).to(x.dtype) * rng.randn_like(x, generator)


def ddim_step(x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
              generator: rng.Generator, eta: float = 0.0) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, arXiv:2010.02502, eq. (12) and (16)) for any process.

    x_s = m_s x0_hat + sqrt(std_s^2 - c^2) eps_hat + c z with c = eta (std_s / std_t) sigma_ts:
    eta = 0 is deterministic, eta = 1 is the ancestral step with the beta_tilde variance. c = 0, and no
    noise is drawn, when eta = 0, at a clean end (std_s = 0) or for a zero-length step; decided from the
    grid floats, so the step never waits on the device.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
    t, s = _times(x, t_cur), _times(x, t_next)
    (m_s, std_s), (_, std_t) = process.marginal(s), process.marginal(t)
    _, sigma_ts = process.transition(t, s)
    score = score_fn(x, t)
    x0_hat = x0_from_score(x, score, t, process)
    eps_hat = eps_from_score(score, t, process)
    c = eta * std_s / std_t * sigma_ts
    b = lambda v: append_dims(v, x.ndim).to(x.dtype)  # noqa: E731
    out = b(m_s) * x0_hat + b(torch.sqrt(torch.clamp(std_s**2 - c**2, min=0.0))) * eps_hat
    if eta > 0 and t_next != t_cur and not is_clean(process, t_next):
        out = out + b(c) * rng.randn_like(x, generator)
    return out


def kernel_step(x: Tensor, t_cur: float, t_next: float, kernel_fn: KernelFn, process: Process,
                generator: rng.Generator) -> Tensor:
    """One draw from a learned reverse kernel N(mean, diag(var)) (Sohl-Dickstein et al. 2015, eq. (5));
    the step that ends at clean data returns its mean, as DDPM's Algorithm 2 does."""
    t, s = _times(x, t_cur), _times(x, t_next)
    mean, var = kernel_fn(x, t, s)
    if is_clean(process, t_next):
        return mean
    return mean + var.sqrt() * rng.randn_like(x, generator)


def ddpm_sampler(score_fn: ScoreFn, process: Process, shape: tuple[int, ...], generator: rng.Generator,
                 steps: Optional[int] = None, variance: str = "beta_tilde", progress: bool = False, *,
                 device=None, record: Optional[int] = None) -> SampleResult:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over process.grid(steps)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown ancestral variance {variance!r}; allowed: {', '.join(VARIANCES)}")
    return prior_walk(partial(ancestral_step, variance=variance), score_fn, process, shape, generator,
                      process.grid(steps), device=device, record=record, progress=progress, desc="ancestral")


def ddim_sampler(score_fn: ScoreFn, process: Process, shape: tuple[int, ...], generator: rng.Generator,
                 steps: Optional[int] = None, eta: float = 0.0, progress: bool = False, *,
                 device=None, record: Optional[int] = None) -> SampleResult:
    """DDIM over `steps` strided times of process.grid(steps) (Song, Meng & Ermon 2021, sec. 4.2)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
    return prior_walk(partial(ddim_step, eta=eta), score_fn, process, shape, generator, process.grid(steps),
                      device=device, record=record, progress=progress, desc="DDIM")


def kernel_sampler(kernel_fn: KernelFn, process: Process, shape: tuple[int, ...], generator: rng.Generator,
                   progress: bool = False, *, device=None, record: Optional[int] = None) -> SampleResult:
    """Ancestral sampling through a learned reverse kernel over the process's whole grid (Sohl-Dickstein et al.)."""
    return prior_walk(kernel_step, kernel_fn, process, shape, generator, process.grid(), device=device,
                      record=record, progress=progress, desc="learned kernel")
