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
# "eps": the noise, s = -eps / std (Ho et al. 2020, eq. (11); Song et al. 2021, appendix C).
# "x0": the clean data, s = (mean_coef x0 - x) / std^2 (Tweedie).
# "drift": Huang et al. 2021's a = g s (arXiv:2106.02808, sec. 4; sdeflow-light), s = a / g.
PARAMETERIZATIONS = ("score", "score_over_sigma", "eps", "x0", "drift")


def _b(v: Tensor, like: Tensor) -> Tensor:
    return append_dims(v, like.ndim).to(like.dtype)


def score_from_output(output: Tensor, x: Tensor, t: Tensor, process: Process, parameterization: str) -> Tensor:
    """Convert a network output (shaped like x) at times t (B,) to the score."""
    if parameterization == "score":
        return output
    if parameterization == "score_over_sigma":
        return output / _b(process.marginal(t)[1], output)
    if parameterization == "eps":
        return -output / _b(process.marginal(t)[1], output)
    if parameterization == "x0":
        m, std = process.marginal(t)
        return (_b(m, output) * output - x) / _b(std, output) ** 2
    if parameterization == "drift":
        return output / _b(process.sde(x, t)[1], output)
    raise ValueError(f"unknown parameterization {parameterization!r}; allowed: {', '.join(PARAMETERIZATIONS)}")


def output_from_score(score: Tensor, x: Tensor, t: Tensor, process: Process, parameterization: str) -> Tensor:
    """The inverse of score_from_output: what a network of this parameterization should output."""
    if parameterization == "score":
        return score
    if parameterization == "score_over_sigma":
        return score * _b(process.marginal(t)[1], score)
    if parameterization == "eps":
        return -score * _b(process.marginal(t)[1], score)
    if parameterization == "x0":
        m, std = process.marginal(t)
        return (x + _b(std, score) ** 2 * score) / _b(m, score)
    if parameterization == "drift":
        return score * _b(process.sde(x, t)[1], score)
    raise ValueError(f"unknown parameterization {parameterization!r}; allowed: {', '.join(PARAMETERIZATIONS)}")


def eps_from_score(score: Tensor, t: Tensor, process: Process) -> Tensor:
    """eps_hat = -std score: the noise estimate DDPM/DDIM steps use."""
    return -score * _b(process.marginal(t)[1], score)


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
