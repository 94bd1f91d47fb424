"""Samplers of the diffusion family: contracts on (B, 2) and (B, 1, 8, 8), and the exact-score oracle.

With the analytic score of a Gaussian mixture at every t (REFERENCES.md, "Exact scores for
testing"), the reverse SDE, PC, probability-flow ODE, DDPM ancestral and DDIM samplers must
recover the mixture's weights, means and covariances within sampling error.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.gmm import GaussianMixture
from pipeline.models import exact_score_fn
from pipeline.processes import DiscreteVP, SubVPSDE, VESDE, VPSDE, linear_betas
from pipeline.samplers.ddpm import ancestral_posterior, ancestral_step, ddim_sampler, ddim_step, ddpm_sampler
from pipeline.samplers.ode import ode_sampler
from pipeline.samplers.pc import CORRECTORS, PREDICTORS, pc_sampler

from oracles import gaussian_score

MIX = dict(weights=[0.4, 0.6], means=[[2.0, 2.0], [-1.0, 1.0]], covs=[[2.0, 1.0], [0.5, 3.0]])
PROCESSES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=20.0), "ddpm": DiscreteVP(linear_betas(1000))}


def _samplers():
    cases = {f"pc-{p}-{c}": (pc_sampler, dict(steps=20, predictor=p, corrector=c))
             for p in PREDICTORS for c in CORRECTORS}
    cases.update({
        "pc-plugin-lambda-0.5": (pc_sampler, dict(steps=20, predictor="euler_maruyama", corrector="none", lam=0.5)),
        "ode-euler": (ode_sampler, dict(method="euler", steps=20)),
        "ode-heun": (ode_sampler, dict(method="heun", steps=20)),
        "ode-rk45": (ode_sampler, dict(method="rk45", rtol=1e-3, atol=1e-3)),
        "ddpm-beta": (ddpm_sampler, dict(steps=20, variance="beta")),
        "ddpm-beta_tilde": (ddpm_sampler, dict(steps=20, variance="beta_tilde")),
        "ddim-eta0": (ddim_sampler, dict(steps=20, eta=0.0)),
        "ddim-eta1": (ddim_sampler, dict(steps=20, eta=1.0)),
    })
    return cases


SAMPLERS = _samplers()


def _needs_sde(name: str) -> bool:
    return name.startswith("ode") or "euler_maruyama" in name or "plugin" in name


# DDPM's discrete chain has no SDE: the SDE-based samplers are refused there (tested below).
CONTRACT = [(n, p) for n in SAMPLERS for p in PROCESSES if not (p == "ddpm" and _needs_sde(n))]


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=["B2", "B1x8x8"])
@pytest.mark.parametrize("name, process", CONTRACT)
def test_sampler_contract(name, process, shape):
    p = PROCESSES[process]
    sampler, options = SAMPLERS[name]
    score_fn = gaussian_score(p)
    run = lambda seed: sampler(score_fn, p, (4, *shape), torch.Generator().manual_seed(seed), **options)  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.x.shape == (4, *shape) and torch.isfinite(a.x).all()
    assert a.nfe >= 1
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)


def test_discrete_chain_refuses_sde_samplers():
    with pytest.raises(NotImplementedError, match="without an SDE"):
        ode_sampler(gaussian_score(PROCESSES["ddpm"]), PROCESSES["ddpm"], (4, 2), torch.Generator(), "euler", 10)


def test_unknown_options_are_refused():
    p, s = PROCESSES["vp"], gaussian_score(PROCESSES["vp"])
    with pytest.raises(ValueError, match="allowed"):
        pc_sampler(s, p, (2, 2), torch.Generator(), 5, predictor="heun")
    with pytest.raises(ValueError, match="allowed"):
        pc_sampler(s, p, (2, 2), torch.Generator(), 5, corrector="hmc")
    with pytest.raises(ValueError, match="allowed"):
        ode_sampler(s, p, (2, 2), torch.Generator(), method="rk4")
    with pytest.raises(ValueError, match="eta"):
        ddim_sampler(s, p, (2, 2), torch.Generator(), 5, eta=1.5)


def test_ddpm_posterior_mean_is_ho_et_al_eq_11():
    """mean = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t) on DDPM's chain."""
    d = DiscreteVP(linear_betas(1000))
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    score_fn = gaussian_score(d)
    i = 500
    mean, std = ancestral_posterior(x, float(i), float(i - 1), score_fn, d)
    beta, ab = d.betas[i], d.alpha_bars[i]
    eps = -torch.sqrt(1 - ab) * score_fn(x, torch.full((5,), float(i), dtype=torch.float64))
    torch.testing.assert_close(mean, (x - beta / torch.sqrt(1 - ab) * eps) / torch.sqrt(1 - beta))
    torch.testing.assert_close(std, torch.full((5,), float(torch.sqrt(beta * (1 - d.alpha_bars[i - 1]) / (1 - ab))),
                                                dtype=torch.float64))


ORACLE = {
    "reverse-sde-vp": ("vp", pc_sampler, dict(steps=1000, predictor="euler_maruyama", corrector="none")),
    "pc-vp": ("vp", pc_sampler, dict(steps=500, predictor="reverse_diffusion", corrector="langevin", snr=0.16)),
    "pc-ve-ancestral-ald": ("ve", pc_sampler, dict(steps=500, predictor="ancestral", corrector="ald", snr=0.16)),
    "plugin-lambda-0.5-subvp": ("subvp", pc_sampler, dict(steps=1000, predictor="euler_maruyama", corrector="none",
                                                          lam=0.5)),
    "ode-rk45-vp": ("vp", ode_sampler, dict(method="rk45")),
    "ode-rk45-ve": ("ve", ode_sampler, dict(method="rk45")),
    "ode-rk45-subvp": ("subvp", ode_sampler, dict(method="rk45")),
    "ddpm-ancestral": ("ddpm", ddpm_sampler, dict(variance="beta_tilde")),
    "ddim-50": ("ddpm", ddim_sampler, dict(steps=50, eta=0.0)),
}


@pytest.mark.parametrize("name", list(ORACLE))
def test_exact_score_samplers_recover_the_mixture(name, moment_errors):
    process_name, sampler, options = ORACLE[name]
    p = PROCESSES[process_name]
    g = GaussianMixture.from_params(**MIX)
    out = sampler(exact_score_fn(g, p), p, (4000, 2), torch.Generator().manual_seed(0), **options)
    for key, (err, se) in moment_errors(g, out.x.double()).items():
        z = float((err.abs() / se).max())
        assert z < 5, (name, key, z)


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=["B2", "B1x8x8"])
@pytest.mark.parametrize("process", list(PROCESSES))
def test_ddim_with_eta_one_is_the_ancestral_step(process, shape):
    """DDIM eq. (16) with eta = 1 has the posterior's mean and variance (beta_tilde): the same draw."""
    p = PROCESSES[process]
    score_fn = gaussian_score(p)
    grid = p.grid(10).tolist()
    x = torch.randn((5, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t_cur, t_next in zip(grid[:-2], grid[1:-1]):  # the last step of DDPM's grid adds no noise
        a = ancestral_step(x, t_cur, t_next, score_fn, p, torch.Generator().manual_seed(1))
        b = ddim_step(x, t_cur, t_next, score_fn, p, torch.Generator().manual_seed(1), eta=1.0)
        torch.testing.assert_close(a, b)
        c = ddim_step(x, t_cur, t_next, score_fn, p, torch.Generator().manual_seed(1), eta=0.0)
        assert not torch.allclose(a, c)
