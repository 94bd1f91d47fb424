"""Class-conditional scores and classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598).

Labels enter a network as an embedding index: 0 is the null label (the unconditional model) and class k
(0-based) is index k + 1 (docs/controllable.md, "Class-conditional models and guidance"). One network learns both models by
replacing labels with the null label at random during training (`drop_labels`, their Algorithm 1).

The guidance scale w is Ho & Salimans': eps~ = (1 + w) eps(x, t, c) - w eps(x, t, null) (their eq. (6)).
eps = -std * score is linear in the score, so the guided score has the same form, and
(1 + w) s(x, t, c) - w s(x, t, null) = s(x, t, c) + w grad_x log p_t(c | x): the conditional score plus
w times the gradient of the implicit classifier p_t(c | x) = p_t(x | c) p(c) / p_t(x) (their sec. 3.2).
w = 0 is the conditional model alone, w = -1 the unconditional one; the other convention in use,
eps_u + s (eps_c - eps_u) (docs/references.md, "DDPM / DDIM / CFG"), has s = 1 + w.

Guidance wraps the score function; samplers are unchanged (docs/design.md, "The core abstraction").
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from pipeline import rng
from pipeline.gmm import GaussianMixture
from pipeline.parameterization import ScoreFn
from pipeline.processes import Process

NULL_LABEL = 0

# score_fn(x, t, y=None): x (B, *D), t (B,), y int64 label indices (B,) or None -> score (B, *D);
# make_score_fn's functions and gmm_class_score_fn are of this kind.
ClassScoreFn = Callable[..., Tensor]


def label_index(classes: Tensor) -> Tensor:
    """Embedding indices of 0-based class labels: k -> k + 1 (index 0 is NULL_LABEL); (B,) int -> (B,) int64."""
    if classes.dtype.is_floating_point or classes.dtype.is_complex or classes.dtype == torch.bool:
        raise ValueError(f"class labels must be integers, got dtype {classes.dtype}")
    # A -1 ("no label") would silently become the null label: refuse it.
    if classes.numel() and bool((classes < 0).any()):
        raise ValueError(f"class labels must be >= 0 (0-based), got a minimum of {int(classes.min())}")
    return classes.long() + 1


def _uniform(shape: tuple[int, ...], generator: rng.Generator) -> Tensor:
    """U[0, 1) draws of `shape` in float64 where the generator lives (row i from sample i's generator
    for SampleGenerators), so the bits depend neither on the data's device nor on the batch split."""
    if isinstance(generator, rng.SampleGenerators):
        return generator.rand(shape, dtype=torch.float64)
    return torch.rand(shape, generator=generator, dtype=torch.float64,
                      device=generator.device if generator is not None else None)


def drop_labels(index: Tensor, p: float, generator: rng.Generator) -> Tensor:
    """Label dropout: each label index (B,) replaced by NULL_LABEL with probability p, on index's device.

    Ho & Salimans 2022, Algorithm 1 (p_uncond; 0.1 or 0.2 in their experiments). One uniform draw per
    label whatever p is, so the generator's stream does not depend on p; a torch.Generator or per-sample
    SampleGenerators (pipeline.rng).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout probability must lie in [0, 1], got {p}")
    drop = (_uniform(tuple(index.shape), generator) < p).to(index.device)
    return torch.where(drop, torch.full_like(index, NULL_LABEL), index)


def guided_score(score_fn: ClassScoreFn, classes: Tensor, w: float) -> ScoreFn:
    """The classifier-free guided score_fn(x, t) of a class-conditional score_fn(x, t, y), for the
    0-based classes (B,) of the batch: (1 + w) s(x, t, k + 1) - w s(x, t, NULL_LABEL).

    Ho & Salimans 2022, eq. (6), written for the score (see the module docstring). w = 0 makes one
    network call on the batch; any other w one call on the doubled batch [x; x] with labels
    [classes + 1; null], so the network runs once per step. The returned function's `evaluations`
    attribute (1 or 2) is the network evaluations per sample per call; the walker's nfe counts it.
    """
    w = float(w)
    index = label_index(classes)
    if index.ndim != 1:
        raise ValueError(f"classes must have shape (B,), got {tuple(classes.shape)}")

    def check(x: Tensor) -> None:
        if x.shape[0] != index.shape[0]:
            raise ValueError(f"guided score built for {index.shape[0]} labels, called on a batch of {x.shape[0]}")

    if w == 0.0:
        def conditional(x: Tensor, t: Tensor) -> Tensor:
            check(x)
            return score_fn(x, t, index.to(x.device))

        conditional.evaluations = 1
        return conditional

    both = torch.cat([index, torch.full_like(index, NULL_LABEL)])

    def guided(x: Tensor, t: Tensor) -> Tensor:
        check(x)
        s_c, s_u = score_fn(torch.cat([x, x]), torch.cat([t, t]), both.to(x.device)).chunk(2)
        # This form is exact at w = -1 (the unconditional score) as well as at w = 0.
        return (1 + w) * s_c - w * s_u

    guided.evaluations = 2
    return guided


def gmm_class_score_fn(mixture: GaussianMixture, process: Process) -> ClassScoreFn:
    """The exact class-conditional score of a Gaussian mixture pushed through `process`, an oracle:
    score_fn(x, t, y=None), x (B, *D) with prod(D) = mixture.dim, t (B,), y (B,) label indices.

    Component k of the mixture is class k: rows with index k + 1 get the score of N(mu_k, Sigma_k) pushed
    through the process, N(m mu_k, m^2 Sigma_k + s^2 I); rows with NULL_LABEL (or y=None) the whole
    mixture's (docs/references.md, "Exact scores for testing"), so p_t(x | null) = p_t(x) as in CFG training.
    """
    k = mixture.weights.shape[0]
    # Index j scores under parts[j]: the whole mixture, then each component as a one-component mixture.
    parts = [mixture] + [GaussianMixture(mixture.weights.new_ones(1), mixture.means[i:i + 1], mixture.covs[i:i + 1])
                         for i in range(k)]

    def score_fn(x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        mean_coef, std = process.marginal(t)
        if y is None:
            return mixture.score(x, mean_coef, std)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if bool(((y < 0) | (y > k)).any()):
            raise ValueError(f"label indices must lie in [0, {k}] (0 the null label), got {y.tolist()}")
        mean_coef = mean_coef.expand(x.shape[0]) if mean_coef.ndim == 0 else mean_coef
        std = std.expand(x.shape[0]) if std.ndim == 0 else std
        out = torch.empty_like(x)
        # Only the rows of each label are scored, so a batch of one class costs one component's score.
        for j, part in enumerate(parts):
            rows = y == j
            if bool(rows.any()):
                out[rows] = part.score(x[rows], mean_coef[rows], std[rows])
        return out

    return score_fn
