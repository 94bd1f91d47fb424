"""The network registry (pipeline.nets) and the DDPM U-Net (Ho et al. 2020, appendix B).

Every registry entry is checked on small widths for: output shapes (score and learned-kernel),
determinism under the seed, gradients reaching every parameter, float64, independence of examples
(required for autograd divergences), and the class-label hook.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import models, nets
from pipeline.nets.mlp import ConditionalMLP
from pipeline.nets.unet import UNet

MLP = {"kind": "mlp", "dim": 2, "hidden": 16, "blocks": 2, "emb_dim": 8}


def _unet(shape, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_classes=0):
    return {"kind": "unet", "shape": list(shape), "channels": channels, "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks, "attn_resolutions": list(attn_resolutions), "dropout": 0.1,
            "num_classes": num_classes}


# (spec, example shape); the U-Nets cover a side that halves evenly (8, 32) and one that does not (28 -> 7 -> 4).
CASES = {
    "mlp": (MLP, (2,)),
    "unet-8x8": (_unet((1, 8, 8), attn_resolutions=[4]), (1, 8, 8)),
    "unet-28x28": (_unet((1, 28, 28), channel_mult=(1, 2, 2, 1), attn_resolutions=[7]), (1, 28, 28)),
    "unet-32x32": (_unet((3, 32, 32), channels=16, channel_mult=(1, 1, 2), attn_resolutions=[8]), (3, 32, 32)),
    # EDM's preconditioning around each network (conditioned on sigma > 0: _inputs draws it from (0, 1))
    "edm-mlp": ({"kind": "edm", "sigma_data": 0.5, "parameterization": "x0", "net": MLP}, (2,)),
    "edm-unet-8x8": ({"kind": "edm", "sigma_data": 0.5, "parameterization": "x0",
                      "net": _unet((1, 8, 8), attn_resolutions=[4])}, (1, 8, 8)),
}
IDS = list(CASES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which costs whole
    scheduler slices when other processes load the CPU (measured: 13 s vs 0.6 s for three forward and
    backward passes). The thread count is restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_registry_entry_is_covered():
    assert {spec["kind"] for spec, _ in CASES.values()} == set(nets.NETWORKS)
    assert set(models.KINDS) == set(nets.NETWORKS) | {"gmm_exact"}


def _inputs(shape, batch=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g, dtype=dtype), torch.rand(batch, generator=g, dtype=dtype)


def _perturb_output_layer(net, seed=1):
    """Give zero-initialised layers random weights so that outputs depend on the input (eval-mode checks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


@pytest.mark.parametrize("case", IDS)
@pytest.mark.parametrize("parameterization", ["eps", "kernel"])
def test_output_shape(case, parameterization):
    spec, shape = CASES[case]
    if spec["kind"] == "edm":  # EDM's wrapper outputs D = x0_hat whatever it wraps: other outputs are refused
        with pytest.raises(ValueError, match="parameterization is x0"):
            nets.build_network({**spec, "parameterization": parameterization}, seed=0)
        parameterization = "x0"
    net = nets.build_network({**spec, "parameterization": parameterization}, seed=0)
    x, c = _inputs(shape)
    out = net(x, c)
    assert out.shape == ((3, 2, *shape) if parameterization == "kernel" else (3, *shape))
    assert out.dtype == x.dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("case", IDS)
def test_determinism(case):
    spec, shape = CASES[case]
    state = torch.random.get_rng_state()
    a, b, other = (nets.build_network(spec, seed=s).eval() for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state), "building a network must not touch the global RNG"
    for (name, pa), pb, po in zip(a.named_parameters(), b.parameters(), other.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, po) for pa, po in zip(a.parameters(), other.parameters()))
    x, c = _inputs(shape)
    for net in (a, b, other):
        _perturb_output_layer(net)
    assert torch.equal(a(x, c), b(x, c))
    assert not torch.allclose(a(x, c), other(x, c))


@pytest.mark.parametrize("case", IDS)
def test_gradients_reach_every_parameter(case):
    """The U-Net's zero-initialised layers (output conv, second conv of each residual block, attention
    projection) block the gradient to what lies behind them at init; a few Adam steps open every path."""
    spec, shape = CASES[case]
    net = nets.build_network(spec, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, c = _inputs(shape, batch=4)
    target = torch.randn_like(x)
    for step in range(3):
        opt.zero_grad()
        ((net(x, c) - target) ** 2).mean().backward()
        if step == 0:
            final = list(net.parameters())[-2]  # the output layer's weight
            assert final.grad is not None and final.grad.abs().sum() > 0
        opt.step()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("case", IDS)
def test_float64(case):
    spec, shape = CASES[case]
    net = _perturb_output_layer(nets.build_network(spec, seed=0).eval()).double()
    x, c = _inputs(shape, dtype=torch.float64)
    out = net(x, c)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    out32 = net.float()(x.float(), c.float())
    torch.testing.assert_close(out.float(), out32, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", IDS)
def test_examples_do_not_interact(case):
    """Example 0's output must not depend on example 1's input (no batch statistics), so that a
    per-example divergence by autograd through the batch is valid; also checked as a zero Jacobian block."""
    spec, shape = CASES[case]
    net = _perturb_output_layer(nets.build_network(spec, seed=0).eval()).double()
    x, c = _inputs(shape, dtype=torch.float64)
    y = x.clone()
    y[1] = 10 * torch.randn_like(y[1])
    c2 = c.clone()
    c2[1] = 0.9
    out_x, out_y = net(x, c), net(y, c2)
    torch.testing.assert_close(out_x[0], out_y[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_x[2], out_y[2], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out_x[1], out_y[1])
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x, c)[0].sum(), x)
    assert grad[1:].abs().max() == 0 and grad[0].abs().max() > 0


def test_class_hook():
    spec, shape = CASES["unet-8x8"]
    net = _perturb_output_layer(nets.build_network({**spec, "num_classes": 10}, seed=0).eval())
    x, c = _inputs(shape)
    base = net(x, c)
    y0, y1 = torch.tensor([0, 1, 2]), torch.tensor([3, 1, 2])
    out0, out1 = net(x, c, y0), net(x, c, y1)
    assert not torch.allclose(out0, base), "labels must change the output"
    assert not torch.allclose(out0[0], out1[0])
    torch.testing.assert_close(out0[1:], out1[1:])
    plain = nets.build_network(spec, seed=0)
    with pytest.raises(ValueError, match="num_classes"):
        plain(x, c, y0)


def test_unknown_kind_and_bad_specs():
    with pytest.raises(ValueError, match="mlp, unet"):
        nets.build_network({"kind": "transformer"}, seed=0)
    with pytest.raises(ValueError, match="mlp, unet"):
        models.build_network({"kind": "gmm_exact"}, seed=0)
    with pytest.raises(ValueError, match="channel_mult"):
        nets.build_network({"kind": "unet", "shape": [1, 8, 8], "channels": 16}, seed=0)
    with pytest.raises(ValueError, match="match no level"):
        nets.build_network(_unet((1, 8, 8), attn_resolutions=[16]), seed=0)


def test_ddpm_cifar10_parameter_count():
    """Ho et al. 2020 (appendix B): the CIFAR-10 model has 35.7M parameters (35,746,307 in the official code)."""
    with torch.device("meta"):  # count only: no memory, no init
        net = UNet((3, 32, 32), 128, (1, 2, 2, 2), 2, [16], 0.1)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 35.7e6) < 0.05e6, f"DDPM CIFAR-10 U-Net has {n:,} parameters, expected 35.7M"
    assert n == 35_746_307, f"DDPM CIFAR-10 U-Net has {n:,} parameters, the official code 35,746,307"


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("parameterization", ["eps", "kernel"])
def test_mlp_init_unchanged(seed, parameterization):
    """The registry builds the same MLP, bit for bit, as ConditionalMLP under torch.manual_seed(seed)
    (so existing model files and the default pipeline's outputs are unchanged)."""
    spec = {"kind": "mlp", "dim": 4, "hidden": 32, "blocks": 3, "emb_dim": 16, "parameterization": parameterization}
    torch.manual_seed(seed)
    ref = ConditionalMLP(4, 32, 3, 16, outputs=2 if parameterization == "kernel" else 1)
    for built in (nets.build_network(spec, seed), models.build_network(spec, seed)):
        assert isinstance(built, ConditionalMLP)
        ref_state, state = ref.state_dict(), built.state_dict()
        assert list(ref_state) == list(state)
        for k in ref_state:
            assert torch.equal(ref_state[k], state[k]), k


# --------------------------------------------------------------------------- class-conditional networks

# Conditional networks (num_classes real classes; embedding rows: the null label 0 and classes 1..3).
COND = {
    "mlp": ({**MLP, "num_classes": 3}, (2,)),
    "unet-8x8": (_unet((1, 8, 8), attn_resolutions=[4], num_classes=3), (1, 8, 8)),
}


def _plain(spec):
    """The same spec without the class key: what every unconditional model file holds."""
    return {k: v for k, v in spec.items() if k != "num_classes"}


@pytest.mark.parametrize("case", list(COND))
def test_num_classes_zero_is_the_unconditional_network(case):
    """num_classes = 0 adds no parameter and draws nothing more at init: its state_dict is, key for key and
    bit for bit, the spec without the key. A conditional network adds label_emb.weight (num_classes + 1 rows)
    only, created last, so its other weights are those of the unconditional network of the same seed."""
    spec, _ = COND[case]
    plain = nets.build_network(_plain(spec), seed=2).state_dict()
    zero = nets.build_network({**spec, "num_classes": 0}, seed=2)
    assert zero.label_emb is None
    cond = nets.build_network(spec, seed=2).state_dict()
    assert list(zero.state_dict()) == list(plain) and "label_emb.weight" not in plain
    assert list(cond) == list(plain) + ["label_emb.weight"]
    assert cond["label_emb.weight"].shape[0] == spec["num_classes"] + 1
    for k, v in plain.items():
        assert torch.equal(zero.state_dict()[k], v), k
        assert torch.equal(cond[k], v), k


@pytest.mark.parametrize("case", list(COND))
def test_conditional_network_contract(case):
    """Shapes right; each example's output depends on its own label only; the null label (0) and every class
    index run; y=None is the null label (the unconditional model label dropout trains)."""
    spec, shape = COND[case]
    net = _perturb_output_layer(nets.build_network(spec, seed=0).eval())
    x, c = _inputs(shape, batch=4)
    labels = torch.tensor([0, 1, 2, 3])
    out = net(x, c, labels)
    assert out.shape == (4, *shape) and out.dtype == x.dtype and torch.isfinite(out).all()
    other = net(x, c, torch.tensor([0, 2, 2, 3]))
    assert not torch.allclose(out[1], other[1]), "the label must change the output"
    torch.testing.assert_close(out[[0, 2, 3]], other[[0, 2, 3]], rtol=0, atol=0)
    null = net(x, c, torch.zeros(4, dtype=torch.long))
    assert not torch.allclose(null[1:], out[1:]) and torch.equal(null[0], out[0])
    assert torch.equal(net(x, c), null), "y=None must be the null label: the unconditional model CFG trains"
    kernel = nets.build_network({**spec, "parameterization": "kernel"}, seed=0)
    assert kernel(x, c, labels).shape == (4, 2, *shape)


@pytest.mark.parametrize("case", list(COND))
def test_labels_to_an_unconditional_network_are_refused(case):
    spec, shape = COND[case]
    x, c = _inputs(shape)
    with pytest.raises(ValueError, match="num_classes=0"):
        nets.build_network(_plain(spec), seed=0)(x, c, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="num_classes"):
        nets.build_network({**spec, "num_classes": -1}, seed=0)


@pytest.mark.parametrize("case", list(COND))
def test_gradients_reach_the_class_embedding(case):
    """The label embedding trains: a conditional loss sends a gradient to the rows of the labels used only."""
    spec, shape = COND[case]
    net = _perturb_output_layer(nets.build_network(spec, seed=0))
    x, c = _inputs(shape, batch=4)
    ((net(x, c, torch.tensor([0, 1, 1, 2])) - torch.randn_like(x)) ** 2).mean().backward()
    row_grad = net.label_emb.weight.grad.abs().sum(1)
    assert (row_grad[:3] > 0).all() and row_grad[3] == 0
