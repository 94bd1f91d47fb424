"""The one place that maps 8-bit pixels to model space and back, and the constants that go with it.

Two scalings: "minus_one_one", x / 127.5 - 1 in [-1, 1] (DDPM, VP; Ho et al. 2020, sec. 4), and
"zero_one", x / 255 in [0, 1] (NCSN, NCSNv2, VE). Uniform dequantisation (x + U) / 256 lies in
[0, 1) (score_sde's (255 x01 + U) / 256), times 2 minus 1 for [-1, 1). The density of the 8-bit
data is then p(y) / 256^D on [0, 1) or p(y) / 128^D on [-1, 1), hence the bits/dim offsets 8 and 7
(Song et al. 2021, arXiv:2011.13456, likelihood.py: offset = 7 - inverse_scaler(-1)).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

SCALINGS = ("minus_one_one", "zero_one")


def _check(scaling: str) -> None:
    if scaling not in SCALINGS:
        raise ValueError(f"unknown pixel scaling {scaling!r}; allowed: {', '.join(SCALINGS)}")


def _levels(x: Tensor) -> Tensor:
    """x as float64 pixel levels 0..255; ValueError for anything that is not 8-bit pixel data."""
    if x.dtype == torch.uint8:
        return x.to(torch.float64)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"pixels must be uint8 or integer-valued in [0, 255], got dtype {x.dtype}")
    v = x.to(torch.float64)
    if x.numel() and (bool((v != torch.round(v)).any()) or float(v.min()) < 0 or float(v.max()) > 255):
        raise ValueError("pixels must be uint8 or integer-valued in [0, 255]")
    return v


def to_model(x: Tensor, scaling: str, *, dequantize: bool = False,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """8-bit pixels (uint8 or integer-valued, any shape) to float32 model space, on x's device.

    Without dequantisation level k maps to k / 255 ("zero_one") or k / 127.5 - 1 ("minus_one_one"),
    so 0 and 255 land on the ends of the range. With it, to (k + U) / 256 in [k, k + 1) / 256, U ~ U[0, 1)
    drawn by torch.rand(x.shape, generator=generator) on the CPU (then moved to x.device), times 2
    minus 1 for "minus_one_one": a different scale (1/256, not 1/255) from the plain map, as in score_sde.
    The value is computed in float64 and kept strictly below its bin's upper edge after the float32 cast.
    """
    _check(scaling)
    levels = _levels(x)
    if not dequantize:
        y = levels / 255.0 if scaling == "zero_one" else levels / 127.5 - 1.0
        return y.to(torch.float32)
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(x.device)
    y = (levels + u.to(torch.float64)) / 256.0
    upper = (levels + 1.0) / 256.0
    if scaling == "minus_one_one":
        y, upper = 2.0 * y - 1.0, 2.0 * upper - 1.0
    # (k + U) / 256 can round up to the next bin's edge in float32 (U within 2^-17 of 1 near k = 255)
    upper32 = upper.to(torch.float32)
    return torch.minimum(y.to(torch.float32), torch.nextafter(upper32, torch.full_like(upper32, -2.0)))


def to_pixels(x: Tensor, scaling: str) -> Tensor:
    """Model-space values to uint8 pixels: the inverse of the plain (non-dequantised) map, rounded then
    clipped to [0, 255]. Exactly the pixels a PNG holds and FID sees. On x's device.

    A dequantised value of level k comes back as k - 1, k or k + 1 (the 1/256 and 1/255 scales
    differ): k or k + 1 for k <= 126, k - 1 or k for k >= 129; floor(256 y) (on [0, 1)) recovers k.
    """
    _check(scaling)
    v = x.detach().to(torch.float64)
    v = v * 255.0 if scaling == "zero_one" else (v + 1.0) * 127.5
    return torch.clamp(torch.round(v), 0, 255).to(torch.uint8)


def bpd_offset(scaling: str) -> float:
    """Bits/dim of the 8-bit data = nll of the dequantised data in model space / ln 2 + this offset:
    8 for "zero_one" (bins of width 1/256), 7 for "minus_one_one" (bins of width 2/256)."""
    _check(scaling)
    return 8.0 if scaling == "zero_one" else 7.0


def bin_width(scaling: str) -> float:
    """The width of one pixel level in the plain model space: 1/255 ("zero_one"), 2/255 ("minus_one_one",
    the bins of Ho et al. 2020's discretised decoder, eq. (13))."""
    _check(scaling)
    return 1.0 / 255.0 if scaling == "zero_one" else 2.0 / 255.0


def pixel_range(scaling: str) -> tuple[float, float]:
    """(low, high): the lowest and highest pixel level in the plain model space, to_model of 0 and 255."""
    ends = to_model(torch.tensor([0, 255], dtype=torch.uint8), scaling)
    return float(ends[0]), float(ends[1])


def discrete_decoder(scaling: str) -> dict[str, float]:
    """The keyword arguments of the discretised Gaussian decoder for this scaling: bin_width, low, high
    (pipeline.elbo.step_term / negative_elbo / DiscreteELBO)."""
    low, high = pixel_range(scaling)
    return {"bin_width": bin_width(scaling), "low": low, "high": high}


def image_batches(scaling: str, *, dequantize: bool = False, hflip: bool = False) -> Callable[[Tensor, torch.Generator], Tensor]:
    """The training transform of uint8 image batches (B, C, H, W): pixels to model space (pipeline.pixels), with
    uniform dequantisation (score_sde) and random horizontal flips (Ho et al. 2020, appendix B), drawn from the
    training generator: the dequantisation noise first, then one flip bit per example."""
    def transform(x: Tensor, generator: torch.Generator) -> Tensor:
        out = to_model(x, scaling, dequantize=dequantize, generator=generator)
        if hflip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            out = torch.where(flip.reshape(-1, *([1] * (out.ndim - 1))).to(out.device), out.flip(-1), out)
        return out

    return transform
