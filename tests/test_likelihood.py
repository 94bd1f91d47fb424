"""Probability-flow ODE likelihoods against analytic oracles.

Divergences are checked on linear fields (divergence = trace A) and by averaging Hutchinson
probes; log-likelihoods with the exact score of a Gaussian mixture (docs/references.md, "Exact scores
for testing") against the mixture's closed-form log-density. What the ODE computes differs from
log p_0(x) in three ways, each measured here: the solver error (rtol = atol = 1e-5), the start at
t_eps > 0 instead of 0, and the Gaussian prior standing in for the true p_T at t_max.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.gmm import GaussianMixture
from pipeline.likelihood import divergence_exact, divergence_hutchinson, ode_log_likelihood
from pipeline.models import exact_score_fn
from pipeline.processes import SubVPSDE, VESDE, VPSDE, append_dims

from oracles import gaussian_score

MIX = dict(weights=[0.4, 0.6], means=[[2.0, 2.0], [-1.0, 1.0]], covs=[[2.0, 1.0], [0.5, 3.0]])
# VE's sigma_max = 20 exceeds the mixture's spread (its points lie within ~15 of each other)
PROCESSES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=20.0)}
SHAPES = {"B2": (2,), "B1x4x4": (1, 4, 4)}


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def with_prior(process, logp_fn):
    """A copy of the process whose prior_logp is logp_fn: isolates solver error from prior mismatch."""
    p = copy.copy(process)
    p.prior_logp = logp_fn
    return p


def linear_field(a: torch.Tensor):
    """fn(x, t) = t * A x on the flattened x; divergence t * trace A."""
    return lambda x, t: append_dims(t, x.ndim) * (x.flatten(1) @ a.T).reshape(x.shape)


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.from_params(**MIX)


@pytest.fixture(scope="module")
def held_out(mixture):
    return mixture.sample(300, torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exact_runs(mixture, held_out):
    """ode_log_likelihood with the exact divergence, per process (shared by several tests)."""
    return {name: ode_log_likelihood(p, exact_score_fn(mixture, p), held_out) for name, p in PROCESSES.items()}


# --- divergences -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_divergence_exact_of_linear_field_is_trace(shape):
    g = torch.Generator().manual_seed(0)
    d = math.prod(shape)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(5, *shape, generator=g, dtype=torch.float64)
    t = torch.linspace(0.1, 1.0, 5, dtype=torch.float64)
    div = divergence_exact(linear_field(a), x, t)
    assert div.shape == (5,)
    torch.testing.assert_close(div, t * torch.trace(a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_hutchinson_rademacher_converges_to_trace(shape):
    g = torch.Generator().manual_seed(0)
    d, n = math.prod(shape), 20000
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)  # one probe per row; A x is x-free
    probe = torch.randint(0, 2, x.shape, generator=g).to(torch.float64) * 2 - 1
    est = divergence_hutchinson(linear_field(a), x, torch.ones(n, dtype=torch.float64), probe)
    assert est.shape == (n,)
    # eps^T A eps = tr A + sum_{i<j} (A_ij + A_ji) eps_i eps_j: variance sum_{i<j} (A_ij + A_ji)^2
    s = a + a.T
    var = float((s.triu(1) ** 2).sum())
    assert abs(float(est.mean()) - float(torch.trace(a))) < 4 * math.sqrt(var / n)
    assert float(est.var()) == pytest.approx(var, rel=0.1)
    # a diagonal Jacobian makes every Rademacher probe exact (eps_i^2 = 1)
    diag = torch.diag(torch.diagonal(a))
    exact = divergence_hutchinson(linear_field(diag), x[:3], torch.ones(3, dtype=torch.float64), probe[:3])
    torch.testing.assert_close(exact, torch.trace(a).expand(3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_hutchinson_gaussian_is_unbiased_on_a_nonlinear_field(shape):
    g = torch.Generator().manual_seed(0)
    d, probes = math.prod(shape), 4000
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    fn = lambda x, t: torch.tanh(linear_field(a)(x, t)) + x**2  # noqa: E731
    x0 = torch.randn(1, *shape, generator=g, dtype=torch.float64)
    x = x0.expand(probes, *shape)
    t = torch.full((probes,), 0.7, dtype=torch.float64)
    est = divergence_hutchinson(fn, x, t, torch.randn(x.shape, generator=g, dtype=torch.float64))
    truth = divergence_exact(fn, x0, t[:1])
    assert abs(float(est.mean() - truth)) < 4 * float(est.std()) / math.sqrt(probes)


# --- the mixture oracle ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROCESSES))
def test_ode_nll_matches_the_mixture(name, mixture, held_out, exact_runs):
    out = exact_runs[name]
    true_nll = float(-mixture.log_prob(held_out).mean()) / mixture.dim
    # measured |nll - true_nll|: vp 3e-5, subvp 3e-5, ve 1.2e-3 nats/dim. VE's is KL(p_T || prior) / D:
    # p_T is the data blurred by N(0, 20^2 I), the data mean [0.2, 1.4] shifts it off the prior's,
    # KL ~ |mean|^2 / (2 * 20^2) = 2.5e-3 nats; VP/sub-VP keep mean_coef(1) = 6.6e-3 of the data.
    assert abs(out["nll"] - true_nll) < 0.01
    assert out["logp"].shape == (held_out.shape[0],) and out["logp"].dtype == torch.float64
    assert out["bpd"] == pytest.approx(out["nll"] / math.log(2))
    assert isinstance(out["nfe"], int) and out["nfe"] > 0
    # the start at t_eps (1e-3 for VP/sub-VP: std 0.0105; 1e-5 for VE: std 0.01) moves the target
    # from log p_0 to log p_{t_eps}: measured |mean gap| <= 2.5e-6 nats/dim on these points
    p = PROCESSES[name]
    gap = float((mixture.log_prob(held_out, *p.marginal(_t(p.t_min))) - mixture.log_prob(held_out)).mean())
    assert abs(gap) / mixture.dim < 1e-4


@pytest.mark.parametrize("name", list(PROCESSES))
def test_ode_logp_per_example(name, mixture, held_out, exact_runs):
    p = PROCESSES[name]
    target = mixture.log_prob(held_out, *p.marginal(_t(p.t_min)))  # log p_{t_eps}, what the ODE computes
    # with the true p_T as the prior only the solver error is left: measured max 2.5e-4 .. 5.3e-4 nats
    exact_prior = with_prior(p, lambda z: mixture.log_prob(z, *p.marginal(_t(p.t_max))))
    out = ode_log_likelihood(exact_prior, exact_score_fn(mixture, p), held_out)
    assert float((out["logp"] - target).abs().max()) < 2e-3
    # with the Gaussian prior each point also carries log N(x_T) - log p_T(x_T), about x_T . (m_T mu) /
    # prior variance: measured max 0.026 (vp, subvp) and 0.215 (ve) nats per point, mean ~0
    bound = {"vp": 0.05, "subvp": 0.05, "ve": 0.3}[name]
    assert float((exact_runs[name]["logp"] - target).abs().max()) < bound


@pytest.mark.parametrize("divergence", ["rademacher", "gaussian"])
@pytest.mark.parametrize("name", list(PROCESSES))
def test_hutchinson_nll_within_its_standard_error(name, divergence, mixture, held_out, exact_runs):
    p = PROCESSES[name]
    out = ode_log_likelihood(p, exact_score_fn(mixture, p), held_out, divergence=divergence,
                             generator=torch.Generator().manual_seed(0))
    # paired with the exact divergence on the same points, so the difference is the probe noise alone
    diff = (out["logp"] - exact_runs[name]["logp"]) / mixture.dim
    se = float(diff.std()) / math.sqrt(len(diff))
    assert se > 0  # the mixture's Jacobian is not diagonal, so the probes do add noise
    assert abs(float(diff.mean())) < 3 * se


def test_hutchinson_is_reproducible_from_the_generator(mixture, held_out):
    p, x = PROCESSES["vp"], held_out[:20]
    runs = [ode_log_likelihood(p, exact_score_fn(mixture, p), x, divergence="rademacher", rtol=1e-3, atol=1e-3,
                               generator=torch.Generator().manual_seed(3))["logp"] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


# --- images and the API ------------------------------------------------------------------------


def gaussian_logp(x, mean, std):
    """log N(x; mean, std^2 I) summed over all but the batch dimension, (B,)."""
    d = x[0].numel()
    return -0.5 * ((x - mean) ** 2).flatten(1).sum(1) / std**2 - d * (math.log(std) + 0.5 * math.log(2 * math.pi))


@pytest.mark.parametrize("name", list(PROCESSES))
def test_image_shaped_inputs_match_the_gaussian_density(name):
    p, mu, c = PROCESSES[name], 0.5, 0.8
    x = mu + c * torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # float32 in, float64 out

    def perturbed(t):  # (mean, std) of p_t for N(mu, c^2 I) data
        m, s = p.marginal(_t(t))
        return m * mu, float(torch.sqrt(m**2 * c**2 + s**2))

    exact_prior = with_prior(p, lambda z: gaussian_logp(z, *perturbed(p.t_max)))
    target = gaussian_logp(x.double(), *perturbed(p.t_min))
    with torch.no_grad():  # the divergence needs autograd; the function must turn it on itself
        exact = ode_log_likelihood(exact_prior, gaussian_score(p), x, offset=8.0)
        rad = ode_log_likelihood(exact_prior, gaussian_score(p), x, divergence="rademacher",
                                 generator=torch.Generator().manual_seed(0))
    assert exact["logp"].shape == (8,) and exact["logp"].dtype == torch.float64
    assert float((exact["logp"] - target).abs().max()) < 2e-3
    assert exact["bpd"] == pytest.approx(exact["nll"] / math.log(2) + 8.0)
    # the score's Jacobian is a multiple of I, so every Rademacher probe gives the exact divergence
    torch.testing.assert_close(rad["logp"], exact["logp"], rtol=0, atol=1e-8)
    # with the process's own prior, the mean still matches: measured |error| <= 7e-4 nats/dim
    plain = ode_log_likelihood(p, gaussian_score(p), x)
    assert abs(plain["nll"] - float(-target.mean()) / 16) < 0.01


def test_unknown_divergence_is_rejected():
    with pytest.raises(ValueError, match="unknown divergence 'hutch'.*rademacher"):
        ode_log_likelihood(VPSDE(), gaussian_score(VPSDE()), torch.zeros(2, 2), divergence="hutch")


# --- bits/dim of images ------------------------------------------------------------------------

IMAGE_PROCESSES = {"vp": VPSDE(), "ve": VESDE()}  # VE with score_sde's sigma_max = 50


def perturbed_gaussian(process, t, mu, c):
    """(mean, std) of p_t for N(mu, c^2 I) data pushed through the process."""
    m, s = process.marginal(_t(t))
    return float(m) * mu, float(torch.sqrt(m**2 * c**2 + s**2))


@pytest.mark.parametrize("name", list(IMAGE_PROCESSES))
def test_image_bpd_matches_the_gaussian_closed_form(name):
    """(B, 1, 8, 8) data, the exact score of N(mu, c^2 I), the process's own Gaussian prior: the ODE's
    bits/dim against log N(x; m mu, (m^2 c^2 + s^2) I) at t_min. The score's Jacobian is a multiple
    of I, so each Rademacher probe gives the exact divergence (checked on 4 points against autograd):
    what is left is the solver error and the prior mismatch, measured |bpd error| 6e-5 (vp) and
    3e-4 (ve) bits/dim."""
    p, mu, c = IMAGE_PROCESSES[name], 0.5, 0.2
    x = (mu + c * torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))).double()
    target = gaussian_logp(x, *perturbed_gaussian(p, p.t_min, mu, c))
    closed_bpd = float(-target.mean()) / 64 / math.log(2) + 8.0
    out = ode_log_likelihood(p, gaussian_score(p, mu, c), x, divergence="rademacher",
                             generator=torch.Generator().manual_seed(1), offset=8.0)
    assert abs(out["bpd"] - closed_bpd) < 0.01
    exact = ode_log_likelihood(p, gaussian_score(p, mu, c), x[:4])
    rad = ode_log_likelihood(p, gaussian_score(p, mu, c), x[:4], divergence="rademacher",
                             generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(exact["logp"], rad["logp"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("scaling,mu,c", [("minus_one_one", 0.0, 0.4), ("zero_one", 0.5, 0.2)])
def test_pixel_bpd_is_the_dequantised_density_plus_the_offset(scaling, mu, c):
    """8-bit pixels of a discretised Gaussian; the model is the exact score of N(mu, c^2 I) in model
    space. model_likelihoods(..., scaling) dequantises first (its first draw from the generator), so
    the expected value comes from the same draw: the closed-form density at t_min of those points,
    in bits/dim, plus bpd_offset. Measured |error| 6e-6 (minus_one_one) and 3e-5 (zero_one) bits/dim;
    the same pixels in the two scalings give 7.69528 and 7.69538 bits/dim (the offsets 7 and 8 absorb
    the change of scale)."""
    from pipeline.likelihood import model_likelihoods
    from pipeline.pixels import bpd_offset, to_model, to_pixels

    p = VPSDE()
    z = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = to_pixels(mu + c * z, scaling)  # round to the grid, outer levels collect the tails
    assert x.dtype == torch.uint8
    r = model_likelihoods("score", gaussian_score(p, mu, c), p, x, ode=True, elbo=None, scaling=scaling,
                          generator=torch.Generator().manual_seed(5))
    y = to_model(x, scaling, dequantize=True, generator=torch.Generator().manual_seed(5)).double()
    target = gaussian_logp(y, *perturbed_gaussian(p, p.t_min, mu, c))
    nll = float(-target.mean()) / 64
    assert abs(r["nll"] - nll) < 0.01 * math.log(2)
    assert abs(r["bpd"] - (nll / math.log(2) + bpd_offset(scaling))) < 0.01
    assert r["bpd"] == pytest.approx(r["nll"] / math.log(2) + bpd_offset(scaling))
    assert 7.6 < r["bpd"] < 7.8  # both scalings: the same pixels, the same bits
    # integer-valued floats are the same pixels
    again = model_likelihoods("score", gaussian_score(p, mu, c), p, x.double(), ode=True, elbo=None,
                              scaling=scaling, generator=torch.Generator().manual_seed(5))
    assert again == r


def test_unknown_pixel_scaling_is_rejected():
    from pipeline.likelihood import model_likelihoods

    with pytest.raises(ValueError, match="unknown pixel scaling 'bytes'.*minus_one_one, zero_one"):
        model_likelihoods("score", gaussian_score(VPSDE()), VPSDE(), torch.zeros(2, 1, 2, 2, dtype=torch.uint8),
                          ode=True, elbo=None, scaling="bytes")


@pytest.mark.cuda  # run on a GPU machine: pytest -m cuda (deselected by default, pytest.ini)
def test_pixel_likelihoods_on_cuda_match_the_cpu():
    """Every draw is made on the CPU and moved, so the device changes only the float arithmetic."""
    from pipeline.likelihood import model_likelihoods
    from pipeline.pixels import to_pixels
    from pipeline.processes import DiscreteVP, linear_betas

    x = to_pixels(0.4 * torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)), "minus_one_one")
    for p, ode, elbo in ((VPSDE(), True, None), (DiscreteVP(linear_betas(20)), False, "discrete")):
        runs = [model_likelihoods("score", gaussian_score(p, 0.0, 0.4), p, x.to(device), ode=ode, elbo=elbo,
                                  scaling="minus_one_one", generator=torch.Generator().manual_seed(1))
                for device in ("cpu", "cuda")]
        assert runs[0].keys() == runs[1].keys()
        for key in runs[0]:
            if key == "likelihood_nfe":  # rounding may move the adaptive solver by a step (6 evaluations)
                assert abs(runs[1][key] - runs[0][key]) <= 12
            else:
                assert runs[1][key] == pytest.approx(runs[0][key], rel=1e-4, abs=1e-6), key
