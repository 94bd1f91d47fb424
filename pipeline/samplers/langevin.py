"""Langevin dynamics and annealed Langevin dynamics.

Song & Ermon 2019 (arXiv:1907.05600), Algorithm 1; NCSNv2 (arXiv:2006.09011) adds the
final denoising step x + sigma_L^2 s(x, sigma_L).

Annealed Langevin is a walk (pipeline.samplers.walk) over the noise levels with the first level
repeated, [sigma_1, sigma_1, sigma_2, ..., sigma_L]: the step to level t_next runs T Langevin steps at
t_next (the first one, from the prior N(0, sigma_1^2 I), moves no time), and the step that ends at the
last level also denoises. So it is a PC sampler whose predictor is the identity.
"""

from __future__ import annotations

from functools import partial
from typing import Mapping, Optional

import torch
from torch import Tensor

from pipeline import rng
from pipeline.parameterization import ScoreFn, x0_from_score
from pipeline.processes import Process
from pipeline.samplers.walk import SampleResult, prior_walk

__all__ = ["SampleResult", "annealed_langevin", "annealed_langevin_plan", "annealed_langevin_step", "annealed_step_sizes",
           "langevin_step"]


def langevin_step(x: Tensor, t: Tensor, score_fn: ScoreFn, alpha: float, generator: rng.Generator) -> Tensor:
    """One unadjusted Langevin step x + alpha s(x, t) + sqrt(2 alpha) z at fixed time t (B,)."""
    z = rng.randn_like(x, generator)
    return x + alpha * score_fn(x, t) + (2 * alpha) ** 0.5 * z


def annealed_step_sizes(stds: Tensor, step_size: float) -> Tensor:
    """alpha_i = eps sigma_i^2 / sigma_L^2 (Algorithm 1), for the float64 noise levels sigma_1..sigma_L."""
    return step_size * stds**2 / stds[-1] ** 2


def annealed_langevin_step(x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
                           generator: rng.Generator, alphas: Mapping[float, float], steps_per_scale: int,
                           denoise: bool = True, t_end: Optional[float] = None) -> Tensor:
    """T = steps_per_scale Langevin steps at level t_next with step size alphas[t_next] (Algorithm 1's
    inner loop); the step that ends at t_end (the last level; process.t_min by default) then returns
    Tweedie's denoised (x + std^2 s(x, t_end)) / mean_coef when `denoise` (NCSNv2's final denoising step)."""
    t = torch.full((x.shape[0],), t_next, dtype=x.dtype, device=x.device)
    alpha = alphas[t_next]
    for _ in range(steps_per_scale):
        x = langevin_step(x, t, score_fn, alpha, generator)
    if denoise and t_next == (process.t_min if t_end is None else t_end):
        x = x0_from_score(x, score_fn(x, t), t, process)
    return x


def annealed_langevin(
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    step_size: float,
    steps_per_scale: int,
    generator: rng.Generator,
    denoise: bool = True,
    progress: bool = False,
    *,
    device=None,
    record: Optional[int] = None,
) -> SampleResult:
    """Annealed Langevin dynamics from the prior over process.grid(), T steps per level.

    Step sizes come from the std of each grid time, so the same sampler serves any process
    whose grid ends near the data (std small). Samples are independent of each other (batch-size
    invariant with per-sample generators).
    """
    step, walk_grid = annealed_langevin_plan(process, step_size, steps_per_scale, denoise)
    return prior_walk(step, score_fn, process, shape, generator, walk_grid, device=device, record=record,
                      progress=progress, desc="annealed Langevin")


def annealed_langevin_plan(process: Process, step_size: float, steps_per_scale: int, denoise: bool = True):
    """(step, grid) of annealed Langevin: the levels of process.grid() with the first repeated (the first step
    stays at sigma_1: Langevin on the prior draw), step sizes from each level's std (Algorithm 1); what
    annealed_langevin walks, and what guidance and inpainting wrap (pipeline.samplers.plan)."""
    grid = process.grid()
    _, stds = process.marginal(grid)
    levels = grid.tolist()
    alphas = dict(zip(levels, annealed_step_sizes(stds, step_size).tolist()))
    step = partial(annealed_langevin_step, alphas=alphas, steps_per_scale=steps_per_scale, denoise=denoise,
                   t_end=levels[-1])
    return step, torch.tensor([levels[0]] + levels, dtype=torch.float64)
