"""Few-step samplers of the probability-flow ODE for any continuous process x_t = m(t) x0 + std(t) z: EDM's Heun
sampler with its ρ-schedule and optional stochastic churn (Karras et al. 2022, arXiv:2206.00364, Algorithms 1
and 2) and DPM-Solver++(2M) in half-log-SNR time (Lu et al. 2022, arXiv:2211.01095, Algorithm 2).

Both read the process through its marginal only. In the scaled variable x̂ = x / m the process is EDM's
x̂ = x0 + σ z with σ(t) = std(t) / m(t), the denoiser is Tweedie's D(x̂; σ) = x0_hat = (x + std² score) / m, and
the probability-flow ODE is dx̂/dσ = (x̂ − D) / σ (EDM eq. 3 with s = 1). Steps have the walker's signature
step(x, t_cur, t_next, fn, process, generator); grids are float64 times t_max → t_min, found from σ by bisection
(σ(t) increases with t), so VP, sub-VP, VE and OU all get the same samplers. Discrete chains (DDPM's grid, NCSN's
scales) have no σ between their grid points and are refused.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pipeline import rng
from pipeline.parameterization import ScoreFn
from pipeline.processes import Process

EDM_RHO = 7.0  # EDM's ρ (Table 1)


def _require_continuous(process: Process, what: str) -> None:
    if not process.continuous:
        raise ValueError(f"{what} needs a process with continuous time (an SDE); {type(process).__name__} has only "
                         "its own grid")


def sigma_of(process: Process, t: Tensor) -> Tensor:
    """EDM's σ(t) = std(t) / m(t) of the scaled variable x / m(t), float64, shape of t."""
    m, std = process.marginal(t.to(torch.float64))
    return std / m


def time_of_sigma(process: Process, sigma: Tensor, iterations: int = 100) -> Tensor:
    """The times t in [t_min, t_max] with σ(t) = sigma (float64 bisection; σ increases with t), clamped to the ends."""
    _require_continuous(process, "finding the time of a noise level")
    sigma = sigma.to(torch.float64)
    lo = torch.full_like(sigma, process.t_min)
    hi = torch.full_like(sigma, process.t_max)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        above = sigma_of(process, mid) > sigma
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return 0.5 * (lo + hi)


def edm_grid(process: Process, steps: int, rho: float = EDM_RHO) -> Tensor:
    """EDM eq. (5): σ_i = (σ_max^(1/ρ) + i/(N−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0..N, as float64 times t_max → t_min.

    σ_max = σ(t_max) and σ_min = σ(t_min): the ends the model was trained on. `steps` intervals (N = steps + 1)."""
    _require_continuous(process, "the EDM schedule")
    if steps < 1:
        raise ValueError(f"the EDM schedule needs at least one step, got {steps}")
    ends = sigma_of(process, torch.tensor([process.t_max, process.t_min], dtype=torch.float64))
    i = torch.arange(steps + 1, dtype=torch.float64) / steps
    sigmas = (ends[0] ** (1 / rho) + i * (ends[1] ** (1 / rho) - ends[0] ** (1 / rho))) ** rho
    t = time_of_sigma(process, sigmas)
    t[0], t[-1] = process.t_max, process.t_min  # exactly the ends, not the bisection's approximations
    return t


def logsnr_grid(process: Process, steps: int) -> Tensor:
    """Times t_max → t_min uniform in λ = log(m / std) = −log σ (DPM-Solver's recommended grid for unguided
    sampling, Lu et al. 2022, sec. 3.3), float64, `steps` intervals."""
    _require_continuous(process, "the log-SNR schedule")
    if steps < 1:
        raise ValueError(f"the log-SNR schedule needs at least one step, got {steps}")
    ends = torch.log(sigma_of(process, torch.tensor([process.t_max, process.t_min], dtype=torch.float64)))
    t = time_of_sigma(process, torch.exp(torch.linspace(float(ends[0]), float(ends[1]), steps + 1,
                                                        dtype=torch.float64)))
    t[0], t[-1] = process.t_max, process.t_min
    return t


def _times(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _coefficients(process: Process, t: float) -> tuple[float, float]:
    """(m(t), std(t)) as Python floats (float64 on the host: the grid is read once, no device sync per sample)."""
    m, std = process.marginal(torch.tensor([t], dtype=torch.float64))
    return float(m), float(std)


def denoised(x: Tensor, t: float, score_fn: ScoreFn, process: Process) -> Tensor:
    """Tweedie's x0_hat = (x + std² score(x, t)) / m, shape of x: EDM's D(x̂; σ) in data units."""
    m, std = _coefficients(process, t)
    return (x + std ** 2 * score_fn(x, _times(x, t))) / m


def edm_heun_step(x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
                  generator: rng.Generator = None, churn: float = 0.0, s_tmin: float = 0.0,
                  s_tmax: float = float("inf"), s_noise: float = 1.0, steps: Optional[int] = None) -> Tensor:
    """One step of EDM's Algorithm 2 (Algorithm 1 when churn = 0) from t_cur to t_next, in x̂ = x / m and σ.

    Churn: for σ(t_cur) in [s_tmin, s_tmax], raise σ to σ̂ = σ (1 + γ), γ = min(churn / steps, √2 − 1), adding
    N(0, (σ̂² − σ²) s_noise²) to x̂ (drawn from `generator`), clamped at σ(t_max); then the Euler step to σ(t_next)
    and Heun's correction (the trapezoid of the two slopes (x̂ − D) / σ), two network evaluations."""
    m_cur, std_cur = _coefficients(process, t_cur)
    m_next, std_next = _coefficients(process, t_next)
    sigma_cur, sigma_next = std_cur / m_cur, std_next / m_next
    xh = x / m_cur
    t_hat, sigma_hat = t_cur, sigma_cur
    if churn > 0 and s_tmin <= sigma_cur <= s_tmax:
        if not steps:
            raise ValueError("EDM's churn is divided by the number of steps: pass steps")
        gamma = min(churn / steps, 2 ** 0.5 - 1)
        sigma_max = float(sigma_of(process, torch.tensor([process.t_max], dtype=torch.float64)))
        sigma_hat = min(sigma_cur * (1 + gamma), sigma_max)
        t_hat = float(time_of_sigma(process, torch.tensor([sigma_hat], dtype=torch.float64)))
        noise = rng.randn_like(x, generator)
        xh = xh + (sigma_hat ** 2 - sigma_cur ** 2) ** 0.5 * s_noise * noise
    m_hat, _ = _coefficients(process, t_hat)
    d_cur = (xh - denoised(xh * m_hat, t_hat, score_fn, process)) / sigma_hat
    xh_next = xh + (sigma_next - sigma_hat) * d_cur
    if sigma_next > 0:
        d_next = (xh_next - denoised(xh_next * m_next, t_next, score_fn, process)) / sigma_next
        xh_next = xh + (sigma_next - sigma_hat) * 0.5 * (d_cur + d_next)
    return xh_next * m_next


class DPMSolverPP2M:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2, as a walker step with a memory of one step.

    With λ = log(m / std) and D the data prediction (Tweedie's x0_hat), h = λ_next − λ_cur:
    x_next = (std_next / std_cur) x − m_next (e^(−h) − 1) D̃, where D̃ = D_cur on a first step (DDIM, η = 0) and
    D̃ = (1 + 1/(2r)) D_cur − 1/(2r) D_prev with r = h_prev / h afterwards. One network evaluation per step.
    The memory restarts whenever a step does not begin where the last one ended (a new batch, RePaint's jumps)."""

    def __init__(self):
        self._end: Optional[float] = None
        self._prev: Optional[tuple[float, Tensor]] = None  # (h of the previous step, its D)

    def __call__(self, x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
                 generator: rng.Generator = None) -> Tensor:
        m_cur, std_cur = _coefficients(process, t_cur)
        m_next, std_next = _coefficients(process, t_next)
        lam_cur, lam_next = torch.log(torch.tensor(m_cur / std_cur)), torch.log(torch.tensor(m_next / std_next))
        h = float(lam_next - lam_cur)
        d_cur = denoised(x, t_cur, score_fn, process)
        if self._end != t_cur or self._prev is None or self._prev[1].shape != x.shape:
            d = d_cur  # first order: the memory does not continue this walk
        else:
            h_prev, d_prev = self._prev
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * d_cur - 1 / (2 * r) * d_prev
        self._prev, self._end = (h, d_cur), t_next
        return (std_next / std_cur) * x - m_next * torch.expm1(torch.tensor(-h, dtype=torch.float64)).item() * d


def dpm_solver_step() -> DPMSolverPP2M:
    """A fresh DPM-Solver++(2M) step for one walk (its memory is per walk)."""
    return DPMSolverPP2M()

