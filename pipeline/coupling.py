"""How a flow-matching batch pairs its noise with its data: independently, or by the batch's exact optimal transport.

Tong et al. 2023 (arXiv:2302.00482, sec. 3.2, OT-CFM): solve the discrete OT problem between the B data points and
the B noise draws of a batch for the squared Euclidean cost and train on the plan's pairs. With uniform weights on
both sides the exact plan is a permutation (a vertex of the Birkhoff polytope, which POT's network simplex returns),
so the coupling reorders the noise and draws nothing: the pairs are a deterministic function of the batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipeline.names import COUPLINGS


def ot_permutation(x: Tensor, z: Tensor) -> Tensor:
    """The exact OT assignment of z to x for the cost |x_i − z_j|²: indices (B,) with z[perm] paired to x, by
    POT's `ot.emd` (Bonneel et al. 2011's network simplex) on the flattened (B, *D) batches, in float64."""
    import ot  # here, not at the top: POT imports scikit-learn and pandas, 2 s at every train stage's start

    if x.shape != z.shape:
        raise ValueError(f"OT pairs two batches of one shape, got {tuple(x.shape)} and {tuple(z.shape)}")
    a = x.detach().flatten(1).to("cpu", torch.float64)
    b = z.detach().flatten(1).to("cpu", torch.float64)
    cost = torch.cdist(a, b).pow(2).numpy()
    n = a.shape[0]
    weights = np.full(n, 1.0 / n)
    plan = ot.emd(weights, weights, cost)
    return torch.from_numpy(plan.argmax(1)).to(z.device)


def couple(x: Tensor, z: Tensor, coupling: str) -> Tensor:
    """z reordered to pair with x under `coupling`: as drawn ("independent", Lipman et al. 2023) or by the batch's
    exact OT ("minibatch_ot", Tong et al. 2023), shaped like x."""
    if coupling == "independent":
        return z
    if coupling == "minibatch_ot":
        return z[ot_permutation(x, z)]
    raise ValueError(f"unknown coupling {coupling!r}; allowed: {', '.join(COUPLINGS)}")


def transport_cost(x: Tensor, z: Tensor) -> float:
    """The mean squared distance E|x_i − z_i|² of paired rows (B, *D), the quantity W2² minimises over pairings."""
    return float((x.flatten(1).double() - z.flatten(1).double()).pow(2).sum(1).mean())
