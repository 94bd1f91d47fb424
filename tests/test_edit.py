"""SDEdit (pipeline.edit): perturb the input to t0 by the forward marginal, walk the sampler's grid from there.

Analytic oracle: data N(mu, s^2 I) in 2-D with its exact score at every noise level (a one-component
GaussianMixture). Inputs drawn from the data make x(t0) an exact draw of p_t0, so an edit returns data again
(mean and variance within 5 standard errors), and x' and x are independent draws of p(x0 | x_t0):
E |x' - x|^2 / D = 2 s^2 (1 - rho^2), rho^2 = m^2 s^2 / (m^2 s^2 + std^2) at the start time t = grid[start],
which checks where the walk starts. Then the contracts: the start position on every kind of grid, nfe, shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.edit import rms_distance, sdedit, start_index
from pipeline.gmm import GaussianMixture
from pipeline.models import exact_score_fn
from pipeline.processes import DiscreteVP, NoiseScaleProcess, VPSDE, linear_betas
from pipeline.rng import SampleGenerators
from pipeline.samplers import plan

from oracles import gaussian_score

BASE = dict(denoise=True, variance="beta_tilde", eta=0.0, predictor="reverse_diffusion", corrector="none", snr=0.16,
            corrector_steps=1, lam=0.0, ode_method="euler", rtol=1e-5, atol=1e-5, step_size=1e-3, steps_per_scale=3)
VP = VPSDE()
CHAIN = DiscreteVP(linear_betas(20))
NCSN = NoiseScaleProcess([3.0, 1.0, 0.3, 0.1])
# s = 3: at t0 = 0.6 the VP SDE keeps rho = 0.44 of the input (s = 0.5 would keep 0.08), so the distance to the
# input still grows from t0 = 0.6 to 1.0 by ~13 standard errors at n = 4000.
MU, S, N = torch.tensor([1.0, -0.5], dtype=torch.float64), 3.0, 4000
DATA = GaussianMixture.from_params([1.0], [MU.tolist()], [[S**2, S**2]])


def _inputs(seed: int = 1) -> torch.Tensor:
    return DATA.sample(N, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t0", [0.3, 1.0])
def test_editing_data_returns_data_at_the_right_distance(t0):
    """Measured over seeds 1-5 (500 steps): mean and variance within 2.1 SE, the squared distance within 1.9 SE."""
    x = _inputs()
    out = sdedit("pc", "score", exact_score_fn(DATA, VP), VP, x, t0, torch.Generator().manual_seed(0), 500, BASE)
    assert out.x.shape == x.shape and out.x.dtype == torch.float64 and out.nfe == round(500 * t0)
    mean_z = (out.x.mean(0) - MU) / (S / math.sqrt(N))
    var_z = (out.x.var(0) - S**2) / (S**2 * math.sqrt(2 / N))
    assert mean_z.abs().max() < 5 and var_z.abs().max() < 5, (mean_z, var_z)
    _, grid, _ = plan("pc", "score", VP, 500, BASE)
    m, std = VP.marginal(grid[start_index(len(grid), t0)].reshape(1))
    rho2 = float(m**2 * S**2 / (m**2 * S**2 + std**2))
    sq = rms_distance(out.x, x) ** 2
    expected = 2 * S**2 * (1 - rho2)
    assert abs(float(sq.mean()) - expected) < 5 * float(sq.std()) / math.sqrt(N), (float(sq.mean()), expected)


def test_the_distance_to_the_input_grows_with_t0_and_one_step_stays_close():
    """Each step of t0 adds more than 5 SE (measured over seeds 1-5: 0.6 -> 1.0 adds 8.6-11 SE, the others > 60)."""
    x = _inputs(2)
    fn = exact_score_fn(DATA, VP)
    dist = {}
    for t0 in (0.01, 0.1, 0.3, 0.6, 1.0):
        out = sdedit("pc", "score", fn, VP, x, t0, torch.Generator().manual_seed(0), 100, BASE)
        d = rms_distance(out.x, x)
        dist[t0] = (float(d.mean()), float(d.std()) / math.sqrt(N), out.nfe)
    means = [dist[t0][0] for t0 in (0.1, 0.3, 0.6, 1.0)]
    errors = [dist[t0][1] for t0 in (0.1, 0.3, 0.6, 1.0)]
    assert all(b - a > 5 * math.hypot(ea, eb) for a, b, ea, eb in zip(means, means[1:], errors, errors[1:])), dist
    # t0 = 0.01: one grid step from std(t) ~ 0.05 back to the data, against S = 3
    assert dist[0.01][2] == 1 and dist[0.01][0] < 0.1, dist


def test_start_positions_on_every_kind_of_grid():
    assert [start_index(11, t0) for t0 in (1.0, 0.5, 0.3, 0.1, 0.01)] == [0, 5, 7, 9, 9]
    assert start_index(2, 1.0) == 0 and start_index(2, 1e-9) == 0
    for t0 in (0.0, -0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            start_index(11, t0)
    fn = gaussian_score(VP)
    x = torch.zeros(3, 2, dtype=torch.float64)
    # a continuous grid linspace(T, t_min, 11): t0 = 0.3 starts at t_min + 0.3 (T - t_min) and walks 3 steps
    out = sdedit("pc", "score", fn, VP, x, 0.3, torch.Generator().manual_seed(0), 10, BASE, record=2)
    assert out.nfe == 3 and out.trajectory[0][0] == pytest.approx(VP.t_min + 0.3 * (VP.t_max - VP.t_min))
    # DDPM's chain 19, ..., 0, -1: t0 = 0.5 starts at step index 9 and walks 10 ancestral steps
    out = sdedit("ancestral", "score", gaussian_score(CHAIN), CHAIN, x, 0.5, torch.Generator().manual_seed(0), None,
                 BASE, record=2)
    assert out.nfe == 10 and out.trajectory[0][0] == 9.0 and out.trajectory[-1][0] == -1.0
    # annealed Langevin's [3, 3, 1, 0.3, 0.1]: t0 = 0.5 starts at level 1 and runs the levels 0.3 and 0.1, T = 3 each,
    # then denoises; t0 = 1 is the whole run from x + 3 z
    for t0, start, levels in ((0.5, 1.0, 2), (1.0, 3.0, 4)):
        out = sdedit("annealed_langevin", "score", gaussian_score(NCSN), NCSN, x, t0,
                     torch.Generator().manual_seed(0), None, BASE, record=2)
        assert out.trajectory[0][0] == start and out.nfe == 3 * levels + 1


@pytest.mark.parametrize("sampler,process,steps", [("ancestral", CHAIN, None), ("annealed_langevin", NCSN, None),
                                                   ("ddim", CHAIN, 10), ("ode", VP, 20)],
                         ids=["ancestral-chain", "annealed_langevin-ncsn", "ddim-chain", "ode-euler-vp"])
def test_edits_of_images_with_per_sample_generators(sampler, process, steps):
    """(B, 1, 8, 8) inputs, per-sample generators: each edit is its own sample's, whatever the batch; smaller t0
    stays closer to the input (the exact score of N(0.5, 0.8^2 I) images)."""
    fn = gaussian_score(process)
    x = 0.5 + 0.8 * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    near = sdedit(sampler, "score", fn, process, x, 0.25, SampleGenerators(0, range(6)), steps, BASE)
    far = sdedit(sampler, "score", fn, process, x, 1.0, SampleGenerators(0, range(6)), steps, BASE)
    half = sdedit(sampler, "score", fn, process, x[3:], 0.25, SampleGenerators(0, range(3, 6)), steps, BASE)
    assert near.x.shape == x.shape and near.x.dtype == x.dtype and torch.isfinite(near.x).all()
    assert torch.allclose(half.x, near.x[3:], atol=1e-6)
    assert float(rms_distance(near.x, x).mean()) < float(rms_distance(far.x, x).mean())
    assert 0 < near.nfe < far.nfe


def test_refusals():
    x = torch.zeros(2, 2)
    fn = gaussian_score(VP)
    with pytest.raises(ValueError, match="picks its own times"):
        sdedit("ode", "score", fn, VP, x, 0.5, None, 10, {**BASE, "ode_method": "rk45"})
    for t0 in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            sdedit("pc", "score", fn, VP, x, t0, None, 10, BASE)
    with pytest.raises(ValueError, match="one shape"):
        rms_distance(torch.zeros(2, 3), torch.zeros(3, 2))
    assert torch.equal(rms_distance(torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 3.0)), torch.full((2,), 3.0))
