"""Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598): the exact-score oracle first, then the
label conventions, label dropout, the guided score's cost, and the contract with tiny conditional networks.

The oracle: a Gaussian mixture whose component k is class k has an exact conditional score at every t
(pipeline.guidance.gmm_class_score_fn), so with w = 0 every sampler must draw component k for class k, and
with w = -1 the whole mixture, within sampling error (docs/references.md, "Exact scores for testing").
"""

from __future__ import annotations

import pytest
import torch

from pipeline import nets
from pipeline.gmm import GaussianMixture
from pipeline.guidance import NULL_LABEL, drop_labels, gmm_class_score_fn, guided_score, label_index
from pipeline.models import exact_score_fn
from pipeline.parameterization import make_score_fn
from pipeline.processes import DiscreteVP, VPSDE, linear_betas
from pipeline.rng import SampleGenerators
from pipeline.samplers.ddpm import ddim_sampler, ddpm_sampler
from pipeline.samplers.ode import ode_sampler
from pipeline.samplers.pc import pc_sampler

MIX = dict(weights=[0.4, 0.6], means=[[2.0, 2.0], [-1.0, 1.0]], covs=[[2.0, 1.0], [0.5, 3.0]])
VP, DDPM = VPSDE(), DiscreteVP(linear_betas(1000))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread avoids synchronisation costs on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mixture() -> GaussianMixture:
    return GaussianMixture.from_params(**MIX)


def _component(mixture: GaussianMixture, k: int) -> GaussianMixture:
    return GaussianMixture(mixture.weights.new_ones(1), mixture.means[k:k + 1], mixture.covs[k:k + 1])


# --------------------------------------------------------------------------- the exact-score oracle

# (process, sampler, options): DDPM's ancestral sampler on its own 1000-step chain, VP's PC (reverse
# diffusion predictor) and probability-flow ODE (RK45).
ORACLE = {
    "ancestral-ddpm": (DDPM, ddpm_sampler, dict(variance="beta_tilde")),
    "pc-vp": (VP, pc_sampler, dict(steps=200, predictor="reverse_diffusion", corrector="none")),
    "ode-rk45-vp": (VP, ode_sampler, dict(method="rk45")),
}


@pytest.mark.parametrize("name", list(ORACLE))
def test_conditional_sampling_with_w_zero_recovers_each_component(name, moment_errors):
    """w = 0 is the conditional model alone: class k's samples follow component k (moments within 5 SE)."""
    process, sampler, options = ORACLE[name]
    g = _mixture()
    classes = torch.arange(4000) % 2  # both classes in one batch: the oracle scores each row by its label
    fn = guided_score(gmm_class_score_fn(g, process), classes, 0.0)
    out = sampler(fn, process, (4000, 2), torch.Generator().manual_seed(0), **options)
    for k in range(2):
        for key, (err, se) in moment_errors(_component(g, k), out.x[classes == k].double()).items():
            if key == "weights":  # one component: the weight is 1 by construction
                continue
            z = float((err.abs() / se).max())
            assert z < 5, (name, k, key, z)


@pytest.mark.parametrize("name", ["pc-vp", "ode-rk45-vp"])
def test_w_minus_one_recovers_the_whole_mixture(name, moment_errors):
    """w = -1 is the unconditional (null-label) model: whatever the labels, the samples follow the mixture."""
    process, sampler, options = ORACLE[name]
    g = _mixture()
    fn = guided_score(gmm_class_score_fn(g, process), torch.zeros(4000, dtype=torch.long), -1.0)
    out = sampler(fn, process, (4000, 2), torch.Generator().manual_seed(1), **options)
    for key, (err, se) in moment_errors(g, out.x.double()).items():
        z = float((err.abs() / se).max())
        assert z < 5, (name, key, z)


@pytest.mark.parametrize("sampler, process, options", [
    (ode_sampler, VP, dict(method="rk45")),
    (ddpm_sampler, DDPM, dict(steps=100, variance="beta_tilde")),
], ids=["ode-rk45-vp", "ancestral-ddpm-100"])
def test_positive_w_moves_each_class_away_from_the_other_component(sampler, process, options):
    """As w grows, each class's samples become more typical of their own component and leave the other's.

    Why: the guided score is s(x, t, c) + w grad_x log p_t(c | x) (Ho & Salimans 2022, sec. 3.2), so w > 0
    adds a drift up the implicit classifier's log-probability at every noise level. The samples of class c
    therefore move to where component c dominates: their mean responsibility r_c(x) under the clean mixture
    rises, and their mean moves away from the other component's mean (here the log-odds grow along the
    line between the means). With the same seed for every w the comparisons are between coupled draws.

    Not asserted, because it is not true: that the samples follow p(x | c) p(c | x)^w (the guided score is
    not the score of that density pushed through the process, so the ODE and ancestral samplers give
    different distributions for w != 0), or that every spread shrinks (the components' covariances differ,
    the log-odds are quadratic, and class 1's spread along the second axis grows with w).
    """
    g = _mixture()
    classes = torch.arange(2000) % 2
    distance, typicality = [], []
    for w in (0.0, 1.0, 3.0):
        fn = guided_score(gmm_class_score_fn(g, process), classes, w)
        x = sampler(fn, process, (2000, 2), torch.Generator().manual_seed(0), **options).x.double()
        r = g.responsibilities(x)
        distance.append([float((x[classes == k].mean(0) - g.means[1 - k]).norm()) for k in range(2)])
        typicality.append([float(r[classes == k, k].mean()) for k in range(2)])
    for k in range(2):
        # steps of at least 0.1 (the class means' standard errors are about 0.05 and the draws are coupled)
        assert distance[0][k] + 0.1 < distance[1][k] and distance[1][k] + 0.1 < distance[2][k], (k, distance)
        assert typicality[0][k] < typicality[1][k] < typicality[2][k], (k, typicality)


def test_the_class_oracle_scores_each_row_by_its_label():
    """Index k + 1 is component k's score, the null label (and y=None) the mixture's, which is the
    responsibility-weighted sum of the component scores at the same noise level."""
    g = _mixture()
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(6, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(6, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    fn = gmm_class_score_fn(g, VP)
    m, s = VP.marginal(t)
    components = [_component(g, k).score(x, m, s) for k in range(2)]
    mixture = exact_score_fn(g, VP)(x, t)
    want = torch.stack([mixture, *components])[y, torch.arange(6)]
    torch.testing.assert_close(fn(x, t, y), want, rtol=0, atol=0)
    torch.testing.assert_close(fn(x, t), mixture, rtol=0, atol=0)
    log_joint = torch.stack([torch.log(g.weights[k]) + _component(g, k).log_prob(x, m, s) for k in range(2)], 1)
    r = torch.softmax(log_joint, 1)
    torch.testing.assert_close(mixture, r[:, :1] * components[0] + r[:, 1:] * components[1])
    with pytest.raises(ValueError, match="label indices"):
        fn(x, t, torch.tensor([0, 1, 2, 3, 1, 0]))


# --------------------------------------------------------------------------- labels and dropout


def test_label_index_puts_class_k_at_k_plus_one():
    assert NULL_LABEL == 0
    assert torch.equal(label_index(torch.tensor([0, 1, 4], dtype=torch.int32)), torch.tensor([1, 2, 5]))
    assert label_index(torch.tensor([0])).dtype == torch.int64
    with pytest.raises(ValueError, match=">= 0"):
        label_index(torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="integers"):
        label_index(torch.tensor([1.0]))


def test_label_dropout_rate_and_determinism():
    """Each label goes to the null label with probability p (Ho & Salimans 2022, Algorithm 1): the rate is
    within 5 standard errors of p; kept labels are untouched; the same seed drops the same labels."""
    index = label_index(torch.arange(100_000) % 7)
    p = 0.1
    dropped = drop_labels(index, p, torch.Generator().manual_seed(0))
    null = dropped == NULL_LABEL
    se = (p * (1 - p) / index.numel()) ** 0.5
    assert abs(float(null.double().mean()) - p) < 5 * se
    assert torch.equal(dropped[~null], index[~null]) and dropped.dtype == index.dtype
    assert torch.equal(dropped, drop_labels(index, p, torch.Generator().manual_seed(0)))
    assert not torch.equal(dropped, drop_labels(index, p, torch.Generator().manual_seed(1)))
    assert torch.equal(drop_labels(index, 0.0, torch.Generator()), index)
    assert (drop_labels(index, 1.0, torch.Generator()) == NULL_LABEL).all()
    with pytest.raises(ValueError, match="probability"):
        drop_labels(index, 1.5, torch.Generator())


def test_label_dropout_with_per_sample_generators():
    """Per-sample generators: label i's fate depends on (seed, i) alone, not on the batch it is in."""
    index = label_index(torch.arange(3000) % 5)
    whole = drop_labels(index, 0.2, SampleGenerators(3, range(3000)))
    parts = torch.cat([drop_labels(index[a:a + 700], 0.2, SampleGenerators(3, range(a, min(a + 700, 3000))))
                       for a in range(0, 3000, 700)])
    assert torch.equal(whole, parts)
    se = (0.2 * 0.8 / 3000) ** 0.5
    assert abs(float((whole == NULL_LABEL).double().mean()) - 0.2) < 5 * se


# --------------------------------------------------------------------------- the guided score and its cost


def _recording_score_fn(calls):
    """A fake class-conditional score, linear in the label index, that records the batches it is called on."""

    def score_fn(x, t, y=None):
        calls.append((x.shape[0], None if y is None else y.clone()))
        return x + 10.0 * y.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    return score_fn


@pytest.mark.parametrize("w", [0.0, -1.0, 2.5])
def test_guided_score_is_one_network_call_per_step(w):
    """(1 + w) s(x, t, k + 1) - w s(x, t, null), from one call: the batch itself for w = 0, else [x; x]."""
    calls = []
    classes = torch.tensor([0, 2, 1])
    fn = guided_score(_recording_score_fn(calls), classes, w)
    x, t = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.full((3,), 0.5)
    out = fn(x, t)
    assert len(calls) == 1
    index = classes + 1
    if w == 0.0:
        assert fn.evaluations == 1 and calls[0][0] == 3 and torch.equal(calls[0][1], index)
    else:
        assert fn.evaluations == 2 and calls[0][0] == 6
        assert torch.equal(calls[0][1], torch.cat([index, torch.zeros(3, dtype=torch.long)]))
    want = x + 10.0 * ((1 + w) * index - w * NULL_LABEL).to(x.dtype).reshape(3, 1, 1, 1)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="batch"):
        fn(x[:2], t[:2])


@pytest.mark.parametrize("w, per_step", [(0.0, 1), (2.0, 2)])
def test_nfe_counts_two_network_evaluations_per_guided_step(w, per_step):
    """nfe stays network evaluations per sample: a doubled-batch call counts 2 (walk reads fn.evaluations)."""
    g = _mixture()
    classes = torch.tensor([0, 1, 1])
    fn = guided_score(gmm_class_score_fn(g, VP), classes, w)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert ddim_sampler(fn, VP, (3, 2), gen(), 10).nfe == 10 * per_step
    assert pc_sampler(fn, VP, (3, 2), gen(), 10, corrector="ald", corrector_steps=2).nfe == (10 + 9 * 2) * per_step
    assert ode_sampler(fn, VP, (3, 2), gen(), "heun", 10).nfe == 20 * per_step
    # RK45 picks its own times and counts its own calls: the same rule
    calls = []
    oracle = gmm_class_score_fn(g, VP)

    def counted(x, t, y=None):
        calls.append(1)
        return oracle(x, t, y)

    out = ode_sampler(guided_score(counted, classes, w), VP, (3, 2), gen(), "rk45", rtol=1e-3, atol=1e-3)
    assert len(calls) > 0 and out.nfe == len(calls) * per_step
    assert ddim_sampler(exact_score_fn(g, VP), VP, (3, 2), gen(), 10).nfe == 10  # plain score functions: 1


# --------------------------------------------------------------------------- tiny conditional networks

CONDITIONAL = {
    "mlp": ({"kind": "mlp", "dim": 2, "hidden": 16, "blocks": 2, "emb_dim": 8, "num_classes": 3}, (2,)),
    "unet": ({"kind": "unet", "shape": [1, 8, 8], "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
              "attn_resolutions": [], "dropout": 0.0, "num_classes": 3}, (1, 8, 8)),
}


def _randomise_zero_layers(net):
    """The U-Net's output layer starts at zero, which would hide the labels' effect: give it weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("case", list(CONDITIONAL))
def test_guided_sampling_contract_with_conditional_networks(case):
    """make_score_fn passes y to the network; guided sampling gives finite samples of the right shape,
    deterministic per seed, that depend on the classes and on w; an unconditional network refuses labels."""
    spec, shape = CONDITIONAL[case]
    net = _randomise_zero_layers(nets.build_network({**spec, "parameterization": "eps"}, seed=0).eval())
    score_fn = make_score_fn(net, DDPM, "eps")
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 500.0, dtype=torch.float64)
    assert not torch.allclose(score_fn(x, t, torch.tensor([1, 1, 1, 1])), score_fn(x, t, torch.tensor([2, 2, 2, 2])))
    assert torch.equal(score_fn(x, t), make_score_fn(net, DDPM, "eps")(x, t))

    def run(classes, w, seed=0):
        fn = guided_score(score_fn, torch.tensor(classes), w)
        with torch.no_grad():
            return ddim_sampler(fn, DDPM, (4, *shape), torch.Generator().manual_seed(seed), 5)

    a = run([0, 1, 2, 0], 2.0)
    assert a.x.shape == (4, *shape) and torch.isfinite(a.x).all() and a.nfe == 10
    assert torch.equal(a.x, run([0, 1, 2, 0], 2.0).x)
    assert not torch.equal(a.x, run([0, 1, 2, 0], 2.0, seed=1).x)
    assert not torch.allclose(a.x, run([1, 1, 2, 0], 2.0).x)
    assert not torch.allclose(a.x, run([0, 1, 2, 0], 0.0).x)
    plain = nets.build_network({k: v for k, v in spec.items() if k != "num_classes"}, seed=0)
    with pytest.raises(ValueError, match="num_classes"):
        guided_score(make_score_fn(plain, DDPM, "eps"), torch.tensor([0, 1, 2, 0]), 1.0)(x, t)
