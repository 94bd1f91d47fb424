"""pipeline.rng: per-sample generators (EDM's StackedRandomGenerator idea) and device-following draws."""

from __future__ import annotations

import pytest
import torch

from pipeline import rng
from pipeline.rng import SampleGenerators, sample_seed

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_sample_seeds_are_mixed_not_added():
    seeds = {sample_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400  # seed + i would collide 210 times
    assert sample_seed(0, 1) != sample_seed(1, 0)
    assert all(0 <= s < 2**64 for s in seeds)
    torch.Generator().manual_seed(max(seeds))  # a valid torch seed
    with pytest.raises(ValueError, match=">= 0"):
        sample_seed(-1, 0)


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8), ()], ids=["B2", "B1x8x8", "B"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_i_is_sample_i_own_generator(shape, dtype):
    g = SampleGenerators(7, [4, 0, 9])
    assert len(g) == 3
    z = g.randn((3, *shape), dtype=dtype)
    assert z.shape == (3, *shape) and z.dtype == dtype
    for row, i in zip(z, [4, 0, 9]):
        assert torch.equal(row, torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(7, i)),
                                            dtype=dtype))
    # later draws continue each sample's own stream
    z2 = g.randn((3, *shape), dtype=dtype)
    own = torch.Generator().manual_seed(sample_seed(7, 4))
    torch.randn(shape, generator=own, dtype=dtype)
    assert torch.equal(z2[0], torch.randn(shape, generator=own, dtype=dtype))


def test_draws_do_not_depend_on_the_batch_split():
    whole = SampleGenerators(3, range(10))
    parts = [SampleGenerators(3, range(a, min(a + 3, 10))) for a in range(0, 10, 3)]
    for draw in (lambda g, n: g.randn((n, 2, 5)), lambda g, n: g.rand((n, 4)), lambda g, n: g.randint(7, (n, 3))):
        assert torch.equal(draw(whole, 10), torch.cat([draw(p, len(p)) for p in parts]))


def test_shape_must_match_the_number_of_samples():
    g = SampleGenerators(0, range(3))
    with pytest.raises(ValueError, match=r"\(3, \.\.\.\)"):
        g.randn((4, 2))
    assert SampleGenerators(0, []).randn((0, 2)).shape == (0, 2)


def test_state_round_trip():
    g = SampleGenerators(1, range(4))
    state = g.get_state()
    a = g.randn((4, 3))
    g.set_state(state)
    assert torch.equal(a, g.randn((4, 3)))


def test_randn_like_with_a_torch_generator_is_todays_draw():
    """rng.randn_like(x, g) must be torch.randn(x.shape, generator=g, dtype=x.dtype) bit for bit: training
    randomness goes through it and the trained model files must not change."""
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(5, 1, 4, 4, dtype=dtype)
        assert torch.equal(rng.randn_like(x, torch.Generator().manual_seed(3)),
                           torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=dtype))
    assert torch.equal(rng.randn((4, 2), torch.Generator().manual_seed(3)),
                       torch.randn((4, 2), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_noise_follows_the_data_device_and_not_the_bits(device):
    x = torch.zeros(3, 2, dtype=torch.float64, device=device)
    for make in (lambda: torch.Generator().manual_seed(0), lambda: SampleGenerators(0, range(3))):
        z = rng.randn_like(x, make())
        assert z.device == x.device and z.dtype == x.dtype and z.shape == x.shape
        if device != "meta":  # drawn on the CPU, then moved: the same numbers on every device
            assert torch.equal(z.cpu(), rng.randn_like(x.cpu(), make()))
