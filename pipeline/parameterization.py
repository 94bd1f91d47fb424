"""The only place that converts between what a network outputs and the score.

Every consumer (losses, samplers, likelihoods) gets a `score_fn(x, t) -> score` from here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from pipeline.names import SCORE_PARAMETERIZATIONS
from pipeline.processes import Process, append_dims

ScoreFn = Callable[[Tensor, Tensor], Tensor]

# "score": the network outputs s(x, t) directly.
# "score_over_sigma": NCSNv2 technique 3, s(x, sigma) = s_theta(x) / sigma (arXiv:2006.09011, sec. 3.3).
# "eps": the noise, s = -eps / std (Ho et al. 2020, eq. (11); Song et al. 2021, appendix C).
# "x0": the clean data, s = (mean_coef x0 - x) / std^2 (Tweedie).
# "drift": Huang et al. 2021's a = g s (arXiv:2106.02808, sec. 4; sdeflow-light), s = a / g.
PARAMETERIZATIONS = SCORE_PARAMETERIZATIONS


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
    """Wrap a network model(x, c[, y]) conditioned on c = process.conditioning(t) as score_fn(x, t, y=None).

    y: optional int64 label indices (B,) passed on to the network (pipeline.guidance: 0 the null label);
    samplers call score_fn(x, t), and y=None calls model(x, c) exactly as an unconditional network expects.
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; allowed: {', '.join(PARAMETERIZATIONS)}")

    def score_fn(x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        c = process.conditioning(t).to(x.dtype)
        out = model(x, c) if y is None else model(x, c, y)
        return score_from_output(out, x, t, process, parameterization)

    return score_fn


def bind_labels(model: Callable[..., Tensor], y: Tensor | None) -> Callable[..., Tensor]:
    """model(x, c) that calls a class-conditional network as model(x, c, y), y (B,) int64 label indices of the
    batch (pipeline.guidance: 0 the null label); the model itself when y is None. Losses bind their `cond` so
    every score and kernel built from the model sees the labels."""
    if y is None:
        return model
    return lambda x, c: model(x, c, y)


def x0_from_score(x: Tensor, score: Tensor, t: Tensor, process: Process) -> Tensor:
    """Tweedie's denoiser E[x0 | x_t] = (x_t + std^2 score) / mean_coef (Efron 2011)."""
    m, s = process.marginal(t)
    return (x + append_dims(s, x.ndim).to(x.dtype) ** 2 * score) / append_dims(m, x.ndim).to(x.dtype)


def clip_denoised(score_fn: ScoreFn, process: Process, low: float, high: float) -> ScoreFn:
    """The score rewritten from Tweedie's x0_hat clipped to [low, high]: s' = (m clip(x0_hat) - x) / std^2.

    What Ho et al. 2020's reference sampler does (`clip_denoised=True`: x0_hat clipped to [-1, 1] before the
    posterior mean of eq. (7)) and diffusers' DDIMScheduler (`clip_sample`), written as a score so that every
    sampler that steps through x0_hat (ancestral, DDIM) takes it unchanged. Where x0_hat already lies in the
    data range the score is unchanged. Shapes (B, *D), t (B,).
    """

    def clipped(x: Tensor, t: Tensor) -> Tensor:
        m, std = process.marginal(t)
        x0 = x0_from_score(x, score_fn(x, t), t, process).clamp(low, high)
        return (_b(m, x) * x0 - x) / _b(std, x) ** 2

    clipped.evaluations = getattr(score_fn, "evaluations", 1)  # the walker's nfe counts what the wrapped one costs
    return clipped


# "velocity": flow matching's network outputs the velocity dx_t/dt of the path's probability-flow ODE (Lipman et al.
# 2023, arXiv:2210.02747; Liu et al. 2023, arXiv:2209.03003), here in this codebase's time (data at t = 0). Its
# samplers and likelihood take the velocity itself: on the linear path the score-to-x0 conversion divides by m,
# which is 0 at t = 1.
VelocityFn = Callable[[Tensor, Tensor], Tensor]


def velocity_from_x0(x0: Tensor, x: Tensor, t: Tensor, process: Process) -> Tensor:
    """The probability-flow velocity m' x0 + std' z with z = (x − m x0) / std, shaped like x (Lipman et al. 2023,
    eq. 15 at the posterior means E[x0 | x_t], E[z | x_t]); `x0` an estimate of E[x0 | x_t]. Needs std > 0."""
    (m, std), (dm, ds) = process.marginal(t), process.marginal_rates(t)
    return _b(dm, x) * x0 + _b(ds, x) * (x - _b(m, x) * x0) / _b(std, x)


def x0_from_velocity(v: Tensor, x: Tensor, t: Tensor, process: Process) -> Tensor:
    """E[x0 | x_t] from the velocity v = m' x0 + std' z and x = m x0 + std z: x0 = (std' x − std v) / (std' m −
    std m'), shaped like x. The denominator is the Wronskian of (m, std), 1 on the linear path at every t, so this
    holds at t = 1 (m = 0) where Tweedie's formula from the score does not."""
    (m, std), (dm, ds) = process.marginal(t), process.marginal_rates(t)
    return (_b(ds, x) * x - _b(std, x) * v) / _b(ds * m - std * dm, x)


def make_velocity_fn(model: nn.Module, process: Process) -> VelocityFn:
    """Wrap a velocity network model(x, c) conditioned on c = process.conditioning(t) as velocity_fn(x, t)."""

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        return model(x, process.conditioning(t).to(x.dtype))

    return velocity_fn


# "kernel": Sohl-Dickstein et al. 2015's reverse kernel p(x_s | x_t) = N(mean, diag(var)), learned
# mean and variance; the network outputs two maps shaped like x, stacked as (B, 2, *D).
KernelFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def reverse_variance_bounds(t: Tensor, s: Tensor, process: Process) -> tuple[Tensor, Tensor]:
    """(lower, upper) of the reverse variance from t to s, each (B,): beta_tilde and beta.

    Ho et al. 2020 (sec. 3.2): beta_tilde is optimal for a point-mass x0 and beta for x0 ~ N(0, I),
    the two extremes. At a clean end beta_tilde is 0 and the decoder's density would collapse; the
    lower bound there is beta / 2 (Ho et al. and Nichol & Dhariwal 2021 clip at beta_tilde of the
    next step instead, which is not defined from (t, s) alone; for long chains the two agree).
    """
    upper = process.transition(t, s)[1] ** 2
    _, std_s = process.marginal(s)
    _, std_t = process.marginal(t)
    tilde = upper * std_s**2 / std_t**2
    return torch.where(tilde > 0, tilde, upper / 2), upper


def kernel_from_output(output: Tensor, x: Tensor, t: Tensor, s: Tensor, process: Process) -> tuple[Tensor, Tensor]:
    """Mean and variance (each like x) of a learned reverse kernel from a (B, 2, *D) network output.

    Sohl-Dickstein et al. 2015 (arXiv:1503.03585, sec. 2.4 and appendix D) learn the mean and a
    diagonal variance of each reverse step. Here mean = (x + sigma_ts f_mu) / alpha, a residual in
    units of the step's own noise, and log var = v log beta + (1 - v) log beta_tilde_clipped with
    v = sigmoid(f_v) (the interpolation of Nichol & Dhariwal 2021, arXiv:2102.09672, eq. (15), with v
    squashed into [0, 1]; Sohl-Dickstein et al.'s code uses sigmoid(f + logit beta) instead).
    """
    alpha, sigma_ts = process.transition(t, s)
    lower, upper = reverse_variance_bounds(t, s, process)
    f_mu, f_v = output[:, 0], output[:, 1]
    mean = (x + _b(sigma_ts, x) * f_mu) / _b(alpha, x)
    v = torch.sigmoid(f_v)
    log_var = v * _b(torch.log(upper), x) + (1 - v) * _b(torch.log(lower), x)
    return mean, torch.exp(log_var)


def make_kernel_fn(model: nn.Module, process: Process) -> KernelFn:
    """Wrap a network model(x, c) -> (B, 2, *D) as kernel_fn(x_t, t, s) -> (mean, var)."""

    def kernel_fn(x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        return kernel_from_output(model(x, process.conditioning(t).to(x.dtype)), x, t, s, process)

    return kernel_fn


def kernel_from_score(score_fn: ScoreFn, process: Process, variance: str = "beta_tilde") -> KernelFn:
    """The fixed-variance reverse kernel of a score model: process.posterior at Tweedie's x0_hat.

    variance "beta_tilde" or "beta" (Ho et al. 2020, sec. 3.2), the lower one clipped at a clean
    end as in reverse_variance_bounds so that the decoder's density exists.
    """
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"unknown reverse variance {variance!r}; allowed: beta_tilde, beta")

    def kernel_fn(x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        mean, _ = process.posterior(x0_from_score(x, score_fn(x, t), t, process), x, t, s)
        lower, upper = reverse_variance_bounds(t, s, process)
        var = lower if variance == "beta_tilde" else upper
        return mean, _b(var, x).expand_as(x)

    return kernel_fn
