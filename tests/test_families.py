"""Contract tier over the registry: every family in families.NAMES, with no edit here, on (B, 2) and (B, 1, 8, 8).

For each family at its defaults: its process is built and is a Process; every sampler it accepts draws finite samples
of the right shape from the exact score of Gaussian data under that process (tests/oracles.py); its loss, built from
its plan and its own options around its own network wrapper, gives one finite loss per example and a gradient. A new
family is picked up by these tests as soon as it is registered.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import families
from oracles import gaussian_score
from pipeline import config, defaults
from pipeline.losses import build_loss
from pipeline.models import build_network
from pipeline.names import FAST_SAMPLERS, SAMPLERS
from pipeline.processes import Process
from pipeline.rng import SampleGenerators
from pipeline.samplers import draw

SHAPES = {"B2": (2,), "B1x8x8": (1, 8, 8)}
# NCSN's scales and VE's sigma range, as the noise_scales stage would choose them for data of spread ~1.
SIGMAS = np.geomspace(5.0, 0.01, 12).tolist()
# Every family at its defaults; a family that needs data of its own says so here (exact_score: a Gaussian mixture).
DATA = {"exact_score": "gmm"}


def _family_cfg(name: str):
    raw = {"method": {"name": name}, "data": {"name": DATA.get(name, "swissroll")}}
    if name == "schrodinger_bridge":
        raw["data"]["target"] = "moons"
    return config.validate(raw)


def _setup(name: str):
    cfg = _family_cfg(name)
    family = families.get(name)
    plan = families.plan(cfg)
    return cfg, family, plan, family.build_process(plan.process, cfg.method, SIGMAS)


def _options(cfg, sampler: str) -> dict:
    options = cfg.sample.model_dump(include={"denoise", "variance", "eta", "predictor", "corrector", "snr",
                                             "corrector_steps", "lam", "ode_method", "rtol", "atol", "spacing", "rho",
                                             "churn", "s_tmin", "s_tmax", "s_noise"})
    options.update(ode_method="euler")  # a fixed grid: every sampler here is a walk
    if sampler == "annealed_langevin":
        options.update(step_size=1e-4, steps_per_scale=2)
    return options


@pytest.mark.parametrize("name", families.NAMES)
def test_every_family_builds_a_process_and_plans_at_its_defaults(name):
    cfg, family, plan, process = _setup(name)
    assert isinstance(process, Process)
    assert plan.sampler == family.sampler(plan.process, "auto")
    if "sample" not in family.own_stages:  # a score model: the ODE likelihood exists exactly on continuous time
        assert plan.ode == process.continuous
        # Huang's ELBO needs the SDE, which a flow's linear path lacks (its ODE walks the velocity)
        assert (plan.elbo == "huang") == (process.continuous and process.has_sde)


def _accepted(name: str) -> list[tuple[str, str]]:
    cases = []
    for sampler in SAMPLERS:
        _, family, plan, _ = _setup(name)
        if not family.has_score:
            continue
        try:
            family.sampler(plan.process, sampler)
        except ValueError:
            continue
        cases.append((name, sampler))
    return cases


ACCEPTED = [c for name in families.NAMES for c in _accepted(name)]


def test_every_family_with_a_score_accepts_its_default_sampler_and_more():
    by_family = {n: {s for f, s in ACCEPTED if f == n} for n in families.NAMES}
    for name in families.NAMES:
        if families.get(name).has_score:
            assert _setup(name)[2].sampler in by_family[name], name
            assert {"edm_heun", "dpm_solver"} <= by_family[name], name  # the few-step samplers walk any score model


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("name, sampler", ACCEPTED)
def test_every_accepted_sampler_walks_the_family_process(name, sampler, shape):
    cfg, family, _, process = _setup(name)
    _, _, plan, _ = _setup(name)
    # NCSN's scales fix the grid except for the few-step samplers, which pick among them (families.base)
    steps = None if plan.process == "noise_scales" and sampler not in FAST_SAMPLERS else 8
    out = draw(sampler, "score", gaussian_score(process), process, (4, *shape), SampleGenerators(0, range(4)),
               steps, _options(cfg, sampler))
    assert out.x.shape == (4, *shape) and torch.isfinite(out.x).all() and out.nfe > 0


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("name", [n for n in families.NAMES if _setup(n)[2].loss not in (None, "bridge")])
def test_every_family_loss_trains_its_own_network(name, shape):
    cfg, family, plan, process = _setup(name)
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(0))
    record = {"kind": "images" if len(shape) == 3 else "points", "shape": list(shape)}
    model = cfg.model.model_dump() | ({"channels": 8, "channel_mult": [1], "num_res_blocks": 1} if len(shape) == 3
                                      else {})
    spec = defaults.network_spec(model, record, plan.parameterization)
    spec, extra = family.network_spec(spec, cfg.method, lambda: x)
    loss = build_loss(plan.loss, process, plan.parameterization, **(family.loss_options(plan.loss, cfg.method) | extra))
    net = build_network(spec, seed=0)
    per_example = loss(net, x, generator=torch.Generator().manual_seed(1))
    assert per_example.shape == (6,) and torch.isfinite(per_example).all()
    per_example.mean().backward()
    assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
