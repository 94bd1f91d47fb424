"""EDM's preconditioning around any network of the registry (Karras et al. 2022, arXiv:2206.00364, Table 1, "Ours").

D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)) with c_skip = σ_d² / (σ² + σ_d²),
c_out = σ σ_d / sqrt(σ² + σ_d²), c_in = 1 / sqrt(σ² + σ_d²) and c_noise = ln(σ) / 4, σ_d the data's std. The
wrapped network F sees inputs and targets of unit variance at every σ (their sec. 5). The wrapper is conditioned on
σ itself (pipeline.processes.EDMProcess.conditioning) and outputs D, Tweedie's x0_hat: parameterization "x0".
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn


class EDMPrecond(nn.Module):
    """D(x; σ) from a network F(x, c[, y]); x (B, *D), sigma (B,), y optional label indices (B,)."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"EDM's sigma_data must be > 0, got {sigma_data}")
        self.net, self.sigma_data = net, float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise), each (B,)."""
        sd2 = self.sigma_data ** 2
        root = torch.sqrt(sigma ** 2 + sd2)
        return sd2 / root ** 2, sigma * self.sigma_data / root, 1 / root, torch.log(sigma) / 4

    def forward(self, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
                                        for c in self.coefficients(sigma))
        args = (c_in * x, c_noise.reshape(-1))
        out = self.net(*args) if y is None else self.net(*args, y)
        return c_skip * x + c_out * out


def from_spec(spec: Mapping[str, Any], build: Callable[[Mapping[str, Any]], nn.Module]) -> EDMPrecond:
    """{"kind": "edm", "sigma_data", "parameterization": "x0", "net": the wrapped network's spec} -> EDMPrecond."""
    return EDMPrecond(build(spec["net"]), spec["sigma_data"])
