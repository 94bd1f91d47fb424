"""pipeline/pixels.py: the map between 8-bit pixels and model space, and its bits/dim constants."""

from __future__ import annotations

import pytest
import torch

from pipeline.pixels import (SCALINGS, bin_width, bpd_offset, discrete_decoder, pixel_range, to_model,
                             to_pixels)

ALL = torch.arange(256, dtype=torch.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_round_trip_of_every_level(scaling):
    y = to_model(ALL, scaling)
    assert y.dtype == torch.float32 and y.shape == (256,)
    assert torch.equal(to_pixels(y, scaling), ALL)
    # integer-valued floats and ints are pixels too, and map the same way
    assert torch.equal(to_model(ALL.double(), scaling), y) and torch.equal(to_model(ALL.long(), scaling), y)
    low, high = (-1.0, 1.0) if scaling == "minus_one_one" else (0.0, 1.0)
    assert float(y[0]) == low and float(y[-1]) == high
    # the levels are evenly spaced by the bin width
    torch.testing.assert_close(y[1:] - y[:-1], torch.full((255,), bin_width(scaling)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_to_pixels_rounds_and_clips(scaling):
    low, high = pixel_range(scaling)
    b = bin_width(scaling)
    x = torch.tensor([low - 5.0, low + 0.49 * b, low + 0.51 * b, high - 0.49 * b, high + 3.0])
    assert to_pixels(x, scaling).tolist() == [0, 0, 1, 255, 255]
    assert to_pixels(x, scaling).dtype == torch.uint8


@pytest.mark.parametrize("scaling", SCALINGS)
def test_dequantised_values_lie_in_their_bin(scaling):
    x = ALL.repeat(400).reshape(400, 256)  # every level 400 times
    y = to_model(x, scaling, dequantize=True, generator=gen(0))
    assert y.dtype == torch.float32
    y01 = y.double() if scaling == "zero_one" else (y.double() + 1) / 2  # back to [0, 1)
    k = x.double()
    assert bool((y01 >= k / 256).all()) and bool((y01 < (k + 1) / 256).all())
    assert torch.equal(torch.floor(256 * y01), k)  # floor(256 y) recovers the level exactly
    # the plain inverse uses the 1/255 scale, so a dequantised value comes back within one level:
    # k or k + 1 up to k = 126, k - 1 or k from k = 129 (derivation in to_pixels' docstring)
    back = to_pixels(y, scaling).long() - x.long()
    assert int(back.abs().max()) == 1
    assert bool((back[:, :127] >= 0).all()) and bool((back[:, 129:] <= 0).all())
    assert bool((back[:, :127] == 1).any()) and bool((back[:, 129:] == -1).any())
    # reproducible from the generator, different with another seed
    assert torch.equal(y, to_model(x, scaling, dequantize=True, generator=gen(0)))
    assert not torch.equal(y, to_model(x, scaling, dequantize=True, generator=gen(1)))


def test_dequantisation_stays_below_the_bins_upper_edge(monkeypatch):
    # the largest float32 U below 1 would round (k + U) / 256 up to (k + 1) / 256 in float32
    worst = 1 - 2**-24
    assert float(((255 + torch.tensor(worst).double()) / 256).float()) == 1.0
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, worst, dtype=torch.float32))
    for scaling in SCALINGS:
        y = to_model(ALL, scaling, dequantize=True)
        y01 = y.double() if scaling == "zero_one" else (y.double() + 1) / 2
        assert torch.equal(torch.floor(256 * y01), ALL.double()), scaling
        assert float(y01.max()) < 1.0


def test_offsets_and_bin_widths():
    assert bpd_offset("zero_one") == 8.0 and bpd_offset("minus_one_one") == 7.0
    assert bin_width("zero_one") == pytest.approx(1 / 255) and bin_width("minus_one_one") == pytest.approx(2 / 255)
    assert pixel_range("zero_one") == (0.0, 1.0) and pixel_range("minus_one_one") == (-1.0, 1.0)
    assert discrete_decoder("minus_one_one") == {"bin_width": 2 / 255, "low": -1.0, "high": 1.0}
    # offset = log2 of the dequantised bin's width in model space: 8 + log2(width of [0, 1)) ...
    for scaling in SCALINGS:
        lo, hi = pixel_range(scaling)
        assert bpd_offset(scaling) == pytest.approx(8 - torch.log2(torch.tensor(hi - lo)).item())


@pytest.mark.parametrize("call", [lambda s: to_model(ALL, s), lambda s: to_pixels(torch.zeros(2), s), bpd_offset,
                                  bin_width, pixel_range])
def test_unknown_scaling_names_the_allowed_ones(call):
    with pytest.raises(ValueError, match="unknown pixel scaling 'unit'.*minus_one_one, zero_one"):
        call("unit")


@pytest.mark.parametrize("bad", [torch.tensor([0.5]), torch.tensor([-1.0]), torch.tensor([256]),
                                 torch.tensor([True])])
def test_non_pixels_are_refused(bad):
    with pytest.raises(ValueError, match="pixels must be uint8 or integer-valued"):
        to_model(bad, "zero_one")


def test_device_follows_the_input():
    # the meta device refuses any mix with CPU tensors, so this checks that nothing stays behind
    x = ALL.reshape(1, 1, 16, 16).to("meta")
    for scaling in SCALINGS:
        assert to_model(x, scaling).device == x.device
        y = to_model(x, scaling, dequantize=True, generator=gen(0))
        assert y.device == x.device and y.dtype == torch.float32
        assert to_pixels(y, scaling).device == x.device


@pytest.mark.cuda  # run on a GPU machine: pytest -m cuda (deselected by default, pytest.ini)
def test_device_follows_the_input_on_cuda():
    x = ALL.reshape(1, 1, 16, 16).cuda()
    a = to_model(x, "minus_one_one", dequantize=True, generator=gen(0))
    assert a.device == x.device
    # the CPU generator draws the same U wherever the pixels live
    torch.testing.assert_close(a.cpu(), to_model(x.cpu(), "minus_one_one", dequantize=True, generator=gen(0)))
    assert to_pixels(a, "minus_one_one").device == x.device
