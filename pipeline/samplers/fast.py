"""Few-step samplers of the probability-flow ODE for any process x_t = m(t) x0 + std(t) z: EDM's Heun sampler with
its ρ-schedule and optional stochastic churn (Karras et al. 2022, arXiv:2206.00364, Algorithms 1 and 2) and
DPM-Solver++(2M) in half-log-SNR time (Lu et al. 2022, arXiv:2211.01095, Algorithm 2).

Both read the process through its marginal only. In the scaled variable x̂ = x / m the process is EDM's
x̂ = x0 + σ z with σ(t) = std(t) / m(t), the denoiser is Tweedie's D(x̂; σ) = x0_hat = (x + std² score) / m, and
the probability-flow ODE is dx̂/dσ = (x̂ − D) / σ (EDM eq. 3 with s = 1). Steps have the walker's signature
step(x, t_cur, t_next, fn, process, generator); grids are float64 times t_max → t_min.

On a continuous process the times of a σ are found by bisection (σ(t) increases with t), so VP, sub-VP, VE, OU and
EDM's own process get the same samplers. A discrete process (DDPM's chain, NCSN's scales) is evaluated only at
the times of its own grid: a schedule there takes, for each σ it asks for, the grid time nearest in log σ.
Schedules end at clean data (σ = 0) where the process has it, as EDM's Algorithm 1 and diffusers' schedulers
(final σ = 0) do; the step into it is first order (Heun's Euler step, DPM-Solver's DDIM step), which returns the
data prediction itself, so it costs one network evaluation and none at σ = 0.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from pipeline import rng
from pipeline.parameterization import ScoreFn, x0_from_velocity
from pipeline.processes import Process
from pipeline.samplers.walk import SampleResult, prior_walk

EDM_RHO = 7.0  # EDM's ρ (Table 1)


def sigma_of(process: Process, t: Tensor) -> Tensor:
    """EDM's σ(t) = std(t) / m(t) of the scaled variable x / m(t), float64, shape of t."""
    m, std = process.marginal(t.to(torch.float64))
    return std / m


def _grid_times(process: Process) -> tuple[Tensor, Optional[float]]:
    """A discrete process's noisy grid times (σ > 0, float64, increasing σ) and its clean end (σ = 0) or None."""
    t = process.grid().to(torch.float64)
    sigma = sigma_of(process, t)
    clean = float(t[sigma == 0][0]) if bool((sigma == 0).any()) else None
    noisy = t[sigma > 0]
    return noisy[torch.argsort(sigma_of(process, noisy))], clean


def time_of_sigma(process: Process, sigma: Tensor, iterations: int = 100) -> Tensor:
    """The times t in [t_min, t_max] with σ(t) = sigma, float64, shape of sigma.

    Continuous: bisection (σ increases with t), clamped to the ends. Discrete: the noisy grid time nearest in log σ."""
    sigma = sigma.to(torch.float64)
    if not process.continuous:
        times, _ = _grid_times(process)
        levels = torch.log(sigma_of(process, times))
        nearest = (torch.log(sigma).reshape(-1, 1) - levels).abs().argmin(1)
        return times[nearest].reshape(sigma.shape)
    lo = torch.full_like(sigma, process.t_min)
    hi = torch.full_like(sigma, process.t_max)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        above = sigma_of(process, mid) > sigma
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return 0.5 * (lo + hi)


def _schedule(process: Process, steps: int, name: str, between) -> Tensor:
    """Times t_max → t_min whose σ follow `between(σ_max, σ_min, n)` (n float64 levels from σ_max to σ_min).

    `steps` intervals in all. Continuous: the levels from σ(t_max) to σ(t_min), the ends exact, then, where the
    process has clean data at t = 0 (σ(0) = 0: VP, sub-VP, OU, EDM; not VE), a last step to t = 0, as EDM's
    Algorithm 1 ends at σ_N = 0 (the network is never evaluated there). Discrete: the levels between its largest and
    smallest noisy σ, each at its nearest grid time (fewer steps where two coincide), then its clean end if any."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the {name} schedule needs an integer number of steps >= 1, got {steps!r}")
    if process.continuous:
        ends = sigma_of(process, torch.tensor([process.t_max, process.t_min], dtype=torch.float64))
        if not math.isfinite(float(ends[0])):
            raise ValueError(f"the {name} schedule spaces σ = std / m, which is infinite at t_max (m = 0: pure noise, "
                             f"flow matching's t = 1); use sample.spacing: time")
        clean = float(sigma_of(process, torch.zeros(1, dtype=torch.float64))) == 0.0
        n = steps if clean else steps + 1
        t = time_of_sigma(process, between(float(ends[0]), float(ends[1]), n))
        t[0] = process.t_max  # exactly the ends, not the bisection's approximations
        if n > 1:
            t[-1] = process.t_min
        return torch.cat([t, torch.zeros(1, dtype=torch.float64)]) if clean else t
    times, clean = _grid_times(process)
    sigmas = sigma_of(process, times)
    n = steps if clean is not None else steps + 1
    t = torch.unique_consecutive(time_of_sigma(process, between(float(sigmas[-1]), float(sigmas[0]), n)))
    return t if clean is None else torch.cat([t, torch.tensor([clean], dtype=torch.float64)])


def edm_grid(process: Process, steps: int, rho: float = EDM_RHO) -> Tensor:
    """EDM eq. (5): σ_i = (σ_max^(1/ρ) + i/(N−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ as float64 times t_max → t_min.

    σ_max and σ_min: the ends the model was trained on (see _schedule for discrete processes)."""
    if not rho > 0:
        raise ValueError(f"EDM's rho must be > 0, got {rho}")

    def between(high: float, low: float, n: int) -> Tensor:
        i = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
        return (high ** (1 / rho) + i * (low ** (1 / rho) - high ** (1 / rho))) ** rho

    return _schedule(process, steps, "EDM", between)


def logsnr_grid(process: Process, steps: int) -> Tensor:
    """Times t_max → t_min uniform in λ = log(m / std) = −log σ (DPM-Solver's recommended grid for unguided
    sampling, Lu et al. 2022, sec. 3.3), float64 (see _schedule for discrete processes)."""

    def between(high: float, low: float, n: int) -> Tensor:
        return torch.exp(torch.linspace(math.log(high), math.log(low), n, dtype=torch.float64))

    return _schedule(process, steps, "log-SNR", between)


def time_grid(process: Process, steps: int) -> Tensor:
    """Times uniform in t from t_max to the clean end (t = 0 of a continuous process with σ(0) = 0, a chain's clean
    index) or else t_min, float64, `steps` intervals: diffusers' "linspace" spacing and DDIM's stride. Times below
    t_min are raised to it (the network never saw them); on a discrete process each is its nearest grid time (fewer
    steps where two coincide)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the time-uniform schedule needs an integer number of steps >= 1, got {steps!r}")
    if process.continuous:
        clean = float(sigma_of(process, torch.zeros(1, dtype=torch.float64))) == 0.0
        t = torch.linspace(process.t_max, 0.0 if clean else process.t_min, steps + 1, dtype=torch.float64)
        t[:-1] = t[:-1].clamp(min=process.t_min)
        return torch.cat([torch.unique_consecutive(t[:-1]), t[-1:]])
    times, clean = _grid_times(process)
    end = clean if clean is not None else float(times.min())
    t = torch.linspace(float(times.max()), end, steps + 1, dtype=torch.float64)
    noisy = t[:-1] if clean is not None else t
    nearest = times[(noisy.reshape(-1, 1) - times).abs().argmin(1)]
    t = torch.unique_consecutive(nearest)
    return t if clean is None else torch.cat([t, torch.tensor([clean], dtype=torch.float64)])


# The few-step samplers' time schedules: EDM's ρ-schedule, uniform log-SNR (DPM-Solver's), uniform time (diffusers').
SPACINGS = ("karras", "logsnr", "time")


def fast_grid(process: Process, steps: int, spacing: str, rho: float = EDM_RHO) -> Tensor:
    """The grid of a few-step sampler: edm_grid ("karras", with rho), logsnr_grid or time_grid."""
    if spacing == "karras":
        return edm_grid(process, steps, rho)
    if spacing == "logsnr":
        return logsnr_grid(process, steps)
    if spacing == "time":
        return time_grid(process, steps)
    raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")


def _times(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _coefficients(process: Process, t: float) -> tuple[float, float]:
    """(m(t), std(t)) as Python floats (float64 on the host: the grid is read once, no device sync per sample)."""
    m, std = process.marginal(torch.tensor([t], dtype=torch.float64))
    return float(m), float(std)


def denoised(x: Tensor, t: float, score_fn: ScoreFn, process: Process, field: str = "score") -> Tensor:
    """x0_hat at time t, shape of x: Tweedie's (x + std² score(x, t)) / m (EDM's D(x̂; σ) in data units), or from a
    flow-matching velocity (field "velocity": pipeline.parameterization.x0_from_velocity, defined where m = 0)."""
    if field == "velocity":
        return x0_from_velocity(score_fn(x, _times(x, t)), x, _times(x, t), process)
    m, std = _coefficients(process, t)
    return (x + std ** 2 * score_fn(x, _times(x, t))) / m


def _log_snr(m: float, std: float) -> float:
    """λ = log(m / std); −∞ at a pure-noise end (m = 0: the linear path's t = 1)."""
    return math.log(m / std) if m > 0 else -math.inf


def edm_heun_step(x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
                  generator: rng.Generator = None, churn: float = 0.0, s_tmin: float = 0.0,
                  s_tmax: float = float("inf"), s_noise: float = 1.0, steps: Optional[int] = None) -> Tensor:
    """One step of EDM's Algorithm 2 (Algorithm 1 when churn = 0) from t_cur to t_next, in x̂ = x / m and σ.

    Churn: for σ(t_cur) in [s_tmin, s_tmax], raise σ to σ̂ = σ (1 + γ), γ = min(churn / steps, √2 − 1) (steps: the
    walk's number of steps), clamped at σ(t_max) and taken at its time t̂ (on a discrete process the nearest grid
    time, σ̂ = σ(t̂)), adding N(0, (σ̂² − σ²) s_noise²) to x̂ from `generator`; then the Euler step to σ(t_next) and
    Heun's correction (the trapezoid of the two slopes (x̂ − D) / σ): two network evaluations, one into σ = 0."""
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
        t_hat = float(time_of_sigma(process, torch.tensor([min(sigma_cur * (1 + gamma), sigma_max)],
                                                          dtype=torch.float64)))
        m_hat, std_hat = _coefficients(process, t_hat)
        sigma_hat = max(std_hat / m_hat, sigma_cur)
        if sigma_hat > sigma_cur:
            xh = xh + (sigma_hat ** 2 - sigma_cur ** 2) ** 0.5 * s_noise * rng.randn_like(x, generator)
        else:
            t_hat = t_cur
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
    D̃ = (1 + 1/(2r)) D_cur − 1/(2r) D_prev with r = h_prev / h afterwards (the "midpoint" form, as diffusers'
    DPMSolverMultistepScheduler). One network evaluation per step; into a clean end (std 0) x_next = m D_cur.
    The memory restarts whenever a step does not begin where the last one ended (a new batch, RePaint's jumps).
    From a pure-noise end (m = 0, λ = −∞: flow matching's t = 1) h is infinite and the first step is
    x_next = (std_next / std_cur) x + m_next D, DDIM's. field: what the walker's fn is (denoised)."""

    def __init__(self, field: str = "score"):
        self.field = field
        self._end: Optional[float] = None
        self._prev: Optional[tuple[float, Tensor]] = None  # (h of the previous step, its D)

    def __call__(self, x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
                 generator: rng.Generator = None) -> Tensor:
        m_cur, std_cur = _coefficients(process, t_cur)
        m_next, std_next = _coefficients(process, t_next)
        d_cur = denoised(x, t_cur, score_fn, process, self.field)
        if std_next == 0:  # into a clean end: h = ∞, the first-order step is the data prediction itself
            self._prev, self._end = None, None
            return m_next * d_cur
        h = _log_snr(m_next, std_next) - _log_snr(m_cur, std_cur)
        if self._end != t_cur or self._prev is None or self._prev[1].shape != x.shape:
            d = d_cur  # first order: the memory does not continue this walk
        else:
            h_prev, d_prev = self._prev
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * d_cur - 1 / (2 * r) * d_prev
        self._prev, self._end = (h, d_cur), t_next
        return (std_next / std_cur) * x - m_next * math.expm1(-h) * d


def edm_plan(process: Process, steps: int, rho: float = EDM_RHO, churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: Optional[float] = None, s_noise: float = 1.0,
             spacing: str = "karras") -> tuple[Callable[..., Tensor], Tensor]:
    """(step, grid) of EDM's sampler: edm_heun_step with its churn options over fast_grid(process, steps, spacing,
    rho), EDM's own ρ-schedule by default.

    s_tmax None: no upper bound. Churn's γ divides by the grid's number of steps (EDM's N)."""
    grid = fast_grid(process, steps, spacing, rho)
    step = partial(edm_heun_step, churn=churn, s_tmin=s_tmin, s_tmax=float("inf") if s_tmax is None else s_tmax,
                   s_noise=s_noise, steps=len(grid) - 1)
    return step, grid


def edm_sampler(score_fn: ScoreFn, process: Process, shape: tuple[int, ...], generator: rng.Generator,
                steps: int = 18, rho: float = EDM_RHO, churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: Optional[float] = None, s_noise: float = 1.0, progress: bool = False, *, device=None,
                record: Optional[int] = None) -> SampleResult:
    """EDM's Heun sampler (Karras et al. 2022, Algorithm 1, or 2 with churn > 0) from a prior draw at t_max."""
    step, grid = edm_plan(process, steps, rho, churn, s_tmin, s_tmax, s_noise)
    return prior_walk(step, score_fn, process, shape, generator, grid, device=device, record=record,
                      progress=progress, desc="EDM Heun")


def dpm_solver_sampler(score_fn: ScoreFn, process: Process, shape: tuple[int, ...], generator: rng.Generator,
                       steps: int = 20, spacing: str = "logsnr", progress: bool = False, *, device=None,
                       record: Optional[int] = None) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) over fast_grid(process, steps, spacing) from a prior draw
    (uniform log-SNR by default, their recommendation for unguided sampling)."""
    return prior_walk(DPMSolverPP2M(), score_fn, process, shape, generator, fast_grid(process, steps, spacing),
                      device=device, record=record, progress=progress, desc="DPM-Solver++(2M)")

