"""The probability-flow ODE of a forward SDE, and its sampler (fixed-step Euler / Heun, or RK45).

dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t): eq. (13) of Song et al. 2021 (arXiv:2011.13456). Integrated
from t_max to t_min it maps prior draws to data with the same marginals as the reverse SDE.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy import integrate
from torch import Tensor

from pipeline.parameterization import ScoreFn
from pipeline.processes import Process, append_dims
from pipeline.samplers.langevin import SampleResult

DriftFn = Callable[[Tensor, Tensor], Tensor]


def probability_flow_drift(process: Process, score_fn: ScoreFn) -> DriftFn:
    """drift(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t), x of shape (B, *D), t of shape (B,)."""

    def drift(x: Tensor, t: Tensor) -> Tensor:
        f, g = process.sde(x, t)
        return f - 0.5 * append_dims(g, x.ndim).to(x.dtype) ** 2 * score_fn(x, t)

    return drift


def ode_sampler(
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    generator: torch.Generator,
    method: str = "rk45",
    steps: int = 100,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> SampleResult:
    """Integrate the probability-flow ODE from a prior draw at t_max to t_min, x of shape `shape`.

    `rk45`: SciPy's adaptive Dormand-Prince (Song et al. 2021, sec. D.3, rtol = atol = 1e-5), the
    batch as one float64 state; `euler` and `heun`: `steps` fixed steps over process.grid(steps)
    (Heun: Karras et al. 2022, Algorithm 1, without the extra noise).
    """
    drift = probability_flow_drift(process, score_fn)
    x = process.prior_sample(shape, generator)
    if method == "rk45":
        nfe = 0

        def rhs(t: float, y: np.ndarray) -> np.ndarray:
            nonlocal nfe
            nfe += 1
            xt = torch.from_numpy(y).reshape(shape).to(x.dtype)
            with torch.no_grad():
                d = drift(xt, torch.full((shape[0],), t, dtype=x.dtype))
            return d.double().reshape(-1).numpy()

        sol = integrate.solve_ivp(rhs, (process.t_max, process.t_min), x.double().reshape(-1).numpy(),
                                  method="RK45", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"probability-flow ODE solver failed: {sol.message}")
        return SampleResult(torch.from_numpy(sol.y[:, -1]).reshape(shape).to(x.dtype), nfe)
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; allowed: rk45, euler, heun")
    grid, nfe = process.grid(steps), 0
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        tc = torch.full((shape[0],), float(t_cur), dtype=x.dtype)
        dt = float(t_next - t_cur)
        d_cur = drift(x, tc)
        nfe += 1
        x_next = x + dt * d_cur
        if method == "heun":
            d_next = drift(x_next, torch.full((shape[0],), float(t_next), dtype=x.dtype))
            nfe += 1
            x_next = x + 0.5 * dt * (d_cur + d_next)
        x = x_next
    return SampleResult(x, nfe)
