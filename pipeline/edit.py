"""SDEdit: edit an input by noising it part of the way and solving the reverse process back (Meng et al. 2021).

Meng et al. 2021 (arXiv:2108.01073), Algorithm 1: x(t0) = m(t0) x + std(t0) z by the forward marginal, then the
reverse process from t0 to the data. Here the reverse process is any grid sampler: `pipeline.samplers.plan`'s step
walked by the one walker over the tail grid[start:] of its own grid, so there is no copy of a sampler. t0 in (0, 1]
is the fraction of the sampling grid walked (`start_index`): small t0 stays faithful to the input, t0 = 1 forgets
it (their trade-off of realism against faithfulness). All noise is drawn through pipeline.rng; every tensor lives on
x's device with x's dtype.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from pipeline import rng
from pipeline.processes import Process
from pipeline.samplers import plan
from pipeline.samplers.walk import SampleResult, walk


def start_index(grid_len: int, t0: float) -> int:
    """The grid position an edit at t0 in (0, 1] starts from: round((1 - t0) (grid_len - 1)), at most grid_len - 2.

    The walk covers the last t0 fraction of the grid's steps, one step at least. What a position is, per sampler:
    a continuous process's grid linspace(T, t_min, steps + 1): time t_min + t0 (T - t_min), about t0 T;
    DDPM's chain N-1, ..., 0, -1 (ancestral, ddim, the learned kernel): step index about t0 N - 1, walking
    about t0 N steps; annealed Langevin's [sigma_1, sigma_1, sigma_2, ..., sigma_L]: the state at grid position p
    is a draw at level grid[p] (the repeated sigma_1 at p = 0 and 1), and the walk runs the Langevin steps of the
    L - p levels below it, about the last t0 L levels. ValueError for t0 outside (0, 1].
    """
    if not 0.0 < t0 <= 1.0:
        raise ValueError(f"SDEdit's t0 is the fraction of the sampling grid walked, in (0, 1], got {t0}")
    if grid_len < 2:
        raise ValueError(f"SDEdit needs a sampling grid of at least 2 times, got {grid_len}")
    return min(round((1.0 - t0) * (grid_len - 1)), grid_len - 2)


def sdedit(sampler: str, model_kind: str, fn, process: Process, x: Tensor, t0: float, generator: rng.Generator,
           steps: Optional[int], options: Mapping[str, Any], *, progress: bool = False,
           record: Optional[int] = None) -> SampleResult:
    """Meng et al. 2021 (arXiv:2108.01073), Algorithm 1, for inputs x (B, *D): x perturbed to t = grid[start] by the
    forward marginal, m(t) x + std(t) z, then `sampler`'s step walked over grid[start:] (start_index(len(grid), t0)).

    (step, grid) are pipeline.samplers.plan's for sampler and options (as for draw), which refuses the RK45 ODE
    (it picks its own times: no tail of a grid to walk). fn is a score_fn, or a kernel_fn when model_kind ==
    "kernel". nfe is counted by the walker; record=k keeps k states of the walk, the perturbed input first.
    """
    step, grid, desc = plan(sampler, model_kind, process, steps, options)
    start = start_index(len(grid), t0)
    t = torch.full((x.shape[0],), float(grid[start]), dtype=x.dtype, device=x.device)
    x_start = process.perturb(x, t, rng.randn_like(x, generator))
    return walk(step, x_start, grid[start:], fn, process, generator, record=record, progress=progress,
                desc=f"{desc}, SDEdit from t0 = {t0:g}")


def rms_distance(a: Tensor, b: Tensor) -> Tensor:
    """The root-mean-square difference of a and b (B, *D) over all but the batch dimension, (B,): how far an edit
    moved each input (Meng et al. 2021 measure faithfulness by an L2 distance to the input)."""
    if a.shape != b.shape:
        raise ValueError(f"rms_distance compares tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 1:
        raise ValueError("rms_distance needs a batch dimension, (B, *D)")
    return (a - b).pow(2).reshape(a.shape[0], -1).mean(1).sqrt()
