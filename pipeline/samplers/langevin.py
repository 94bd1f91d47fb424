"""Langevin dynamics and annealed Langevin dynamics.

Song & Ermon 2019 (arXiv:1907.05600), Algorithm 1; NCSNv2 (arXiv:2006.09011) adds the
final denoising step x + sigma_L^2 s(x, sigma_L).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.parameterization import ScoreFn, x0_from_score
from pipeline.processes import Process


def langevin_step(x: Tensor, t: Tensor, score_fn: ScoreFn, alpha: float, generator: torch.Generator) -> Tensor:
    """One unadjusted Langevin step x + alpha s(x, t) + sqrt(2 alpha) z at fixed time t (B,)."""
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x + alpha * score_fn(x, t) + (2 * alpha) ** 0.5 * z


def annealed_step_sizes(stds: Tensor, step_size: float) -> Tensor:
    """alpha_i = eps sigma_i^2 / sigma_L^2 (Algorithm 1), for the float64 noise levels sigma_1..sigma_L."""
    return step_size * stds**2 / stds[-1] ** 2


@dataclass
class SampleResult:
    """Samples (N, *D) and the number of score (network) evaluations per sample."""

    x: Tensor
    nfe: int


def annealed_langevin(
    score_fn: ScoreFn,
    process: Process,
    shape: tuple[int, ...],
    step_size: float,
    steps_per_scale: int,
    generator: torch.Generator,
    denoise: bool = True,
    progress: bool = False,
) -> SampleResult:
    """Annealed Langevin dynamics from the prior over process.grid(), T steps per level.

    Step sizes come from the std of each grid time, so the same sampler serves any process
    whose grid ends near the data (std small).
    """
    grid = process.grid()
    _, stds = process.marginal(grid)
    alphas = annealed_step_sizes(stds, step_size)
    x = process.prior_sample(shape, generator)
    nfe = 0
    bar = tqdm(total=len(grid) * steps_per_scale, desc="annealed Langevin", disable=not progress, mininterval=1.0)
    for t_i, alpha in zip(grid, alphas):
        t = torch.full((shape[0],), float(t_i), dtype=x.dtype)
        for _ in range(steps_per_scale):
            x = langevin_step(x, t, score_fn, float(alpha), generator)
            nfe += 1
        bar.update(steps_per_scale)
    bar.close()
    if denoise:
        t = torch.full((shape[0],), float(grid[-1]), dtype=x.dtype)
        x = x0_from_score(x, score_fn(x, t), t, process)
        nfe += 1
    return SampleResult(x, nfe)
