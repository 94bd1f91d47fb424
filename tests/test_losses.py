"""Training losses: DSM (sigma2 / likelihood weighting, uniform / importance time), eps-MSE, ISM, SSM.

Analytic oracles first. For Gaussian data N(mu, c^2 I) the perturbed marginal at time t is
N(m mu, (m^2 c^2 + std^2) I), so s_a(x, t) = -a (x - m mu) / (m^2 c^2 + std^2) is the exact
score at a = 1 and every score-matching loss has its expected value minimised there. By
Stein's lemma E_z[s(x_t) . z] = std E[div s(x_t)], so for any network and any weighting,
E[DSM - ISM | t] = lambda(t) D / (2 std(t)^2): D/2 for lambda = std^2 (Vincent 2011's
"DSM = explicit SM + constant" with the constant made explicit). Then contracts on (B, 2)
and (B, 1, 8, 8). Monte Carlo checks compare with 4 standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.gmm import GaussianMixture
from pipeline.losses import (LOSSES, DenoisingScoreMatching, EpsilonMSE, HuangELBO, ImplicitScoreMatching,
                             SlicedScoreMatching, build_loss)
from pipeline.models import build_network
from pipeline.processes import DiscreteVP, EDMProcess, NoiseScaleProcess, VESDE, VPSDE, append_dims, linear_betas

MU, C = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.7
PROCESSES = {"vp": VPSDE, "ve": VESDE, "ncsn": lambda: NoiseScaleProcess([3.0, 1.0, 0.3, 0.1]), "edm": EDMProcess}
# How each process's conditioning (pipeline.processes) maps back to t, for the oracle "network".
T_OF_COND = {
    "vp": lambda p, c: c * p.t_max / 1000.0,
    "ve": lambda p, c: (c - math.log(p.sigma_min)) / math.log(p.sigma_max / p.sigma_min),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.detach().double()
    return float(v.mean()), float(v.std()) / len(v) ** 0.5


class GaussianOracle(nn.Module):
    """s_a(x, t) = -a (x - m mu) / (m^2 c^2 + std^2), (m, std) = process.marginal(t); exact at a = 1."""

    def __init__(self, name: str, process, a: float):
        super().__init__()
        self.name, self.process = name, process
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x, cond):
        m, std = self.process.marginal(T_OF_COND[self.name](self.process, cond))
        m, std = append_dims(m, x.ndim), append_dims(std, x.ndim)
        return -self.a * (x - m * MU) / (m**2 * C**2 + std**2)


def gaussian_data(n: int, seed: int = 0) -> torch.Tensor:
    return MU + C * torch.randn(n, 2, generator=gen(seed), dtype=torch.float64)


def tiny_net(dim: int) -> nn.Module:
    return build_network({"kind": "mlp", "dim": dim, "hidden": 16, "blocks": 1, "emb_dim": 8}, seed=0)


# --------------------------------------------------------------------------- analytic oracles


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_dsm_ism_ssm_are_minimised_at_the_analytic_score(name):
    """Common random numbers over a grid of a: each estimated expected loss has its argmin near a = 1."""
    p, x0 = PROCESSES[name](), gaussian_data(40_000)
    grid = torch.linspace(0.8, 1.2, 41, dtype=torch.float64)
    losses = {"dsm": DenoisingScoreMatching(p, "score"), "ism": ImplicitScoreMatching(p, "score"),
              "ssm": SlicedScoreMatching(p, "score", n_projections=4),  # 4 probes: the (v^T s)^2 term is noisy
              "ssm_vr": SlicedScoreMatching(p, "score", variance_reduced=True)}
    for key, loss in losses.items():
        with torch.no_grad():
            values = torch.stack([loss(GaussianOracle(name, p, float(a)), x0, generator=gen(1)).mean() for a in grid])
        best = float(grid[values.argmin()])
        assert abs(best - 1.0) <= 0.05, (key, best)


@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
def test_dsm_minus_ism_is_the_stein_constant_and_ssm_matches_ism(weighting):
    """E[DSM - ISM | t] = lambda D / (2 std^2) for every a; E_v[SSM] = ISM (same t and z, seed for seed)."""
    p, x0, n = VPSDE(), gaussian_data(20_000), 20_000
    t = p.sample_time(n, gen(2)).double()  # the losses draw t first from the same seed
    _, std = p.marginal(t)
    lam = std**2 if weighting == "sigma2" else p.sde(x0, t)[1] ** 2
    gap = lam * 2 / (2 * std**2)
    for a in (0.5, 1.0, 1.5):
        model = GaussianOracle("vp", p, a)
        with torch.no_grad():
            dsm = DenoisingScoreMatching(p, "score", weighting=weighting)(model, x0, generator=gen(2))
            ism = ImplicitScoreMatching(p, "score", weighting=weighting)(model, x0, generator=gen(2))
            ssm = SlicedScoreMatching(p, "score", weighting=weighting)(model, x0, generator=gen(2))
        m, se = mean_se(dsm - ism - gap)
        assert abs(m) < 4 * se + 1e-12, (a, m, se)
        m, se = mean_se(ssm - ism)
        assert abs(m) < 4 * se, (a, m, se)


@pytest.mark.parametrize("exact_max_dim", [16, 0], ids=["exact", "hutchinson"])
def test_ism_gradient_includes_the_divergence_term(exact_max_dim):
    """d ISM / da = lambda (a ||w||^2 - D / k), w = (x_t - m mu) / k: -lambda D / k comes only through create_graph."""
    p, x0, a = VPSDE(), gaussian_data(500), 0.7
    model = GaussianOracle("vp", p, a)
    ImplicitScoreMatching(p, "score", exact_max_dim=exact_max_dim)(model, x0, generator=gen(3)).mean().backward()
    g = gen(3)
    t = p.sample_time(500, g).double()
    z = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    m, std = p.marginal(t)
    k = m**2 * C**2 + std**2
    w = (p.perturb(x0, t, z) - m[:, None] * MU) / k[:, None]
    want = (std**2 * (a * w.pow(2).sum(1) - 2 / k)).mean()  # Rademacher: v^T J v = -a ||v||^2 / k = -a D / k
    torch.testing.assert_close(model.a.grad, want)


def test_hutchinson_ism_agrees_with_exact_ism_in_expectation():
    p, n = VPSDE(), 4000
    x = torch.randn(n, 1, 4, 4, generator=gen(0))  # D = 16: exact at the default exact_max_dim
    net = tiny_net(16)
    with torch.no_grad():
        exact = ImplicitScoreMatching(p, "score")(net, x, generator=gen(5))
        hutch = ImplicitScoreMatching(p, "score", exact_max_dim=0, n_probes=2)(net, x, generator=gen(5))
        ssm_vr = SlicedScoreMatching(p, "score", n_projections=2, probe="rademacher", variance_reduced=True)(
            net, x, generator=gen(5))
    m, se = mean_se(hutch - exact)  # same t and z: the difference is the probes' noise alone
    assert se > 0 and abs(m) < 4 * se, (m, se)
    torch.testing.assert_close(ssm_vr, hutch)  # SSM-VR with Rademacher probes is Hutchinson ISM


@pytest.mark.parametrize("proc", list(PROCESSES))
@pytest.mark.parametrize("name", ["dsm", "ism", "ssm"])
def test_likelihood_weighting_is_g2_over_std2_times_sigma2(proc, name):
    p, x = PROCESSES[proc](), torch.randn(64, 2, generator=gen(0))
    net = tiny_net(2)
    sig = build_loss(name, p, "score")(net, x, generator=gen(7))
    lik = build_loss(name, p, "score", weighting="likelihood")(net, x, generator=gen(7))
    t = p.sample_time(64, gen(7))
    ratio = p.sde(x, t)[1] ** 2 / p.marginal(t)[1] ** 2
    torch.testing.assert_close(lik, ratio * sig, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
def test_both_time_samplings_estimate_the_time_average_at_the_exact_score(weighting):
    """At a = 1, std s + z = (m^2 c^2 z - std m c eps) / k, so E[DSM | t] = lambda / std^2 * D/2 * m^2 c^2 / k.

    Its average over t ~ U[t_min, t_max] by quadrature is what both samplings must estimate; the
    likelihood-weighted integrand grows like 1/t, so mass the proposal puts below t_min shows up.
    """
    p, n = VPSDE(), 20_000
    x0, model = gaussian_data(n), GaussianOracle("vp", p, 1.0)
    t = torch.logspace(math.log10(p.t_min), math.log10(p.t_max), 200_001, dtype=torch.float64)
    m, std = p.marginal(t)
    lam = std**2 if weighting == "sigma2" else p.sde(t[:, None], t)[1] ** 2
    integrand = lam / std**2 * m**2 * C**2 / (m**2 * C**2 + std**2)  # times D/2 = 1
    want = float(torch.trapezoid(integrand, t)) / (p.t_max - p.t_min)
    for t_sampling in ("uniform", "importance"):
        with torch.no_grad():
            got = DenoisingScoreMatching(p, "score", weighting, t_sampling)(model, x0, generator=gen(13))
        m_, se = mean_se(got)
        assert abs(m_ - want) < 4 * se, (t_sampling, m_, se, want)


@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
def test_importance_sampled_time_has_the_uniform_mean(weighting):
    p, n = VPSDE(), 40_000
    x = gaussian_data(n).float()
    net = tiny_net(2)
    with torch.no_grad():
        uni = DenoisingScoreMatching(p, "score", weighting=weighting)(net, x, generator=gen(11))
        imp = DenoisingScoreMatching(p, "score", weighting, "importance")(net, x, generator=gen(12))
    (mu_u, se_u), (mu_i, se_i) = mean_se(uni), mean_se(imp)
    assert abs(mu_u - mu_i) < 4 * (se_u**2 + se_i**2) ** 0.5, (mu_u, se_u, mu_i, se_i)
    if weighting == "likelihood":  # q(t) ∝ g^2/std^2 is the proposal made for this weighting
        assert se_i < se_u / 2


def test_eps_mse_is_twice_sigma2_dsm_and_is_the_noise_regression_for_eps_networks():
    p, x = VPSDE(), torch.randn(32, 1, 8, 8, generator=gen(0))
    net = tiny_net(64)
    for par in ("score", "eps", "x0"):
        dsm = DenoisingScoreMatching(p, par)(net, x, generator=gen(4))
        eps = EpsilonMSE(p, par)(net, x, generator=gen(4))
        torch.testing.assert_close(eps, 2 * dsm)
        torch.testing.assert_close(EpsilonMSE(p, par, reduction="mean")(net, x, generator=gen(4)), eps / 64)
    g = gen(4)
    t = p.sample_time(32, g)
    z = torch.randn(x.shape, generator=g)
    want = (net(p.perturb(x, t, z), p.conditioning(t)) - z).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(EpsilonMSE(p, "eps")(net, x, generator=gen(4)), want)


# --------------------------------------------------------------------------- contracts


# The discrete ELBO needs a chain that ends at clean data (DDPM's); every other loss takes every process.
CONTRACT_PROCESSES = {**PROCESSES, "ddpm": lambda: DiscreteVP(linear_betas(10))}
# What each loss's network outputs: a score, except flow matching's velocity.
OUTPUT = {"flow_matching": "velocity", "reflow": "velocity"}


def _pairs(name: str, proc: str) -> bool:
    """The discrete ELBO needs DDPM's chain; the score losses but Huang's take it too; Huang's ELBO needs an SDE (the
    linear path has none); flow matching needs a differentiable marginal (every continuous process)."""
    if name == "vlb" or proc == "ddpm":
        return (name == "vlb") == (proc == "ddpm") or name in ("dsm", "eps_mse", "ism", "ssm", "edm")
    return name != "huang_elbo" or CONTRACT_PROCESSES[proc]().has_sde


def batch(name: str, shape: tuple, n: int) -> torch.Tensor:
    """n examples of `shape` as the loss `name` takes them: reflow's are pairs, (n, 2, *shape)."""
    return torch.randn((n, 2, *shape) if name == "reflow" else (n, *shape), generator=gen(0))


CONTRACT_PAIRS = [(name, proc) for name in LOSSES for proc in CONTRACT_PROCESSES if _pairs(name, proc)]


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=["B2", "B1x8x8"])
@pytest.mark.parametrize("name, proc", CONTRACT_PAIRS)
def test_loss_contract(name, proc, shape):
    p, dim = CONTRACT_PROCESSES[proc](), math.prod(shape)
    net, loss = tiny_net(dim), build_loss(name, p, OUTPUT.get(name, "score"))
    x = batch(name, shape, 5)
    a = loss(net, x, generator=gen(3))
    b = loss(net, x, generator=gen(3))
    c = loss(net, x, generator=gen(4))
    assert a.shape == (5,) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.mean().backward()
    grads = [q.grad for q in net.parameters()]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)


def tiny_conditional_net(dim: int, parameterization: str = "score") -> nn.Module:
    return build_network({"kind": "mlp", "dim": dim, "hidden": 16, "blocks": 1, "emb_dim": 8, "num_classes": 3,
                          "parameterization": parameterization}, seed=0)


CONDITIONAL_CASES = [(name, proc, OUTPUT.get(name, "score")) for name, proc in CONTRACT_PAIRS] + [("vlb", "ddpm", "kernel")]


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=["B2", "B1x8x8"])
@pytest.mark.parametrize("name, proc, parameterization", CONDITIONAL_CASES)
def test_every_loss_takes_class_labels(name, proc, parameterization, shape):
    """cond (label indices, 0 the null label) reaches the network, draws no randomness, and trains only the
    embedding rows of the labels in the batch."""
    p, dim = CONTRACT_PROCESSES[proc](), math.prod(shape)
    net, loss = tiny_conditional_net(dim, parameterization), build_loss(name, p, parameterization)
    x = batch(name, shape, 6)
    g_none, g_one, g_two = gen(3), gen(3), gen(3)
    unlabelled = loss(net, x, generator=g_none)
    ones = loss(net, x, cond=torch.ones(6, dtype=torch.long), generator=g_one)
    twos = loss(net, x, cond=torch.full((6,), 2), generator=g_two)
    assert ones.shape == (6,) and torch.isfinite(ones).all() and not torch.equal(ones, twos)
    assert torch.equal(g_none.get_state(), g_one.get_state()) and torch.equal(g_one.get_state(), g_two.get_state())
    assert torch.isfinite(unlabelled).all()
    net.zero_grad()
    ones.mean().backward()
    grad = net.label_emb.weight.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def test_defaults_are_the_previous_dsm_and_no_grad_detaches():
    p, x, net = VPSDE(), torch.randn(8, 2, generator=gen(0)), tiny_net(2)
    old = DenoisingScoreMatching(p, "score")(net, x, generator=gen(1))
    new = build_loss("dsm", p, "score", weighting="sigma2", t_sampling="uniform")(net, x, generator=gen(1))
    assert torch.equal(old, new)
    with torch.no_grad():
        assert ImplicitScoreMatching(p, "score")(net, x, generator=gen(1)).grad_fn is None


@pytest.mark.parametrize("call, match", [
    (lambda p: build_loss("elbo", p, "score"), "allowed: dsm, eps_mse, ism, ssm, huang_elbo, vlb"),
    (lambda p: build_loss("vlb", p, "score"), "discrete ELBO needs a discrete chain.*VPSDE"),
    (lambda p: build_loss("vlb", DiscreteVP(linear_betas(10)), "score", variance="small"), "beta_tilde, beta"),
    (lambda p: build_loss("dsm", p, "score", lr=1.0), "lr.*allowed: weighting, t_sampling"),
    (lambda p: build_loss("ism", p, "score", probe="gaussian"),
     "allowed: weighting, t_sampling, exact_max_dim, n_probes"),
    (lambda p: build_loss("dsm", p, "score", weighting="uniform"), "allowed: sigma2, likelihood"),
    (lambda p: build_loss("dsm", p, "score", t_sampling="stratified"), "allowed: uniform, importance"),
    (lambda p: build_loss("ssm", p, "score", probe="sphere"), "allowed: gaussian, rademacher"),
    (lambda p: build_loss("ssm", p, "score", n_projections=0), "n_projections must be an integer >= 1"),
    (lambda p: build_loss("eps_mse", p, "score", reduction="max"), "allowed: sum, mean"),
    (lambda p: build_loss("dsm", p, "velocity"), "allowed: score, score_over_sigma, eps, x0, drift"),
    (lambda p: build_loss("flow_matching", p, "score"), "allowed: velocity"),
    (lambda p: build_loss("flow_matching", p, "velocity", coupling="sinkhorn"), "allowed: independent, minibatch_ot"),
    (lambda p: build_loss("dsm", VESDE(), "score", t_sampling="importance"), "sample_time_importance.*VESDE"),
    (lambda p: build_loss("ism", DiscreteVP(linear_betas(10)), "score", weighting="likelihood"), "sde.*DiscreteVP"),
])
def test_build_loss_errors_name_the_allowed_values(call, match):
    with pytest.raises(ValueError, match=match):
        call(VPSDE())


# --------------------------------------------------------------------------- Huang et al.'s ELBO


class _ExactMixtureScore(torch.nn.Module):
    """A 'network' returning the exact score of a mixture under VP (conditioning is 1000 t / T) or EDM's process
    (conditioning is t)."""

    def __init__(self, mixture, process, scale=1.0):
        super().__init__()
        self.mixture, self.process, self.scale = mixture, process, scale

    def forward(self, x, cond):
        t = cond.double() if isinstance(self.process, EDMProcess) else cond.double() * self.process.t_max / 1000.0
        m, s = self.process.marginal(t)
        return self.scale * self.mixture.score(x, m, s)


@pytest.mark.parametrize("process, t_sampling", [("vp", "uniform"), ("vp", "importance"), ("edm", "uniform"),
                                                 ("edm", "importance")])
def test_huang_elbo_is_tight_at_the_true_score(process, t_sampling):
    """With the exact score the continuous-time ELBO equals log p(x) in expectation (Huang et al.,
    Theorem 3: the gap is the KL between path measures, zero for the true time reversal), up to the
    prior mismatch at T (~1e-4 nats here); a wrong score lowers it by many standard errors. On EDM's process the
    integral is over uniform (or log-uniform) σ, never its log-normal training σ."""
    mixture = GaussianMixture.from_params([0.4, 0.6], [[2.0, 2.0], [-1.0, 1.0]], [[2.0, 1.0], [0.5, 3.0]])
    p = VPSDE() if process == "vp" else EDMProcess()
    x = mixture.sample(500, torch.Generator().manual_seed(1))
    true = float(mixture.log_prob(x).mean())
    loss = HuangELBO(p, "score", t_sampling=t_sampling)

    def elbo(scale):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            vals = torch.stack([-loss(_ExactMixtureScore(mixture, p, scale), x, generator=gen) for _ in range(100)])
        return float(vals.mean()), float(vals.std()) / vals.numel() ** 0.5

    est, se = elbo(1.0)
    assert abs(est - true) < 4 * se, (est, true, se)
    wrong, se_wrong = elbo(1.3)
    assert wrong < true - 4 * se_wrong, (wrong, true, se_wrong)


def test_huang_elbo_needs_an_sde():
    with pytest.raises(ValueError, match="SDE"):
        HuangELBO(DiscreteVP(linear_betas(10)), "score")


# --------------------------------------------------------------------------- devices and the draw order

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VARIANT_OPTIONS = {"dsm": [{}, {"weighting": "likelihood"}, {"t_sampling": "importance"}],
                   "eps_mse": [{}], "ism": [{}, {"exact_max_dim": 0}], "ssm": [{}, {"probe": "rademacher"}],
                   "huang_elbo": [{}, {"exact_max_dim": 0}], "vlb": [{}], "edm": [{}, {"sigma_data": 0.3}],
                   "flow_matching": [{}, {"coupling": "minibatch_ot"}], "reflow": [{}]}
DEVICE_CASES = [(name, proc, opts, device) for name, proc in CONTRACT_PAIRS for opts in VARIANT_OPTIONS[name]
                for device in DEVICES + ["meta"]
                if not (opts.get("t_sampling") == "importance" and proc != "vp")
                and not (opts.get("weighting") == "likelihood" and proc == "ddpm")
                # the OT coupling solves on the host (POT) from the batch's values, which a meta tensor has not
                and not (opts.get("coupling") == "minibatch_ot" and device == "meta")]


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=["B2", "B1x8x8"])
@pytest.mark.parametrize("name, proc, opts, device", DEVICE_CASES)
def test_losses_follow_the_data_device(name, proc, opts, shape, device):
    """Every loss runs with the network and x on any device; on "meta" any CPU tensor left in the loss's
    arithmetic (a time, a noise draw, a probe, a process table) raises."""
    p, dim = CONTRACT_PROCESSES[proc](), math.prod(shape)
    net, loss = tiny_net(dim).to(device), build_loss(name, p, OUTPUT.get(name, "score"), **opts)
    x = batch(name, shape, 5).to(device)
    v = loss(net, x, generator=gen(3))
    assert v.shape == (5,) and v.device == x.device
    v.mean().backward()
    assert all(q.grad is not None and q.grad.device == x.device for q in net.parameters())
    if device != "meta":  # drawn on the CPU then moved: the same loss on every device, up to float reductions
        cpu = build_loss(name, p, OUTPUT.get(name, "score"), **opts)(tiny_net(dim), x.cpu(), generator=gen(3))
        torch.testing.assert_close(v.detach().cpu(), cpu.detach())


def test_the_loss_draws_t_then_z_from_one_generator():
    """Training randomness is fixed: t from process.sample_time, then z = torch.randn(x.shape) from the same
    generator (the trained model files depend on this order)."""
    p, x = VPSDE(), torch.randn(6, 1, 4, 4, generator=gen(0))
    seen = {}

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x_t, cond):
            seen["x_t"], seen["cond"] = x_t, cond
            return x_t * self.w

    DenoisingScoreMatching(p, "score")(Spy(), x, generator=gen(5))
    g = gen(5)
    t = p.sample_time(6, g)
    z = torch.randn(x.shape, generator=g, dtype=x.dtype)
    assert torch.equal(seen["x_t"], p.perturb(x, t, z))
    assert torch.equal(seen["cond"], p.conditioning(t))
