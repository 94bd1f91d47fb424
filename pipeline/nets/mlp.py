"""A noise-conditional residual MLP for low-dimensional data (no batch norm)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(c: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer-style sine/cosine features of a scalar per example: (B,) -> (B, dim).

    Vaswani et al. 2017, as used for the time embedding of DDPM (Ho et al. 2020, appendix B).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=c.device) / half)
    args = c.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def add_label_embedding(emb: Tensor, label_emb: nn.Embedding | None, y: Tensor | None, network: str) -> Tensor:
    """emb (B, E) plus the embedding of label indices y (B,) (pipeline.guidance: 0 the null label).

    A class-conditional network called without labels (y=None: likelihoods, a plain sampler) is the
    unconditional model, so it takes the null label, the one label dropout trained it with (Ho & Salimans 2022);
    a network without an embedding (num_classes = 0) refuses labels and leaves emb as it is.
    """
    if label_emb is None:
        if y is not None:
            raise ValueError(f"class labels y given to a {network} built with num_classes=0")
        return emb
    if y is None:
        y = torch.zeros(emb.shape[0], dtype=torch.long, device=emb.device)
    return emb + label_emb(y)


class ResidualBlock(nn.Module):
    """x + W2 silu(W1 silu(x) + E c): a pre-activation residual block with additive conditioning."""

    def __init__(self, hidden: int, emb_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.lin2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        y = self.lin1(torch.nn.functional.silu(h)) + self.emb(emb)
        return h + self.lin2(torch.nn.functional.silu(y))


class ConditionalMLP(nn.Module):
    """model(x, c, y=None): x of shape (B, *D), a conditioning scalar c (B,) and optional int64 label indices
    y (B,) -> output shaped like x, or (B, outputs, *D) when outputs > 1 (a learned mean and variance:
    Sohl-Dickstein's kernel).

    num_classes > 0 adds an embedding of num_classes + 1 rows (index 0 the null label of classifier-free
    guidance, pipeline.guidance) to the time embedding after emb_mlp, as the U-Net does (Dhariwal & Nichol
    2021, arXiv:2105.05233; Ho & Salimans 2022, arXiv:2207.12598). num_classes = 0 builds the unconditional
    network with no extra parameter; a conditional one called with y=None takes the null label.
    """

    def __init__(self, dim: int, hidden: int = 128, blocks: int = 3, emb_dim: int = 64, outputs: int = 1,
                 num_classes: int = 0):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.emb_dim, self.outputs, self.num_classes = emb_dim, outputs, num_classes
        self.inp = nn.Linear(dim, hidden)
        self.emb_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.blocks = nn.ModuleList(ResidualBlock(hidden, emb_dim) for _ in range(blocks))
        self.out = nn.Linear(hidden, dim * outputs)
        # Created last, so that every other layer draws the same initial weights as the unconditional
        # network of the same seed (and num_classes = 0 draws nothing more).
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

    def forward(self, x: Tensor, c: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.emb_mlp(sinusoidal_embedding(c, self.emb_dim).to(x.dtype))
        emb = add_label_embedding(emb, self.label_emb, y, "ConditionalMLP")
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        out = self.out(torch.nn.functional.silu(h))
        return out.reshape(x.shape) if self.outputs == 1 else out.reshape(x.shape[0], self.outputs, *x.shape[1:])
