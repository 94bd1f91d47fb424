"""Predictor-corrector sampling (Song et al. 2021, arXiv:2011.13456, sec. 4.2, Algorithms 2-5).

A predictor steps the reverse-time SDE from t_cur to t_next; a corrector runs score-based MCMC at
t_next. Every step is a function of (x, t_cur, t_next, score_fn, process, generator) that only
asks the process. Predictors return (x, x_mean) so the last step can drop its noise (`denoise`).
`pc_step` is one predictor step and its corrector as a single step of pipeline.samplers.walk.

Batch coupling: the Langevin corrector's step size uses norms averaged over the batch (as score_sde
does), so with corrector="langevin" a sample depends on the other samples of its batch and the
sampler is not batch-size invariant. Every other predictor and corrector treats samples independently.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from pipeline import rng
from pipeline.parameterization import ScoreFn
from pipeline.processes import Process, append_dims
from pipeline.samplers.ddpm import ancestral_posterior
from pipeline.samplers.walk import SampleResult, prior_walk


def _b(v: Tensor, x: Tensor) -> Tensor:
    return append_dims(v, x.ndim).to(x.dtype)


def _noise(x: Tensor, generator: rng.Generator) -> Tensor:
    return rng.randn_like(x, generator)


def _times(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def euler_maruyama(x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
                   generator: rng.Generator, lam: float = 0.0) -> tuple[Tensor, Tensor]:
    """Euler-Maruyama on Huang et al.'s plug-in reverse SDE family (arXiv:2106.02808, eq. (7)):

    dx = [f - (1 - lam/2) g^2 s] dt + sqrt(1 - lam) g dW-bar, dt = t_next - t_cur < 0.
    lam = 0 is the reverse SDE (Song et al. 2021, eq. (6)), lam = 1 the probability-flow ODE.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"the plug-in reverse SDE needs lambda in [0, 1], got {lam}")
    t = _times(x, t_cur)
    f, g = process.sde(x, t)
    dt = t_next - t_cur
    x_mean = x + (f - (1 - 0.5 * lam) * _b(g, x) ** 2 * score_fn(x, t)) * dt
    return x_mean + _b((1 - lam) ** 0.5 * g * abs(dt) ** 0.5, x) * _noise(x, generator), x_mean


def reverse_diffusion(x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
                      generator: rng.Generator) -> tuple[Tensor, Tensor]:
    """The reverse of the process's own discretisation x_t = x_s + f + G z (Song et al. 2021, eq. (46)):

    x_mean = x - f + G^2 s(x, t), x = x_mean + G z; with DDPM / SMLD discretisations of VP / VE.
    """
    t = _times(x, t_cur)
    f, big_g = process.discretize(x, t, torch.full_like(t, t_next))
    x_mean = x - f + _b(big_g, x) ** 2 * score_fn(x, t)
    return x_mean + _b(big_g, x) * _noise(x, generator), x_mean


def ancestral(x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process,
              generator: rng.Generator) -> tuple[Tensor, Tensor]:
    """The ancestral predictor: a draw from q(x_s | x_t, x0_hat) (pipeline.samplers.ddpm)."""
    mean, std = ancestral_posterior(x, t_cur, t_next, score_fn, process)
    return mean + _b(std, x) * _noise(x, generator), mean


def langevin_corrector(x: Tensor, t: float, score_fn: ScoreFn, process: Process,
                       generator: rng.Generator, snr: float, n_steps: int) -> tuple[Tensor, int]:
    """Langevin MCMC at time t with step 2 (snr ||z|| / ||s||)^2 (Song et al. 2021, Algorithm 4/5).

    As in score_sde the norms are averaged over the batch: per-example norms give the points
    near a mode (small ||s||) huge steps, which biased the exact-score oracle by 15 standard errors.
    This couples the samples of a batch, so this corrector is not batch-size invariant: the same
    per-sample generators give different samples in batches of different sizes.
    score_sde also scales the step by alpha_i = 1 - beta_i, within 2% of 1 for VP's default; we use 1.
    """
    tt = _times(x, t)
    for _ in range(n_steps):
        s = score_fn(x, tt)
        z = _noise(x, generator)
        ratio = z.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean().clamp_min(1e-12)
        eps = 2 * (snr * ratio) ** 2
        x = x + eps * s + torch.sqrt(2 * eps) * z
    return x, n_steps


def ald_corrector(x: Tensor, t: float, score_fn: ScoreFn, process: Process,
                  generator: rng.Generator, snr: float, n_steps: int) -> tuple[Tensor, int]:
    """Annealed Langevin dynamics as a corrector: step 2 (snr std(t))^2 (score_sde's AnnealedLangevinDynamics)."""
    tt = _times(x, t)
    eps = 2 * (snr * process.marginal(tt)[1]) ** 2
    for _ in range(n_steps):
        x = x + _b(eps, x) * score_fn(x, tt) + _b(torch.sqrt(2 * eps), x) * _noise(x, generator)
    return x, n_steps


def no_corrector(x: Tensor, t: float, score_fn: ScoreFn, process: Process,
                 generator: rng.Generator, snr: float, n_steps: int) -> tuple[Tensor, int]:
    """No correction."""
    return x, 0


PREDICTORS: dict[str, Callable] = {"euler_maruyama": euler_maruyama, "reverse_diffusion": reverse_diffusion,
                                   "ancestral": ancestral}
CORRECTORS: dict[str, Callable] = {"langevin": langevin_corrector, "ald": ald_corrector, "none": no_corrector}


def pc_step(x: Tensor, t_cur: float, t_next: float, score_fn: ScoreFn, process: Process, generator: rng.Generator,
            predictor: str = "reverse_diffusion", corrector: str = "langevin", snr: float = 0.16,
            corrector_steps: int = 1, lam: float = 0.0, denoise: bool = True, t_end: Optional[float] = None) -> Tensor:
    """One PC step: the predictor from t_cur to t_next, then the corrector at t_next (Song et al. 2021, Alg. 1).

    The step that ends at t_end (the grid's last time; process.t_min by default) returns the predictor's
    mean instead when `denoise` (score_sde's noise removal) and runs no corrector. `lam` is Huang's lambda
    for the euler_maruyama predictor. With corrector="langevin" it is not batch-size invariant (see
    langevin_corrector).
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; allowed: {', '.join(PREDICTORS)}")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}; allowed: {', '.join(CORRECTORS)}")
    options = {"lam": lam} if predictor == "euler_maruyama" else {}
    x, x_mean = PREDICTORS[predictor](x, t_cur, t_next, score_fn, process, generator, **options)
    if denoise and t_next == (process.t_min if t_end is None else t_end):
        return x_mean
    return CORRECTORS[corrector](x, t_next, score_fn, process, generator, snr, corrector_steps)[0]


def pc_sampler(score_fn: ScoreFn, process: Process, shape: tuple[int, ...], generator: rng.Generator,
               steps: Optional[int] = None, predictor: str = "reverse_diffusion", corrector: str = "langevin",
               snr: float = 0.16, corrector_steps: int = 1, lam: float = 0.0, denoise: bool = True,
               progress: bool = False, *, device=None, record: Optional[int] = None) -> SampleResult:
    """PC sampling over process.grid(steps) from a prior draw: pc_step walked over the grid; the last
    predictor step returns its mean when `denoise` (score_sde's noise removal). `lam` is Huang's lambda for
    the euler_maruyama predictor.

    With the default corrector="langevin" the sampler is not batch-size invariant: the corrector's step
    size averages norms over the batch (see langevin_corrector); with "ald" or "none" it is.
    """
    step, grid = pc_plan(process, steps, predictor, corrector, snr, corrector_steps, lam, denoise)
    return prior_walk(step, score_fn, process, shape, generator, grid, device=device, record=record,
                      progress=progress, desc="PC sampling")


def pc_plan(process: Process, steps: Optional[int], predictor: str, corrector: str, snr: float,
            corrector_steps: int, lam: float, denoise: bool):
    """(step, grid) of the PC sampler: pc_step bound to its options over process.grid(steps), denoising at the
    grid's last time; what pc_sampler walks, and what guidance and inpainting wrap (pipeline.samplers.plan)."""
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; allowed: {', '.join(PREDICTORS)}")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}; allowed: {', '.join(CORRECTORS)}")
    grid = process.grid(steps)
    step = partial(pc_step, predictor=predictor, corrector=corrector, snr=snr, corrector_steps=corrector_steps,
                   lam=lam, denoise=denoise, t_end=float(grid[-1]))
    return step, grid
