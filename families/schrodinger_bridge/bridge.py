"""Schrödinger bridges between two distributions: drifts, their walk, the reference's bridge, and the closed forms.

A bridge between p0 (the source, t = 0) and p1 (the target, t = 1) is a pair of drifts over a grid of N equal steps
γ = 1/N on [0, 1] around a reference process (pipeline.processes: BrownianMotion dX = σ dW, or the VP SDE), which
gives f(x, t) and g(t):

    forward   X_{k+1} = X_k + γ F(X_k, t_k) + g(t_k) √γ z,      F = f + a forward network
    backward  X_k = X_{k+1} + γ B(X_{k+1}, t_{k+1}) + g(t_{k+1}) √γ z,   B = -f + a backward network

(Euler-Maruyama in each direction of travel; De Bortoli et al. 2021, arXiv:2106.01357, eq. (3) and (5)). Both are one
step, `bridge_step`, walked by the one walker (pipeline.samplers.walk). The training targets of both solvers are
here: IPF's mean matching of a simulated path (De Bortoli et al. 2021, Prop. 3) and bridge matching of the
reference's bridge between a coupling's two ends (Shi et al. 2023, arXiv:2303.16852, eq. (8)); the loops are in
families.schrodinger_bridge.solvers. With a Brownian reference the bridge's law of (X_0, X_1) is the entropic optimal-transport plan
for the cost |x - y|^2 / 2 with regularisation σ²: `sinkhorn_cost` computes it on samples (POT), and between two
Gaussians `gaussian_coupling` gives it in closed form (Janati et al. 2020; Bunne et al. 2023, arXiv:2202.05722, Thm. 3).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from pipeline import rng
from pipeline.processes import Process, append_dims
from pipeline.samplers.walk import SampleResult, walk

DIRECTIONS = ("forward", "backward")
# Each direction's sign of the reference drift f in its own time: the backward walk runs time from 1 to 0.
SIGN = {"forward": 1.0, "backward": -1.0}


def opposite(direction: str) -> str:
    """The other direction."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; allowed: {', '.join(DIRECTIONS)}")
    return "backward" if direction == "forward" else "forward"


def time_grid(num_steps: int, direction: str) -> Tensor:
    """The float64 grid of N = num_steps equal steps over [0, 1], walked 0 -> 1 forward and 1 -> 0 backward."""
    if num_steps < 1:
        raise ValueError(f"a bridge needs num_steps >= 1, got {num_steps}")
    grid = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    return grid.flip(0) if opposite(direction) == "forward" else grid


class Drift(nn.Module):
    """drift(x, t) (B, *D), t (B,) -> the drift of one direction in its own time: sign f(x, t) + net(x, c(t)).

    net None is the reference alone (IPF's first forward walk). The network sees the process's conditioning of t.
    """

    def __init__(self, net: Optional[nn.Module], process: Process, direction: str):
        super().__init__()
        opposite(direction)  # checks the name
        self.net, self.process, self.direction = net, process, direction

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        f, _ = self.process.sde(x, t)
        drift = SIGN[self.direction] * f
        if self.net is None:
            return drift
        return drift + self.net(x, self.process.conditioning(t).to(x.dtype))


def bridge_step(x: Tensor, t_cur: float, t_next: float, fn: Callable, process: Process,
                generator: rng.Generator, *, denoise: bool = False) -> Tensor:
    """One Euler-Maruyama step of a bridge in its direction of travel: x + |dt| fn(x, t_cur) + g(t_cur) √|dt| z.

    denoise: the step that reaches an end (t_next 0 or 1) returns its mean, as DDPM's last step and NCSN's denoising
    do: every Gaussian step blurs by g² |dt|, which a thin target (moons) cannot afford at the end.
    """
    dt = abs(t_next - t_cur)
    t = torch.full((x.shape[0],), t_cur, dtype=x.dtype, device=x.device)
    mean = x + dt * fn(x, t)
    if denoise and t_next in (0.0, 1.0):
        return mean
    _, g = process.sde(x, t)
    return mean + append_dims(g, x.ndim).to(x.dtype) * math.sqrt(dt) * rng.randn_like(x, generator)


def transport(drift: Callable, process: Process, x: Tensor, direction: str, num_steps: int,
              generator: rng.Generator, *, denoise: bool = False, record: Optional[int] = None,
              progress: bool = False) -> SampleResult:
    """Walk x (B, *D) from one end to the other with `drift` (forward: from t = 0; backward: from t = 1); denoise:
    the last step without noise (bridge_step). Training walks keep it: their targets need the chain's own law."""
    return walk(partial(bridge_step, denoise=denoise), x, time_grid(num_steps, direction), drift, process, generator,
                record=record, progress=progress, desc=f"bridge ({direction})")


def denoised_variance(process: Process, num_steps: int, direction: str) -> float:
    """The per-coordinate variance g(t)² |dt| of the noise the last step leaves out with denoise (t: where that
    step starts). It is independent of both ends, so E|X_0 - X_1|² of the noisy walk is the denoised pairs' mean
    squared distance plus D times this, exactly."""
    grid = time_grid(num_steps, direction)
    t_last, dt = float(grid[-2]), abs(float(grid[-1] - grid[-2]))
    _, g = process.sde(torch.zeros(1, 1, dtype=torch.float64), torch.tensor([t_last], dtype=torch.float64))
    return float(g[0]) ** 2 * dt


# --------------------------------------------------------------------------- training targets


def mean_matching_targets(drift: Callable, path: list[tuple[float, Tensor]], gamma: float
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(x, t, target) for the opposite direction's drift from a path walked with `drift`, its states (s_j, y_j).

    The opposite direction's step from y_{j+1} has mean y_j when its drift at (y_{j+1}, s_{j+1}) is
    (y_j - y_{j+1}) / γ + D(y_j, s_j) - D(y_{j+1}, s_j): De Bortoli et al. 2021, Prop. 3 (their B_{k+1} and F_k
    targets), divided by γ. Rows: every step of every path, (B N, *D), t (B N,).
    """
    xs, ts, targets = [], [], []
    for (s, y), (s_next, y_next) in zip(path[:-1], path[1:]):
        t = torch.full((y.shape[0],), s, dtype=y.dtype, device=y.device)
        xs.append(y_next)
        ts.append(torch.full_like(t, s_next))
        targets.append((y - y_next) / gamma + drift(y, t) - drift(y_next, t))
    return torch.cat(xs), torch.cat(ts), torch.cat(targets)


def bridge_sample(process: Process, x0: Tensor, x1: Tensor, t: Tensor, z: Tensor) -> Tensor:
    """x_t of the reference pinned at x0 (t = 0) and x1 (t = 1), for 0 < t < 1 (B,).

    Gaussian conditioning of x_t ~ N(m_t x0, s_t²) on x1 | x_t ~ N(a x_t, c²), with (a, c) the transition t -> 1
    (Process.transition): for Brownian motion x_t = (1 - t) x0 + t x1 + σ √(t (1 - t)) z.
    """
    m, s = (append_dims(v, x0.ndim).to(x0.dtype) for v in process.marginal(t))
    a, c = (append_dims(v, x0.ndim).to(x0.dtype) for v in process.transition(torch.ones_like(t), t))
    # The posterior in variance form, so that the ends (s = 0 at t = 0, c = 0 at t = 1) give x0 and x1 (up to one
    # rounding where σ² is not exact in binary) instead of 0/0.
    denominator = c**2 + a**2 * s**2
    mean = (c**2 * m * x0 + a * s**2 * x1) / denominator
    return mean + z * s * c / denominator.sqrt()


def bridge_targets(process: Process, x0: Tensor, x1: Tensor, xt: Tensor, t: Tensor, direction: str) -> Tensor:
    """The drift of `direction` that reproduces the reference's bridge at (x_t, t): Shi et al. 2023, eq. (8).

    forward: f + g² ∇ log p(x1 | x_t) = f + g² a (x1 - a x_t) / c²   (Brownian: (x1 - x_t) / (1 - t))
    backward: -f + g² ∇ log p(x_t | x0) = -f + g² (m_t x0 - x_t) / s_t²   (Brownian: (x0 - x_t) / t)
    """
    f, g = process.sde(xt, t)
    g2 = append_dims(g, xt.ndim).to(xt.dtype) ** 2
    if direction == "forward":
        a, c = (append_dims(v, xt.ndim).to(xt.dtype) for v in process.transition(torch.ones_like(t), t))
        return f + g2 * a * (x1 - a * xt) / c**2
    opposite(direction)
    m, s = (append_dims(v, xt.ndim).to(xt.dtype) for v in process.marginal(t))
    return -f + g2 * (m * x0 - xt) / s**2


# --------------------------------------------------------------------------- the entropic OT checks


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_coupling(cov0: np.ndarray, cov1: np.ndarray, sigma: float) -> np.ndarray:
    """The cross-covariance C = Cov(X_0, X_1) (D, D) of the Schrödinger bridge between N(m0, cov0) and N(m1, cov1)
    with the reference dX = σ dW on [0, 1] (the plan is Gaussian; the means only shift it):

        C = (Σ0^½ D Σ0^-½ - σ² I) / 2,   D = (4 Σ0^½ Σ1 Σ0^½ + σ⁴ I)^½

    (Janati et al. 2020, arXiv:2006.02572, Thm. 1, with their σ² = our σ²; Bunne et al. 2023, Thm. 3). The joint
    precision's off-diagonal block is then -I / σ², the Brownian kernel's (tests/test_bridge.py checks it).
    """
    cov0, cov1 = np.asarray(cov0, dtype=np.float64), np.asarray(cov1, dtype=np.float64)
    eye = np.eye(len(cov0))
    root = _sym_sqrt(cov0)
    d = _sym_sqrt(4.0 * root @ cov1 @ root + sigma**4 * eye)
    return 0.5 * (root @ d @ np.linalg.inv(root) - sigma**2 * eye)


def gaussian_ot_cost(mean0, cov0, mean1, cov1, sigma: float) -> float:
    """E|X_0 - X_1|² under the Gaussian bridge plan: |m0 - m1|² + tr Σ0 + tr Σ1 - 2 tr C."""
    c = gaussian_coupling(cov0, cov1, sigma)
    diff = np.asarray(mean0, dtype=np.float64) - np.asarray(mean1, dtype=np.float64)
    return float(diff @ diff + np.trace(cov0) + np.trace(cov1) - 2.0 * np.trace(c))


def coupling_cost(x0: Tensor | np.ndarray, x1: Tensor | np.ndarray, left_out_variance: float = 0.0) -> float:
    """The cost of a coupling given by its pairs (x0_i, x1_i), (N, *D) each: the mean |x0 - x1|², plus D times the
    per-coordinate variance of noise left out of x1 that is independent of both (denoised_variance): exactly the
    cost of the pairs with that noise put back, in expectation."""
    a, b = (np.asarray(v, dtype=np.float64).reshape(len(v), -1) for v in (x0, x1))
    return float(((a - b) ** 2).sum(1).mean() + a.shape[1] * left_out_variance)


def sinkhorn_cost(x0: np.ndarray, x1: np.ndarray, sigma: float, *, max_iter: int = 10_000,
                  tol: float = 1e-9) -> float:
    """Σ_ij π_ij |x0_i - x1_j|² of POT's entropic plan π between the uniform empirical measures of x0 and x1 (N, D)
    for the cost |x - y|² / 2 and regularisation σ² (log-domain Sinkhorn): the cost of the bridge's plan on these
    samples. Refuses a run that did not converge."""
    import ot

    a, b = (np.asarray(v, dtype=np.float64).reshape(len(v), -1) for v in (x0, x1))
    cost = ot.dist(a, b, metric="sqeuclidean")
    weights_a, weights_b = np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b))
    plan, log = ot.sinkhorn(weights_a, weights_b, cost / 2.0, sigma**2, method="sinkhorn_log",
                            numItermax=max_iter, stopThr=tol, log=True)
    if not log["err"] or log["err"][-1] > tol * 10:
        raise RuntimeError(f"Sinkhorn did not converge in {max_iter} iterations (marginal error "
                           f"{log['err'][-1] if log['err'] else float('nan'):.3g})")
    return float((plan * cost).sum())
