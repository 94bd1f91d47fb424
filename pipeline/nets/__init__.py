"""Score networks and their registry: a spec (plain JSON, stored in every model file) -> a network.

A network is model(x, c, y=None) -> output shaped like x (or (B, 2, *D) for the learned kernel), with c the
process's conditioning scalar per example and y optional int64 label indices (B,) for a network built with
"num_classes" > 0 (index 0 the null label, class k at k + 1: pipeline.guidance). To add one: a module here
with a `from_spec(spec)` and a line in NETWORKS.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from pipeline.nets import edm, unet
from pipeline.nets.mlp import ConditionalMLP


def _mlp(spec: Mapping[str, Any]) -> ConditionalMLP:
    """{"kind": "mlp", "dim", "hidden", "blocks", "emb_dim", "num_classes" (optional, 0), "parameterization"}
    -> ConditionalMLP."""
    return ConditionalMLP(spec["dim"], spec["hidden"], spec["blocks"], spec["emb_dim"],
                          outputs=2 if spec.get("parameterization") == "kernel" else 1,
                          num_classes=int(spec.get("num_classes", 0)))


def _edm(spec: Mapping[str, Any]) -> nn.Module:
    """EDM's preconditioning (pipeline.nets.edm) around the network of spec["net"]."""
    inner = spec["net"]
    if spec.get("parameterization", "x0") != "x0":
        raise ValueError(f"EDM's preconditioned network outputs the denoised x0 (D); its parameterization is x0, "
                         f"not {spec['parameterization']!r}")
    if inner.get("kind") not in ("mlp", "unet"):
        raise ValueError(f"EDM's preconditioning wraps an mlp or a unet, not {inner.get('kind')!r}")
    return edm.from_spec(spec, lambda s: NETWORKS[s["kind"]](s))


NETWORKS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "mlp": _mlp,
    "unet": unet.from_spec,
    "edm": _edm,
}


def build_network(spec: Mapping[str, Any], seed: int) -> nn.Module:
    """A freshly initialised network from its spec; the init draws from `seed`, not the global RNG
    (whose state is left as it was)."""
    kind = spec.get("kind")
    if kind not in NETWORKS:
        raise ValueError(f"no trainable network for kind {kind!r}; trainable kinds: {', '.join(NETWORKS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NETWORKS[kind](spec)
