"""Inpainting: generate the unknown part of x given its known part: masks, the inverse problem of the `Mask`
operator (pipeline.inverse, where the methods live: replace, langevin, repaint, mcg, dps), and the exact conditional
of a Gaussian mixture that judges them.

A mask is 1 where x is known and 0 where it is generated, shaped (*D) or (B, *D) against x (B, *D).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from pipeline import rng
from pipeline.gmm import GaussianMixture
from pipeline.inverse import (METHODS, REPAINT_JUMP, REPAINT_RESAMPLES, Mask, Operator, mcg, operator_from,
                              repaint_grid, solve)
from pipeline.names import MASKS
from pipeline.processes import Process
from pipeline.samplers.walk import SampleResult

__all__ = ["METHODS", "REPAINT_JUMP", "REPAINT_RESAMPLES", "Mask", "gmm_conditional", "gmm_conditional_cdf",
           "inpaint", "make_mask", "mcg", "repaint_grid", "task_operator"]
# MCG's step alpha has no default: the step alpha / ||r|| grad ||r||^2 has a length set by alpha alone, so its effect
# grows with the number of steps and shrinks with the dimension. The MCG code (scale 1 on grad ||r||) is alpha = 0.5
# on 256 x 256 images; on the 2-D mixture oracle (tests/test_inpaint.py) with 500 PC steps 0.01 shows no bias at
# n = 1500 and 0.1 a large one.


# --------------------------------------------------------------------------- masks


def make_mask(kind: str, shape: Sequence[int], generator: rng.Generator = None, keep: float = 0.5, *,
              device=None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A mask of `shape`, 1 = known and 0 = to generate, for points (D,) / (B, D) or images (C, H, W) / (B, C, H, W).

    box: hides the centre square of half the side (rows and columns [n // 4, n // 4 + n // 2)); half: hides
    the right half (the last W // 2 columns); random: keeps round(keep H W) pixels of each image (all its
    channels) or round(keep D) coordinates of each point, one draw per sample from `generator` (a
    torch.Generator or SampleGenerators with one generator per row of a batched shape); first: keeps
    coordinate 0 of points and generates the rest. ValueError for a mask that does not fit the shape.
    """
    shape = tuple(int(s) for s in shape)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    images, points = len(shape) in (3, 4), len(shape) in (1, 2)
    if kind not in MASKS:
        raise ValueError(f"unknown mask {kind!r}; allowed: {', '.join(MASKS)}")
    if kind in ("box", "half"):
        if not images:
            raise ValueError(f"a {kind!r} mask is for images (C, H, W) or (B, C, H, W), got shape {shape}; "
                             "points take 'first' or 'random'")
        h, w = shape[-2:]
        if (kind == "box" and min(h, w) < 2) or w < 2:
            raise ValueError(f"a {kind!r} mask needs images of at least 2 pixels a side, got shape {shape}")
        mask = torch.ones(shape, dtype=dtype)
        if kind == "box":
            mask[..., h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = 0
        else:
            mask[..., w - w // 2:] = 0
        return mask.to(device)
    if kind == "first":
        if not points or shape[-1] < 2:
            raise ValueError(f"a 'first' mask is for points (D,) or (B, D) with D >= 2, got shape {shape}; "
                             "images take 'box', 'half' or 'random'")
        mask = torch.zeros(shape, dtype=dtype)
        mask[..., 0] = 1
        return mask.to(device)
    if not (images or points):
        raise ValueError(f"a 'random' mask is for points (D,), (B, D) or images (C, H, W), (B, C, H, W), got {shape}")
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"the kept fraction of a 'random' mask must be in [0, 1], got {keep}")
    if generator is None:
        raise ValueError("a 'random' mask draws its pixels: pass a generator")
    batched = len(shape) in (2, 4)
    cells = shape[-2:] if images else shape[-1:]
    n = math.prod(cells)
    # ranks of i.i.d. normals are a uniform random permutation: the round(keep n) lowest are kept
    scores = rng.randn((shape[0] if batched else 1, n), generator, dtype=torch.float64)
    mask = (scores.argsort(1).argsort(1) < round(keep * n)).to(dtype).reshape(-1, *((1,) if images else ()), *cells)
    mask = mask.expand(mask.shape[0], *shape[1 if batched else 0:]) if batched else mask[0].expand(shape)
    return mask.contiguous().to(device)


# --------------------------------------------------------------------------- the measurement of a task


def task_operator(spec: Mapping[str, Any], shape: Sequence[int], n: int, generator: rng.Generator = None, *,
                  device=None, dtype: Optional[torch.dtype] = None, key: str = "sample.inverse") -> Operator:
    """The operator of sample.task inverse or inpaint for n items of `shape` (*D): spec holds its name
    (`operator`) and keys (pipeline.inverse.operator_from); the mask operator draws its mask of kind spec["mask"]
    (keeping spec["keep"]) once for all n items from `generator`, so a random mask's row i does not depend on the
    batching."""
    if spec["operator"] != "mask":
        return operator_from(spec, shape, key=key)
    mask = make_mask(spec["mask"], (n, *shape), generator, spec["keep"], device=device, dtype=dtype)
    return Mask(mask, (n, *shape), spec["mask"])


# --------------------------------------------------------------------------- the inpainting sampler


def inpaint(sampler: str, model_kind: str, fn, process: Process, x_known: Tensor, mask: Tensor,
            generator: rng.Generator, steps: Optional[int], options: Mapping[str, Any], method: str, *,
            progress: bool = False, record: Optional[int] = None, **method_options) -> SampleResult:
    """Generate x (B, *D) where mask == 0 given x_known (B, *D) where mask == 1 (mask (*D) or (B, *D)): the
    inverse problem of the `Mask` operator (pipeline.inverse.solve), noiseless, by `method` (replace, langevin,
    repaint, mcg, dps) with its options (jump, resamples; alpha; zeta). x lives on x_known's device with its
    dtype; the known part of the result is x_known exactly for every method but dps."""
    operator = Mask(mask, x_known.shape)
    return solve(sampler, model_kind, fn, process, operator, operator(x_known), x_known.shape, generator, steps,
                 options, method, progress=progress, record=record, **method_options)


# --------------------------------------------------------------------------- the Gaussian-mixture oracle


def gmm_conditional(mixture: GaussianMixture, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The exact p(x_U | x_K) of a Gaussian mixture, K the coordinates where mask (D,) is 1, U the others.

    A mixture again: weights (B, K) proportional to pi_k N(x_K; mu_kK, S_kKK), means (B, K, |U|)
    mu_kU + S_kUK S_kKK^-1 (x_K - mu_kK), covariances (K, |U|, |U|) S_kUU - S_kUK S_kKK^-1 S_kKU (the Gaussian
    conditioning formulas, e.g. Bishop 2006, eq. (2.81)-(2.82)). x (B, *D) with prod(D) = mixture.dim, float64.
    """
    xf = x.reshape(x.shape[0], -1).to(torch.float64)
    m = mask.reshape(-1).to(torch.float64).cpu() != 0
    if m.numel() != mixture.dim or xf.shape[1] != mixture.dim:
        raise ValueError(f"a mixture of dimension {mixture.dim} needs x of {mixture.dim} features and a mask of "
                         f"{mixture.dim} entries, got {xf.shape[1]} and {m.numel()}")
    if m.all() or not m.any():
        raise ValueError("the conditional needs at least one known and one generated coordinate")
    ki, ui = m.nonzero()[:, 0], (~m).nonzero()[:, 0]
    mu, cov = mixture.means.to(xf.device), mixture.covs.to(xf.device)
    s_kk, s_uk, s_uu = cov[:, ki][:, :, ki], cov[:, ui][:, :, ki], cov[:, ui][:, :, ui]
    diff = xf[:, None, ki] - mu[None, :, ki]  # (B, K, |K|)
    chol = torch.linalg.cholesky(s_kk)  # (K, |K|, |K|)
    solved = torch.cholesky_solve(diff[..., None], chol.expand(xf.shape[0], -1, -1, -1))[..., 0]  # S_KK^-1 diff
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_w = torch.log(mixture.weights.to(xf.device)) - 0.5 * ((diff * solved).sum(-1) + logdet
                                                             + len(ki) * math.log(2 * math.pi))
    means = mu[None, :, ui] + torch.einsum("kuj,bkj->bku", s_uk, solved)
    covs = s_uu - s_uk @ torch.cholesky_solve(s_uk.transpose(1, 2), chol)
    return torch.softmax(log_w, dim=1), means, covs


def gmm_conditional_cdf(mixture: GaussianMixture, x: Tensor, mask: Tensor) -> Tensor:
    """F(x_u | x_K), the exact conditional CDF of the one generated coordinate u (mask (D,) zero there) at x (B, *D).

    With x_u drawn from p(x_u | x_K) this is uniform on [0, 1] (the probability-integral transform), so a
    Kolmogorov-Smirnov test of it measures an inpainter. (B,), float64.
    """
    if int((mask.reshape(-1) == 0).sum()) != 1:
        raise ValueError("the conditional CDF is of one generated coordinate: the mask needs exactly one 0")
    weights, means, covs = gmm_conditional(mixture, x, mask)
    u = x.reshape(x.shape[0], -1).to(torch.float64)[:, (mask.reshape(-1).cpu() == 0).nonzero()[0, 0]]
    z = (u[:, None] - means[..., 0]) / covs[None, :, 0, 0].sqrt()
    return (weights * torch.special.ndtr(z)).sum(1)
