"""The multistep consistency sampler (Song et al. 2023, arXiv:2303.01469, Algorithm 1) as a walker step.

A consistency model f(x_t, t) maps a point of the ODE's trajectory at time t to its end, the data. One step from
t_max is f(x_T, T); each further step noises the last estimate to the next time of the grid, x = m x0 + std z with
z from the sample's generator, and maps it back: x0 = f(x, t). The grid is a few-step one (pipeline.samplers.fast:
EDM's ρ-schedule, or uniform time where σ(t_max) is infinite), its last time the data end, where the walk returns
f's estimate itself; one network evaluation per step. f is read from the network as its x0_hat: Tweedie's from a
score, or from a flow's velocity (pipeline.samplers.fast.denoised), the parameterization of easy consistency tuning
(Geng et al. 2024, arXiv:2406.14548), where the consistency function is the diffusion model's own denoiser. Its
output is data at σ = 0, so the next level is x0 + τ z (the process's perturb), where Algorithm 1, whose f(x, ε) = x
sits at level ε, adds sqrt(τ² − ε²) z; diffusers' CMStochasticIterativeScheduler is that (tests/test_diffusers.py).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

from pipeline import rng
from pipeline.processes import Process
from pipeline.samplers.fast import denoised, fast_grid


def consistency_step(x: Tensor, t_cur: float, t_next: float, fn: Callable, process: Process,
                     generator: rng.Generator = None, end: float = 0.0, field: str = "score") -> Tensor:
    """x0 = f(x, t_cur); at the grid's `end` that estimate, else x0 noised to t_next from `generator`."""
    x0 = denoised(x, t_cur, fn, process, field)
    if t_next == end:
        return x0
    t = torch.full((x.shape[0],), t_next, dtype=x.dtype, device=x.device)
    return process.perturb(x0, t, rng.randn_like(x0, generator))


def consistency_plan(process: Process, steps: int, spacing: str, field: str) -> tuple[Callable[..., Tensor], Tensor]:
    """(step, grid) of `steps` consistency steps: the first `steps` levels of fast_grid(process, steps + 1, spacing)
    and its data end, so that the intermediate times are spread over the schedule (two steps on EDM's process:
    σ 80, 2.5, then the data; Song et al. pick 0.821 for CIFAR-10 by search) rather than ending at σ_min."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the consistency sampler needs an integer number of steps >= 1, got {steps!r}")
    levels = fast_grid(process, steps + 1, spacing)
    grid = torch.cat([levels[:steps], levels[-1:]])
    return partial(consistency_step, end=float(grid[-1]), field=field), grid
