"""The probability-flow ODE of a forward SDE, and its sampler (fixed-step Euler / Heun, or RK45).

dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t): eq. (13) of Song et al. 2021 (arXiv:2011.13456). Integrated
from t_max to t_min it maps prior draws to data with the same marginals as the reverse SDE.
Euler and Heun are steps walked over process.grid(steps) (pipeline.samplers.walk). RK45 is not: SciPy
chooses its own times adaptively from the error of the whole batch, so it is no walk over a grid.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from pipeline import rng
from pipeline.parameterization import ScoreFn
from pipeline.processes import Process, append_dims
from pipeline.samplers.walk import SampleResult, prior_walk, record_positions

DriftFn = Callable[[Tensor, Tensor], Tensor]
ODE_METHODS = ("rk45", "euler", "heun")


def probability_flow_drift(process: Process, score_fn: ScoreFn) -> DriftFn:
    """drift(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t), x of shape (B, *D), t of shape (B,)."""

    def drift(x: Tensor, t: Tensor) -> Tensor:
        f, g = process.sde(x, t)
        return f - 0.5 * append_dims(g, x.ndim).to(x.dtype) ** 2 * score_fn(x, t)

    return drift


# What the walker's fn is for the ODE, named as the model kinds are (pipeline.models.network_fn): a score (the drift
# is f − ½ g² s) or the velocity itself (flow matching).
FIELDS = ("score", "velocity")


def ode_field(process: Process, fn: Callable, field: str = "score") -> DriftFn:
    """The ODE's right-hand side dx/dt from the walker's fn: probability_flow_drift of a score_fn (field "score"),
    or a flow-matching velocity_fn as it is (field "velocity"; pipeline.parameterization)."""
    if field == "score":
        return probability_flow_drift(process, fn)
    if field == "velocity":
        return fn
    raise ValueError(f"unknown ODE field {field!r}; allowed: {', '.join(FIELDS)}")


def ode_step(x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
             generator: rng.Generator = None, method: str = "euler", field: str = "score") -> Tensor:
    """One Euler or Heun step of the probability-flow ODE from t_cur to t_next (no randomness).

    Heun: Karras et al. 2022 (arXiv:2206.00364), Algorithm 1 without the extra noise: the Euler
    prediction corrected by the trapezoidal rule, two drift evaluations. field: what score_fn is (ode_field).
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown fixed-step ODE method {method!r}; allowed: euler, heun")
    drift = ode_field(process, score_fn, field)
    dt = t_next - t_cur
    d_cur = drift(x, torch.full((x.shape[0],), t_cur, dtype=x.dtype, device=x.device))
    x_next = x + dt * d_cur
    if method == "heun":
        d_next = drift(x_next, torch.full((x.shape[0],), t_next, dtype=x.dtype, device=x.device))
        x_next = x + 0.5 * dt * (d_cur + d_next)
    return x_next


def ode_sampler(
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    generator: rng.Generator,
    method: str = "rk45",
    steps: int = 100,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    *,
    device=None,
    record: Optional[int] = None,
    field: str = "score",
) -> SampleResult:
    """Integrate the probability-flow ODE from a prior draw at t_max to t_min, x of shape `shape`.

    `rk45`: SciPy's adaptive Dormand-Prince (Song et al. 2021, sec. D.3, rtol = atol = 1e-5), the
    batch as one float64 state on the host; `euler` and `heun`: `steps` fixed steps over
    process.grid(steps) (ode_step walked by pipeline.samplers.walk).

    RK45 is not batch-size invariant: its step sizes are chosen from the error norm of the whole
    batch state, so a sample's path depends on the others in its batch. Its trajectory (`record`)
    is the start and the end only. Euler and Heun treat samples independently. field: what score_fn is
    (ode_field: a score, or a flow-matching velocity).
    """
    from scipy import integrate  # here: half a second at every sample start of another sampler

    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; allowed: {', '.join(ODE_METHODS)}")
    if method != "rk45":
        return prior_walk(partial(ode_step, method=method, field=field), score_fn, process, shape, generator,
                          process.grid(steps), device=device, record=record, desc=f"ODE ({method})")
    record_positions(record, 2)  # refuse a bad `record` as the walker would
    drift = ode_field(process, score_fn, field)
    x = process.prior_sample(shape, generator, device)
    nfe, per_call = 0, getattr(score_fn, "evaluations", 1)  # as the walker counts (a guided score says 2)

    def rhs(t: float, y):
        nonlocal nfe
        nfe += per_call
        xt = torch.from_numpy(y).reshape(shape).to(device=x.device, dtype=x.dtype)
        with torch.no_grad():
            d = drift(xt, torch.full((shape[0],), t, dtype=x.dtype, device=x.device))
        return d.double().reshape(-1).cpu().numpy()

    sol = integrate.solve_ivp(rhs, (process.t_max, process.t_min), x.double().reshape(-1).cpu().numpy(),
                              method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE solver failed: {sol.message}")
    out = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(device=x.device, dtype=x.dtype)
    trajectory = [(float(process.t_max), x.detach().clone()), (float(process.t_min), out.clone())] if record else []
    return SampleResult(out, nfe, trajectory)
