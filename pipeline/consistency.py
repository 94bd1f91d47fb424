"""Consistency distillation (Song et al. 2023, arXiv:2303.01469, Algorithm 2): train f(x_t, t) to give the same
data estimate at neighbouring times of the teacher's probability-flow ODE.

For data x0, an interval n of the discretisation t_max = t_0 > ... > t_{N−1} = t_min and z ~ N(0, I): x_hi =
m(t_n) x0 + std(t_n) z, one Heun step of the teacher's ODE from t_n to t_{n+1} gives x_lo, and the loss is
d(f_θ(x_hi, t_n), f_θ⁻(x_lo, t_{n+1})). Choices, each from a later paper of the same line:

- θ⁻ = stopgrad(θ) (Song & Dhariwal 2023, arXiv:2310.14189, sec. 3.2: the EMA teacher of the first paper is not
  needed; Geng et al. 2024 keep it so), so the target is the student itself under no_grad;
- d is the pseudo-Huber metric sqrt(|a − b|² + c²) − c with c = 0.00054 √D (Song & Dhariwal 2023, sec. 3.3), LPIPS
  being an ImageNet network this project does not ship;
- f is the network's own x0_hat (Tweedie's from a score, or from a flow's velocity), initialised from the teacher:
  easy consistency tuning's parameterization (Geng et al. 2024, arXiv:2406.14548), where the diffusion model's
  denoiser is already a consistency function at t_min (x0_hat ≈ x where std ≈ 0) and the boundary condition holds
  without an extra c_skip.

The ODE step asks the process for its field: the probability-flow drift of a score, or a flow's velocity
(pipeline.samplers.ode.ode_field); shapes (B, *D), times per example.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from pipeline import rng
from pipeline.parameterization import bind_labels, score_from_output, x0_from_score, x0_from_velocity
from pipeline.processes import Process, append_dims
from pipeline.samplers.fast import fast_grid
from pipeline.samplers.ode import ode_field


def make_x0_fn(model: nn.Module, process: Process, parameterization: str) -> Callable[[Tensor, Tensor], Tensor]:
    """x0_hat(x, t) of a network of this parameterization, t (B,): from its velocity, or Tweedie's from its score."""

    def x0_fn(x: Tensor, t: Tensor) -> Tensor:
        out = model(x, process.conditioning(t).to(x.dtype))
        if parameterization == "velocity":
            return x0_from_velocity(out, x, t, process)
        return x0_from_score(x, score_from_output(out, x, t, process, parameterization), t, process)

    return x0_fn


def distillation_grid(process: Process, num_scales: int, spacing: str) -> Tensor:
    """The N = num_scales times t_max → t_min of the teacher's discretisation, float64: the few-step grid (EDM's
    ρ-schedule, as Song et al.; uniform time where σ(t_max) is infinite) with N times from t_max to t_min. A clean end
    below t_min (σ = 0 at t = 0 of VP or EDM, where no score exists) is left out; the linear path's t_min is 0."""
    if num_scales < 2:
        raise ValueError(f"consistency distillation needs num_scales >= 2 times, got {num_scales}")
    grid = fast_grid(process, num_scales - 1, spacing)
    if float(grid[-1]) < process.t_min:
        grid = fast_grid(process, num_scales, spacing)[:-1]
    return grid


def pseudo_huber(a: Tensor, b: Tensor) -> Tensor:
    """sqrt(|a − b|² + c²) − c per example, c = 0.00054 √D (Song & Dhariwal 2023, sec. 3.3), (B,)."""
    c = 0.00054 * math.sqrt(a[0].numel())
    return torch.sqrt((a - b).pow(2).flatten(1).sum(1) + c * c) - c


class ConsistencyDistillationLoss:
    """loss(model, x, cond=None, generator=None) -> (B,): Algorithm 2's loss for one random interval per example.

    teacher: the trained model's fn (a score_fn, or a velocity_fn with field "velocity"), frozen; parameterization:
    what the student network outputs (the teacher's, whose weights it starts from); grid: distillation_grid's times.
    Draws n, then z, from `generator`."""

    def __init__(self, process: Process, teacher: Callable, parameterization: str, grid: Tensor,
                 field: str = "score"):
        if len(grid) < 2:
            raise ValueError(f"consistency distillation needs at least two times, got {len(grid)}")
        self.process, self.parameterization, self.grid = process, parameterization, grid.to(torch.float64)
        self.drift = ode_field(process, teacher, field)

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        p, b = self.process, x.shape[0]
        n = torch.randint(len(self.grid) - 1, (b,), generator=generator)
        t_hi = self.grid[n].to(device=x.device, dtype=x.dtype)
        t_lo = self.grid[n + 1].to(device=x.device, dtype=x.dtype)
        z = rng.randn_like(x, generator)
        x_hi = p.perturb(x, t_hi, z)
        dt = append_dims(t_lo - t_hi, x.ndim)
        with torch.no_grad():  # the teacher's Heun step (Karras et al. 2022, Algorithm 1), then the target
            d_hi = self.drift(x_hi, t_hi)
            x_euler = x_hi + dt * d_hi
            x_lo = x_hi + 0.5 * dt * (d_hi + self.drift(x_euler, t_lo))
            f = make_x0_fn(bind_labels(model, cond), p, self.parameterization)
            target = f(x_lo, t_lo)
        return pseudo_huber(f(x_hi, t_hi), target)
