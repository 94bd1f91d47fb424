"""Post-hoc EMA: Karras et al. 2024 (EDM2, arXiv:2312.02696, sec. 3 and appendix C), the EMA length chosen after
training from snapshots of two power-function EMAs.

A power-function EMA of exponent gamma averages the weights theta(tau) of the run up to step t with the profile
p_{gamma,t}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (eq. 121); its relative standard deviation
(the profile's width over its age t) is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (eq. 123).
Training tracks it with theta_hat <- beta_t theta_hat + (1 - beta_t) theta_t, beta_t = (1 - 1/t)^(gamma + 1)
(eq. 127, one step per unit of t; step 1 copies the weights), and saves snapshots of every tracked profile.
Any other profile (gamma', T) is then the combination sum_k x_k theta_hat_k of the snapshots whose profiles come
closest to it in L2 (Algorithm 3: the snapshots' Gram matrix of profile inner products, eq. 151, against the
target's; solved, then scaled to sum to 1).

The weights are constant over each step (theta(tau) = theta_i on (i - 1, i]), and the betas telescope: after t
steps theta_i carries (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1), the profile's integral over (i - 1, i]. So the
tracked EMA is exactly the integral of p theta, and a reconstruction's only error is its profile's:
|theta_rec - theta_target| <= ||sum_k x_k p_k - p||_2 ||theta(.) - c||_2 for every constant c (Cauchy-Schwarz,
as sum_k x_k = 1), per parameter; Coefficients.residual is the first factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline import io
from pipeline.defaults import SIGMA_REL_MAX

SNAPSHOT_GLOB = "*.pt"


def sigma_rel_of(gamma: float) -> float:
    """EDM2 eq. 123: the relative standard deviation of the power-function profile of exponent gamma."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_of(sigma_rel: float) -> float:
    """EDM2 eq. 126 (Algorithm 2): the exponent gamma >= 0 of the profile of width sigma_rel in (0, sqrt(1/12)],
    the largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2)."""
    if not 0.0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}] (the uniform average is the widest "
                         f"profile), got {sigma_rel!r}")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return max(0.0, float(roots[np.abs(roots.imag) < 1e-9].real.max()))


def power_beta(gamma: float, t: int) -> float:
    """EDM2 eq. 127 with one step per unit of time: the decay of update t = 1, 2, ... (beta_1 = 0: a copy)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def power_multi_avg_fn(gamma: float) -> Callable:
    """torch.optim.swa_utils.AveragedModel's multi_avg_fn of the power-function EMA: AveragedModel copies the
    weights at update 1 and passes num_averaged = t - 1 at update t, so the weight of the new value is
    1 - beta_t = 1 - ((t - 1) / t)^(gamma + 1), computed on the parameters' device (no host sync per step)."""

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        if not torch.is_floating_point(ema_params[0]):  # integer buffers (counters) follow the model
            torch._foreach_copy_(ema_params, params)
            return
        n = num_averaged.to(torch.float64)
        weight = (1.0 - (n / (n + 1.0)) ** (gamma + 1.0)).to(ema_params[0].dtype)
        torch._foreach_lerp_(ema_params, params, weight)

    return update


def profile_inner(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """EDM2 eq. 151: <p_{gamma_a,t_a}, p_{gamma_b,t_b}> = (gamma_a + 1)(gamma_b + 1) min(t_a, t_b)^(gamma_a +
    gamma_b + 1) / ((gamma_a + gamma_b + 1) t_a^(gamma_a + 1) t_b^(gamma_b + 1)), broadcast, float64."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(t_a, t_b)
    # in ratios to the longer profile's age, so that long runs neither overflow nor underflow
    longest = np.maximum(t_a, t_b)
    return ((gamma_a + 1.0) * (gamma_b + 1.0) * (m / longest) ** (gamma_a + gamma_b + 1.0)
            / ((gamma_a + gamma_b + 1.0) * longest * (t_a / longest) ** (gamma_a + 1.0)
               * (t_b / longest) ** (gamma_b + 1.0)))


@dataclass(frozen=True)
class Coefficients:
    """The combination x (K,) of K snapshots that reconstructs a target profile, and its L2 error (residual)
    relative to the target profile's norm (relative) and absolute (residual, in the units of eq. 151)."""

    x: np.ndarray
    residual: float
    relative: float


def coefficients(steps: Sequence[int], sigma_rels: Sequence[float], target_step: int,
                 target_sigma_rel: float) -> Coefficients:
    """EDM2 Algorithm 3: the least-squares combination of the snapshots' profiles (step_k, sigma_rel_k) closest
    to the target profile (target_step, target_sigma_rel) in L2, scaled to sum to 1 (a weighted average)."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.array([gamma_of(s) for s in sigma_rels])
    g_target = gamma_of(target_sigma_rel)
    gram = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, float(target_step), g_target)
    x = np.linalg.lstsq(gram, b, rcond=None)[0]
    x = x / x.sum()
    target = float(profile_inner(target_step, g_target, target_step, g_target))
    square = max(float(x @ gram @ x - 2.0 * x @ b) + target, 0.0)
    return Coefficients(x, math.sqrt(square), math.sqrt(square / target))


# --------------------------------------------------------------------------- snapshots on disk


def snapshot_path(directory: Path | str, step: int) -> Path:
    """Where the snapshot of `step` lives: one file per step, holding every tracked profile."""
    return Path(directory) / f"{step:09d}.pt"


def save_snapshot(directory: Path | str, step: int, sigma_rels: Sequence[float],
                  states: Sequence[Mapping[str, Tensor]]) -> None:
    """Write the tracked profiles' weights at `step` (one state_dict per sigma_rel, on the CPU), atomically."""
    io.save_torch(snapshot_path(directory, step), {
        "step": int(step), "sigma_rels": [float(s) for s in sigma_rels],
        "states": [{k: v.detach().cpu().contiguous() for k, v in s.items()} for s in states]})


def snapshot_steps(directory: Path | str) -> list[int]:
    """The steps of the snapshots in `directory`, ascending (none: [])."""
    return sorted(int(p.stem) for p in Path(directory).glob(SNAPSHOT_GLOB) if p.stem.isdigit())


def keep_snapshots_until(directory: Path | str, step: int, every: int) -> None:
    """Remove the snapshots a run resumed at `step` with snapshots every `every` steps would not have written:
    those after `step`, those off the cadence (the last step of a shorter run), and all of them when it starts at
    step 0 (another run's). So the snapshots depend on train.steps and the cadence only, not on the history."""
    for s in snapshot_steps(directory):
        if s > step or step == 0 or s % every:
            snapshot_path(directory, s).unlink()


def _profiles(directory: Path | str) -> tuple[list[int], list[float], list[tuple[int, int]]]:
    """Every (step, sigma_rel) profile held in the snapshots, with where it is: (file's step, index in it)."""
    steps, sigmas, where = [], [], []
    for step in snapshot_steps(directory):
        record = io.load_torch(snapshot_path(directory, step), mmap=True)  # the profiles' names, not their weights
        for i, s in enumerate(record["sigma_rels"]):
            steps.append(step)
            sigmas.append(float(s))
            where.append((step, i))
    return steps, sigmas, where


def combination(directory: Path | str, sigma_rel: float) -> tuple[Coefficients, list[tuple[int, int]], int]:
    """How reconstruct combines the snapshots in `directory` for the width sigma_rel at the last snapshot's step:
    (the Coefficients, each coefficient's profile as (snapshot step, index in that file), that step). Profiles of
    age 0 (the initial weights) are left out unless they are all there is (a run of train.steps 0)."""
    steps, sigmas, where = _profiles(directory)
    if not steps:
        raise FileNotFoundError(f"no post-hoc EMA snapshots in {directory}")
    last = max(steps)
    if last == 0:
        return Coefficients(np.ones(1), 0.0, 0.0), [where[0]], 0
    keep = [i for i, s in enumerate(steps) if s > 0]
    coef = coefficients([steps[i] for i in keep], [sigmas[i] for i in keep], last, sigma_rel)
    return coef, [where[i] for i in keep], last


def reconstruct(directory: Path | str, sigma_rel: float) -> tuple[dict[str, Tensor], Coefficients, int]:
    """The weights of the power-function EMA of width sigma_rel at the last snapshot's step, from every snapshot in
    `directory` (EDM2 Algorithm 3; see combination): (state_dict, its Coefficients, that step). Floating tensors
    are summed in float64, one file at a time, and returned in their own dtype; other tensors are the last
    snapshot's."""
    coef, profiles, last = combination(directory, sigma_rel)
    total: dict[str, Tensor] = {}
    loaded: dict[int, dict] = {}
    for x, (step, index) in zip(coef.x, profiles):
        if step not in loaded:  # one file at a time: a run's snapshots need not fit in memory together
            loaded = {step: io.load_torch(snapshot_path(directory, step))}
        state = loaded[step]["states"][index]
        for k, v in state.items():
            if torch.is_floating_point(v):
                total[k] = total.get(k, 0.0) + float(x) * v.to(torch.float64)
            elif step == last:
                total[k] = v
    dtypes = {k: v.dtype for k, v in state.items()}
    return {k: v.to(dtypes[k]) for k, v in total.items()}, coef, last
