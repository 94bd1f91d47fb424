"""The DDPM U-Net (Ho et al. 2020, arXiv:2006.11239, appendix B) for image data.

A PixelCNN++-style backbone (Salimans et al. 2017) with wide-ResNet blocks (Zagoruyko & Komodakis
2016), group normalisation instead of weight normalisation (Wu & He 2018), single-head self-attention
at chosen resolutions (Wang et al. 2018 / Vaswani et al. 2017) and the noise level entering every
residual block through a sinusoidal embedding. The structure follows the official diffusion_tf
`models/unet.py`; the DDPM CIFAR-10 configuration (channels 128, channel_mult (1, 2, 2, 2), two
residual blocks per level, attention at 16x16, dropout 0.1) has 35,746,307 parameters ("35.7M").

Departures from the official code, all harmless at the sizes DDPM used:
- the number of GroupNorm groups is gcd(32, channels) so that narrow networks (16, 48 channels) work;
  it is 32 whenever the width is a multiple of 32, as in DDPM;
- downsampling pads symmetrically (conv 3x3, stride 2, padding 1: a side of s becomes ceil(s/2)),
  and upsampling goes to the exact size of the skip tensor it is concatenated with, so sides that
  do not halve evenly work (28 -> 14 -> 7 -> 4 -> 7 -> 14 -> 28);
- an optional class embedding (num_classes > 0) is added to the time embedding, as in Dhariwal &
  Nichol 2021 (arXiv:2105.05233), with num_classes + 1 rows: index 0 is the null label of classifier-free
  guidance (Ho & Salimans 2022, arXiv:2207.12598; pipeline.guidance) and class k is index k + 1; y=None
  takes the null label (the unconditional model), and num_classes = 0 adds no parameter.

Every operation acts on one example at a time (GroupNorm, attention within an image, dropout; no batch
norm), so the Jacobian of one example's output with respect to another's input is zero and per-example
divergences computed with autograd through a batch are valid.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.nets.mlp import add_label_embedding, sinusoidal_embedding

SPEC_KEYS = ("shape", "channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout")


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 as in DDPM, reduced to a divisor of the width for narrow networks."""
    return math.gcd(32, channels)


def _norm(channels: int) -> nn.GroupNorm:
    # eps as in the official code (tf.contrib.layers.group_norm there, 1e-6 in its PyTorch port).
    return nn.GroupNorm(_groups(channels), channels, eps=1e-6)


def _init(module: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Module:
    """DDPM's default_init: variance_scaling(scale, "fan_avg", "uniform") weights, zero biases.

    scale 0 (the official init_scale=0.) zeroes the weights, making a residual branch start as the
    identity and the network's output start at zero.
    """
    if scale == 0.0:
        nn.init.zeros_(module.weight)
    else:
        nn.init.xavier_uniform_(module.weight, gain=math.sqrt(scale))
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> + Dense(SiLU(emb)) -> GroupNorm -> SiLU -> Dropout -> conv3x3,
    plus the input (through a 1x1 conv when the width changes). (B, in_ch, H, W) -> (B, out_ch, H, W).

    Ho et al. 2020, appendix B; the second conv starts at zero, so the block starts as the identity
    (init_scale=0 in the official resnet_block).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = _init(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb = _init(nn.Linear(emb_ch, out_ch))
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _init(nn.Conv2d(out_ch, out_ch, 3, padding=1), scale=0.0)
        self.skip = _init(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each image, with a residual connection:
    x + proj(softmax(q k^T / sqrt(C)) v), q, k, v 1x1 convs of GroupNorm(x). (B, C, H, W) -> same.

    Ho et al. 2020, appendix B (the official attn_block); the output projection starts at zero.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        for part in self.qkv.weight.data.chunk(3):  # three separate 1x1 projections in the original
            nn.init.xavier_uniform_(part)
        nn.init.zeros_(self.qkv.bias)
        self.proj = _init(nn.Conv2d(channels, channels, 1), scale=0.0)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """conv 3x3, stride 2, padding 1: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _init(nn.Conv2d(channels, channels, 3, stride=2, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (twice the side, or the skip tensor's odd size), then conv 3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _init(nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class UNet(nn.Module):
    """model(x, c, y=None): images x (B, C, H, W), a conditioning scalar c (B,) (the process's time or
    log sigma) and optional int64 label indices y (B,) (0 the null label, class k at k + 1) -> output
    shaped like x, or (B, outputs, C, H, W) when outputs > 1 (a learned mean and variance map:
    Sohl-Dickstein's kernel, as in ConditionalMLP).

    Ho et al. 2020, appendix B. Levels i = 0..len(channel_mult)-1 run at widths channels *
    channel_mult[i] and sides that halve (rounding up) from level to level; attention follows every
    residual block of a level whose feature-map side (its height) is in attn_resolutions, and the
    middle is Res, Attn, Res. The output layer (GroupNorm, SiLU, conv 3x3) starts at zero.
    """

    def __init__(self, shape: Sequence[int], channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float, num_classes: int = 0, outputs: int = 1):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"shape must be [C, H, W], got {list(shape)}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if channels % 2:
            raise ValueError(f"channels must be even (the sinusoidal embedding's width), got {channels}")
        in_ch, height, width = (int(s) for s in shape)
        self.shape, self.channels, self.outputs, self.num_classes = (in_ch, height, width), channels, outputs, num_classes
        emb_ch = 4 * channels

        sides = [height]
        for _ in channel_mult[1:]:
            sides.append((sides[-1] + 1) // 2)
        unused = sorted(set(attn_resolutions) - set(sides))
        if unused:
            raise ValueError(f"attn_resolutions {unused} match no level; the feature-map sides are {sides}")
        self.attn_levels = [side in attn_resolutions for side in sides]

        # Time (and class) embedding: Dense(ch, 4ch) -> SiLU -> Dense(4ch, 4ch).
        self.temb = nn.Sequential(_init(nn.Linear(channels, emb_ch)), nn.SiLU(), _init(nn.Linear(emb_ch, emb_ch)))

        self.conv_in = _init(nn.Conv2d(in_ch, channels, 3, padding=1))
        # Downsampling path; skip_ch records the width of every tensor pushed for a skip connection.
        self.down = nn.ModuleList()
        skip_ch, ch = [channels], channels
        for level, mult in enumerate(channel_mult):
            stage = nn.Module()
            stage.res = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.res.append(ResBlock(ch, channels * mult, emb_ch, dropout))
                ch = channels * mult
                if self.attn_levels[level]:
                    stage.attn.append(AttnBlock(ch))
                skip_ch.append(ch)
            if level != len(channel_mult) - 1:
                stage.downsample = Downsample(ch)
                skip_ch.append(ch)
            self.down.append(stage)

        self.mid_res1 = ResBlock(ch, ch, emb_ch, dropout)
        self.mid_attn = AttnBlock(ch)
        self.mid_res2 = ResBlock(ch, ch, emb_ch, dropout)

        # Upsampling path: num_res_blocks + 1 blocks per level, each eating one skip tensor.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            stage = nn.Module()
            stage.res = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.res.append(ResBlock(ch + skip_ch.pop(), channels * mult, emb_ch, dropout))
                ch = channels * mult
                if self.attn_levels[level]:
                    stage.attn.append(AttnBlock(ch))
            if level != 0:
                stage.upsample = Upsample(ch)
            self.up.insert(0, stage)  # self.up[level], as self.down[level]
        assert not skip_ch

        self.norm_out = _norm(ch)
        self.conv_out = _init(nn.Conv2d(ch, in_ch * outputs, 3, padding=1), scale=0.0)
        # Class embedding (null label + classes), created last so that every other layer draws the same
        # initial weights as the unconditional network of the same seed.
        self.label_emb = nn.Embedding(num_classes + 1, emb_ch) if num_classes > 0 else None

    def forward(self, x: Tensor, c: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.temb(sinusoidal_embedding(c, self.channels).to(x.dtype))
        emb = add_label_embedding(emb, self.label_emb, y, "UNet")

        hs = [self.conv_in(x)]
        for stage in self.down:
            for i, block in enumerate(stage.res):
                h = block(hs[-1], emb)
                if len(stage.attn):
                    h = stage.attn[i](h)
                hs.append(h)
            if hasattr(stage, "downsample"):
                hs.append(stage.downsample(hs[-1]))

        h = self.mid_res2(self.mid_attn(self.mid_res1(hs[-1], emb)), emb)

        for stage in reversed(self.up):
            for i, block in enumerate(stage.res):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h, hs[-1].shape[-2:])

        out = self.conv_out(F.silu(self.norm_out(h)))
        return out if self.outputs == 1 else out.reshape(x.shape[0], self.outputs, *x.shape[1:])


def from_spec(spec: Mapping[str, Any]) -> UNet:
    """A UNet from a plain-JSON spec {"kind": "unet", "shape": [C, H, W], "channels", "channel_mult",
    "num_res_blocks", "attn_resolutions", "dropout", "num_classes" (optional, 0), "parameterization"}.

    Every architectural key is required (no defaults), so a model file rebuilds the same network
    even if defaults elsewhere change.
    """
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"unet spec lacks {', '.join(missing)}; required: {', '.join(SPEC_KEYS)}")
    return UNet(spec["shape"], int(spec["channels"]), [int(m) for m in spec["channel_mult"]],
                int(spec["num_res_blocks"]), [int(r) for r in spec["attn_resolutions"]], float(spec["dropout"]),
                num_classes=int(spec.get("num_classes", 0)),
                outputs=2 if spec.get("parameterization") == "kernel" else 1)
