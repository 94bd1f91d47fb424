"""The only place that converts between what a network outputs and the score.

Every consumer (losses, samplers, likelihoods) gets a `score_fn(x, t) -> score` from here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from pipeline.processes import Process, append_dims

ScoreFn = Callable[[Tensor, Tensor], Tensor]

# "score": the network outputs s(x, t) directly.
# "score_over_sigma": NCSNv2 technique 3, s(x, sigma) = s_theta(x) / sigma (arXiv:2006.09011, sec. 3.3).
PARAMETERIZATIONS = ("score", "score_over_sigma")


def score_from_output(output: Tensor, x: Tensor, t: Tensor, process: Process, parameterization: str) -> Tensor:
    """Convert a network output (shaped like x) at times t (B,) to the score."""
    if parameterization == "score":
        return output
    if parameterization == "score_over_sigma":
        _, std = process.marginal(t)
        return output / append_dims(std, x.ndim).to(output.dtype)
    raise ValueError(f"unknown parameterization {parameterization!r}; allowed: {', '.join(PARAMETERIZATIONS)}")


def make_score_fn(model: nn.Module, process: Process, parameterization: str) -> ScoreFn:
    """Wrap a network model(x, c) conditioned on c = process.conditioning(t) as score_fn(x, t)."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; allowed: {', '.join(PARAMETERIZATIONS)}")

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        out = model(x, process.conditioning(t).to(x.dtype))
        return score_from_output(out, x, t, process, parameterization)

    return score_fn


def x0_from_score(x: Tensor, score: Tensor, t: Tensor, process: Process) -> Tensor:
    """Tweedie's denoiser E[x0 | x_t] = (x_t + std^2 score) / mean_coef (Efron 2011)."""
    m, s = process.marginal(t)
    return (x + append_dims(s, x.ndim).to(x.dtype) ** 2 * score) / append_dims(m, x.ndim).to(x.dtype)
