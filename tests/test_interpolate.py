"""Interpolation noise (pipeline.rng.InterpolatedNoise) and interpolation between samples (pipeline.interpolate).

The noise first: its end frames are the ordinary per-sample draws bit for bit, NCSNv2's frames are N(0, I) with the
correlations cos/sin give, slerp's frames lie on the great circle through the ends. Then interpolate = draw: with
the exact score of a Gaussian mixture in float64, frame 0 and frame K-1 of row j are samples 2 pairs[j] and
2 pairs[j] + 1 of an ordinary draw, bit for bit, for deterministic samplers (slerp) and stochastic ones (ncsnv2).
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import rng
from pipeline.gmm import GaussianMixture
from pipeline.interpolate import SCHEMES, auto_scheme, interpolate
from pipeline.models import exact_score_fn
from pipeline.processes import DiscreteVP, VPSDE, linear_betas
from pipeline.rng import InterpolatedNoise, SampleGenerators
from pipeline.samplers import draw

from oracles import gaussian_score

BASE = dict(denoise=True, variance="beta_tilde", eta=0.0, predictor="reverse_diffusion", corrector="none", snr=0.16,
            corrector_steps=1, lam=0.0, ode_method="euler", rtol=1e-5, atol=1e-5, step_size=1e-3, steps_per_scale=3)
MIX = GaussianMixture.from_params(weights=[0.4, 0.6], means=[[2.0, 2.0], [-1.0, -2.0]], covs=[[1.0, 1.0], [0.5, 1.0]])
VP = VPSDE()
CHAIN = DiscreteVP(linear_betas(20))


@pytest.fixture
def float64():
    """draw samples in the default dtype: float64 makes the comparisons of whole sampler runs exact."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _frames(z: torch.Tensor, pairs: int, frames: int) -> torch.Tensor:
    return z.reshape(pairs, frames, *z.shape[1:])


# --------------------------------------------------------------------------- the noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_end_frames_are_the_ordinary_samples_draws_bit_for_bit(scheme, dtype):
    pairs, frames, shape = [3, 0, 5], 4, (1, 3, 3)
    noise = InterpolatedNoise(11, pairs, frames, scheme)
    ordinary = SampleGenerators(11, range(12))
    for _ in range(2):  # each draw advances every end's own stream, as SampleGenerators do
        z = _frames(noise.randn((len(noise), *shape), dtype=dtype), len(pairs), frames)
        ref = ordinary.randn((12, *shape), dtype=dtype)
        assert z.dtype == dtype
        for j, p in enumerate(pairs):
            assert torch.equal(z[j, 0], ref[2 * p]) and torch.equal(z[j, -1], ref[2 * p + 1])
            assert not torch.equal(z[j, 1], ref[2 * p])


def test_ncsnv2_frames_are_standard_normal_with_cos_sin_correlations():
    pairs, frames, dim = 64, 5, 2000
    z = _frames(InterpolatedNoise(0, range(pairs), frames, "ncsnv2").randn((pairs * frames, dim),
                                                                          dtype=torch.float64), pairs, frames)
    n = pairs * dim
    var = z.pow(2).mean((0, 2))  # (frames,), mean zero known
    assert (var - 1).abs().max() < 5 * math.sqrt(2 / n), var
    phi = torch.linspace(0, math.pi / 2, frames, dtype=torch.float64)
    for k in range(frames):
        corr_p = float((z[:, k] * z[:, 0]).mean())
        corr_q = float((z[:, k] * z[:, -1]).mean())
        assert abs(corr_p - math.cos(phi[k])) < 5 / math.sqrt(n) and abs(corr_q - math.sin(phi[k])) < 5 / math.sqrt(n)
    mid = z[:, frames // 2]
    assert abs(float((mid * z[:, 0]).mean()) - math.sqrt(0.5)) < 0.01
    assert abs(float((mid * z[:, -1]).mean()) - math.sqrt(0.5)) < 0.01


def _angle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.arccos(((u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))).clamp(-1, 1))


def test_slerp_frames_lie_on_the_great_circle():
    pairs, frames, dim = 16, 5, 500
    z = _frames(InterpolatedNoise(1, range(pairs), frames, "slerp").randn((pairs * frames, dim),
                                                                         dtype=torch.float64), pairs, frames)
    p, q = z[:, 0], z[:, -1]
    theta = _angle(p, q)
    alphas = torch.linspace(0, 1, frames, dtype=torch.float64).tolist()
    basis, _ = torch.linalg.qr(torch.stack([p, q], -1))  # (pairs, dim, 2): the plane of the ends
    for k, alpha in enumerate(alphas):
        v = z[:, k]
        in_plane = torch.einsum("bdi,bi->bd", basis, torch.einsum("bdi,bd->bi", basis, v))
        assert torch.allclose(v, in_plane, atol=1e-10)
        # unequal end norms (sqrt(500) +- 0.7) tilt the arc a little: the angle is alpha theta to ~0.02 rad
        assert torch.allclose(_angle(v, p), alpha * theta, atol=0.05)
    norms = z.norm(dim=-1)  # near-equal end norms: the middle frame's norm lies between them
    lo, hi = torch.minimum(norms[:, 0], norms[:, -1]), torch.maximum(norms[:, 0], norms[:, -1])
    assert ((norms[:, 2] > lo * (1 - 1e-3)) & (norms[:, 2] < hi * (1 + 1e-3))).all()
    # equal end norms: the great circle exactly, angle alpha theta to p and (1 - alpha) theta to q, norm kept
    q = q * (p.norm(dim=-1) / q.norm(dim=-1))[:, None]
    a, b = rng.interpolation_weights("slerp", frames, p, q)
    for k, alpha in enumerate(alphas):
        v = a[:, k, None] * p + b[:, k, None] * q
        assert torch.allclose(_angle(v, p), alpha * theta, atol=1e-6)
        assert torch.allclose(_angle(v, q), (1 - alpha) * theta, atol=1e-6)
        assert torch.allclose(v.norm(dim=-1), p.norm(dim=-1), rtol=1e-12)


def test_slerp_of_parallel_ends_is_linear():
    z = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    a, b = rng.interpolation_weights("slerp", 3, z, 2 * z)
    assert torch.allclose(a, torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64))
    assert torch.allclose(b, torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64))


def test_randn_like_takes_interpolated_noise_and_follows_x():
    noise = InterpolatedNoise(2, [0, 1], 3, "ncsnv2")
    x = torch.zeros(6, 1, 4, 4, dtype=torch.float64)
    z = rng.randn_like(x, noise)
    assert z.shape == x.shape and z.dtype == x.dtype and z.device == x.device
    assert rng.randn((6, 2), noise, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(6, \.\.\.\)"):
        noise.randn((4, 2))
    with pytest.raises(NotImplementedError, match="normal draws only"):
        noise.rand((6, 2))
    with pytest.raises(NotImplementedError, match="normal draws only"):
        noise.randint(3, (6, 2))
    with pytest.raises(TypeError, match="randn"):
        rng.randn((2,), object())
    state = noise.get_state()
    first = noise.randn((6, 3))
    noise.set_state(state)
    assert torch.equal(first, noise.randn((6, 3)))


def test_bad_frames_and_schemes_are_refused():
    with pytest.raises(ValueError, match="frames >= 2"):
        InterpolatedNoise(0, [0], 1, "slerp")
    with pytest.raises(ValueError, match="frames >= 2"):
        InterpolatedNoise(0, [0], True, "slerp")
    with pytest.raises(ValueError, match="allowed: ncsnv2, slerp"):
        InterpolatedNoise(0, [0], 3, "lerp")
    with pytest.raises(ValueError, match="at least one pair"):
        InterpolatedNoise(0, [], 3, "slerp")


# --------------------------------------------------------------------------- interpolate = draw


CASES = {  # name: (process, sampler, steps, options, scheme)
    "ddim-chain": (CHAIN, "ddim", 10, {}, "slerp"),
    "ode-euler-vp": (VP, "ode", 20, {}, "slerp"),
    "ancestral-chain": (CHAIN, "ancestral", None, {}, "ncsnv2"),
    "pc-vp": (VP, "pc", 20, {}, "ncsnv2"),
}


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=["B2", "B1x8x8"])
@pytest.mark.parametrize("name", list(CASES))
def test_end_frames_are_the_ordinary_samples(name, shape, float64):
    process, sampler, steps, options, scheme = CASES[name]
    fn = exact_score_fn(MIX, process) if shape == (2,) else gaussian_score(process)
    pairs, frames = [2, 0], 4
    out = interpolate(sampler, "score", fn, process, shape, 5, pairs, frames, scheme, steps, {**BASE, **options},
                      record=2)
    ref = draw(sampler, "score", fn, process, (6, *shape), SampleGenerators(5, range(6)), steps, {**BASE, **options})
    x = _frames(out.x, len(pairs), frames)
    assert out.x.shape == (len(pairs) * frames, *shape) and out.x.dtype == torch.float64 and out.nfe == ref.nfe
    for j, p in enumerate(pairs):
        assert torch.equal(x[j, 0], ref.x[2 * p]) and torch.equal(x[j, -1], ref.x[2 * p + 1])
        assert ((x[j, 1:-1] - x[j, :1]).flatten(1).norm(dim=1) > 1e-3).all()  # the frames between are new samples
    if scheme == "slerp":  # deterministic: the prior draws (the recorded start) are the slerp of the ends
        prior = _frames(out.trajectory[0][1], len(pairs), frames) / process.prior_std()
        a, b = rng.interpolation_weights("slerp", frames, prior[:, 0], prior[:, -1])
        bcast = (len(pairs), frames) + (1,) * len(shape)
        mixed = a.reshape(bcast) * prior[:, :1] + b.reshape(bcast) * prior[:, -1:]
        assert torch.allclose(prior, mixed, atol=1e-12)


def test_interpolated_paths_are_continuous_for_a_deterministic_sampler(float64):
    """More frames, smaller jumps: neighbouring frames of the DDIM map of a slerp get closer as K grows."""
    fn = exact_score_fn(MIX, CHAIN)
    gaps = []
    for frames in (3, 9, 33):
        x = _frames(interpolate("ddim", "score", fn, CHAIN, (2,), 0, range(8), frames, "slerp", 10, BASE).x, 8, frames)
        gaps.append(float((x[:, 1:] - x[:, :-1]).norm(dim=-1).max()))
    assert gaps[0] > gaps[1] > gaps[2]


def test_auto_scheme_table():
    assert auto_scheme("ddim", {**BASE, "eta": 0.0}) == "slerp"
    assert auto_scheme("ddim", {**BASE, "eta": 0.5}) == "ncsnv2"
    for method in ("euler", "heun", "rk45"):
        assert auto_scheme("ode", {**BASE, "ode_method": method}) == "slerp"
    for sampler in ("ancestral", "pc", "annealed_langevin"):
        assert auto_scheme(sampler, BASE) == "ncsnv2"
    with pytest.raises(ValueError, match="allowed: annealed_langevin"):
        auto_scheme("euler", BASE)
