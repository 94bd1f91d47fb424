"""EDM (Karras et al. 2022, arXiv:2206.00364) as a method: its process, preconditioning and loss against their closed
forms, the method's plan and refusals, and the model file round trip through the network registry."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import config
from pipeline.losses import DenoisingScoreMatching, EDMLoss
import families
from families.edm import sigma_data_of as edm_sigma_data
from pipeline.models import build_network, network_fn
from pipeline.nets.edm import EDMPrecond
from pipeline.parameterization import x0_from_score
from pipeline.processes import EDMProcess, VPSDE, process_from_spec

MLP = {"kind": "mlp", "dim": 2, "hidden": 16, "blocks": 1, "emb_dim": 8, "parameterization": "x0"}


def test_process_is_x0_plus_sigma_z_with_log_normal_training_sigma():
    p = EDMProcess()
    t = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    m, std = p.marginal(t)
    assert torch.equal(m, torch.ones(3, dtype=torch.float64)) and torch.equal(std, t)
    assert p.prior_std() == 80.0 and (p.t_min, p.t_max) == (0.002, 80.0)
    assert process_from_spec(p.spec()).spec() == p.spec()
    # the grid of every sampler on this process is Karras's ρ-schedule (eq. 5), the edm_heun levels without σ = 0
    from pipeline.samplers.fast import edm_grid

    torch.testing.assert_close(p.grid(12), edm_grid(p, 13)[:-1], rtol=1e-12, atol=0)
    log_sigma = torch.log(p.sample_time(40_000, torch.Generator().manual_seed(0)).double())
    se = 1.2 / math.sqrt(40_000)
    assert abs(float(log_sigma.mean()) + 1.2) < 5 * se
    assert abs(float(log_sigma.std()) - 1.2) < 5 * 1.2 / math.sqrt(2 * 40_000)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_preconditioning_gives_unit_variance_input_and_target(sigma_data):
    """Table 1's c_in makes Var(c_in x_σ) = 1 and, with c_skip and c_out, the target (x0 − c_skip x_σ) / c_out of F
    has unit variance for data of std σ_d (their eq. 117 and 131), at every σ."""
    net = EDMPrecond(torch.nn.Identity(), sigma_data)
    sigma = torch.logspace(-3, 2, 11, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = net.coefficients(sigma)
    sd2 = sigma_data ** 2
    torch.testing.assert_close(c_in ** 2 * (sd2 + sigma ** 2), torch.ones_like(sigma))
    target_var = ((1 - c_skip) ** 2 * sd2 + c_skip ** 2 * sigma ** 2) / c_out ** 2
    torch.testing.assert_close(target_var, torch.ones_like(sigma))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)


def test_preconditioned_network_outputs_c_skip_x_plus_c_out_f():
    calls = {}

    class Recorder(torch.nn.Module):
        def forward(self, x, c, y=None):
            calls.update(x=x, c=c, y=y)
            return torch.full_like(x, 2.0)

    net = EDMPrecond(Recorder(), 0.5)
    x, sigma = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    out = net(x, sigma, torch.tensor([1, 2, 3]))
    c_skip, c_out, c_in, c_noise = (c.reshape(3, 1, 1, 1) for c in net.coefficients(sigma))
    torch.testing.assert_close(out, c_skip * x + c_out * 2.0)
    torch.testing.assert_close(calls["x"], c_in * x)
    torch.testing.assert_close(calls["c"], c_noise.reshape(3))
    assert calls["y"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("process", [EDMProcess(), VPSDE()], ids=["edm", "vp"])
def test_loss_is_the_weighted_x0_error_and_a_reweighted_dsm(process):
    """λ(σ) ||D − x0||² with λ = (σ² + σ_d²) / (σ σ_d)² (eq. 8, Table 1) = 2 (σ² + σ_d²) / σ_d² × σ²-weighted DSM
    at the same draws (m = 1: the DSM residual is (D − x0) / σ; elsewhere σ = std / m)."""
    net = build_network(MLP, seed=0)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    edm = EDMLoss(process, "x0", sigma_data=0.7)(net, x, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    t = process.sample_time(64, g)
    z = torch.randn(x.shape, generator=g)
    x_t = process.perturb(x, t, z)
    from pipeline.parameterization import make_score_fn

    d = x0_from_score(x_t, make_score_fn(net, process, "x0")(x_t, t), t, process)
    m, std = process.marginal(t)
    sigma = std / m
    torch.testing.assert_close(edm, (sigma ** 2 + 0.49) / (sigma * 0.7) ** 2 * (d - x).pow(2).sum(1))
    if isinstance(process, EDMProcess):
        dsm = DenoisingScoreMatching(process, "x0")(net, x, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(edm, 2 * (sigma ** 2 + 0.49) / 0.49 * dsm)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMLoss(process, "x0", sigma_data=0.0)


def test_model_file_spec_rebuilds_the_preconditioned_network():
    spec = {"kind": "edm", "sigma_data": 0.6, "parameterization": "x0", "net": MLP}
    net = build_network(spec, seed=3)
    assert isinstance(net, EDMPrecond) and net.sigma_data == 0.6
    again = build_network(spec, seed=0)
    again.load_state_dict(net.state_dict())
    kind, score_fn = network_fn(again, EDMProcess(), "x0")
    x, t = torch.randn(5, 2), torch.full((5,), 0.8)
    # the score of D: (D − x) / σ²
    torch.testing.assert_close(score_fn(x, t), (net(x, t) - x) / 0.64)
    with pytest.raises(ValueError, match="wraps an mlp or a unet"):
        build_network({**spec, "net": {"kind": "edm"}}, seed=0)


def test_sigma_data_auto_is_the_std_of_the_training_data():
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    assert edm_sigma_data("auto", x) == pytest.approx(float(x.std()))
    assert edm_sigma_data(0.5, x) == 0.5
    with pytest.raises(ValueError, match="not all equal"):
        edm_sigma_data("auto", torch.ones(10, 2))


def test_method_plan_and_refusals():
    p = families.get("edm").plan(config.MethodParams(name="edm"))
    assert (p.process, p.loss, p.parameterization, p.sampler, p.ode) == ("edm", "edm", "x0", "edm_heun", True)
    assert config.validate({"method": {"name": "edm", "sigma_data": 0.5}}).method.sigma_data == 0.5
    refused = [({"method": {"name": "edm", "sde": "vp"}}, "own process"),
               ({"method": {"name": "edm", "loss": "dsm"}}, "own loss"),
               ({"method": {"name": "edm", "parameterization": "eps"}}, "outputs the denoised x0"),
               ({"method": {"name": "ddpm", "sigma_data": 0.5}}, "leave it 'auto'"),
               ({"method": {"name": "edm", "sigma_data": -1.0}}, "number > 0")]
    for raw, words in refused:
        with pytest.raises(config.ConfigError, match=words):
            config.validate(raw)
