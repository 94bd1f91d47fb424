"""Flow matching against closed forms: the linear path, the exact mixture velocity (the oracle, as the exact score is
for score models), the samplers and the ODE likelihood on it, the loss's target, and the minibatch OT coupling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from scipy.optimize import linear_sum_assignment

from pipeline.coupling import couple, ot_permutation, transport_cost
from pipeline.gmm import GaussianMixture
from pipeline.likelihood import ode_log_likelihood
from pipeline.losses import FlowMatchingLoss, ReflowLoss
from pipeline.models import exact_score_fn, exact_velocity_fn
from pipeline.parameterization import velocity_from_x0, x0_from_velocity
from pipeline.processes import LinearPath, Process, VPSDE
from pipeline.rng import SampleGenerators
from pipeline.samplers import draw, plan
from pipeline.samplers.fast import DPMSolverPP2M, fast_grid
from pipeline.samplers.ode import probability_flow_drift

MIXTURE = dict(weights=[0.3, 0.7], means=[[-2.0, 0.0], [1.5, 1.0]], covs=[[0.3, 0.5], [[0.6, 0.2], [0.2, 0.4]]])


def mixture(extra_var: float = 0.0) -> GaussianMixture:
    """The test mixture, its covariances widened by extra_var I (the data end of a path with σ_min > 0 is the
    mixture convolved with N(0, σ_min² I))."""
    g = GaussianMixture.from_params(**MIXTURE)
    return GaussianMixture(g.weights, g.means, g.covs + extra_var * torch.eye(2, dtype=torch.float64))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_linear_path_marginal_rates_and_prior(sigma_min):
    """m = 1 − t, std = σ_min + (1 − σ_min) t (Lipman et al. eq. 20 in reversed time); the closed-form rates equal the
    generic forward-mode derivative; the prior N(0, I) is exact at t = 1 and the data end is x0 + σ_min z."""
    p = LinearPath(sigma_min)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    m, std = p.marginal(t)
    torch.testing.assert_close(m, 1 - t)
    torch.testing.assert_close(std, sigma_min + (1 - sigma_min) * t)
    for mine, generic in zip(p.marginal_rates(t), Process.marginal_rates(p, t)):
        torch.testing.assert_close(mine, generic)
    assert float(m[-1]) == 0.0 and float(std[-1]) == 1.0 == p.prior_std()
    assert not p.has_sde
    with pytest.raises(NotImplementedError, match="singular at t = 1"):
        p.sde(torch.zeros(1, 2), torch.ones(1))


def test_exact_velocity_is_the_probability_flow_drift_where_both_exist():
    """On the VP SDE the mixture's velocity m' x0_hat + std' z_hat (generic rates by autograd) equals the
    probability-flow drift f − ½ g² s of the exact score: two derivations of one ODE."""
    p, g = VPSDE(), mixture()
    x = torch.randn(64, 2, generator=gen(0), dtype=torch.float64) * 2
    t = torch.rand(64, generator=gen(1), dtype=torch.float64) * 0.98 + 0.01
    torch.testing.assert_close(exact_velocity_fn(g, p)(x, t), probability_flow_drift(p, exact_score_fn(g, p))(x, t))


@pytest.mark.parametrize("process", [LinearPath(0.0), LinearPath(0.05), VPSDE()], ids=["rf", "cfm", "vp"])
def test_x0_from_velocity_inverts_velocity_from_x0(process):
    """The velocity ↔ data-prediction conversion is exact both ways, including t = 1 of the linear path (m = 0)."""
    x = torch.randn(32, 1, 4, 4, generator=gen(0), dtype=torch.float64)
    x0 = torch.randn(32, 1, 4, 4, generator=gen(1), dtype=torch.float64)
    t = torch.rand(32, generator=gen(2), dtype=torch.float64) * 0.98 + 0.01
    if isinstance(process, LinearPath):
        t[0] = 1.0
    torch.testing.assert_close(x0_from_velocity(velocity_from_x0(x0, x, t, process), x, t, process), x0)


def test_exact_velocity_at_the_noise_end_is_the_data_mean_minus_noise():
    """At t = 1 of rectified flow E[x0 | x_1] = E[x0] and E[z | x_1] = x_1, so v = x − E[x0]: finite where the
    score-based drift divides by m = 0."""
    g, p = mixture(), LinearPath(0.0)
    x = torch.randn(16, 2, generator=gen(0), dtype=torch.float64)
    mean = (g.weights[:, None] * g.means).sum(0)
    torch.testing.assert_close(exact_velocity_fn(g, p)(x, torch.ones(16, dtype=torch.float64)), x - mean)


# (sampler, ODE method, steps): every sampler a velocity walks.
SAMPLERS = [("ode", "euler", 200), ("ode", "heun", 50), ("ode", "rk45", None), ("dpm_solver", "euler", 20)]


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
@pytest.mark.parametrize("sampler, method, steps", SAMPLERS)
def test_samplers_reach_the_mixture_with_the_exact_velocity(sampler, method, steps, sigma_min):
    """From N(0, I) at t = 1 the exact velocity's ODE ends at the data law at t = 0: the mixture, convolved with
    N(0, σ_min² I) when σ_min > 0; its weights, means and covariances within 4 standard errors."""
    p = LinearPath(sigma_min)
    n = 4000
    out = draw(sampler, "velocity", exact_velocity_fn(mixture(), p), p, (n, 2), SampleGenerators(0, range(n)), steps,
               {"ode_method": method, "rtol": 1e-5, "atol": 1e-5, "spacing": "auto"})
    assert out.nfe == {"euler": 200, "heun": 100}.get(method if sampler == "ode" else "", out.nfe)
    for name, (err, se) in mixture(sigma_min ** 2).moment_errors(out.x).items():
        assert (err.abs() <= 4 * se).all(), (name, err, se)


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_ode_likelihood_of_the_exact_velocity_is_the_true_log_density(sigma_min):
    """The instantaneous change of variables along the exact velocity, with the exact 2-D divergence, gives the data
    law's log density at held-out points: the nll (nats/dim, the mean the evaluate stage reports) within 1e-3 at the
    evaluate stage's rtol = atol = 1e-5 (RK45 controls the error of the whole batch state, so one point may be off by
    more), and every point within 1e-5 nats/dim at rtol = atol = 1e-8."""
    p, g = LinearPath(sigma_min), mixture()
    x = g.sample(200, gen(3))
    true = mixture(sigma_min ** 2).log_prob(x)
    r = ode_log_likelihood(p, exact_velocity_fn(g, p), x, divergence="exact", field="velocity")
    assert abs(r["nll"] - float(-true.mean()) / 2) <= 1e-3
    tight = ode_log_likelihood(p, exact_velocity_fn(g, p), x, divergence="exact", field="velocity", rtol=1e-8,
                               atol=1e-8)
    assert float((tight["logp"] - true).abs().max()) / 2 <= 1e-5
    # the score's drift would divide by m = 0 at t = 1: the velocity is the only field there
    with pytest.raises(NotImplementedError, match="singular"):
        ode_log_likelihood(p, exact_score_fn(g, p), x[:4], divergence="exact")


def test_dpm_solver_first_step_from_pure_noise_is_ddim():
    """At t = 1 (m = 0, λ = −∞) DPM-Solver++'s first step is x_next = (std_next / std_cur) x + m_next D (h = ∞),
    with D from the velocity; later steps are second order."""
    p, g = LinearPath(0.0), mixture()
    v = exact_velocity_fn(g, p)
    x = torch.randn(8, 2, generator=gen(0), dtype=torch.float64)
    t_next = 0.7
    got = DPMSolverPP2M("velocity")(x, 1.0, t_next, v, p)
    d = x0_from_velocity(v(x, torch.ones(8, dtype=torch.float64)), x, torch.ones(8, dtype=torch.float64), p)
    torch.testing.assert_close(got, t_next * x + (1 - t_next) * d)


def test_a_velocity_refuses_score_samplers_and_sigma_spacings():
    """σ = std / m is infinite at t = 1: the ρ- and log-SNR schedules refuse it (uniform time is auto's choice), and a
    velocity is no score for Langevin, PC, ancestral, DDIM or EDM's σ-Heun."""
    p = LinearPath(0.0)
    for spacing in ("karras", "logsnr"):
        with pytest.raises(ValueError, match="sample.spacing: time"):
            fast_grid(p, 10, spacing)
    _, grid, _ = plan("dpm_solver", "velocity", p, 10, {"spacing": "auto"})
    torch.testing.assert_close(grid, torch.linspace(1, 0, 11, dtype=torch.float64))
    for sampler in ("pc", "ddim", "ancestral", "edm_heun", "annealed_langevin"):
        with pytest.raises(ValueError, match="ode or dpm_solver"):
            plan(sampler, "velocity", p, 10, {})


# --------------------------------------------------------------------------- the loss


class _Spy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = {}
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, cond):
        self.seen.update(x_t=x_t, cond=cond)
        return x_t * self.w


@pytest.mark.parametrize("sigma_min", [0.0, 0.2])
def test_loss_regresses_the_conditional_velocity_with_t_then_z(sigma_min):
    """Lipman et al. eq. 23 in this time: x_t = (1 − t) x0 + (σ_min + (1 − σ_min) t) z, target (1 − σ_min) z − x0,
    t uniform then z from the one generator (the order every loss draws in)."""
    p, x = LinearPath(sigma_min), torch.randn(6, 1, 3, 3, generator=gen(0))
    spy = _Spy()
    loss = FlowMatchingLoss(p)(spy, x, generator=gen(5))
    g = gen(5)
    t = p.sample_time(6, g)
    z = torch.randn(x.shape, generator=g)
    b = t.reshape(-1, 1, 1, 1)
    x_t = (1 - b) * x + (sigma_min + (1 - sigma_min) * b) * z
    torch.testing.assert_close(spy.seen["x_t"], x_t)
    torch.testing.assert_close(spy.seen["cond"], 1000 * t)
    torch.testing.assert_close(loss, ((1 - sigma_min) * z - x).pow(2).flatten(1).sum(1))


def test_the_exact_velocity_minimises_the_loss():
    """The marginal velocity is the loss's minimiser (Lipman et al., Theorem 2): a scaled or shifted velocity has a
    higher expected loss, by many standard errors of the paired difference."""
    p, g = LinearPath(0.0), mixture()

    class Exact(torch.nn.Module):
        def __init__(self, scale=1.0, shift=0.0):
            super().__init__()
            self.scale, self.shift, self.v = scale, shift, exact_velocity_fn(g, p)

        def forward(self, x, cond):
            return self.scale * self.v(x, cond / 1000.0) + self.shift

    x = g.sample(20000, gen(1))
    exact = FlowMatchingLoss(p)(Exact(), x, generator=gen(2))
    for wrong in (Exact(scale=1.1), Exact(scale=0.9), Exact(shift=0.1)):
        diff = FlowMatchingLoss(p)(wrong, x, generator=gen(2)) - exact
        assert float(diff.mean()) > 6 * float(diff.std()) / math.sqrt(len(diff)), wrong


# --------------------------------------------------------------------------- the minibatch OT coupling


def test_ot_permutation_is_the_optimal_assignment():
    """POT's exact plan is a permutation whose cost equals the Hungarian algorithm's optimum (SciPy), on points and
    on image-shaped batches."""
    for shape in ((64, 2), (32, 1, 4, 4)):
        x = torch.randn(shape, generator=gen(0), dtype=torch.float64) + 1.0
        z = torch.randn(shape, generator=gen(1), dtype=torch.float64)
        perm = ot_permutation(x, z)
        assert sorted(perm.tolist()) == list(range(shape[0]))
        cost = torch.cdist(x.flatten(1), z.flatten(1)).pow(2).numpy()
        rows, cols = linear_sum_assignment(cost)
        assert transport_cost(x, z[perm]) == pytest.approx(cost[rows, cols].mean(), rel=1e-12)
        assert transport_cost(x, z[perm]) < transport_cost(x, z)
        assert torch.equal(couple(x, z, "independent"), z)


def test_minibatch_ot_cost_approaches_w2_of_two_gaussians():
    """Between N(μ, Σ) and N(0, I), W2² = |μ|² + tr(Σ + I − 2 Σ^½) in closed form and independent pairs cost
    |μ|² + tr Σ + 2. The minibatch OT pairs of one pool of 2048 draws cost less as the batch grows (B = 1 is the
    independent coupling), and one batch of 2048 costs W2² within 4 standard errors of the mean pair cost."""
    mu = torch.tensor([3.0, -1.0], dtype=torch.float64)
    a = torch.tensor([[1.5, 0.0], [0.8, 0.5]], dtype=torch.float64)
    cov = (a @ a.T).numpy()
    w2 = float(mu @ mu) + float(np.trace(cov + np.eye(2) - 2 * np.real(sqrtm(cov))))
    independent = float(mu @ mu) + float(np.trace(cov)) + 2
    n = 2048
    x = mu + torch.randn(n, 2, generator=gen(0), dtype=torch.float64) @ a.T
    z = torch.randn(n, 2, generator=gen(1), dtype=torch.float64)
    costs = {}
    for b in (1, 16, 256, 2048):
        paired = torch.cat([couple(x[i:i + b], z[i:i + b], "minibatch_ot") for i in range(0, n, b)])
        costs[b] = (x - paired).pow(2).sum(1)
    means = [float(c.mean()) for c in costs.values()]
    assert means == sorted(means, reverse=True), means
    se = float(costs[1].std()) / math.sqrt(n)
    assert abs(means[0] - independent) < 4 * se
    assert abs(means[-1] - w2) < 4 * float(costs[2048].std()) / math.sqrt(n), (means[-1], w2)
    assert means[-1] < independent - 10 * se


def test_reflow_loss_regresses_the_straight_path_between_the_given_pairs():
    """Reflow (Liu et al. 2023, sec. 2.2) trains on the pairs it is given, (B, 2, *D) = (sample, noise): x_t on the
    straight line between them, target z − x0, t uniform and nothing else drawn; anything but pairs is refused."""
    p = LinearPath(0.0)
    pairs = torch.randn(6, 2, 1, 3, 3, generator=gen(0))
    spy, used = _Spy(), gen(5)
    loss = ReflowLoss(p)(spy, pairs, generator=used)
    g = gen(5)
    t = p.sample_time(6, g).reshape(-1, 1, 1, 1)
    x0, z = pairs[:, 0], pairs[:, 1]
    torch.testing.assert_close(spy.seen["x_t"], (1 - t) * x0 + t * z)
    torch.testing.assert_close(loss, (z - x0).pow(2).flatten(1).sum(1))
    assert torch.equal(used.get_state(), g.get_state())  # the times, and no noise
    with pytest.raises(ValueError, match=r"pairs stacked as \(B, 2, \*D\)"):
        ReflowLoss(p)(spy, torch.randn(6, 2), generator=gen(5))


def test_a_velocity_network_has_an_image_likelihood_by_hutchinson():
    """On images the velocity's ODE likelihood runs with Hutchinson's divergence (one Rademacher probe per image), as
    the evaluate stage does for eval.likelihood on pixels: finite, and the same with the same probe seed."""
    from pipeline.models import build_network, network_fn

    p = LinearPath(0.0)
    net = build_network({"kind": "unet", "shape": [1, 8, 8], "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                         "attn_resolutions": [], "dropout": 0.0, "parameterization": "velocity"},
                        seed=0).double().eval().requires_grad_(False)
    kind, v = network_fn(net, p, "velocity")
    x = torch.randn(3, 1, 8, 8, generator=gen(0), dtype=torch.float64)
    a = ode_log_likelihood(p, v, x, divergence="rademacher", generator=gen(1), field="velocity", rtol=1e-4, atol=1e-4)
    b = ode_log_likelihood(p, v, x, divergence="rademacher", generator=gen(1), field="velocity", rtol=1e-4, atol=1e-4)
    assert kind == "velocity" and torch.isfinite(a["logp"]).all() and torch.equal(a["logp"], b["logp"])
