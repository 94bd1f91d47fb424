"""Analytic tier for the discrete ELBO (pipeline/elbo.py), Sohl-Dickstein's kernel and the kernel sampler."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.elbo import (DiscreteELBO, check_has_elbo, discretized_gaussian_log_likelihood, log_normal_interval,
                           negative_elbo, prior_term, step_term)
from pipeline.gmm import GaussianMixture
from pipeline.likelihood import model_likelihoods
from pipeline.parameterization import kernel_from_output, kernel_from_score, reverse_variance_bounds
from pipeline.pixels import SCALINGS, bpd_offset, discrete_decoder, to_model, to_pixels
from pipeline.processes import DiscreteVP, NoiseScaleProcess, VPSDE, cosine_betas, linear_betas
from pipeline.samplers.ddpm import kernel_sampler

from oracles import gaussian_score

MIX = GaussianMixture.from_params([0.4, 0.6], [[2.0, 2.0], [-1.0, 1.0]], [[2.0, 1.0], [0.5, 3.0]])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def exact_score(process):
    def score_fn(x, t):
        m, s = process.marginal(t)
        return MIX.score(x, m, s)
    return score_fn


def test_prior_term_is_the_gaussian_kl():
    p, x0 = DiscreteVP(linear_betas(50)), torch.randn(6, 3, generator=gen(0), dtype=torch.float64)
    m, s = (float(v) for v in p.marginal(torch.tensor([float(p.t_max)], dtype=torch.float64)))
    q = torch.distributions.Normal(m * x0, s)
    want = torch.distributions.kl_divergence(q, torch.distributions.Normal(torch.zeros_like(x0), 1.0)).sum(1)
    torch.testing.assert_close(prior_term(p, x0), want)


def test_step_term_is_the_kl_to_the_kernel_and_the_decoder_density():
    p = DiscreteVP(linear_betas(20))
    x0 = torch.randn(5, 2, generator=gen(1), dtype=torch.float64)
    mean_p, var_p = torch.randn(5, 2, generator=gen(2), dtype=torch.float64), torch.rand(5, 2, generator=gen(3),
                                                                                        dtype=torch.float64) + 0.1
    kernel = lambda x, t, s: (mean_p, var_p)  # noqa: E731
    for t_i, s_i in ((7.0, 6.0), (0.0, -1.0)):
        t, s = torch.full((5,), t_i, dtype=torch.float64), torch.full((5,), s_i, dtype=torch.float64)
        got = step_term(kernel, p, x0, t, s, gen(9))
        x_t = p.perturb(x0, t, torch.randn(x0.shape, generator=gen(9), dtype=torch.float64))
        model = torch.distributions.Normal(mean_p, var_p.sqrt())
        if s_i >= 0:
            mq, vq = p.posterior(x0, x_t, t, s)
            want = torch.distributions.kl_divergence(torch.distributions.Normal(mq, vq.sqrt()[:, None]), model).sum(1)
        else:
            want = -model.log_prob(x0).sum(1)
        torch.testing.assert_close(got, want)


def test_ddpm_elbo_with_the_exact_score_bounds_the_true_nll_tightly_with_beta():
    """With the exact mixture score and reverse variance beta the bound is within a few SE of the
    true nll (measured with N = 250: 1.7991 ± 0.030 against 1.7989 nats/dim); beta_tilde is far looser
    on continuous data (measured 2.74), because its decoder variance is beta_1 / 2."""
    p = DiscreteVP(linear_betas(250))
    x = MIX.sample(1000, gen(0)).double()
    true = float(-MIX.log_prob(x).mean()) / 2
    with torch.no_grad():
        tight = negative_elbo(kernel_from_score(exact_score(p), p, "beta"), p, x, gen(1)) / 2
        loose = negative_elbo(kernel_from_score(exact_score(p), p, "beta_tilde"), p, x, gen(1)) / 2
    se = float(tight.std()) / math.sqrt(len(tight))
    assert abs(float(tight.mean()) - true) < 4 * se, (float(tight.mean()), true, se)
    assert float(loose.mean()) > true + 0.3


def test_the_one_step_loss_is_unbiased_for_the_full_bound():
    p = DiscreteVP(cosine_betas(30))
    x = MIX.sample(200, gen(0)).double()

    class Exact(nn.Module):  # score parameterisation: the network returns the exact score
        def forward(self, x, c):
            m, s = p.marginal(c.to(torch.float64))
            return MIX.score(x, m, s)

    loss = DiscreteELBO(p, "score", variance="beta")
    with torch.no_grad():
        one_step = torch.stack([loss(Exact(), x, generator=gen(10 + k)) for k in range(40)])
        full = negative_elbo(kernel_from_score(exact_score(p), p, "beta"), p, x, gen(3))
    diff = one_step.mean(0) - full
    se = float(one_step.std(0).mean()) / math.sqrt(40 * len(x)) + float(full.std()) / math.sqrt(len(x))
    assert abs(float(diff.mean())) < 4 * se


def test_learned_kernel_keeps_its_variance_between_beta_tilde_and_beta():
    p = DiscreteVP(linear_betas(40))
    x = torch.randn(64, 2, generator=gen(0))
    t = torch.randint(40, (64,), generator=gen(1)).float()
    s = t - 1
    out = 10 * torch.randn(64, 2, 2, generator=gen(2))
    mean, var = kernel_from_output(out, x, t, s, p)
    lower, upper = reverse_variance_bounds(t, s, p)
    assert (var >= lower[:, None] * (1 - 1e-5)).all() and (var <= upper[:, None] * (1 + 1e-5)).all()
    assert (lower[t == 0] > 0).all()
    alpha = p.transition(t, s)[0]
    torch.testing.assert_close(kernel_from_output(torch.zeros(64, 2, 2), x, t, s, p)[0], x / alpha[:, None])


def test_kernel_sampler_with_the_exact_posterior_kernel_recovers_the_mixture(moment_errors):
    p = DiscreteVP(linear_betas(200))
    out = kernel_sampler(kernel_from_score(exact_score(p), p, "beta"), p, (4000, 2), gen(0))
    assert out.nfe == 200
    for key, (err, se) in moment_errors(MIX, out.x.double()).items():
        assert float((err.abs() / se).max()) < 5, key


def test_elbo_refused_without_a_clean_end():
    for process in (VPSDE(), NoiseScaleProcess([1.0, 0.1])):
        with pytest.raises(ValueError, match="discrete chain that ends at clean data"):
            check_has_elbo(process)


def test_model_likelihoods_reports_each_bound_of_the_exact_score():
    x = MIX.sample(200, gen(0)).double()
    vp = VPSDE()
    r = model_likelihoods("score", exact_score(vp), vp, x, ode=True, elbo="huang", elbo_slices=5, generator=gen(1))
    assert set(r) >= {"nll", "nll_se", "bpd", "elbo_nll", "elbo_nll_se", "elbo_nll_importance", "elbo_bpd"}
    true = float(-MIX.log_prob(x).mean()) / 2
    assert abs(r["nll"] - true) < 0.01 and r["bpd"] == pytest.approx(r["nll"] / math.log(2))
    chain = DiscreteVP(linear_betas(100))
    r = model_likelihoods("score", exact_score(chain), chain, x, ode=False, elbo="discrete", generator=gen(1))
    assert set(r) == {"elbo_nll", "elbo_nll_se", "elbo_bpd"}


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=["B2", "B1x8x8"])
def test_learned_kernel_contract(shape):
    """Sohl-Dickstein's kernel network on points and images: the ELBO loss, the full bound and the sampler."""
    from pipeline.nets.mlp import ConditionalMLP
    from pipeline.parameterization import make_kernel_fn

    p, dim = DiscreteVP(linear_betas(12)), math.prod(shape)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = ConditionalMLP(dim, hidden=16, blocks=1, emb_dim=8, outputs=2)
    x = torch.randn((5, *shape), generator=gen(0))
    assert net(x, torch.zeros(5)).shape == (5, 2, *shape)
    loss = DiscreteELBO(p, "kernel")
    a, b, c = loss(net, x, generator=gen(1)), loss(net, x, generator=gen(1)), loss(net, x, generator=gen(2))
    assert a.shape == (5,) and torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, c)
    a.mean().backward()
    assert all(q.grad is not None for q in net.parameters())
    kernel = make_kernel_fn(net, p)
    with torch.no_grad():
        full = negative_elbo(kernel, p, x, gen(3))
        out = kernel_sampler(kernel, p, (4, *shape), gen(4))
    assert full.shape == (5,) and torch.isfinite(full).all()
    assert out.x.shape == (4, *shape) and out.nfe == 12 and torch.isfinite(out.x).all()
    again = kernel_sampler(kernel, p, (4, *shape), gen(4))
    assert torch.equal(out.x, again.x)


def test_likelihood_gaps_against_the_mixture():
    from pipeline.gmm import likelihood_gaps

    x = MIX.sample(50, gen(0)).double()
    true = float(-MIX.log_prob(x).mean()) / 2
    got = likelihood_gaps(MIX, x, {"nll": true + 0.1, "elbo_nll": true + 0.3, "bpd": 9.0})
    assert got["nll_true_subset"] == pytest.approx(true)
    assert got["nll_gap"] == pytest.approx(0.1) and got["elbo_nll_gap"] == pytest.approx(0.3)
    assert set(got) == {"nll_true_subset", "nll_gap", "elbo_nll_gap"}


# --- the discretised Gaussian decoder (Ho et al. 2020, eq. (13)) -----------------------------------

LEVELS = torch.arange(256, dtype=torch.uint8)


def grid_log_probs(scaling, mean, var, dtype=torch.float64):
    """log P(k) of N(mean, var) discretised on the scaling's grid, for every level k: (256,)."""
    x = to_model(LEVELS, scaling).to(dtype)
    return discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, var),
                                               **discrete_decoder(scaling))


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("mean,std", [(0.0, 0.3), (0.13, 1e-3), (0.9, 0.05), (-3.0, 0.5), (1.4, 2.0), (0.5, 30.0),
                                      (1 / 255, 1e-6)])
def test_discretized_gaussian_sums_to_one_over_the_grid(scaling, mean, std):
    """Inside and outside the range, narrower and far wider than a bin, centred on a bin edge (1/255)."""
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-4)):
        logp = grid_log_probs(scaling, mean, std**2, dtype)
        assert logp.dtype == dtype and torch.isfinite(logp).all()
        assert abs(float(logp.double().exp().sum()) - 1) < tol, (dtype, float(logp.exp().sum()))


@pytest.mark.parametrize("scaling", SCALINGS)
def test_discretized_gaussian_is_density_times_bin_when_wide(scaling):
    """For std >> bin the mass of an inner bin is the density times the bin: the midpoint rule, whose
    relative error is (bin/std)^2 (z^2 - 1) / 24 + O((bin/std)^4 z^4), z = (x - mean) / std."""
    low, high, b = (discrete_decoder(scaling)[k] for k in ("low", "high", "bin_width"))
    mean, std = (low + high) / 2, 0.1 * (high - low) / 2  # bin / std = 0.078
    x = to_model(LEVELS, scaling).double()[1:-1]
    density = torch.distributions.Normal(mean, std).log_prob(x).exp()
    mass = grid_log_probs(scaling, mean, std**2).exp()[1:-1]
    z = (x - mean) / std
    near = z.abs() <= 3
    torch.testing.assert_close(mass[near], density[near] * b, rtol=3e-3, atol=0)
    midpoint = density * b * (1 + (b / std) ** 2 * (z**2 - 1) / 24)
    above_floor = z.abs() <= 6  # mass > 1e-10: beyond, the log(1e-12) floor of the official code holds it
    torch.testing.assert_close(mass[above_floor], midpoint[above_floor], rtol=2e-4, atol=0)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_discretized_gaussian_outer_bins_are_open(scaling):
    low, high, b = (discrete_decoder(scaling)[k] for k in ("low", "high", "bin_width"))
    for mean, std in ((low, 0.05), (high + 0.1, 0.2), (0.3, 1.0)):
        normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), std)
        logp = grid_log_probs(scaling, mean, std**2)
        torch.testing.assert_close(logp[0].exp(), normal.cdf(torch.tensor(low + b / 2, dtype=torch.float64)))
        torch.testing.assert_close(logp[-1].exp(), 1 - normal.cdf(torch.tensor(high - b / 2, dtype=torch.float64)))
        inner = normal.cdf(torch.tensor(low + 1.5 * b, dtype=torch.float64)) - normal.cdf(
            torch.tensor(low + 0.5 * b, dtype=torch.float64))
        torch.testing.assert_close(logp[1].exp(), inner)


def test_log_normal_interval_is_accurate_in_both_tails():
    """Against mpmath at 1000 digits (enough to hold 1 - Phi(40) ~ 1e-350 next to 1): tails where
    Phi(hi) - Phi(lo) underflows as a difference of double-precision CDFs. (Intervals far narrower than
    the std lose digits to log Phi(lo) - log Phi(hi): relative error ~ 1e-16 / width, 4e-8 at width
    2e-9; a pixel bin is 2/255 wide and the decoder's std ~ 0.01 to 1.)"""
    import mpmath  # installed with torch (sympy)
    mpmath.mp.dps = 1000
    pairs = [(-40.0, -39.99), (39.99, 40.0), (-0.004, 0.004), (5.0, 5.0001), (-8.0, -7.0), (0.1, 0.2),
             (-1e-3, 1e-3), (30.0, 1e3)]
    lo, hi = (torch.tensor(v, dtype=torch.float64) for v in zip(*pairs))
    got = log_normal_interval(lo, hi)
    want = torch.tensor([float(mpmath.log(mpmath.ncdf(b) - mpmath.ncdf(a))) for a, b in pairs], dtype=torch.float64)
    mpmath.mp.dps = 15
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    # the official floor: a pixel 500 std away costs log(1e-12), and its gradient stays finite
    mean = torch.tensor([0.0, 0.5], dtype=torch.float64, requires_grad=True)
    var = torch.tensor([1e-6, 0.01], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.5, 0.5], dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(x, mean, var, 2 / 255, -1.0, 1.0)
    assert float(logp[0].detach()) == pytest.approx(math.log(1e-12))
    logp.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all()
    assert float(mean.grad[0]) == 0.0 and float(mean.grad[1]) == 0.0  # floored, and centred on the bin


def test_step_term_with_bins_is_the_discretized_decoder():
    p = DiscreteVP(linear_betas(20))
    dec = discrete_decoder("minus_one_one")
    x0 = to_model(torch.randint(256, (5, 1, 4, 4), generator=gen(1), dtype=torch.uint8), "minus_one_one").double()
    mean_p = x0 + 0.01 * torch.randn(x0.shape, generator=gen(2), dtype=torch.float64)
    var_p = torch.full_like(x0, 1e-4)
    kernel = lambda x, t, s: (mean_p, var_p)  # noqa: E731
    for t_i, s_i in ((7.0, 6.0), (0.0, -1.0)):
        t, s = torch.full((5,), t_i, dtype=torch.float64), torch.full((5,), s_i, dtype=torch.float64)
        got = step_term(kernel, p, x0, t, s, gen(9), **dec)
        if s_i >= 0:  # the KL terms do not change
            torch.testing.assert_close(got, step_term(kernel, p, x0, t, s, gen(9)), rtol=0, atol=0)
        else:
            want = -discretized_gaussian_log_likelihood(x0, mean_p, var_p, **dec).flatten(1).sum(1)
            torch.testing.assert_close(got, want)


def test_decoder_arguments_are_checked():
    p = DiscreteVP(linear_betas(10))
    with pytest.raises(ValueError, match="needs the data range"):
        DiscreteELBO(p, "eps", bin_width=2 / 255)
    with pytest.raises(ValueError, match="give them with bin_width"):
        negative_elbo(kernel_from_score(exact_score(p), p), p, torch.zeros(2, 2), gen(0), low=-1.0, high=1.0)
    with pytest.raises(ValueError, match="bin_width > 0 and high > low"):
        DiscreteELBO(p, "eps", bin_width=2 / 255, low=1.0, high=-1.0)


def test_ddpm_discrete_elbo_bounds_the_true_discrete_nll():
    """Pixels drawn from a discretised Gaussian have P(x) in closed form (grid_log_probs, per pixel).
    Any model's bound is >= -log P_model(x), whose mean over data is >= the data's entropy: paired on
    the same points, mean(-ELBO - (-log P_true)) >= 0 up to its standard error. The model here is the
    exact score of the continuous N(mu, c^2 I), variance beta; measured gap 0.041 ± 0.015 bits/dim
    here (truth 7.662), N = 100 steps on 200 points (0.060 ± 0.010 on 400 points, 0.037 ± 0.009 with
    N = 1000), and 1.98 with beta_tilde (the optimal reverse variance for a point mass, too small
    for data of std 0.4: Ho et al. 2020, sec. 3.2)."""
    mu, c, scaling = 0.0, 0.4, "minus_one_one"
    dec = discrete_decoder(scaling)
    x = to_pixels(mu + c * torch.randn(200, 1, 8, 8, generator=gen(0), dtype=torch.float64), scaling)
    x0 = to_model(x, scaling).double()
    true = -discretized_gaussian_log_likelihood(x0, torch.full_like(x0, mu), torch.full_like(x0, c**2),
                                                **dec).flatten(1).sum(1)
    p = DiscreteVP(linear_betas(100))
    with torch.no_grad():
        bound = negative_elbo(kernel_from_score(gaussian_score(p, mu, c), p, "beta"), p, x0, gen(1), **dec)
    gap = (bound - true) / (64 * math.log(2))
    se = float(gap.std()) / math.sqrt(len(gap))
    assert float(gap.mean()) > -3 * se, (float(gap.mean()), se)
    assert float(gap.mean()) < 0.2  # a sanity value: the exact continuous score is nearly the right model
    assert 7.5 < float(true.mean()) / (64 * math.log(2)) < 7.8


@pytest.mark.parametrize("parameterization", ["eps", "kernel"])
def test_discrete_elbo_loss_on_pixels_is_finite_and_trains(parameterization):
    from pipeline.nets.mlp import ConditionalMLP

    p = DiscreteVP(linear_betas(12))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = ConditionalMLP(64, hidden=16, blocks=1, emb_dim=8, outputs=2 if parameterization == "kernel" else 1)
    x = to_model(torch.randint(256, (6, 1, 8, 8), generator=gen(0), dtype=torch.uint8), "minus_one_one")
    x[0] = -1.0  # the open outer bins
    x[1] = 1.0
    loss = DiscreteELBO(p, parameterization, **discrete_decoder("minus_one_one"))
    assert (loss.bin_width, loss.low, loss.high) == (2 / 255, -1.0, 1.0)
    values = torch.stack([loss(net, x, generator=gen(k)) for k in range(8)])  # every step index is drawn
    assert values.shape == (8, 6) and torch.isfinite(values).all()
    values.mean().backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in net.parameters())
    with torch.no_grad():
        full = negative_elbo(loss.kernel_fn(net), p, x, gen(3), **discrete_decoder("minus_one_one"))
    assert torch.isfinite(full).all() and (full > 0).all()  # -log P of discrete data is positive


def test_model_likelihoods_on_pixels():
    """discrete: the discretised decoder on the plain pixels, no offset; huang: the dequantised data,
    with the offset. The two estimate nearly the same bits/dim here (measured 7.750 ± 0.025 and
    7.724 ± 0.085)."""
    mu, c, scaling = 0.0, 0.4, "minus_one_one"
    x = to_pixels(mu + c * torch.randn(64, 1, 8, 8, generator=gen(0), dtype=torch.float64), scaling)
    chain = DiscreteVP(linear_betas(50))
    r = model_likelihoods("score", gaussian_score(chain, mu, c), chain, x, ode=False, elbo="discrete",
                          generator=gen(1), scaling=scaling)
    assert set(r) == {"elbo_nll", "elbo_nll_se", "elbo_bpd"}
    assert r["elbo_bpd"] == r["elbo_nll"] / math.log(2)
    with torch.no_grad():
        want = negative_elbo(kernel_from_score(gaussian_score(chain, mu, c), chain, "beta"), chain,
                             to_model(x, scaling).double(), gen(1), **discrete_decoder(scaling))  # likelihoods run in float64
    assert r["elbo_nll"] == pytest.approx(float(want.mean()) / 64, rel=1e-12)
    vp = VPSDE()
    h = model_likelihoods("score", gaussian_score(vp, mu, c), vp, x, ode=False, elbo="huang", elbo_slices=10,
                          generator=gen(1), scaling=scaling)
    assert h["elbo_bpd"] == pytest.approx(h["elbo_nll"] / math.log(2) + bpd_offset(scaling))
    se = math.hypot(r["elbo_nll_se"], h["elbo_nll_se"]) / math.log(2)
    assert abs(h["elbo_bpd"] - r["elbo_bpd"]) < 4 * se + 0.1


@pytest.mark.parametrize("bins", [False, True], ids=["density", "discretized"])
def test_elbo_follows_the_data_device(bins):
    """On "meta" any stray CPU tensor mixed with the data raises: every tensor follows x's device."""
    from pipeline.nets.mlp import ConditionalMLP

    p = DiscreteVP(linear_betas(5))
    dec = discrete_decoder("minus_one_one") if bins else {}
    x = to_model(torch.zeros(3, 1, 4, 4, dtype=torch.uint8).to("meta"), "minus_one_one")
    full = negative_elbo(kernel_from_score(gaussian_score(p), p, "beta"), p, x, gen(0), **dec)
    assert full.device.type == "meta" and full.shape == (3,)
    net = ConditionalMLP(16, hidden=8, blocks=1, emb_dim=8).to("meta")
    loss = DiscreteELBO(p, "eps", **dec)(net, x, generator=gen(0))
    assert loss.device.type == "meta" and loss.shape == (3,)
