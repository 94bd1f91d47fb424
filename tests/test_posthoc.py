"""Post-hoc EMA (pipeline.posthoc; Karras et al. 2024, EDM2, sec. 3 and appendix C): EDM2's closed forms, the
power-function EMA's weights, the profiles' inner products, and reconstructions from a real training's snapshots,
exact for a tracked profile and within a stated bound for one that was not; the ema stage and the training loop's
snapshots (resume, refusals)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from torch.optim.swa_utils import AveragedModel

from pipeline import io
from pipeline.losses import build_loss
from pipeline.nets.mlp import ConditionalMLP
from pipeline.posthoc import (coefficients, gamma_of, keep_snapshots_until, power_beta, power_multi_avg_fn,
                              profile_inner, reconstruct, save_snapshot, sigma_rel_of, snapshot_path, snapshot_steps)
from pipeline.processes import VPSDE
from pipeline.train import Checkpoints, Hooks, TrainData, TrainSettings, train


def test_sigma_rel_and_gamma_are_edm2s_closed_forms():
    """Eq. 123 and its inverse (eq. 126): EDM2's stated pairs (sec. 3.1: sigma_rel 0.05 is gamma 16.97, 0.10 is
    6.94), the round trip, and the widest profile (gamma 0, the uniform average: sigma_rel = sqrt(1/12))."""
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.005) and gamma_of(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.01, 0.05, 0.08, 0.15, 0.25):
        assert sigma_rel_of(gamma_of(s)) == pytest.approx(s, rel=1e-12)
    assert gamma_of(math.sqrt(1 / 12)) == pytest.approx(0.0, abs=1e-9)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            gamma_of(bad)
    # the profile's standard deviation over its age, numerically: (gamma + 1) tau^gamma on [0, 1]
    g = gamma_of(0.08)
    mean = integrate.quad(lambda u: u * (g + 1) * u ** g, 0, 1)[0]
    var = integrate.quad(lambda u: (u - mean) ** 2 * (g + 1) * u ** g, 0, 1)[0]
    assert math.sqrt(var) == pytest.approx(0.08, rel=1e-9)


def test_power_ema_weights_telescope_to_the_profiles_integrals():
    """AveragedModel with power_multi_avg_fn: after t updates the weight of update i is
    (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1), the integral of p_{gamma,t} over (i - 1, i] (eq. 127's beta_t,
    beta_1 = 0); measured by feeding one-hot weights (float64)."""
    t, gamma = 12, gamma_of(0.10)
    model = torch.nn.Linear(t, 1, bias=False).double()
    averaged = AveragedModel(model, multi_avg_fn=power_multi_avg_fn(gamma), use_buffers=True)
    for i in range(t):
        with torch.no_grad():
            model.weight.zero_()
            model.weight[0, i] = 1.0
        averaged.update_parameters(model)
    i = np.arange(1, t + 1, dtype=np.float64)
    want = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / t ** (gamma + 1)
    np.testing.assert_allclose(averaged.module.weight.detach().numpy()[0], want, rtol=1e-12, atol=1e-15)
    assert power_beta(gamma, 1) == 0.0 and power_beta(gamma, 5) == pytest.approx((4 / 5) ** (gamma + 1))


def test_profile_inner_products_against_quadrature():
    """Eq. 151 against numerical integration of p_a p_b, for ages in both orders and equal ages."""
    for (ta, sa), (tb, sb) in [((300, 0.05), (800, 0.10)), ((800, 0.05), (300, 0.10)), ((500, 0.08), (500, 0.08))]:
        ga, gb = gamma_of(sa), gamma_of(sb)
        pa = lambda u: (ga + 1) * u ** ga / ta ** (ga + 1) if u <= ta else 0.0  # noqa: E731
        pb = lambda u: (gb + 1) * u ** gb / tb ** (gb + 1) if u <= tb else 0.0  # noqa: E731
        want = integrate.quad(lambda u: pa(u) * pb(u), 0, min(ta, tb), epsabs=0, epsrel=1e-12, limit=200)[0]
        assert float(profile_inner(ta, ga, tb, gb)) == pytest.approx(want, rel=1e-9)
    # a million steps neither overflows nor underflows
    assert np.isfinite(profile_inner(1e6, gamma_of(0.05), 2e6, gamma_of(0.10)))


def _train_recording(tmp_path, sigma_rels, steps=240, snapshot_every=20):
    """A real training (pipeline.train) of a small MLP on 2-D points with the given profiles tracked; returns the
    checkpoints and the raw weights after every step (the loss sees the weights before each update)."""
    torch.manual_seed(0)
    net = ConditionalMLP(2, hidden=16, blocks=1, emb_dim=8)
    trajectory = []
    dsm = build_loss("dsm", VPSDE(), "eps")

    def loss(model, x, generator=None):
        trajectory.append(torch.cat([p.detach().flatten().double().clone() for p in net.parameters()]))
        return dsm(model, x, generator=generator)

    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    settings = TrainSettings(steps, 64, 3e-3, 1.0, 0.99, 10_000, 10_000, 0, posthoc_sigma_rels=tuple(sigma_rels),
                             snapshot_every=snapshot_every)
    ckpts = Checkpoints(tmp_path / "ckpt", {"test": 1})
    train(net, loss, TrainData(x), settings, ckpts, Hooks(progress=False))
    trajectory.append(torch.cat([p.detach().flatten().double() for p in net.parameters()]))
    return ckpts, torch.stack(trajectory[1:])  # theta_1 .. theta_T


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in state.values()])


def test_reconstructing_a_tracked_profile_returns_its_weights(tmp_path):
    """The target is one of the snapshots' own profiles at the last step: the least squares pick it alone, and
    the weights come back to float32 rounding."""
    ckpts, _ = _train_recording(tmp_path, (0.05, 0.10))
    assert snapshot_steps(ckpts.snapshots) == list(range(20, 241, 20))
    last = io.load_torch(snapshot_path(ckpts.snapshots, 240))
    for i, s in enumerate((0.05, 0.10)):
        state, coef, step = reconstruct(ckpts.snapshots, s)
        assert step == 240 and coef.relative < 1e-6
        for k, v in last["states"][i].items():
            assert state[k].dtype == v.dtype
            torch.testing.assert_close(state[k], v, rtol=1e-6, atol=1e-7)


def test_an_untracked_profile_agrees_with_its_reconstruction_within_the_cauchy_schwarz_bound(tmp_path):
    """sigma_rel 0.07 tracked directly beside 0.05 and 0.10; reconstructed from the snapshots of 0.05 and 0.10
    alone. The tracked EMA is the integral of its profile times the step-wise constant weights, so per parameter
    |theta_rec - theta_direct| <= ||sum_k x_k p_k - p||_2 * ||theta(.) - mean||_2 (Cauchy-Schwarz; the x_k sum to
    1), with theta(.) the recorded raw weights; plus 1e-6 for float32 accumulation over 240 updates. The bound is
    the tolerance; it is checked to be tight enough to matter (well below the gap between 0.05 and 0.10)."""
    ckpts, theta = _train_recording(tmp_path, (0.05, 0.07, 0.10))
    two = tmp_path / "two"
    for step in snapshot_steps(ckpts.snapshots):
        record = io.load_torch(snapshot_path(ckpts.snapshots, step))
        save_snapshot(two, step, [0.05, 0.10], [record["states"][0], record["states"][2]])
    rebuilt, coef, _ = reconstruct(two, 0.07)
    last = io.load_torch(snapshot_path(ckpts.snapshots, 240))["states"]
    narrow, direct, wide = (_flat(s) for s in last)  # sigma_rel 0.05, 0.07, 0.10
    spread = (theta - theta.mean(0)).pow(2).sum(0).sqrt()  # ||theta_j(.) - c_j||_2 over the 240 unit steps
    bound = coef.residual * spread + 1e-6
    error = (_flat(rebuilt) - direct).abs()
    assert (error <= bound).all(), float((error - bound).max())
    assert float(bound.max()) < 0.25 * float((narrow - wide).abs().max())
    assert coef.relative < 0.05  # EDM2's fig. 3: a profile between the two is reconstructed closely


def test_a_resumed_run_writes_the_same_snapshots_and_drops_stale_ones(tmp_path):
    """A run to 130 steps, then train.steps raised to 200: it resumes at 130 and drops the snapshot of its last
    step (off the cadence of 30) and a stale file, so the snapshots and their bits equal an uninterrupted run's;
    a run starting over clears the folder."""
    whole, _ = _train_recording(tmp_path / "a", (0.05, 0.10), steps=200, snapshot_every=30)
    torch.manual_seed(0)
    net = ConditionalMLP(2, hidden=16, blocks=1, emb_dim=8)
    loss = build_loss("dsm", VPSDE(), "eps")
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    ckpts = Checkpoints(tmp_path / "b", {"test": 1})

    def settings(steps, every):
        return TrainSettings(steps, 64, 3e-3, 1.0, 0.99, every, 10_000, 0, posthoc_sigma_rels=(0.05, 0.10),
                             snapshot_every=30)

    train(net, loss, TrainData(x), settings(130, 120), ckpts, Hooks(progress=False))
    assert snapshot_steps(ckpts.snapshots) == [30, 60, 90, 120, 130]
    save_snapshot(ckpts.snapshots, 990, [0.05], [{}])  # a stale file (past the resumed step) of another run
    net = ConditionalMLP(2, hidden=16, blocks=1, emb_dim=8)
    train(net, loss, TrainData(x), settings(200, 120), ckpts, Hooks(progress=False))
    assert snapshot_steps(ckpts.snapshots) == snapshot_steps(whole.snapshots) == [30, 60, 90, 120, 150, 180, 200]
    for step in snapshot_steps(whole.snapshots):
        a, b = (io.load_torch(snapshot_path(c.snapshots, step))["states"] for c in (whole, ckpts))
        for sa, sb in zip(a, b):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    keep_snapshots_until(ckpts.snapshots, 0, 30)
    assert snapshot_steps(ckpts.snapshots) == []


def test_coefficients_sum_to_one_and_grow_with_snapshots():
    """More snapshots reconstruct a profile between the tracked two better (EDM2 fig. 3's point), and the
    combination is a weighted average (sum 1)."""
    few = coefficients([500, 1000, 500, 1000], [0.05, 0.05, 0.10, 0.10], 1000, 0.07)
    steps = list(range(50, 1001, 50))
    many = coefficients(steps * 2, [0.05] * 20 + [0.10] * 20, 1000, 0.07)
    assert few.x.sum() == pytest.approx(1.0) and many.x.sum() == pytest.approx(1.0)
    assert many.relative < few.relative


def test_a_run_of_no_steps_reconstructs_the_initial_weights(tmp_path):
    """train.steps 0: one snapshot at step 0 whose profiles hold the initial weights; any width gives them."""
    torch.manual_seed(0)
    net = ConditionalMLP(2, hidden=8, blocks=1, emb_dim=8)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    settings = TrainSettings(0, 16, 1e-3, 1.0, 0.99, 10, 10, 0, posthoc_sigma_rels=(0.05, 0.10), snapshot_every=5)
    ckpts = Checkpoints(tmp_path, {"test": 0})
    train(net, build_loss("dsm", VPSDE(), "eps"), TrainData(torch.randn(32, 2)), settings, ckpts, Hooks(progress=False))
    assert snapshot_steps(ckpts.snapshots) == [0]
    state, _, step = reconstruct(ckpts.snapshots, 0.2)
    assert step == 0 and all(torch.equal(state[k], v) for k, v in start.items())


def test_no_profiles_no_snapshots(tmp_path):
    """train.posthoc.sigma_rels: [] tracks nothing and leaves no snapshot of an earlier run in the folder."""
    ckpts = Checkpoints(tmp_path, {"test": 2})
    save_snapshot(ckpts.snapshots, 10, [0.05], [{}])
    settings = TrainSettings(3, 16, 1e-3, 1.0, 0.99, 10, 10, 0)
    net = ConditionalMLP(2, hidden=8, blocks=1, emb_dim=8)
    train(net, build_loss("dsm", VPSDE(), "eps"), TrainData(torch.randn(32, 2)), settings, ckpts, Hooks(progress=False))
    assert snapshot_steps(ckpts.snapshots) == []


def test_other_profiles_start_over_and_a_new_cadence_resumes(tmp_path):
    """A checkpoint resumes only into a run tracking the same profiles with the same snapshot cadence (the
    averages cannot be rebuilt, and the snapshots must be a fresh run's); more steps resume."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    ckpts = Checkpoints(tmp_path, {"test": 3})

    def run(steps, sigma_rels, every):
        settings = TrainSettings(steps, 16, 1e-3, 1.0, 0.99, 10, 10, 0, posthoc_sigma_rels=sigma_rels,
                                 snapshot_every=every)
        net = ConditionalMLP(2, hidden=8, blocks=1, emb_dim=8)
        return train(net, build_loss("dsm", VPSDE(), "eps"), TrainData(x), settings, ckpts, Hooks(progress=False))

    run(20, (0.05, 0.10), 10)
    assert run(30, (0.05, 0.10), 10).resumed_from == 20
    assert run(40, (0.05, 0.10), 5).resumed_from == 0
    assert snapshot_steps(ckpts.snapshots) == list(range(5, 41, 5))
    assert run(50, (0.07,), 5).resumed_from == 0
    assert run(60, (), 5).resumed_from == 0 and snapshot_steps(ckpts.snapshots) == []
    assert run(70, (), 7).resumed_from == 60  # no profiles: the cadence means nothing


def test_the_ema_stage_makes_every_named_final_model():
    """ema.method's names (pipeline.names.EMA_METHODS, what params accept) are the ema stage's registry."""
    from pipeline.names import EMA_METHODS
    from stages.ema import FINAL_MODELS

    assert tuple(FINAL_MODELS) == EMA_METHODS
