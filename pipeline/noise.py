"""Noise scales as pure float64 functions: geometric sigmas and NCSNv2 techniques 1, 2 and 4.

Song & Ermon 2020, "Improved Techniques for Training Score-Based Generative Models"
(arXiv:2006.09011), section 3.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Union

import numpy as np
from scipy import optimize, spatial, special


# NCSN (Song & Ermon 2019, arXiv:1907.05600, section 5): hand-set for data in [0, 1].
NCSN_SIGMA_MAX, NCSN_NUM_SCALES, NCSN_STEP_SIZE, NCSN_STEPS_PER_SCALE = 1.0, 10, 2e-5, 100
# NCSNv2's CIFAR-10 configuration uses T = 5 Langevin steps per scale.
NCSNV2_STEPS_PER_SCALE = 5
# exact_score: technique 4 sizes eps for the noise at the last scale only; the data's own spread
# (variance c^2 >> sigma_L^2) then relaxes at a rate ~ T eps / sigma_L^2 per scale and freezes
# before it reaches the target. Measured on the default data.gmm with 20,000 samples: T = 5 and
# technique 4 leave the covariances 15 standard errors off; T = 50 with alpha_i = sigma_i^2 / 2
# (eps = sigma_L^2 / 2) brings every moment within 2 standard errors. With the true score sampling
# is cheap, so exact_score uses the converged setting.
EXACT_SCORE_STEPS_PER_SCALE, EXACT_SCORE_STEP_RATIO = 50, 0.5
# Whose values noise.* 'auto' takes (families.base.Family.noise_defaults).
NOISE_DEFAULTS = ("ncsnv2", "ncsn", "exact_score")
# The process kinds whose sigmas come from the data through these techniques: NCSN's scales, and the VE SDE's
# sigma range (technique 1, as Song et al. 2021 set sigma_max); the noise_scales stage computes them only there.
SCALED_KINDS = ("noise_scales", "ve")


def geometric_sigmas(sigma_max: float, sigma_min: float, num_scales: int) -> np.ndarray:
    """Descending geometric sequence sigma_1 = sigma_max > ... > sigma_L = sigma_min, shape (L,)."""
    if num_scales < 2:
        raise ValueError(f"need at least 2 noise scales, got {num_scales}")
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_scales))


def _blocked_diameter(x: np.ndarray, block: int = 4096, slack: float = 1e-3) -> float:
    """The exact largest Euclidean distance between rows of x (N, D) by blocked matrix products.

    ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b over the upper-triangle blocks in float32 (BLAS speed), which finds
    every row whose farthest partner is within `slack` (relative) of the largest squared distance; those
    rows are then measured again against every row in float64, so float32 rounding (~1e-6 relative here)
    cannot lose the maximum.
    """
    import torch

    x64 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    x32 = x64.to(torch.float32)
    sq = (x32 * x32).sum(1)
    row_max = torch.zeros(len(x32), dtype=torch.float32)
    for i in range(0, len(x32), block):
        a, sa = x32[i:i + block], sq[i:i + block]
        for j in range(i, len(x32), block):
            d2 = sa[:, None] + sq[None, j:j + block] - 2.0 * (a @ x32[j:j + block].T)
            row_max[i:i + block] = torch.maximum(row_max[i:i + block], d2.max(1).values)
            if j != i:  # the block below the diagonal is the transpose of this one
                row_max[j:j + block] = torch.maximum(row_max[j:j + block], d2.max(0).values)
    candidates = torch.nonzero(row_max >= row_max.max() * (1 - slack) - 1e-6).flatten()
    best = 0.0
    for start in range(0, len(candidates), 256):
        rows = x64[candidates[start:start + 256]]
        best = max(best, float(torch.cdist(rows, x64).max()))
    return best


def max_pairwise_distance(x: np.ndarray, max_exact: int = 20_000, seed: int = 0) -> tuple[float, str]:
    """Technique 1: the largest Euclidean distance between two training points, and how it was found.

    Exact through the convex hull (the diameter is attained at hull vertices) for 2 <= D <= 6, exact by
    brute force up to 2,048 points, exact by blocked matrix products (`_blocked_diameter`) up to
    `max_exact` points, otherwise a lower bound from a random subset of `max_exact` points.
    """
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n, d = x.shape
    if d == 1:
        return float(x.max() - x.min()), "exact (max - min in 1-D)"
    how = "exact (brute force over all pairs)"
    if 2 <= d <= 6 and n > d + 1:
        try:
            x = x[spatial.ConvexHull(x).vertices]
            how = f"exact (all pairs of the {len(x)} convex-hull vertices)"
        except spatial.QhullError:  # degenerate (flat) data: fall back to brute force
            pass
    if len(x) > max_exact:
        idx = np.random.default_rng(seed).choice(len(x), size=max_exact, replace=False)
        x = x[idx]
        how = f"estimate (lower bound: all pairs of a random subset of {max_exact} of {n} points)"
    if len(x) > 2048 and d > 6:
        exact = how.startswith("exact")
        return _blocked_diameter(x), (f"exact (all {n} x {n} pairs by blocked matrix products, float64 check)"
                                      if exact else how)
    best = 0.0
    for start in range(0, len(x), 2048):
        best = max(best, float(spatial.distance.cdist(x[start : start + 2048], x).max()))
    return best, how


def ratio_criterion(gamma: float, dim: int) -> float:
    """Technique 2's left side Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma)."""
    a = math.sqrt(2 * dim) * (gamma - 1)
    # special.ndtr is the standard normal CDF itself (scipy.stats.norm.cdf calls it: the same bits), without
    # scipy.stats' import, a second at every noise_scales start
    return float(special.ndtr(a + 3 * gamma) - special.ndtr(a - 3 * gamma))


def solve_ratio(dim: int, target: float = 0.5, gamma_max: float = 1e6) -> Optional[float]:
    """Technique 2: the ratio gamma > 1 with ratio_criterion(gamma, D) = target, or None if none exists.

    For sqrt(2D) <= 3 (D <= 4) the left side tends to 1 as gamma grows and stays above 0.5:
    there is no root and the number of scales must be set by hand.
    """
    f = lambda g: ratio_criterion(g, dim) - target  # noqa: E731
    hi = 1.0 + 1e-3
    while f(hi) > 0:
        hi = 1 + 2 * (hi - 1)
        if hi > gamma_max:
            return None
    return float(optimize.brentq(f, 1.0, hi, xtol=1e-14, rtol=1e-14))


def num_scales_for_ratio(sigma_max: float, sigma_min: float, gamma: float) -> int:
    """Smallest L whose geometric sequence from sigma_max to sigma_min has ratio <= gamma."""
    return int(math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-9)) + 1


def ratio_of(sigma_max: float, sigma_min: float, num_scales: int) -> float:
    """The ratio gamma = sigma_{i-1} / sigma_i of a geometric sequence of L scales."""
    return (sigma_max / sigma_min) ** (1.0 / (num_scales - 1))


def step_size_objective(eps: float, sigma_min: float, gamma: float, steps_per_scale: int) -> float:
    """Technique 4's left side; it should be about 1 for a good step size eps.

    (1 - eps/s^2)^(2T) (gamma^2 - 2 eps / (s^2 - s^2 (1 - eps/s^2)^2)) + 2 eps / (s^2 - s^2 (1 - eps/s^2)^2)
    with s = sigma_L: the variance ratio left after T Langevin steps at the last scale.
    """
    s2 = sigma_min**2
    a = eps / s2
    c = 2 * eps / (s2 - s2 * (1 - a) ** 2)
    return (1 - a) ** (2 * steps_per_scale) * (gamma**2 - c) + c


def solve_step_size(sigma_min: float, gamma: float, steps_per_scale: int) -> float:
    """Technique 4: the eps in (0, sigma_L^2) that brings step_size_objective closest to 1.

    The objective often has no exact root (its minimum exceeds 1), so we minimise |objective - 1|:
    a log-spaced grid finds the basin, a bounded scalar search refines it.
    """
    s2 = sigma_min**2
    grid = np.logspace(-12, math.log10(0.999), 4000) * s2
    vals = np.array([abs(step_size_objective(e, sigma_min, gamma, steps_per_scale) - 1) for e in grid])
    i = int(vals.argmin())
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = optimize.minimize_scalar(
        lambda e: abs(step_size_objective(e, sigma_min, gamma, steps_per_scale) - 1),
        bounds=(lo, hi), method="bounded", options={"xatol": lo * 1e-9},
    )
    return float(res.x) if res.fun <= vals[i] else float(grid[i])


@dataclass(frozen=True)
class NoiseScales:
    """The resolved schedule: sigmas (descending), step size eps, T steps per scale, and how each was chosen."""

    sigmas: list[float]
    step_size: float
    steps_per_scale: int
    how: dict[str, str]

    @property
    def sigma_max(self) -> float:
        return self.sigmas[0]

    @property
    def sigma_min(self) -> float:
        return self.sigmas[-1]

    def to_json(self) -> dict:
        """The JSON record written by the noise_scales stage."""
        d = asdict(self)
        d.update(sigma_max=self.sigma_max, sigma_min=self.sigma_min, num_scales=len(self.sigmas),
                 ratio=ratio_of(self.sigma_max, self.sigma_min, len(self.sigmas)))
        return d

    @classmethod
    def from_json(cls, d: dict) -> "NoiseScales":
        return cls(list(d["sigmas"]), float(d["step_size"]), int(d["steps_per_scale"]), dict(d["how"]))


def choose_noise_scales(
    train: np.ndarray,
    defaults: str,
    sigma_max: Union[str, float],
    sigma_min: float,
    num_scales: Union[str, int],
    fallback_num_scales: int,
    steps_per_scale: Union[str, int],
    step_size: Union[str, float],
    max_exact_pairwise: int = 20_000,
    seed: int = 0,
    auto_steps: Optional[int] = None,
) -> NoiseScales:
    """Resolve every 'auto' value by `defaults` (a family's noise_defaults): NCSN's hand-set constants for `ncsn`,
    NCSNv2 techniques for `ncsnv2`; `exact_score` takes sigma_1 and L like ncsnv2 but a converged T and eps (see
    EXACT_SCORE_*). auto_steps: the T that `ncsnv2` takes for 'auto' where the data's defaults set one
    (pipeline.defaults.langevin_steps; None: the paper's T = 5); technique 4 then solves eps for it.
    """
    if defaults not in NOISE_DEFAULTS:
        raise ValueError(f"unknown noise defaults {defaults!r}; allowed: {', '.join(NOISE_DEFAULTS)}")
    how: dict[str, str] = {"sigma_min": "set in params (noise.sigma_min)"}
    dim = int(np.prod(train.shape[1:]))
    hand_set = defaults == "ncsn"

    if sigma_max != "auto":
        s_max, how["sigma_max"] = float(sigma_max), "set in params (noise.sigma_max)"
    elif hand_set:
        s_max, how["sigma_max"] = NCSN_SIGMA_MAX, "NCSN hand-set value (Song & Ermon 2019; chosen for data in [0, 1])"
    else:
        s_max, found = max_pairwise_distance(train, max_exact_pairwise, seed)
        how["sigma_max"] = f"NCSNv2 technique 1: largest pairwise distance of the training data, {found}"
    if s_max <= sigma_min:
        raise ValueError(f"sigma_max ({s_max:g}) must exceed noise.sigma_min ({sigma_min:g})")

    if num_scales != "auto":
        n_scales, how["num_scales"] = int(num_scales), "set in params (noise.num_scales)"
    elif hand_set:
        n_scales, how["num_scales"] = NCSN_NUM_SCALES, "NCSN hand-set value (L = 10)"
    else:
        gamma = solve_ratio(dim)
        if gamma is None:
            n_scales = fallback_num_scales
            how["num_scales"] = (
                f"NCSNv2 technique 2 has no root for D={dim} (the left side stays above 0.5 for every gamma >= 1 "
                f"when sqrt(2D) <= 3); used noise.fallback_num_scales"
            )
        else:
            n_scales = num_scales_for_ratio(s_max, sigma_min, gamma)
            how["num_scales"] = f"NCSNv2 technique 2: gamma = {gamma:.6f} solves the criterion = 0.5 for D={dim}"

    if steps_per_scale != "auto":
        t_steps, how["steps_per_scale"] = int(steps_per_scale), "set in params (noise.steps_per_scale)"
    elif hand_set:
        t_steps, how["steps_per_scale"] = NCSN_STEPS_PER_SCALE, "NCSN hand-set value (T = 100)"
    elif defaults == "exact_score":
        t_steps = EXACT_SCORE_STEPS_PER_SCALE
        how["steps_per_scale"] = f"exact_score: T = {t_steps}, enough to converge with the true score (see pipeline/noise.py)"
    elif auto_steps is not None:
        t_steps = int(auto_steps)
        how["steps_per_scale"] = f"image default for this size (pipeline/defaults.py, measured): T = {t_steps}"
    else:
        t_steps, how["steps_per_scale"] = NCSNV2_STEPS_PER_SCALE, "NCSNv2 CIFAR-10 value (T = 5)"

    gamma_used = ratio_of(s_max, sigma_min, n_scales)
    if step_size != "auto":
        eps, how["step_size"] = float(step_size), "set in params (noise.step_size)"
    elif hand_set:
        eps, how["step_size"] = NCSN_STEP_SIZE, "NCSN hand-set value (eps = 2e-5)"
    elif defaults == "exact_score":
        eps = EXACT_SCORE_STEP_RATIO * sigma_min**2
        how["step_size"] = (f"exact_score: eps = {EXACT_SCORE_STEP_RATIO} sigma_L^2, so alpha_i = sigma_i^2 / 2 "
                            f"(technique 4 leaves the data's spread unmixed; see pipeline/noise.py)")
    else:
        eps = solve_step_size(sigma_min, gamma_used, t_steps)
        value = step_size_objective(eps, sigma_min, gamma_used, t_steps)
        how["step_size"] = f"NCSNv2 technique 4 for gamma = {gamma_used:.6f}, T = {t_steps}: objective {value:.4f} (target 1)"
    sigmas = geometric_sigmas(s_max, sigma_min, n_scales)
    return NoiseScales([float(s) for s in sigmas], eps, t_steps, how)
