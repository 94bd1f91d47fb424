"""Reflow (Liu et al. 2023, arXiv:2209.03003, sec. 2.2): the pairs (noise, sample) a flow draws, which the next
rectified flow is trained on, so that its paths are straight and few steps suffice.

The pairs come from the flow's ODE integrated by SciPy's RK45 (rtol = atol = 1e-5), as Liu et al. draw them. Noise
i is drawn from its own generator seeded from (seed, i) (pipeline.rng), so z does not depend on the batch size; x
does, by RK45's tolerance: SciPy picks the steps from the error of the whole batch (pipeline.samplers.ode), so the
pairs are a pure function of the flow, the seed and the batch size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.processes import Process
from pipeline.rng import SampleGenerators
from pipeline.samplers import draw

# The ODE the pairs are drawn with: Liu et al.'s RK45 at score_sde's tolerances.
PAIR_ODE = {"ode_method": "rk45", "rtol": 1e-5, "atol": 1e-5}


def draw_pairs(velocity_fn: Callable[[Tensor, Tensor], Tensor], process: Process, n: int, shape: Sequence[int],
               seed: int, batch_size: int, device: torch.device | str = "cpu", progress: bool = False
               ) -> tuple[Tensor, Tensor]:
    """(z, x), each (n, *shape) float32 on the CPU: noise z from the prior at t_max and the flow's sample x at t_min
    from it (RK45 on velocity_fn), batch after batch of `batch_size`."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"reflow needs n >= 1 pairs and batch_size >= 1, got {n} and {batch_size}")
    zs, xs = [], []
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="pairs", unit="batch", disable=not progress, mininterval=1.0):
            rows = range(start, min(start + batch_size, n))
            out = draw("ode", "velocity", velocity_fn, process, (len(rows), *shape), SampleGenerators(seed, rows),
                       None, PAIR_ODE, record=2, device=device)
            zs.append(out.trajectory[0][1].float().cpu())
            xs.append(out.x.float().cpu())
    return torch.cat(zs), torch.cat(xs)


def stacked(z: Tensor, x: Tensor) -> Tensor:
    """The pairs as the reflow loss takes them (pipeline.losses.ReflowLoss): (N, 2, *D), sample then noise."""
    return torch.stack([x, z], dim=1)
