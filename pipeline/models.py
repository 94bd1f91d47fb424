"""Model files: build a network from its spec, save {"config", "state_dict"}, load a score_fn.

Model files hold only plain data and tensors and load with torch.load(weights_only=True).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from pipeline import io, nets
from pipeline.gmm import GaussianMixture
from pipeline.guidance import gmm_class_score_fn
from pipeline.parameterization import KernelFn, ScoreFn, VelocityFn, make_kernel_fn, make_score_fn, make_velocity_fn
from pipeline.processes import Process, append_dims

KINDS = (*nets.NETWORKS, "gmm_exact")


def build_network(spec: Mapping[str, Any], seed: int) -> nn.Module:
    """A freshly initialised network from its spec; the init draws from `seed`, not the global RNG.

    Delegates to the registry pipeline.nets.NETWORKS (ValueError on an unknown kind)."""
    return nets.build_network(spec, seed)


def exact_score_fn(mixture: GaussianMixture, process: Process) -> ScoreFn:
    """The analytic score of the mixture pushed through the process's marginal at time t."""

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mean_coef, std = process.marginal(t)
        return mixture.score(x, mean_coef, std)

    return score_fn


def exact_velocity_fn(mixture: GaussianMixture, process: Process) -> VelocityFn:
    """The mixture's exact probability-flow velocity v = m' E[x0 | x] + std' E[z | x] along the process's marginal
    (pipeline.parameterization.velocity_from_x0), with E[x0 | x] from the mixture's posterior (defined at m = 0) and
    E[z | x] = −std score (defined at std = 0): the oracle of flow matching, as exact_score_fn is of score models."""

    def velocity_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        (m, std), (dm, ds) = process.marginal(t), process.marginal_rates(t)
        b = lambda v: append_dims(v, x.ndim).to(x.dtype)  # noqa: E731
        return b(dm) * mixture.denoise(x, m, std) - b(ds * std) * mixture.score(x, m, std)

    return velocity_fn


def gmm_model_file(mixture: GaussianMixture) -> dict[str, Any]:
    """The model file of the exact-score 'model': the mixture's parameters, nothing trained."""
    state = {"weights": mixture.weights, "means": mixture.means, "covs": mixture.covs}
    return {"config": {"kind": "gmm_exact", "parameterization": "score"}, "state_dict": state}


def save_model(path: str | Path, spec: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> None:
    """Write {"config": spec, "state_dict": ...} atomically."""
    io.save_torch(path, {"config": dict(spec), "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()}})


def load_model(path: str | Path, process: Process, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[str, ScoreFn | KernelFn | VelocityFn]:
    """("score", score_fn), ("kernel", kernel_fn) or ("velocity", velocity_fn) of a model file: a trained network
    (its weights cast to `dtype`: float64 for the likelihood's ODE, and moved to `device`) or the exact mixture score. A score_fn takes
    optional label indices, score_fn(x, t, y=None) (pipeline.guidance): the exact one scores component k at k + 1."""
    obj = io.load_torch(path)
    spec, state = obj["config"], obj["state_dict"]
    if spec["kind"] == "gmm_exact":
        mixture = GaussianMixture(*(state[k].to(device) for k in ("weights", "means", "covs")))
        return "score", gmm_class_score_fn(mixture, process)  # y=None: the mixture's score; y: a component's
    net = build_network(spec, seed=0)
    net.load_state_dict(state)
    net.to(device=device, dtype=dtype)
    net.eval()
    net.requires_grad_(False)
    return network_fn(net, process, spec["parameterization"])


def network_fn(net: nn.Module, process: Process, parameterization: str) -> tuple[str, ScoreFn | KernelFn | VelocityFn]:
    """("kernel", kernel_fn) for Sohl-Dickstein's learned kernel, ("velocity", velocity_fn) for a flow-matching
    network, else ("score", score_fn) of a network."""
    if parameterization == "kernel":
        return "kernel", make_kernel_fn(net, process)
    if parameterization == "velocity":
        return "velocity", make_velocity_fn(net, process)
    return "score", make_score_fn(net, process, parameterization)

