"""Samplers of the diffusion family: contracts on (B, 2) and (B, 1, 8, 8), and the exact-score oracle.

With the analytic score of a Gaussian mixture at every t (docs/references.md, "Exact scores for
testing"), the reverse SDE, PC, probability-flow ODE, DDPM ancestral and DDIM samplers must
recover the mixture's weights, means and covariances within sampling error. Then the walker (one loop
for every sampler, recorded trajectories), device-following (on every available device and on "meta",
where any stray CPU tensor raises) and batch-size invariance with per-sample generators.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from pipeline.gmm import GaussianMixture
from pipeline.models import exact_score_fn
from pipeline.parameterization import clip_denoised, kernel_from_score, x0_from_score
from pipeline.processes import DiscreteVP, EDMProcess, NoiseScaleProcess, SubVPSDE, VESDE, VPSDE, linear_betas
from pipeline.rng import SampleGenerators
from pipeline.samplers import draw
from pipeline.samplers.ddpm import (ancestral_posterior, ancestral_step, ddim_sampler, ddim_step, ddpm_sampler,
                                    kernel_sampler)
from pipeline.samplers.fast import dpm_solver_sampler, edm_sampler
from pipeline.samplers.langevin import annealed_langevin
from pipeline.samplers.ode import ode_sampler
from pipeline.samplers.pc import CORRECTORS, PREDICTORS, langevin_corrector, pc_sampler
from pipeline.samplers.walk import SampleResult, walk

from oracles import gaussian_score

MIX = dict(weights=[0.4, 0.6], means=[[2.0, 2.0], [-1.0, 1.0]], covs=[[2.0, 1.0], [0.5, 3.0]])
PROCESSES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=20.0), "ddpm": DiscreteVP(linear_betas(1000)),
             "edm": EDMProcess()}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
        "edm-heun": (edm_sampler, dict(steps=10)),
        "edm-heun-churn": (edm_sampler, dict(steps=10, churn=5.0, s_tmin=0.05, s_tmax=10.0)),
        "dpm-solver": (dpm_solver_sampler, dict(steps=10)),
        "dpm-solver-time": (dpm_solver_sampler, dict(steps=10, spacing="time")),
    })
    return cases


SAMPLERS = _samplers()


def _needs_sde(name: str) -> bool:
    return name.startswith("ode") or "euler_maruyama" in name or "plugin" in name


# DDPM's discrete chain has no SDE: the SDE-based samplers are refused there (tested below).
CONTRACT = [(n, p) for n in SAMPLERS for p in PROCESSES if not (p == "ddpm" and _needs_sde(n))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=["B2", "B1x8x8"])
@pytest.mark.parametrize("name, process", CONTRACT)
def test_sampler_contract(name, process, shape, device):
    p = PROCESSES[process]
    sampler, options = SAMPLERS[name]
    score_fn = gaussian_score(p)

    def run(seed):
        return sampler(score_fn, p, (4, *shape), torch.Generator().manual_seed(seed), device=device, **options)

    a, b, c = run(0), run(0), run(1)
    assert a.x.shape == (4, *shape) and torch.isfinite(a.x).all() and a.x.device.type == device
    assert a.nfe >= 1 and a.trajectory == []
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


@pytest.mark.parametrize("process", list(PROCESSES))
def test_clip_denoised_clips_tweedies_x0_hat_and_nothing_else(process):
    """The clipped score's x0_hat is the clamp of the raw one: equal where it is in range, on the edge elsewhere."""
    p = PROCESSES[process]
    raw = gaussian_score(p, mu=0.0, c=2.0)  # data wider than [-1, 1]: many x0_hat fall outside
    clipped = clip_denoised(raw, p, -1.0, 1.0)
    gen = torch.Generator().manual_seed(0)
    outside = 0
    for t_value in p.grid(6).tolist()[:-1]:  # every time but the clean end (no score there)
        t = torch.full((64,), t_value, dtype=torch.float64)
        m, std = p.marginal(t[:1])
        x = m * 2.0 * torch.randn(64, 1, 4, 4, generator=gen, dtype=torch.float64) + std * torch.randn(
            64, 1, 4, 4, generator=gen, dtype=torch.float64)
        x0, x0_clipped = x0_from_score(x, raw(x, t), t, p), x0_from_score(x, clipped(x, t), t, p)
        torch.testing.assert_close(x0_clipped, x0.clamp(-1.0, 1.0))
        inside = x0.abs() <= 1.0
        outside += int((~inside).sum())
        torch.testing.assert_close(clipped(x, t)[inside], raw(x, t)[inside])
    assert outside > 0  # near the prior x0_hat shrinks to the mean; at low noise it follows the wide data


@pytest.mark.parametrize("sampler, options", [(ddpm_sampler, dict(steps=20)), (ddim_sampler, dict(steps=20))],
                         ids=["ancestral", "ddim"])
def test_clipped_ancestral_and_ddim_samples_end_in_the_pixel_range(sampler, options):
    """Their last step returns x0_hat at the clean end, so with clipping every value lies in [-1, 1]."""
    p = PROCESSES["ddpm"]
    raw = gaussian_score(p, mu=0.0, c=2.0)
    draw_with = lambda fn: sampler(fn, p, (32, 1, 8, 8), SampleGenerators(0, range(32)), **options).x  # noqa: E731
    assert draw_with(raw).abs().max() > 1.5
    assert draw_with(clip_denoised(raw, p, -1.0, 1.0)).abs().max() <= 1.0 + 1e-6


# --------------------------------------------------------------------------- the walker


def test_walk_counts_calls_and_records_evenly_spread_states():
    grid = torch.linspace(1.0, 0.1, 10, dtype=torch.float64)
    calls = []

    def step(x, t_cur, t_next, fn, process, generator):
        assert isinstance(t_cur, float) and isinstance(t_next, float)
        return x + fn(x, t_next)

    def fn(x, t):
        calls.append(t)
        return torch.full_like(x, t)

    x0 = torch.zeros(3, 2)
    out = walk(step, x0, grid, fn, None, None, record=4)
    assert out.nfe == len(calls) == 9
    times = grid.tolist()
    assert [t for t, _ in out.trajectory] == [times[0], times[3], times[6], times[9]]
    assert torch.equal(out.trajectory[0][1], x0) and torch.equal(out.trajectory[-1][1], out.x)
    torch.testing.assert_close(out.trajectory[1][1], torch.full((3, 2), sum(times[1:4])))
    assert walk(step, x0, grid, fn, None, None).trajectory == []
    assert len(walk(step, x0, grid, fn, None, None, record=50).trajectory) == 10
    with pytest.raises(ValueError, match="record"):
        walk(step, x0, grid, fn, None, None, record=1)
    assert SampleResult(x0, 1).trajectory == []


@pytest.mark.parametrize("sampler, options, want", [
    ("ancestral", dict(variance="beta"), 5),
    ("ddim", dict(eta=0.0), 5),
    ("pc", dict(predictor="reverse_diffusion", corrector="ald", snr=0.16, corrector_steps=2, lam=0.0, denoise=True), 5),
    ("ode", dict(ode_method="heun", rtol=1e-3, atol=1e-3), 5),
    ("ode", dict(ode_method="rk45", rtol=1e-3, atol=1e-3), 2),
])
def test_draw_records_the_trajectory_from_the_prior_draw_to_the_result(sampler, options, want):
    p = PROCESSES["vp"]
    out = draw(sampler, "score", gaussian_score(p), p, (6, 2), torch.Generator().manual_seed(0), 10, options, record=5)
    assert len(out.trajectory) == want
    times = [t for t, _ in out.trajectory]
    assert times[0] == p.t_max and times[-1] == pytest.approx(p.t_min) and times == sorted(times, reverse=True)
    assert torch.equal(out.trajectory[0][1], p.prior_sample((6, 2), torch.Generator().manual_seed(0)))
    assert torch.equal(out.trajectory[-1][1], out.x)
    assert all(not x.requires_grad and x.shape == (6, 2) for _, x in out.trajectory)
    plain = draw(sampler, "score", gaussian_score(p), p, (6, 2), torch.Generator().manual_seed(0), 10, options)
    assert torch.equal(plain.x, out.x) and plain.nfe == out.nfe and plain.trajectory == []


def test_nfe_is_the_number_of_score_evaluations():
    p, s = PROCESSES["vp"], gaussian_score(PROCESSES["vp"])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert pc_sampler(s, p, (3, 2), g(), 10, corrector="ald", corrector_steps=2).nfe == 10 + 9 * 2  # no last corrector
    assert pc_sampler(s, p, (3, 2), g(), 10, corrector="ald", corrector_steps=2, denoise=False).nfe == 30
    assert ode_sampler(s, p, (3, 2), g(), "heun", 10).nfe == 20
    assert ode_sampler(s, p, (3, 2), g(), "euler", 10).nfe == 10
    assert ddim_sampler(s, p, (3, 2), g(), 10).nfe == 10


def test_ddim_decides_its_noise_from_the_grid_not_the_device():
    """No noise (and no draw) at DDPM's clean end, where c = 0; a draw at every other step with eta > 0."""
    d = DiscreteVP(linear_betas(50))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    for t_cur, t_next, draws in ((0.0, -1.0, False), (10.0, 5.0, True)):
        g = torch.Generator().manual_seed(1)
        ddim_step(x, t_cur, t_next, gaussian_score(d), d, g, eta=1.0)
        assert (not torch.equal(g.get_state(), torch.Generator().manual_seed(1).get_state())) == draws


# --------------------------------------------------------------------------- devices and batch-size invariance

NCSN = NoiseScaleProcess([3.0, 1.0, 0.3, 0.1])
SMALL_CHAIN = DiscreteVP(linear_betas(20))


def _sample(name, process, shape, generator, **kw):
    """Every sampler: the SAMPLERS cases on PROCESSES, annealed Langevin on NCSN's scales and the learned-kernel
    sampler (the exact posterior kernel) on a short DDPM chain."""
    if name == "annealed_langevin":
        return annealed_langevin(gaussian_score(NCSN), NCSN, shape, 1e-3, 3, generator, **kw)
    if name == "kernel":
        return kernel_sampler(kernel_from_score(gaussian_score(SMALL_CHAIN), SMALL_CHAIN, "beta"), SMALL_CHAIN, shape,
                              generator, **kw)
    sampler, options = SAMPLERS[name]
    p = NCSN if process == "ncsn" else PROCESSES[process]
    return sampler(gaussian_score(p), p, shape, generator, **{**options, **kw})


# The few-step samplers also walk NCSN's scales (they need the marginals at the grid's times only).
EVERY_SAMPLER = CONTRACT + [("annealed_langevin", "ncsn"), ("kernel", "ddpm-20"), ("edm-heun", "ncsn"),
                            ("edm-heun-churn", "ncsn"), ("dpm-solver", "ncsn")]
# SciPy's RK45 integrates the batch as one float64 numpy array on the host: it needs the numbers, which meta
# tensors do not have, so it is the one sampler not run on "meta" (it runs on every real device above).
NOT_ON_META = {"ode-rk45"}
META_STEPS = 4
# Samplers that couple the samples of a batch, so that the batch size changes the samples even with per-sample
# generators: the PC Langevin corrector (step size from norms averaged over the batch, as score_sde) and RK45
# (one adaptive step size for the whole batch). Each says so in its docstring (tested below).
BATCH_COUPLED = {name for name in SAMPLERS if name.endswith("-langevin")} | {"ode-rk45"}


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=["B2", "B1x8x8"])
@pytest.mark.parametrize("name, process", [c for c in EVERY_SAMPLER if c[0] not in NOT_ON_META])
def test_samplers_create_every_tensor_on_the_data_device(name, process, shape):
    """On the meta device any op that mixes a CPU tensor (a grid, a table, a noise draw left behind) with
    the samples raises, so this finds every tensor a sampler would leave on the CPU of a CUDA run.

    A sampler with a number of steps takes META_STEPS: a walk's first step, the steps between and its last run
    the code that any longer walk runs, and an op on meta costs Python shape logic (~0.15 ms here) that 20 steps would
    pay five times over for no new line of code."""
    steps = {"steps": META_STEPS} if "steps" in SAMPLERS.get(name, (None, {}))[1] else {}
    for generator in (torch.Generator().manual_seed(0), SampleGenerators(0, range(3))):
        out = _sample(name, process, (3, *shape), generator, device="meta", record=3, **steps)
        assert out.x.device.type == "meta" and out.x.shape == (3, *shape)
        assert all(x.device.type == "meta" for _, x in out.trajectory)


def test_the_meta_check_catches_a_stray_cpu_tensor(monkeypatch):
    """The check has power: the DDPM table indexed on the CPU (as before the device fixes), or noise left on
    the CPU, fails on meta."""
    d = DiscreteVP(linear_betas(20))
    run = lambda: ddpm_sampler(gaussian_score(d), d, (3, 2), torch.Generator(), 5, device="meta")  # noqa: E731
    assert run().x.device.type == "meta"
    with monkeypatch.context() as m:
        m.setattr(DiscreteVP, "_alpha_bar", lambda self, t: self._table[torch.round(t.to(torch.float64)).long() + 1])
        with pytest.raises(RuntimeError, match="device"):
            run()
    with monkeypatch.context() as m:
        m.setattr("pipeline.rng.randn_like", lambda x, g: torch.randn(x.shape, generator=g, dtype=x.dtype))
        with pytest.raises(RuntimeError, match="device"):
            run()


def _in_batches(name, process, shape, n, size):
    parts = [_sample(name, process, (min(size, n - a), *shape), SampleGenerators(11, range(a, min(a + size, n))))
             for a in range(0, n, size)]
    return torch.cat([p.x for p in parts])


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=["B2", "B1x8x8"])
@pytest.mark.parametrize("name, process", [c for c in EVERY_SAMPLER if c[0] not in BATCH_COUPLED])
def test_per_sample_generators_make_samples_independent_of_the_batch_size(name, process, shape):
    whole = _sample(name, process, (7, *shape), SampleGenerators(11, range(7))).x
    assert torch.equal(whole, _in_batches(name, process, shape, 7, 3))
    assert torch.isfinite(whole).all()


@pytest.mark.parametrize("name", sorted(BATCH_COUPLED))
def test_batch_coupled_samplers_say_so_and_are_coupled(name):
    """The two exceptions are documented where they happen, and really do depend on the batch."""
    docs = langevin_corrector.__doc__ + pc_sampler.__doc__ if name.startswith("pc") else ode_sampler.__doc__
    assert "not batch-size invariant" in " ".join(docs.split())
    whole = _sample(name, "vp", (7, 2), SampleGenerators(11, range(7))).x
    assert not torch.equal(whole, _in_batches(name, "vp", (2,), 7, 3))


def test_steps_accept_both_kinds_of_generator():
    p = PROCESSES["ddpm"]
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    a = ancestral_step(x, 10.0, 5.0, gaussian_score(p), p, SampleGenerators(0, range(3)))
    b = ancestral_step(x[1:], 10.0, 5.0, gaussian_score(p), p, SampleGenerators(0, range(1, 3)))
    assert torch.equal(a[1:], b)
    step = partial(ancestral_step, variance="beta")
    out = walk(step, x, p.grid(5), gaussian_score(p), p, torch.Generator().manual_seed(0))
    assert out.nfe == 5 and out.x.shape == (3, 2)
