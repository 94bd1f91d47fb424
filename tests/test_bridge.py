"""Schrödinger bridges (families.schrodinger_bridge.bridge, families.schrodinger_bridge.solvers): the Gaussian closed form of the static plan against
its defining kernel, Sinkhorn against the closed form, the reference's bridge and its drifts against Gaussian
conditioning and autograd, the walk's contract, a trained DSBM bridge against the closed-form coupling, the model
file round trip, the Brownian reference, and the params rules of method.name: schrodinger_bridge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline import config, errors, io
from families.schrodinger_bridge.bridge import (Drift, bridge_sample, bridge_targets, coupling_cost, denoised_variance, gaussian_coupling,
                             gaussian_ot_cost, mean_matching_targets, sinkhorn_cost, time_grid, transport)
from families.schrodinger_bridge.solvers import BridgeSettings, load_bridge, model_file, train_bridge
from pipeline.config import ConfigError
from pipeline.data import toy2d
from pipeline.data.prepare import GAUSSIAN_TARGET, prepare_data, prepare_target, target_seed
from pipeline.data.toy2d import prepare_splits
import families
from pipeline.nets import build_network
from pipeline.processes import VPSDE, BrownianMotion, process_from_spec
from pipeline.rng import SampleGenerators

MLP = {"kind": "mlp", "dim": 2, "hidden": 16, "blocks": 1, "emb_dim": 8, "parameterization": "drift"}
# Two 2-D Gaussians whose covariances do not commute (the trained oracle and the Sinkhorn check use them).
M0, S0 = np.array([-1.0, 0.0]), np.array([[1.0, 0.3], [0.3, 0.5]])
M1, S1 = np.array([1.5, 0.5]), np.array([[0.6, -0.2], [-0.2, 1.2]])
COVARIANCE_PAIRS = [
    (S0, S1),
    (np.array([[2.0, 0.9], [0.9, 0.6]]), np.array([[0.3, 0.0], [0.0, 1.7]])),
    (np.array([[0.5, -0.4], [-0.4, 1.0]]), np.array([[1.5, 0.7], [0.7, 0.8]])),
]
SB = {"name": "schrodinger_bridge"}


# --------------------------------------------------------------------------- the closed forms


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("pair", range(len(COVARIANCE_PAIRS)))
def test_gaussian_coupling_has_the_brownian_kernel_as_its_only_cross_term(pair, sigma):
    """The static Schrödinger plan is f(x) g(y) exp(-|x - y|² / 2σ²): its only x-y term is exp(x·y / σ²), so the joint
    Gaussian [[Σ0, C], [Cᵀ, Σ1]] is positive definite and its precision's off-diagonal block is -I / σ² (the
    marginals are Σ0, Σ1 by construction). Covariances that do not commute, so a symmetric formula cannot pass."""
    cov0, cov1 = COVARIANCE_PAIRS[pair]
    assert not np.allclose(cov0 @ cov1, cov1 @ cov0)
    c = gaussian_coupling(cov0, cov1, sigma)
    joint = np.block([[cov0, c], [c.T, cov1]])
    assert np.linalg.eigvalsh(joint).min() > 0
    precision = np.linalg.inv(joint)
    np.testing.assert_allclose(precision[:2, 2:], -np.eye(2) / sigma**2, rtol=0, atol=1e-10 / sigma**2)
    np.testing.assert_allclose(precision[2:, :2], -np.eye(2) / sigma**2, rtol=0, atol=1e-10 / sigma**2)


@pytest.mark.parametrize("var0, var1", [(1.0, 1.0), (0.3, 2.5), (4.0, 0.2)])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_gaussian_coupling_in_one_dimension_is_the_closed_form(var0, var1, sigma):
    """1-D, stds a, b: the cross-precision condition C / (a² b² - C²) = 1 / σ² solves to
    C = (√(4 a² b² + σ⁴) - σ²) / 2, and the cost is (m0 - m1)² + a² + b² - 2C."""
    c = gaussian_coupling(np.array([[var0]]), np.array([[var1]]), sigma)
    expected = (math.sqrt(4 * var0 * var1 + sigma**4) - sigma**2) / 2
    assert c.shape == (1, 1)
    assert c[0, 0] == pytest.approx(expected, rel=1e-12)
    cost = gaussian_ot_cost([0.5], [[var0]], [-1.0], [[var1]], sigma)
    assert cost == pytest.approx(1.5**2 + var0 + var1 - 2 * expected, rel=1e-12)


@pytest.mark.parametrize("pair", range(len(COVARIANCE_PAIRS)))
def test_gaussian_coupling_limits_are_the_ot_map_and_independence(pair):
    """σ -> 0: the plan of the OT map T = Σ0^-½ (Σ0^½ Σ1 Σ0^½)^½ Σ0^-½, Cov(X, TX) = Σ0^½ (Σ0^½ Σ1 Σ0^½)^½ Σ0^-½
    (computed with scipy's sqrtm, not the library's eigh); the error is O(σ²) (measured 5e-9 at σ = 1e-4).
    σ -> ∞: independence, to first order exp(x·y / σ²) ≈ 1 + x·y / σ², so C ≈ Σ0 Σ1 / σ²."""
    cov0, cov1 = COVARIANCE_PAIRS[pair]
    root = np.real(scipy.linalg.sqrtm(cov0))
    ot = root @ np.real(scipy.linalg.sqrtm(root @ cov1 @ root)) @ np.linalg.inv(root)
    np.testing.assert_allclose(gaussian_coupling(cov0, cov1, 1e-4), ot, rtol=0, atol=1e-7)
    far = gaussian_coupling(cov0, cov1, 100.0)
    assert np.abs(far).max() < 1e-3
    np.testing.assert_allclose(far * 100.0**2, cov0 @ cov1, rtol=1e-3, atol=1e-6)


def test_sinkhorn_cost_matches_the_gaussian_closed_form():
    """POT's entropic plan between 1500 samples of N(M0, S0) and N(M1, S1), σ = 1 (seed 0), against
    gaussian_ot_cost. With the true parameters the sample's own fluctuation dominates: measured -0.53 % for seed 0
    (other seeds: -2.4 %, -0.6 %, +1.9 %, -1.5 %: the 2 % bound is about one standard error of the cost's estimate).
    With the samples' own means and (biased) covariances the closed form is the Sinkhorn value to 1e-4
    (measured 1.3e-5 for seed 0, at most 7.5e-5 over seeds 0-4), which is the sharp check."""
    rng = np.random.default_rng(0)
    x0, x1 = rng.multivariate_normal(M0, S0, 1500), rng.multivariate_normal(M1, S1, 1500)
    cost = sinkhorn_cost(x0, x1, 1.0)
    assert cost == pytest.approx(gaussian_ot_cost(M0, S0, M1, S1, 1.0), rel=0.02)
    plug_in = gaussian_ot_cost(x0.mean(0), np.cov(x0.T, bias=True), x1.mean(0), np.cov(x1.T, bias=True), 1.0)
    assert cost == pytest.approx(plug_in, rel=1e-3)


@pytest.mark.parametrize("sigma", [0.7, 1.5])
def test_sinkhorn_regularisation_is_sigma_squared_on_half_the_squared_cost(sigma):
    """500 samples at σ ≠ 1, against the closed form at the samples' moments: measured gaps <= 0.19 % (σ = 0.7) and
    <= 0.03 % (σ = 1.5) over seeds 0-3; the conventions one could confuse it with (regularisation σ, √σ, or the cost
    |x - y|² without the 1/2, i.e. σ / √2, or σ √2) are each >= 3.3 % off on these samples."""
    rng = np.random.default_rng(1)
    x0, x1 = rng.multivariate_normal(M0, S0, 500), rng.multivariate_normal(M1, S1, 500)
    plug_in = gaussian_ot_cost(x0.mean(0), np.cov(x0.T, bias=True), x1.mean(0), np.cov(x1.T, bias=True), sigma)
    assert sinkhorn_cost(x0, x1, sigma) == pytest.approx(plug_in, rel=5e-3)


def test_coupling_cost_is_the_mean_squared_distance_of_the_pairs():
    """Hand-computed: pairs at squared distances 25, 0, 2 -> 9; any shape (N, *D), numpy or torch."""
    x0 = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]])
    x1 = np.array([[3.0, 4.0], [1.0, 1.0], [1.0, 0.0]])
    assert coupling_cost(x0, x1) == pytest.approx(9.0, rel=1e-15)
    assert coupling_cost(torch.tensor(x0), torch.tensor(x1)) == pytest.approx(9.0, rel=1e-15)
    # (N, 1, 2, 2): the four coordinates of each pair summed, 1 + 4 + 9 + 16 = 30 and 0
    a = torch.zeros(2, 1, 2, 2)
    b = torch.stack([torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2), torch.zeros(1, 2, 2)])
    assert coupling_cost(a, b) == pytest.approx(15.0, rel=1e-15)


# --------------------------------------------------------------------------- the reference's bridge and its drifts


@pytest.mark.parametrize("sigma", [0.5, 0.7, 2.0])
def test_brownian_bridge_sample_mean_variance_and_ends(sigma):
    """Brownian bridge: x_t = (1 - t) x0 + t x1 + σ √(t (1 - t)) z, read with z = 0 (the mean) and z = 1 (mean plus
    the std). The ends are x0 and x1: bit for bit where σ² is exact in binary (σ = 0.5, 2), within one rounding
    (measured 2.2e-16 / 4.4e-16 at σ = 0.7 in float64) otherwise, as (σ² x) / σ² rounds."""
    p = BrownianMotion(sigma)
    g = torch.Generator().manual_seed(0)
    x0, x1 = (torch.randn(5, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.1, 0.25, 0.5, 0.8, 0.95], dtype=torch.float64)
    mean = bridge_sample(p, x0, x1, t, torch.zeros_like(x0))
    torch.testing.assert_close(mean, (1 - t)[:, None] * x0 + t[:, None] * x1, rtol=1e-13, atol=1e-13)
    std = bridge_sample(p, x0, x1, t, torch.ones_like(x0)) - mean
    torch.testing.assert_close(std, (sigma * torch.sqrt(t * (1 - t)))[:, None].expand(5, 2), rtol=1e-12, atol=1e-13)
    z = torch.randn(5, 2, generator=g, dtype=torch.float64)
    start = bridge_sample(p, x0, x1, torch.zeros(5, dtype=torch.float64), z)
    end = bridge_sample(p, x0, x1, torch.ones(5, dtype=torch.float64), z)
    if sigma in (0.5, 2.0):
        assert torch.equal(start, x0) and torch.equal(end, x1)
    else:
        torch.testing.assert_close(start, x0, rtol=4e-16, atol=1e-15)
        torch.testing.assert_close(end, x1, rtol=4e-16, atol=1e-15)


def _vp_conditioning(process, x0, x1, t):
    """Gaussian conditioning in numpy float64, information form (the library uses the variance form): x_t ~
    N(m_t x0, s_t²), x1 | x_t ~ N(a x_t, c²) with a = m_1 / m_t, c² = s_1² - a² s_t²."""
    m, s = (v.numpy() for v in process.marginal(t))
    m1, s1 = (v.numpy() for v in process.marginal(torch.ones_like(t)))
    a = m1 / m
    c2 = s1**2 - a**2 * s**2
    precision = 1 / s**2 + a**2 / c2
    mean = (m[:, None] * x0.numpy() / s[:, None] ** 2 + a[:, None] * x1.numpy() / c2[:, None]) / precision[:, None]
    return mean, 1 / np.sqrt(precision)


def test_vp_bridge_sample_is_gaussian_conditioning():
    """VPSDE(t_min=0): the bridge's mean (z = 0) and std (z = 1 minus the mean) against the conditioning computed
    apart in numpy; the ends are x0 (s_0 = 0) and x1 (c = 0 at t = 1)."""
    p = VPSDE(t_min=0.0)
    g = torch.Generator().manual_seed(1)
    x0, x1 = (torch.randn(5, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    mean, std = _vp_conditioning(p, x0, x1, t)
    got = bridge_sample(p, x0, x1, t, torch.zeros_like(x0))
    np.testing.assert_allclose(got.numpy(), mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((bridge_sample(p, x0, x1, t, torch.ones_like(x0)) - got).numpy(),
                               np.broadcast_to(std[:, None], (5, 2)), rtol=1e-10, atol=1e-12)
    z = torch.randn(5, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bridge_sample(p, x0, x1, torch.zeros(5, dtype=torch.float64), z), x0,
                               rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(bridge_sample(p, x0, x1, torch.ones(5, dtype=torch.float64), z), x1,
                               rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("sigma", [0.7, 1.0])
def test_brownian_bridge_targets_point_at_the_pinned_ends(sigma):
    """Brownian bridge drifts (independent of σ): forward (x1 - x_t) / (1 - t), backward (x0 - x_t) / t."""
    p = BrownianMotion(sigma)
    g = torch.Generator().manual_seed(2)
    x0, x1, xt = (torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)[:, None]
    torch.testing.assert_close(bridge_targets(p, x0, x1, xt, t[:, 0], "forward"), (x1 - xt) / (1 - t),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bridge_targets(p, x0, x1, xt, t[:, 0], "backward"), (x0 - xt) / t,
                               rtol=1e-12, atol=1e-12)


def test_vp_bridge_targets_are_the_drift_plus_g2_times_an_autograd_score():
    """Shi et al. 2023, eq. (8), on VPSDE(t_min=0) in float64: forward f + g² ∇_{x_t} log N(x1; a x_t, c²), backward
    -f + g² ∇_{x_t} log N(x_t; m_t x0, s_t²), the gradients by torch.autograd of the log densities written out."""
    p = VPSDE(t_min=0.0)
    g = torch.Generator().manual_seed(3)
    x0, x1, xt = (torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.1, 0.35, 0.6, 0.85], dtype=torch.float64)
    m, s = (v[:, None] for v in p.marginal(t))
    m1, s1 = (v[:, None] for v in p.marginal(torch.ones_like(t)))
    a = m1 / m
    c2 = s1**2 - a**2 * s**2
    f, gt = p.sde(xt, t)
    g2 = gt[:, None] ** 2

    def grad(logp):
        x = xt.clone().requires_grad_(True)
        (out,) = torch.autograd.grad(logp(x).sum(), x)
        return out

    forward = f + g2 * grad(lambda x: -0.5 * (x1 - a * x) ** 2 / c2)
    backward = -f + g2 * grad(lambda x: -0.5 * (x - m * x0) ** 2 / s**2)
    torch.testing.assert_close(bridge_targets(p, x0, x1, xt, t, "forward"), forward, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bridge_targets(p, x0, x1, xt, t, "backward"), backward, rtol=1e-10, atol=1e-10)


def test_mean_matching_targets_of_the_reference_are_the_path_increments():
    """The reference's own drift (Drift(None, BM, forward)) is 0, so De Bortoli et al.'s Prop. 3 targets reduce to
    (y_j - y_{j+1}) / γ, at x = y_{j+1}, t = s_{j+1}, steps in order."""
    p = BrownianMotion(0.8)
    reference = Drift(None, p, "forward")
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = transport(reference, p, x, "forward", 4, torch.Generator().manual_seed(5), record=5)
    assert [s for s, _ in out.trajectory] == time_grid(4, "forward").tolist()
    xs, ts, targets = mean_matching_targets(reference, out.trajectory, 0.25)
    ys = [y for _, y in out.trajectory]
    assert xs.shape == (24, 2) and ts.shape == (24,) and targets.shape == (24, 2)
    assert torch.equal(xs, torch.cat(ys[1:]))
    assert ts.tolist() == [t for t in (0.25, 0.5, 0.75, 1.0) for _ in range(6)]
    torch.testing.assert_close(targets, torch.cat([(a - b) / 0.25 for a, b in zip(ys[:-1], ys[1:])]),
                               rtol=1e-14, atol=1e-14)


def test_mean_matching_targets_with_a_linear_drift():
    """A hand-built three-state path and D(x, t) = (1 + t) A x: target_j = (y_j - y_{j+1}) / γ + (1 + s_j) A (y_j -
    y_{j+1}), both drift terms at the earlier time s_j (De Bortoli et al.'s F_k(x_k) - F_k(x_{k+1}))."""
    a = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    drift = lambda x, t: (1 + t)[:, None] * x @ a.T  # noqa: E731
    y0 = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    y1 = torch.tensor([[0.5, 1.0], [3.0, 1.0]], dtype=torch.float64)
    y2 = torch.tensor([[-1.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    xs, ts, targets = mean_matching_targets(drift, [(0.0, y0), (0.5, y1), (1.0, y2)], 0.5)
    assert torch.equal(xs, torch.cat([y1, y2])) and ts.tolist() == [0.5, 0.5, 1.0, 1.0]
    expected = torch.cat([(y0 - y1) / 0.5 + 1.0 * (y0 - y1) @ a.T, (y1 - y2) / 0.5 + 1.5 * (y1 - y2) @ a.T])
    torch.testing.assert_close(targets, expected, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------- the walk's contract


def test_time_grid_and_refusals():
    assert time_grid(4, "forward").tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert time_grid(4, "backward").tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert time_grid(4, "forward").dtype == torch.float64
    with pytest.raises(ValueError, match="num_steps >= 1"):
        time_grid(0, "forward")
    with pytest.raises(ValueError, match="unknown direction 'sideways'"):
        time_grid(4, "sideways")
    with pytest.raises(ValueError, match="unknown direction"):
        Drift(None, BrownianMotion(), "sideways")
    with pytest.raises(ValueError, match="unknown direction"):
        transport(lambda x, t: x, BrownianMotion(), torch.zeros(2, 2), "sideways", 3, torch.Generator())
    with pytest.raises(ValueError, match="num_steps >= 1"):
        transport(lambda x, t: x, BrownianMotion(), torch.zeros(2, 2), "forward", 0, torch.Generator())


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_transport_shapes_nfe_reproducibility_and_batch_independence(direction):
    """Points with a network drift, (B, 1, 4, 4) with a lambda: the shape is kept, nfe is num_steps, the same
    SampleGenerators seeds give the same bits, another seed other bits. Rows 0..7 walked as one batch or as two
    batches of 4 (each with its own global indices): the same bits with a row-wise drift; with the MLP drift to
    rounding only, as the CPU matrix product of 8 rows and of 4 rows differ in the last bit (measured: the network
    alone 6e-8, the backward walk 6e-8 apart, the forward one equal)."""
    p = BrownianMotion(0.8)
    drift = Drift(build_network(MLP, seed=0), p, direction)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(6))

    def walk(fn, rows, seed=3):
        return transport(fn, p, x[rows], direction, 5, SampleGenerators(seed, rows))

    with torch.no_grad():
        out, again, other = walk(drift, range(8)), walk(drift, range(8)), walk(drift, range(8), seed=4)
        halves = torch.cat([walk(drift, range(i, i + 4)).x for i in (0, 4)])
    assert out.x.shape == (8, 2) and out.nfe == 5
    assert torch.equal(out.x, again.x) and not torch.equal(out.x, other.x)
    torch.testing.assert_close(halves, out.x, rtol=0, atol=1e-5)
    row_wise = Drift(lambda v, c: torch.tanh(v) * (1 + c[:, None] / 1000), p, direction)
    whole = walk(row_wise, range(8)).x
    assert torch.equal(whole, torch.cat([walk(row_wise, range(i, i + 4)).x for i in (0, 4)]))
    images = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    for process in (BrownianMotion(0.8), VPSDE(t_min=0.0)):
        walked = transport(lambda v, t: -v, process, images, direction, 7, SampleGenerators(0, range(3)), record=8)
        assert walked.x.shape == (3, 1, 4, 4) and walked.nfe == 7 and torch.isfinite(walked.x).all()
        assert [s for s, _ in walked.trajectory] == time_grid(7, direction).tolist()


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_reference_walk_is_brownian_motion(direction):
    """The reference alone (net None, f = 0) walked over [0, 1] adds σ W_1 exactly (Euler-Maruyama is exact for
    zero drift): the increments have mean 0 and variance σ² per coordinate, within 5 standard errors (n = 4000)."""
    sigma, n = 1.5, 4000
    p = BrownianMotion(sigma)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = transport(Drift(None, p, direction), p, x, direction, 10, torch.Generator().manual_seed(9))
    step = (out.x - x).numpy()
    assert np.abs(step.mean(0)).max() < 5 * sigma / math.sqrt(n)
    assert np.abs(step.var(0) - sigma**2).max() < 5 * sigma**2 * math.sqrt(2 / n)


# --------------------------------------------------------------------------- training


def test_dsbm_bridge_between_gaussians_has_the_closed_form_coupling():
    """The must-hold: DSBM (one iteration, BM(1), 50 steps) between N(M0, S0) and N(M1, S1) from 10000 points each;
    4000 fresh source points walked forward with the forward EMA drift. Every entry of the empirical Cov(X0, X1) is
    within 5 standard errors of gaussian_coupling(S0, S1, 1), SE_ij = √((S0_ii S1_jj + C_ij²) / n), and the end's
    mean within 5 SE of M1. Measured: coupling entries -0.73, -0.70, +0.30, -1.24 SE, mean +0.63, -1.11 SE; ~16 s
    on one core. The alternatives are far off: independence 28 SE, the OT map 25 SE, the plans of σ = 0.8 and
    σ = 1.25 6.7 and 7.1 SE (max over entries)."""
    rng = np.random.default_rng(0)
    source = torch.tensor(rng.multivariate_normal(M0, S0, 10_000), dtype=torch.float32)
    target = torch.tensor(rng.multivariate_normal(M1, S1, 10_000), dtype=torch.float32)
    spec = {**MLP, "hidden": 64, "blocks": 2, "emb_dim": 32}
    networks = {"forward": build_network(spec, seed=1), "backward": build_network(spec, seed=2)}
    p = BrownianMotion(1.0)
    settings = BridgeSettings("dsbm", iterations=1, steps=2000, batch_size=256, lr=1e-3, num_steps=50, seed=0)
    result = train_bridge(networks, p, source, target, settings)
    n = 4000
    x0 = torch.tensor(rng.multivariate_normal(M0, S0, n), dtype=torch.float32)
    with torch.no_grad():
        x1 = transport(Drift(result.ema["forward"], p, "forward"), p, x0, "forward", 50,
                       torch.Generator().manual_seed(1)).x
    a, b = x0.double().numpy(), x1.double().numpy()
    cross = (a - a.mean(0)).T @ (b - b.mean(0)) / (n - 1)
    c = gaussian_coupling(S0, S1, 1.0)
    se = np.sqrt((np.outer(np.diag(S0), np.diag(S1)) + c**2) / n)
    assert np.all(np.abs(cross - c) < 5 * se), ((cross - c) / se).round(2).tolist()
    mean_se = np.sqrt(np.diag(S1) / n)
    assert np.all(np.abs(b.mean(0) - M1) < 5 * mean_se), ((b.mean(0) - M1) / mean_se).round(2).tolist()


def _ipf(seed: int):
    rng = np.random.default_rng(0)
    source = torch.tensor(rng.standard_normal((500, 2)), dtype=torch.float32)
    target = torch.tensor(rng.standard_normal((500, 2)) + 2.0, dtype=torch.float32)
    networks = {"forward": build_network(MLP, seed=1), "backward": build_network(MLP, seed=2)}
    settings = BridgeSettings("ipf", iterations=1, steps=200, batch_size=64, lr=1e-3, num_steps=10, seed=seed,
                              paths=256)
    return train_bridge(networks, BrownianMotion(1.0), source, target, settings)


def test_ipf_runs_and_is_reproducible_from_its_seed():
    """A cheap IPF run (one iteration of 200 updates per direction): loss rows for both directions, an EMA for each,
    the same seed -> bit-identical EMA weights, another seed -> different ones."""
    first, second, other = _ipf(0), _ipf(0), _ipf(1)
    assert first.loss_rows and {row[2] for row in first.loss_rows} == {"forward", "backward"}
    assert all(math.isfinite(row[1]) for row in first.loss_rows)
    assert set(first.ema) == {"forward", "backward"}
    for d in ("forward", "backward"):
        a, b, c = (r.ema[d].state_dict() for r in (first, second, other))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- the model file


@pytest.mark.parametrize("process", [BrownianMotion(0.7), VPSDE(t_min=0.0)], ids=["brownian", "vp"])
def test_model_file_round_trip(tmp_path, process):
    """model_file -> io.save_torch -> load_bridge: the same reference (spec), num_steps and drifts, bit for bit; the
    loaded networks are frozen. A score model's file is refused."""
    specs = {"forward": MLP, "backward": MLP}
    networks = {"forward": build_network(MLP, seed=1), "backward": build_network(MLP, seed=2)}
    path = tmp_path / "bridge.pt"
    io.save_torch(path, model_file(specs, networks, process, 12))
    loaded, num_steps, drifts = load_bridge(path)
    assert loaded.spec() == process.spec() and type(loaded) is type(process) and num_steps == 12
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(10))
    t = torch.rand(16, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        for d in ("forward", "backward"):
            assert torch.equal(drifts[d](x, t), Drift(networks[d], process, d)(x, t))
            assert drifts[d].direction == d and not any(q.requires_grad for q in drifts[d].parameters())
    other = tmp_path / "score.pt"
    io.save_torch(other, {"config": {"kind": "mlp"}, "state_dict": {}})
    with pytest.raises(ValueError, match="not a Schrödinger bridge"):
        load_bridge(other)


# --------------------------------------------------------------------------- the Brownian reference


def test_brownian_motion_process():
    """dX = σ dW: marginal (1, σ √t), sde (0, σ), prior_std σ, spec round trip; σ <= 0 (or NaN) refused."""
    p = BrownianMotion(0.7)
    assert (p.t_min, p.t_max) == (0.0, 1.0)
    again = process_from_spec(p.spec())
    assert isinstance(again, BrownianMotion) and again.spec() == p.spec() == {"kind": "brownian", "sigma": 0.7,
                                                                             "t_min": 0.0, "t_max": 1.0}
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    m, s = p.marginal(t)
    assert torch.equal(m, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(s, 0.7 * torch.sqrt(t))
    x = torch.randn(3, 2, dtype=torch.float64)
    f, g = p.sde(x, t)
    assert torch.equal(f, torch.zeros_like(x)) and torch.equal(g, torch.full((3,), 0.7, dtype=torch.float64))
    assert p.prior_std() == 0.7
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma > 0"):
            BrownianMotion(bad)


# --------------------------------------------------------------------------- params and the plan


@pytest.mark.parametrize("raw, words", [
    ({"method": SB}, ["needs data.target", "gaussian", "file with data.target_path"]),
    ({"data": {"target": "moons"}, "method": {"name": "ncsnv2"}},
     ["data.target is for method.name: schrodinger_bridge", "leave data.target: null"]),
    ({"method": {"name": "sde", "sb": {"solver": "dsbm"}}},
     ["method.sb is for method.name: schrodinger_bridge", "leave method.sb at its defaults"]),
    ({"method": {"name": "ddpm"}, "sample": {"direction": "backward"}},
     ["sample.direction is for method.name: schrodinger_bridge", "leave sample.direction: forward"]),
    ({"data": {"target": "moons"}, "method": SB, "sample": {"sampler": "pc"}},
     ["sample.sampler: pc", "leave sample.sampler: auto", "sample.direction"]),
    ({"data": {"target": "moons"}, "method": SB, "sample": {"steps": 10}},
     ["sample.steps does not apply", "method.sb.num_steps", "leave sample.steps: auto"]),
    ({"data": {"target": "moons"}, "method": SB, "train": {"devices": 2}},
     ["train.devices does not apply", "leave train.devices: 1"]),
    ({"data": {"target": "moons"}, "method": SB, "eval": {"likelihood": True}},
     ["eval.likelihood: true", "leave eval.likelihood: false"]),
    ({"data": {"target": "moons"}, "method": {**SB, "sb": {"sigma": 2.0, "reference": "vp"}}},
     ["method.sb.sigma", "method.sb.reference: vp", "leave method.sb.sigma: 1.0"]),
    ({"data": {"target": "file"}, "method": SB}, ["data.target: file needs data.target_path", ".npy or .csv"]),
    ({"data": {"target": "file", "target_path": "/nonexistent/target.npy"}, "method": SB},
     ["data.target: file needs data.target_path", "existing", "/nonexistent/target.npy"]),
    ({"data": {"target": "moons", "target_path": "/nonexistent/target.npy"}, "method": SB},
     ["data.target_path names the file of data.target: file", "leave it null"]),
    ({"data": {"name": "digits", "target": "gaussian"}, "method": SB},
     ["schrodinger_bridge runs between point sets", "data.name: digits is images", "swissroll"]),
])
def test_bridge_params_refused_with_the_key_and_what_works(raw, words):
    with pytest.raises(ConfigError) as err:
        config.validate(raw)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_target_path_must_be_npy_or_csv(tmp_path):
    path = tmp_path / "target.txt"
    path.write_text("0 0\n1 1\n")
    with pytest.raises(ConfigError, match=r"data.target_path must end in .npy or .csv"):
        config.validate({"data": {"target": "file", "target_path": str(path)}, "method": SB})


def test_bridge_params_accepted(tmp_path):
    cfg = config.validate({"data": {"name": "8gaussians", "target": "moons"},
                           "method": {**SB, "sb": {"solver": "ipf"}}})
    sb = families.get("schrodinger_bridge").sb(cfg.method)  # the family's own model of method.sb
    assert (cfg.data.target, sb.solver, sb.reference) == ("moons", "ipf", "brownian")
    cfg = config.validate({"data": {"name": "swissroll", "target": "gaussian"},
                           "method": {**SB, "sb": {"solver": "dsbm", "reference": "vp"}},
                           "sample": {"direction": "backward"}})
    sb = families.get("schrodinger_bridge").sb(cfg.method)
    assert (sb.solver, sb.reference, cfg.sample.direction) == ("dsbm", "vp", "backward")
    path = tmp_path / "target.npy"
    np.save(path, np.zeros((10, 2)))
    cfg = config.validate({"data": {"target": "file", "target_path": str(path)}, "method": SB})
    assert cfg.data.target_path == str(path)


def plan(name: str, **method):
    return families.get(name).plan(config.MethodParams(name=name, **method))


def test_plan_of_the_bridge_and_its_refusals():
    p = plan("schrodinger_bridge")
    assert (p.process, p.parameterization, p.sampler) == ("bridge", "drift", "bridge")
    assert plan("schrodinger_bridge", parameterization="drift") == p
    for kwargs, words in (({"loss": "dsm"}, "leave method.loss: auto"), ({"sde": "vp"}, "leave method.sde: auto"),
                          ({"parameterization": "eps"}, "leave method.parameterization: auto")):
        with pytest.raises(ValueError, match=words):
            plan("schrodinger_bridge", **kwargs)


# --------------------------------------------------------------------------- the target's data


def test_gaussian_target_is_standard_normal_in_the_source_splits():
    """data.target: gaussian: N(0, I) of the source's dimension in its split sizes, float32; mean within 5 SE
    (1 / √n) and std within 5 SE (1 / √(2n)) per coordinate."""
    splits = prepare_target(GAUSSIAN_TARGET, dim=3, n_train=4000, n_test=100, n_reference=50, seed=0)
    assert {k: v.shape for k, v in splits.items()} == {"train": (4000, 3), "test": (100, 3), "reference": (50, 3)}
    assert all(v.dtype == np.float32 for v in splits.values())
    x = splits["train"].astype(np.float64)
    assert np.abs(x.mean(0)).max() < 5 / math.sqrt(4000)
    assert np.abs(x.std(0) - 1).max() < 5 / math.sqrt(2 * 4000)
    assert not np.array_equal(splits["test"], splits["train"][:100])
    again = prepare_target(GAUSSIAN_TARGET, dim=3, n_train=4000, n_test=100, n_reference=50, seed=0)
    assert all(np.array_equal(again[k], splits[k]) for k in splits)


def test_target_draws_another_stream_than_the_source():
    """moons -> moons with one seed: the target is drawn with target_seed(seed), so its points differ from the
    source's (prepare_data) and are those of prepare_splits at target_seed."""
    sizes = {"n_train": 200, "n_test": 20, "n_reference": 20}
    source = prepare_data("moons", seed=0, **sizes).x["train"]
    target = prepare_target("moons", dim=2, seed=0, **sizes)["train"]
    assert target_seed(0) != 0 and target.shape == source.shape == (200, 2)
    assert not np.allclose(source, target)
    np.testing.assert_array_equal(target, prepare_splits("moons", seed=target_seed(0), **sizes)["train"]
                                  .astype(np.float32))


def test_file_target_of_another_dimension_is_refused(tmp_path):
    """A data.target file of 3-D points for a 2-D source: pipeline.errors.DataError (the class pipeline.data.toy2d
    re-exports), naming data.target; the same file read as 3-D passes."""
    assert toy2d.DataError is errors.DataError
    path = tmp_path / "target.npy"
    np.save(path, np.random.default_rng(0).standard_normal((60, 3)))
    with pytest.raises(errors.DataError, match=r"data.target \(file\).*2 coordinates"):
        prepare_target("file", dim=2, n_train=40, n_test=10, n_reference=10, seed=0, path=str(path))
    splits = prepare_target("file", dim=3, n_train=40, n_test=10, n_reference=10, seed=0, path=str(path))
    assert splits["train"].shape == (40, 3) and splits["train"].dtype == np.float32


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_denoised_last_step_leaves_out_exactly_its_noise(direction):
    """With denoise the walk's last step is its mean: the same per-sample noise otherwise, so the ends differ by the
    last step's noise only, whose variance is denoised_variance (σ²/N for Brownian motion; g(t)²/N on VP), and
    E|X_0 - X_1|² of the noisy walk is the denoised cost plus D times it (within 5 SE over 20000 pairs)."""
    p, n, steps = BrownianMotion(0.8), 20_000, 8
    assert denoised_variance(p, steps, direction) == pytest.approx(0.64 / steps)
    vp = VPSDE(t_min=0.0)
    t_last = 1.0 - 1.0 / steps if direction == "forward" else 1.0 / steps
    assert denoised_variance(vp, steps, direction) == pytest.approx(float(vp.beta(torch.tensor(t_last))) / steps)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    drift = lambda y, t: -0.5 * y  # noqa: E731
    walks = {d: transport(drift, p, x, direction, steps, SampleGenerators(3, range(n)), denoise=d).x
             for d in (False, True)}
    gap = walks[False] - walks[True]
    assert gap.var(0).numpy() == pytest.approx([0.64 / steps] * 2, rel=0.05)
    noisy, denoised = (((x - walks[d]) ** 2).sum(1) for d in (False, True))
    se = float(((noisy - denoised).std()) / math.sqrt(n))
    assert abs(float(noisy.mean() - denoised.mean()) - 2 * 0.64 / steps) < 5 * se


def test_coupling_cost_puts_back_the_left_out_variance_in_every_coordinate():
    """D times the left-out per-coordinate variance is added: (N, 2) adds 2 v, (N, 1, 4, 4) adds 16 v."""
    x0, x1 = np.zeros((3, 2)), np.ones((3, 2))
    assert coupling_cost(x0, x1, 0.25) == pytest.approx(2.0 + 2 * 0.25)
    assert coupling_cost(np.zeros((3, 1, 4, 4)), np.ones((3, 1, 4, 4)), 0.25) == pytest.approx(16.0 + 16 * 0.25)


@pytest.mark.parametrize("process", [BrownianMotion(0.7), VPSDE(t_min=0.0)], ids=["brownian", "vp"])
def test_bridge_and_its_targets_act_per_coordinate_on_image_shapes(process):
    """(B, 1, 4, 4) images give exactly the (B, 16) points' bridge sample, bridge targets and mean-matching targets,
    reshaped: the bridge acts coordinate by coordinate, whatever the shape."""
    gen = torch.Generator().manual_seed(0)
    x0, x1, z = (torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.rand(5, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    flat = lambda v: v.reshape(5, 16)  # noqa: E731
    xt = bridge_sample(process, x0, x1, t, z)
    torch.testing.assert_close(flat(xt), bridge_sample(process, flat(x0), flat(x1), t, flat(z)), rtol=0, atol=0)
    for direction in ("forward", "backward"):
        torch.testing.assert_close(flat(bridge_targets(process, x0, x1, xt, t, direction)),
                                   bridge_targets(process, flat(x0), flat(x1), flat(xt), t, direction), rtol=0, atol=0)
    drift = Drift(None, process, "forward")
    path = [(0.25, x0), (0.5, x1)]
    images = mean_matching_targets(drift, path, 0.25)
    points = mean_matching_targets(drift, [(s, flat(v)) for s, v in path], 0.25)
    torch.testing.assert_close(flat(images[0]), points[0], rtol=0, atol=0)
    torch.testing.assert_close(flat(images[2]), points[2], rtol=0, atol=0)


def test_load_bridge_refuses_a_file_without_a_config(tmp_path):
    path = tmp_path / "model.pt"
    io.save_torch(path, {"state_dict": {}})
    with pytest.raises(ValueError, match="not a Schrödinger bridge"):
        load_bridge(path)


def test_a_target_for_image_data_is_refused():
    """A bridge joins point sets: the target of an image source (a data.name: file of images) is refused, naming
    data.target."""
    images = {"kind": "images", "name": "file", "shape": [1, 8, 8]}
    with pytest.raises(errors.DataError, match="data.target joins two point sets"):
        prepare_target("moons", dim=64, n_train=10, n_test=5, n_reference=5, seed=0, source=images)
    points = {"kind": "points", "name": "8gaussians", "shape": [2]}
    assert prepare_target("moons", dim=2, n_train=10, n_test=5, n_reference=5, seed=0, source=points)["train"].shape \
        == (10, 2)
