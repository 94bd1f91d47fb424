"""Forward processes: closed-form marginals (docs/references.md, "Continuous SDEs"), the moment ODEs
that tie marginals to the SDE, a Monte Carlo run of each SDE, DDPM betas against the VP
marginal, transitions, importance-sampled time, the shape contract on (B, 2) and (B, 1, 8, 8),
and the capability properties (has_sde, ...) against what each registered process's methods do.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.processes import (
    PROCESSES,
    BrownianMotion,
    DiscreteVP,
    EDMProcess,
    LinearPath,
    NoiseScaleProcess,
    OUProcess,
    SubVPSDE,
    VESDE,
    VPSDE,
    append_dims,
    cosine_betas,
    linear_betas,
    process_from_spec,
)

F64 = torch.float64
CONTINUOUS = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(), "ou": OUProcess(), "edm": EDMProcess(),
              "brownian": BrownianMotion(0.7)}
ALL = {**CONTINUOUS, "ncsn": NoiseScaleProcess([5.0, 1.0, 0.2, 0.05]), "ddpm": DiscreteVP(linear_betas(100))}


def _times(p, n=7):
    return torch.linspace(max(p.t_min, 1e-3 * p.t_max), p.t_max, n, dtype=F64)


def test_vp_marginal_closed_form():
    p, t = VPSDE(), _times(VPSDE())
    m, s = p.marginal(t)
    want = torch.exp(-0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1)
    torch.testing.assert_close(m, want)
    torch.testing.assert_close(s, torch.sqrt(1 - want**2))


def test_subvp_std_is_one_minus_mean_coef_squared():
    m, s = SubVPSDE().marginal(_times(SubVPSDE()))
    torch.testing.assert_close(s, 1 - m**2)


def test_ve_sigma_and_diffusion():
    p, t = VESDE(), _times(VESDE())
    m, s = p.marginal(t)
    torch.testing.assert_close(m, torch.ones_like(t))
    torch.testing.assert_close(s, 0.01 * (50 / 0.01) ** t)
    _, g = p.sde(torch.zeros(len(t), 2, dtype=F64), t)
    torch.testing.assert_close(g, s * math.sqrt(2 * math.log(50 / 0.01)))
    assert p.prior_std() == 50.0


def test_ou_marginal():
    m, s = OUProcess().marginal(torch.tensor([0.5, 2.0], dtype=F64))
    torch.testing.assert_close(m, torch.exp(-0.5 * torch.tensor([0.5, 2.0], dtype=F64)))
    torch.testing.assert_close(s**2, 1 - torch.exp(-torch.tensor([0.5, 2.0], dtype=F64)))


@pytest.mark.parametrize("name", list(CONTINUOUS) + ["ncsn"])
def test_marginals_solve_the_moment_odes_of_the_sde(name):
    """For dx = f(t) x dt + g(t) dW: d m/dt = f m and d std^2/dt = 2 f std^2 + g^2 (Saerkkae & Solin, eq. 5.51)."""
    p = ALL[name]
    t = _times(p)[1:-1].clone().requires_grad_(True)
    m, s = p.marginal(t)
    m = m + 0 * t  # a constant mean coefficient (ve, ncsn) carries no graph of its own
    dm = torch.autograd.grad(m.sum(), t, retain_graph=True)[0]
    dvar = torch.autograd.grad((s**2).sum(), t)[0]
    with torch.no_grad():
        drift, g = p.sde(torch.ones(len(t), 1, dtype=F64), t)
        f = drift[:, 0]  # the drift is linear: f(t) * x at x = 1
        torch.testing.assert_close(dm, f * m, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(dvar, 2 * f * s**2 + g**2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", list(CONTINUOUS))
def test_euler_maruyama_monte_carlo_matches_the_marginal(name):
    """Simulate the forward SDE from a fixed x0 and compare the sample moments with marginal(t)."""
    p = CONTINUOUS[name]
    n, steps = 20_000, 2000
    gen = torch.Generator().manual_seed(0)
    x0 = 1.5
    x = torch.full((n, 1), x0, dtype=F64)
    t0 = 0.0
    t_end = 0.5 * p.t_max
    dt = (t_end - t0) / steps
    for i in range(steps):
        t = torch.full((n,), t0 + i * dt, dtype=F64)
        drift, g = p.sde(x, t)
        x = x + drift * dt + append_dims(g, 2) * math.sqrt(dt) * torch.randn(x.shape, generator=gen, dtype=F64)
    m, s = p.marginal(torch.tensor([t_end], dtype=F64))
    mean, std = float(x.mean()), float(x.std())
    se_mean, se_std = float(s) / n**0.5, float(s) / (2 * n) ** 0.5
    assert abs(mean - float(m) * x0) < 4 * se_mean + 2e-3, (mean, float(m) * x0)
    # ve starts at std 0 at t = 0 only for sigma_min -> 0: compare increments of the variance.
    s0 = p.marginal(torch.tensor([t0], dtype=F64))[1]
    want_var = float(s) ** 2 - float(s0) ** 2 * float(m / p.marginal(torch.tensor([t0], dtype=F64))[0]) ** 2
    assert abs(std - want_var**0.5) < 4 * se_std + 2e-3 * want_var**0.5, (std, want_var**0.5)


def test_ddpm_discretisation_of_vp_matches_its_marginal():
    """beta_i = beta_min/N + i (beta_max - beta_min)/(N (N-1)) (docs/references.md, "Continuous SDEs"): prod(1 - beta) ~ m(t)^2."""
    n = 1000
    i = torch.arange(n, dtype=F64)
    betas = 0.1 / n + i * (20 - 0.1) / (n * (n - 1))
    d, vp = DiscreteVP(betas), VPSDE()
    t_idx = torch.tensor([99.0, 299.0, 599.0, 999.0], dtype=F64)
    m_d, s_d = d.marginal(t_idx)
    m_c, s_c = vp.marginal((t_idx + 1) / n)
    torch.testing.assert_close(m_d, m_c, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(s_d, s_c, rtol=2e-2, atol=1e-4)


def test_ddpm_linear_and_cosine_betas():
    b = linear_betas(1000)
    assert float(b[0]) == pytest.approx(1e-4) and float(b[-1]) == pytest.approx(0.02)
    c = cosine_betas(1000)
    ab = torch.cumprod(1 - c, 0)
    # Nichol & Dhariwal eq. (17): alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/N + s)/(1 + s) pi/2)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert float(ab[499]) == pytest.approx(f(500) / f(0), rel=1e-9)
    d = DiscreteVP(b)
    m, s = d.marginal(torch.tensor([-1.0, 0.0], dtype=F64))
    assert m.tolist() == [1.0, pytest.approx(math.sqrt(1 - 1e-4))] and float(s[0]) == 0.0


def test_ddpm_grid_full_and_strided():
    d = DiscreteVP(linear_betas(1000))
    full = d.grid()
    assert len(full) == 1001 and full[0] == 999 and full[-1] == -1
    g = d.grid(50)
    assert len(g) == 51 and g[0] == 999 and g[-2] == 0 and g[-1] == -1 and (g[1:] < g[:-1]).all()
    with pytest.raises(ValueError):
        d.grid(0)
    with pytest.raises(ValueError, match="out of range"):
        d.marginal(torch.tensor([1000.0], dtype=F64))


@pytest.mark.parametrize("name", list(CONTINUOUS))
def test_transition_composes_to_the_marginal(name):
    """x_t | x_s = alpha x_s + sigma z with x_s ~ marginal(s) reproduces marginal(t) (VDM eq. 5)."""
    p = CONTINUOUS[name]
    s, t = torch.tensor([0.3 * p.t_max], dtype=F64), torch.tensor([0.7 * p.t_max], dtype=F64)
    alpha, sigma = p.transition(t, s)
    (m_s, std_s), (m_t, std_t) = p.marginal(s), p.marginal(t)
    torch.testing.assert_close(alpha * m_s, m_t)
    torch.testing.assert_close(alpha**2 * std_s**2 + sigma**2, std_t**2)
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    f, g = p.discretize(x, t.expand(3), s.expand(3))
    torch.testing.assert_close(x + f, append_dims(alpha, 2) * x)


def test_vp_importance_sampled_time_is_an_unbiased_proposal():
    """E_q[w(t) h(t)] = int_0^T h(t) dt for w = 1/q: checked for h = 1 and h = t."""
    p = VPSDE()
    t, w = p.sample_time_importance(200_000, torch.Generator().manual_seed(0))
    t, w = t.double(), w.double()
    assert (t >= 0).all() and (t <= p.t_max).all()
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-2)
    assert float((w * t).mean()) == pytest.approx(0.5, rel=1e-2)
    # q(t) ∝ beta / (1 - e^{-B}) piles up at small t
    assert float((t < 0.1).double().mean()) > 0.3
    with pytest.raises(NotImplementedError, match="VP"):
        VESDE().sample_time_importance(4, None)


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=["B2", "B1x8x8"])
def test_process_contract(name, shape):
    p = ALL[name]
    gen = torch.Generator().manual_seed(0)
    b = 5
    t = p.sample_time(b, gen)
    assert t.shape == (b,) and (t >= p.t_min).all() and (t <= p.t_max).all()
    x0 = torch.randn((b, *shape), generator=gen)
    z = torch.randn((b, *shape), generator=gen)
    x_t = p.perturb(x0, t, z)
    assert x_t.shape == x0.shape and x_t.dtype == x0.dtype
    prior = p.prior_sample((b, *shape), torch.Generator().manual_seed(1))
    assert torch.equal(prior, p.prior_sample((b, *shape), torch.Generator().manual_seed(1)))
    logp = p.prior_logp(prior)
    assert logp.shape == (b,) and torch.isfinite(logp).all()
    assert p.conditioning(t).shape == (b,)
    grid = p.grid() if not p.continuous else p.grid(10)
    assert grid.dtype == F64 and (grid[1:] < grid[:-1]).all()
    if p.continuous:
        drift, g = p.sde(x_t, t)
        assert drift.shape == x_t.shape and g.shape == (b,)


@pytest.mark.parametrize("name", list(CONTINUOUS))
@pytest.mark.parametrize("param", ["score", "score_over_sigma", "eps", "x0", "drift"])
def test_parameterizations_round_trip_and_agree_with_tweedie(name, param):
    from pipeline.parameterization import eps_from_score, output_from_score, score_from_output, x0_from_score

    p = CONTINUOUS[name]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 8, 8, generator=gen, dtype=F64)
    z = torch.randn(6, 1, 8, 8, generator=gen, dtype=F64)
    t = _times(p, 6)
    x = p.perturb(x0, t, z)
    m, std = p.marginal(t)
    # The score of x_t given x0: -(x - m x0) / std^2 = -z / std; every parameterization must carry it.
    score = -z / append_dims(std, 4)
    out = output_from_score(score, x, t, p, param)
    torch.testing.assert_close(score_from_output(out, x, t, p, param), score)
    want = {"score": score, "score_over_sigma": -z, "eps": z, "x0": x0,
            "drift": score * append_dims(p.sde(x, t)[1], 4)}[param]
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(eps_from_score(score, t, p), z)
    torch.testing.assert_close(x0_from_score(x, score, t, p), x0)


@pytest.mark.parametrize("name", list(ALL))
def test_spec_rebuilds_the_same_process(name):
    """noise_scales.json records process.spec(); every later stage rebuilds the process from it."""
    p = ALL[name]
    q = process_from_spec(json.loads(json.dumps(p.spec())))
    assert type(q) is type(p) and q.spec() == p.spec()
    t = p.grid(None if not p.continuous else 10)[:-1]
    for a, b in zip(p.marginal(t), q.marginal(t)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown process kind"):
        process_from_spec({"kind": "wiener"})


# --------------------------------------------------------------------------- devices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_process_follows_the_device_of_its_inputs(name, device):
    """Everything a process returns for t and x on a device lives there (float64 tables and sigmas are moved
    at the point of use); on "meta" any stray CPU tensor mixed with the inputs raises."""
    from pipeline.rng import SampleGenerators

    p = ALL[name]
    t = p.grid(None if not p.continuous else 10)[1:-1].to(torch.float32)
    b = len(t)
    t = t.to(device)
    x = torch.zeros(b, 1, 4, 4, device=device)
    outs = [*p.marginal(t), p.perturb(x, t, x), p.conditioning(t), *p.transition(t, t * 0 + t.min()),
            *p.posterior(x, x, t, t * 0 + t.min()), p.prior_logp(x)]
    if p.continuous:
        outs += [*p.sde(x, t), *p.discretize(x, t, t * 0 + t.min())]
    for gen in (torch.Generator().manual_seed(0), SampleGenerators(0, range(b))):
        prior = p.prior_sample((b, 1, 4, 4), gen, device)
        assert prior.shape == (b, 1, 4, 4) and prior.dtype == torch.get_default_dtype()
        outs.append(prior)
    assert all(o.device == x.device for o in outs)


def test_prior_sample_is_drawn_where_the_generator_lives():
    p = VESDE()
    a = p.prior_sample((3, 2), torch.Generator().manual_seed(0))
    assert torch.equal(a, p.sigma_max * torch.randn((3, 2), generator=torch.Generator().manual_seed(0)))
    assert p.prior_sample((3, 2), torch.Generator().manual_seed(0), dtype=F64).dtype == F64
    with pytest.raises(ValueError, match="out of range"):
        DiscreteVP(linear_betas(10)).marginal(torch.tensor([10.0]))


# --------------------------------------------------------------------------- capabilities

# One instance of every registered process (pipeline.processes.PROCESSES), by kind.
REGISTERED = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(), "ou": OUProcess(), "edm": EDMProcess(),
              "brownian": BrownianMotion(0.7), "noise_scales": NoiseScaleProcess([5.0, 1.0, 0.2, 0.05]), "discrete_vp": DiscreteVP(linear_betas(20)),
              "linear_path": LinearPath(0.01)}
CAPABILITIES = ("continuous", "has_sde", "has_importance_sampling", "has_discrete_elbo")


def test_every_registered_process_has_its_capabilities_checked():
    assert set(REGISTERED) == set(PROCESSES)
    assert all(type(REGISTERED[kind]) is cls for kind, cls in PROCESSES.items())
    with pytest.raises(ValueError, match="allowed: has_sde, has_importance_sampling"):
        VPSDE().why_not("continuous")


@pytest.mark.parametrize("kind", list(PROCESSES))
def test_capabilities_say_what_the_methods_do(kind):
    """Each capability property is a bool, True exactly when the method behind it works; where it is False the
    method raises NotImplementedError with why_not's reason (has_sde, has_importance_sampling) or is refused."""
    from pipeline.elbo import negative_elbo
    from pipeline.parameterization import kernel_from_score

    p = REGISTERED[kind]
    assert all(isinstance(getattr(p, c), bool) for c in CAPABILITIES)
    gen = torch.Generator().manual_seed(0)
    t = p.sample_time(4, gen).to(F64)
    x = torch.randn(4, 2, generator=gen, dtype=F64)

    if p.has_sde:
        drift, g = p.sde(x, t)
        assert drift.shape == x.shape and g.shape == (4,) and torch.isfinite(g).all()
    else:
        with pytest.raises(NotImplementedError) as err:
            p.sde(x, t)
        assert str(err.value) == p.why_not("has_sde")

    if p.has_importance_sampling:
        t_q, w = p.sample_time_importance(4, gen)
        assert t_q.shape == w.shape == (4,) and (w > 0).all()
    else:
        with pytest.raises(NotImplementedError) as err:
            p.sample_time_importance(4, gen)
        assert str(err.value) == p.why_not("has_importance_sampling")

    # continuous: the grid needs a number of steps; otherwise the process has its own grid, and trains on it
    if p.continuous:
        with pytest.raises(ValueError, match="needs a number of steps"):
            p.grid()
        assert len(p.grid(10)) == 11
    else:
        grid = p.grid()
        assert bool(torch.isin(p.sample_time(64, gen), grid.to(torch.get_default_dtype())).all())

    # has_discrete_elbo: a discrete grid that ends at clean data, where the bound runs
    ends_clean = not p.continuous and float(p.marginal(p.grid()[-1:])[1][0]) == 0.0
    assert p.has_discrete_elbo == ends_clean
    kernel = kernel_from_score(lambda x_t, t_: -x_t, p, "beta")
    if p.has_discrete_elbo:
        assert torch.isfinite(negative_elbo(kernel, p, x, gen)).all()
    else:
        with pytest.raises(ValueError, match="discrete chain that ends at clean data"):
            negative_elbo(kernel, p, x, gen)
