"""Training losses: small callables loss(model, x, cond=None, generator=None) -> per-example loss (B,).

The caller reduces (mean) and applies any further weighting.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from pipeline.parameterization import make_score_fn
from pipeline.processes import Process, append_dims


class DenoisingScoreMatching:
    """Denoising score matching with weighting lambda = std(t)^2, one random time per example.

    Per example 1/2 lambda ||s(x_t, t) + z / std||^2 = 1/2 ||std s(x_t, t) + z||^2, summed over
    dimensions: eq. (2) of Song & Ermon 2019 (arXiv:1907.05600) with lambda(sigma) = sigma^2.
    """

    def __init__(self, process: Process, parameterization: str):
        self.process = process
        self.parameterization = parameterization

    def __call__(self, model: nn.Module, x: Tensor, cond: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        t = self.process.sample_time(x.shape[0], generator).to(x.dtype)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x_t = self.process.perturb(x, t, z)
        score = make_score_fn(model, self.process, self.parameterization)(x_t, t)
        _, std = self.process.marginal(t)
        residual = append_dims(std, x.ndim).to(x.dtype) * score + z
        return 0.5 * residual.pow(2).flatten(1).sum(1)
