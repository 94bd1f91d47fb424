"""The training loop's image transform and held-out evaluation (pipeline/train.py)."""

from __future__ import annotations

import math

import torch

from pipeline.losses import build_loss
from pipeline.nets.mlp import ConditionalMLP
from pipeline.pixels import to_model
from pipeline.processes import DiscreteVP, VPSDE, linear_betas
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.train import ema_multi_avg_fn, held_out_evaluator, image_batches


def _pixels(n: int = 64) -> torch.Tensor:
    return torch.randint(256, (n, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_image_batches_scale_dequantise_and_flip():
    x = _pixels()
    plain = image_batches("minus_one_one")(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain, to_model(x, "minus_one_one"))
    deq = image_batches("zero_one", dequantize=True)(x, torch.Generator().manual_seed(1))
    assert torch.equal(torch.floor(deq * 256).to(torch.uint8), x)  # each value in its pixel's bin [k, k+1)/256
    flipped = image_batches("zero_one", hflip=True)(x, torch.Generator().manual_seed(1))
    model = to_model(x, "zero_one")
    same = (flipped == model).flatten(1).all(1)
    mirrored = (flipped == model.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 16 < int(mirrored.sum()) < 48  # about half of 64 flipped (a fair coin per example)
    again = image_batches("zero_one", hflip=True)(x, torch.Generator().manual_seed(1))
    assert torch.equal(flipped, again)


def test_held_out_evaluator_units_and_repeatability():
    net = ConditionalMLP(16, hidden=8, blocks=1, emb_dim=8)
    x = _pixels(32)
    chain = DiscreteVP(linear_betas(10))
    vlb = build_loss("vlb", chain, "eps", variance="beta", bin_width=2 / 255, low=-1.0, high=1.0)
    evaluate, unit = held_out_evaluator(vlb, "vlb", x, transform=image_batches("minus_one_one"), device="cpu",
                                        seed=0, scaling="minus_one_one")
    assert unit == "bits/dim"
    a, b = evaluate(1, net), evaluate(2, net)
    assert a == b and math.isfinite(a["value"]) and a["se"] > 0  # the same noise at every evaluation
    with torch.no_grad():
        want = vlb(net, to_model(x, "minus_one_one"), generator=torch.Generator().manual_seed(0)).double()
    assert abs(a["value"] - float(want.mean()) / (16 * math.log(2))) < 1e-9
    dsm = build_loss("dsm", VPSDE(), "eps")
    _, unit = held_out_evaluator(dsm, "dsm", x, transform=image_batches("minus_one_one"), device="cpu", seed=0,
                                 scaling="minus_one_one")
    assert unit == "loss/dim"
    points = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    huang = build_loss("huang_elbo", VPSDE(), "eps")
    evaluate, unit = held_out_evaluator(huang, "huang_elbo", points, transform=None, device="cpu", seed=0, scaling=None)
    assert unit == "nats/dim" and math.isfinite(evaluate(1, ConditionalMLP(2, hidden=8, blocks=1, emb_dim=8))["value"])


def _averaged(decay: float, warmup: bool, values: list[float]) -> float:
    """The EMA of a one-weight model whose weight takes `values` in turn (the first is the initial weight)."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(values[0])
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(decay, warmup), use_buffers=True)
    for v in values[1:]:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update_parameters(model)
    return float(ema.module.weight.detach())


def test_ema_warmup_follows_score_sde_recursion():
    values = [5.0, -1.0, 2.0, 0.5, 3.0, -2.0, 1.0]
    want = values[1]  # AveragedModel's first update copies the weights
    for n, v in enumerate(values[2:], start=1):
        d = min(0.9, (1 + n) / (10 + n))
        want = d * want + (1 - d) * v
    assert math.isclose(_averaged(0.9, True, values), want, rel_tol=1e-6)


def test_ema_without_warmup_is_torch_ema():
    values = torch.randn(50, generator=torch.Generator().manual_seed(0)).tolist()
    ours = _averaged(0.97, False, values)
    model = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.97), use_buffers=True)
    for v in values[1:]:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update_parameters(model)
    assert ours == float(ema.module.weight.detach())  # the 2-D default keeps its bits


def test_ema_warmup_forgets_the_initial_weights():
    """2,000 steps at decay 0.999 keep 0.999^2000 = 13.5 % of the weights the EMA started from; the warm-up
    keeps less than 0.1 %."""
    kept = {}
    for warmup in (False, True):
        model = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.999, warmup), use_buffers=True)
        ema.update_parameters(model)  # the first update copies the start, 1
        with torch.no_grad():
            model.weight.fill_(0.0)
        for _ in range(2000):
            ema.update_parameters(model)
        kept[warmup] = float(ema.module.weight.detach())
    assert math.isclose(kept[False], 0.999**2000, rel_tol=1e-4)
    assert kept[True] < 1e-3
