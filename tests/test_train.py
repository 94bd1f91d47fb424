"""The training loop (pipeline/train.py): the image transform, held-out evaluation, EMA; precision, accumulation,
warm-up, channels-last and compile against the plain loop; the new train.* keys in params and the stage."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from pipeline.guidance import drop_labels, label_index
from pipeline.losses import build_loss
from pipeline.nets.mlp import ConditionalMLP
from pipeline.nets.unet import UNet
from pipeline.pixels import to_model
from pipeline.processes import DiscreteVP, VPSDE, linear_betas
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.train import (Checkpoints, Hooks, TrainData, TrainSettings, ema_multi_avg_fn, held_out_evaluator,
                            image_batches, lr_factor, micro_batches, train, warmup_factor)


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


# --- GPU speed knobs: precision, channels-last, compile, accumulation, warm-up (pipeline.train.train) ---------


def _settings(**kw) -> TrainSettings:
    base = dict(steps=12, batch_size=32, lr=1e-3, grad_clip=1.0, ema_decay=0.9, checkpoint_every=1000,
                log_every=5, seed=0)
    return TrainSettings(**{**base, **kw})


def _points(n: int = 256) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(3))


def _images(n: int = 64) -> torch.Tensor:
    return torch.randint(256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _mlp() -> ConditionalMLP:
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same initial weights in every run of a test
        return ConditionalMLP(2, hidden=16, blocks=1, emb_dim=8)


def _unet(dropout: float = 0.0) -> UNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet((1, 8, 8), 8, (1, 2), 1, [4], dropout)


def _run(tmp_path, settings, net=None, data=None, loss=None, transform=None, labels=None, label_dropout=0.0):
    net = _mlp() if net is None else net
    loss = build_loss("dsm", VPSDE(), "eps") if loss is None else loss
    data = _points() if data is None else data
    return train(net, loss, TrainData(data, transform, labels, label_dropout), settings,
                 Checkpoints(tmp_path, {"test": 1}), Hooks(progress=False))


def _plain_loop(model, loss_fn, data, s: TrainSettings, transform=None, lrs=None):
    """The loop as it was before precision, accumulation, warm-up and preemption (commit 96839e1), inline: the
    reference the default settings must reproduce bit for bit. lrs: the lr of each update, set by hand."""
    gen = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(s.ema_decay, s.ema_warmup), use_buffers=True)
    rows, running, count = [], 0.0, 0
    model.train()
    for step in range(1, s.steps + 1):
        idx = torch.randint(len(data), (s.batch_size,), generator=gen)
        batch = data[idx] if transform is None else transform(data[idx], gen)
        loss = loss_fn(model, batch, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[step - 1]
        opt.step()
        ema.update_parameters(model)
        running += float(loss.detach())
        count += 1
        if step % s.log_every == 0 or step == s.steps:
            rows.append((step, running / count))
            running, count = 0.0, 0
    return model, ema.module, rows


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("images", [False, True])
def test_default_settings_are_the_plain_loop_bit_for_bit(tmp_path, images):
    """All new knobs at their defaults (fp32, accumulate 1, warmup 0, no compile, contiguous) give exactly the
    weights, EMA and loss rows of the loop before they existed; images with dropout, dequantisation and flips."""
    s = _settings(ema_warmup=images)
    loss = build_loss("dsm", VPSDE(), "eps")
    if images:
        data, transform = _images(), image_batches("zero_one", dequantize=True, hflip=True)
        make = lambda: _unet(dropout=0.1)  # noqa: E731
    else:
        data, transform, make = _points(), None, _mlp
    with torch.random.fork_rng():
        torch.manual_seed(1)  # dropout draws from the global RNG: the same start for both loops
        new = _run(tmp_path, s, net=make(), data=data, loss=loss, transform=transform)
        torch.manual_seed(1)
        model, ema, rows = _plain_loop(make(), loss, data, s, transform)
    assert _same_bits(new.model.state_dict(), model.state_dict())
    assert _same_bits(new.ema.state_dict(), ema.state_dict())
    assert new.loss_rows == rows  # the float64 device sum reads back the Python float sum's bits


def _regression(model: nn.Module, x: torch.Tensor, generator=None) -> torch.Tensor:
    """A loss with no randomness of its own: the network at c = 0 regressed onto a fixed map of x, (B,)."""
    target = torch.stack([x[:, 1], -x[:, 0]], 1).tanh()
    return (model(x, torch.zeros(x.shape[0])) - target).pow(2).sum(1)


def test_micro_batches_split_the_batch_in_order():
    x = torch.arange(12.0).reshape(12, 1)
    parts = micro_batches(x, 3)
    assert [p.shape[0] for p in parts] == [4, 4, 4] and torch.equal(torch.cat(parts), x)
    assert micro_batches(x, 1)[0] is x
    with pytest.raises(ValueError, match="train.batch_size .* multiple of train.accumulate"):
        _settings(batch_size=30, accumulate=4)


@pytest.mark.parametrize("accumulate", [2, 4])
def test_accumulation_follows_the_full_batch(tmp_path, accumulate):
    """With a loss that draws no noise, accumulate equal micro-batches give the full batch's mean gradient: the
    weights after 12 Adam steps agree to float32 rounding of the sums (|diff| <= 1e-5 absolute + 1e-4 relative;
    measured ~1e-7), and so do the loss rows (1e-6 relative)."""
    one = _run(tmp_path / "1", _settings(), loss=_regression)
    acc = _run(tmp_path / "n", _settings(accumulate=accumulate), loss=_regression)
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(acc.model.state_dict()[k], v, atol=1e-5, rtol=1e-4)
    for (s1, v1), (s2, v2) in zip(one.loss_rows, acc.loss_rows, strict=True):
        assert s1 == s2 and math.isclose(v1, v2, rel_tol=1e-6)
    assert not _same_bits(one.model.state_dict(), _mlp().state_dict())  # it did train


def test_warmup_is_linear_then_constant(tmp_path):
    """lr_k = lr * min(1, k / warmup) for update k = 0, 1, ... (DDPM's and score_sde's warm-up): the first update
    has lr 0 and leaves the weights alone; the schedule's state is in the checkpoint."""
    factor = warmup_factor(4)
    assert [factor(k) for k in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    net = _mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], abs=1e-12)
    start = {k: v.clone() for k, v in _mlp().state_dict().items()}
    one = _run(tmp_path / "a", _settings(steps=1, warmup=4))
    assert _same_bits(one.model.state_dict(), start)
    _run(tmp_path / "b", _settings(steps=6, warmup=4))
    ckpt = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert ckpt["scheduler"]["last_epoch"] == 6 and ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)


def test_lr_decay_factors_are_the_closed_forms():
    """lr_factor(warmup, decay, steps)(k): 1 - k / steps (linear to zero), (1 + cos(pi k / steps)) / 2 (cosine,
    SGDR's eq. 5 with eta_min 0), times the warm-up's min(1, k / warmup); 'none' is the warm-up alone."""
    linear, cosine = lr_factor(0, "linear", 4), lr_factor(0, "cosine", 4)
    assert [linear(k) for k in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [cosine(k) for k in range(5)] == pytest.approx([1.0, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2, 0.0])
    warm = lr_factor(2, "linear", 4)
    assert [warm(k) for k in range(4)] == [0.0, 0.375, 0.5, 0.25]
    assert [lr_factor(4, "none", 10)(k) for k in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [lr_factor(0, "none", 10)(k) for k in (0, 9)] == [1.0, 1.0]
    with pytest.raises(ValueError, match="lr_decay must be one of none, linear, cosine"):
        _settings(lr_decay="step")
    from pipeline.names import LR_DECAYS
    from pipeline.train.state import DECAYS

    assert tuple(DECAYS) == LR_DECAYS  # every name params validation takes has its factor


@pytest.mark.parametrize("decay,warmup", [("linear", 0), ("cosine", 0), ("cosine", 3)])
def test_lr_decay_trains_as_the_loop_with_that_lr_at_each_update(tmp_path, decay, warmup):
    """With train.lr_decay the run's weights, EMA and loss rows are those of the plain loop whose update k (0-based)
    uses lr * min(1, k / warmup) * d(k / steps), d written out here; the last update's lr is above zero."""
    s = _settings(lr_decay=decay, warmup=warmup)
    ramp = [min(1.0, k / warmup) if warmup else 1.0 for k in range(s.steps)]
    shape = {"linear": lambda u: 1.0 - u, "cosine": lambda u: 0.5 * (1.0 + math.cos(math.pi * u))}[decay]
    lrs = [s.lr * (ramp[k] * shape(k / s.steps)) for k in range(s.steps)]
    assert len(lrs) == s.steps and lrs[-1] > 0
    new = _run(tmp_path, s)
    model, ema, rows = _plain_loop(_mlp(), build_loss("dsm", VPSDE(), "eps"), _points(), s, lrs=lrs)
    assert _same_bits(new.model.state_dict(), model.state_dict())
    assert _same_bits(new.ema.state_dict(), ema.state_dict())
    assert new.loss_rows == rows
    constant = _run(tmp_path / "constant", _settings())
    assert not _same_bits(new.model.state_dict(), constant.model.state_dict())


def test_a_decaying_lr_resumes_only_into_the_same_number_of_steps(tmp_path):
    """Its schedule is a function of train.steps, so the length enters the checkpoint's fingerprint with the decay
    (resolved_fingerprint), and only then: a constant-lr fingerprint is the one from before lr_decay existed (steps
    None, no lr_decay key), so such a run may continue to more steps; a decaying run raised from 6 to 12 steps
    starts over through the loop, equal to a fresh 12-step run."""
    from pipeline.train import resolved_fingerprint

    resolved = {"steps": 6, "batch_size": 32, "lr": 1e-3, "ema_warmup": False, "precision": "fp32",
                "lr_decay": "none", "snapshot_every": 1}
    before = {"steps": None, "batch_size": 32, "lr": 1e-3, "ema_warmup": False, "precision": "fp32"}
    assert resolved_fingerprint(resolved, _settings(steps=6)) == before
    assert resolved_fingerprint({**resolved, "steps": 12}, _settings(steps=12)) == before
    decaying = {**resolved, "lr_decay": "linear"}
    six, twelve = (resolved_fingerprint({**decaying, "steps": n}, _settings(steps=n, lr_decay="linear"))
                   for n in (6, 12))
    assert six == {**before, "steps": 6, "lr_decay": "linear"} and twelve["steps"] == 12
    loss = build_loss("dsm", VPSDE(), "eps")
    for resumed in (0, 6):  # the same setup again resumes from the finished checkpoint
        again = train(_mlp(), loss, TrainData(_points()), _settings(steps=6, lr_decay="linear"),
                      Checkpoints(tmp_path / "a", {"resolved": six}), Hooks(progress=False))
        assert again.resumed_from == resumed
    raised = train(_mlp(), loss, TrainData(_points()), _settings(steps=12, lr_decay="linear"),
                   Checkpoints(tmp_path / "a", {"resolved": twelve}), Hooks(progress=False))
    assert raised.resumed_from == 0
    fresh = _run(tmp_path / "fresh", _settings(steps=12, lr_decay="linear"))
    assert _same_bits(raised.model.state_dict(), fresh.model.state_dict())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_on_the_cpu(tmp_path, precision):
    """autocast on the CPU through a tiny U-Net: finite weights that moved; fp16 keeps its GradScaler's state,
    whose scale backed off from 2^16 (the first 5 steps here overflow in fp16 and are skipped, by design)."""
    data = _images()
    result = _run(tmp_path, _settings(steps=10, batch_size=16, precision=precision), net=_unet(), data=data,
                  transform=image_batches("minus_one_one"))
    state = result.model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(v.dtype == _unet().state_dict()[k].dtype for k, v in state.items())  # the weights stay fp32
    assert not _same_bits(state, _unet().state_dict())
    assert all(math.isfinite(v) for _, v in result.loss_rows)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ("scaler" in ckpt) == (precision == "fp16")
    if precision == "fp16":
        assert 0 < ckpt["scaler"]["scale"] < 2.0**16


def test_channels_last_trains_like_contiguous(tmp_path):
    """channels_last changes only the memory layout (and the convolution kernels): the weights after 4 steps
    agree with the contiguous run to 1e-4 and come back contiguous, with the same keys."""
    data = _images()
    kw = dict(data=data, transform=image_batches("minus_one_one"))
    plain = _run(tmp_path / "a", _settings(steps=4, batch_size=16), net=_unet(), **kw)
    last = _run(tmp_path / "b", _settings(steps=4, batch_size=16, channels_last=True), net=_unet(), **kw)
    for k, v in plain.model.state_dict().items():
        assert last.model.state_dict()[k].is_contiguous() and last.ema.state_dict()[k].is_contiguous()
        torch.testing.assert_close(last.model.state_dict()[k], v, atol=1e-4, rtol=1e-3)


def test_compile_keeps_the_plain_keys(tmp_path):
    """torch.compile of the training network: state_dicts of the model and the EMA keep the module's own keys
    (no `_orig_mod.`) and the weights match eager training to float tolerance. Backend aot_eager runs
    TorchDynamo's capture and AOTAutograd's forward and backward graphs but not Inductor's C++ code generation,
    which alone takes ~30 s here for a tiny MLP (the `inductor` default is what the stage uses)."""
    eager = _run(tmp_path / "a", _settings(steps=6))
    compiled = _run(tmp_path / "b", _settings(steps=6, compile=True, compile_backend="aot_eager"))
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())
    assert list(compiled.ema.state_dict()) == list(eager.ema.state_dict())
    for k, v in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[k], v, atol=1e-5, rtol=1e-4)
    ckpt = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])


# --- the train.* keys and the stage's use of them -----------------------------------------------------------

def test_new_train_keys_are_validated_with_their_names():
    import yaml

    from pipeline.config import ConfigError, validate

    from pathlib import Path

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())  # the repo's params
    for extra, words in (({"batch_size": 100, "accumulate": 3}, ["train.accumulate", "train.batch_size (100)"]),
                         ({"precision": "fp8"}, ["train.precision", "fp32", "bf16", "fp16"]),
                         ({"warmup": -1}, ["train.warmup"]), ({"compile": "yes"}, ["train.compile"]),
                         ({"lr_decay": "step"}, ["train.lr_decay", "linear", "cosine"])):
        with pytest.raises(ConfigError) as err:
            validate({**raw, "train": {**raw["train"], **extra}})
        assert all(w in str(err.value) for w in words), str(err.value)
    cfg = validate({**raw, "train": {**raw["train"], "batch_size": 96, "accumulate": 4, "precision": "bf16"}})
    assert cfg.train.accumulate == 4 and cfg.train.tf32 and not cfg.train.compile and cfg.train.warmup == 0


def test_checkpoint_fingerprint_keeps_its_keys_at_the_defaults():
    """At their defaults the new keys stay out of the fingerprint, so checkpoints written before them resume;
    away from them the keys that change the bits enter it; tf32, like the device, never does, nor the post-hoc
    EMA's profiles (resume compares those with the checkpoint's own)."""
    from pipeline.config import PosthocParams, TrainParams
    from pipeline.train import fingerprinted_train

    old = TrainParams().model_dump(exclude={"steps", "checkpoint_every", "log_every", "device", "eval_every",
                                            "precision", "tf32", "channels_last", "compile", "accumulate", "warmup",
                                            "lr_decay", "devices", "posthoc"})
    assert fingerprinted_train(TrainParams()) == old
    assert fingerprinted_train(TrainParams(tf32=False)) == old
    assert fingerprinted_train(TrainParams(posthoc=PosthocParams(sigma_rels=[0.07], snapshot_every=3))) == old
    changed = TrainParams(precision="bf16", channels_last=True, compile=True, accumulate=2, warmup=10)
    assert fingerprinted_train(changed) == {**old, "precision": "bf16", "channels_last": True, "compile": True,
                                            "accumulate": 2, "warmup": 10}
    assert fingerprinted_train(TrainParams(lr_decay="cosine")) == {**old, "lr_decay": "cosine"}


def test_stage_refuses_compile_with_a_divergence_loss_and_uneven_auto_batches(tmp_path, monkeypatch, capsys):
    """What params validation cannot see is refused by the stage before training (exit 2): torch.compile with
    ssm (a double backward) and an accumulate that does not divide the 'auto' batch size (512 for points)."""
    import yaml

    from stages.common import run_named
    from test_stages import TINY, _deep_merge

    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(TINY, sort_keys=False))
    for name in ("prepare", "noise_scales"):
        assert run_named(name, ["--params", str(params)]) == 0
    for extra, words in (({"method": {"loss": "ssm"}, "train": {"compile": True}}, ["train.compile", "ssm"]),
                         ({"train": {"batch_size": "auto", "accumulate": 3}}, ["train.accumulate (3)", "(512"])):
        params.write_text(yaml.safe_dump(_deep_merge(TINY, extra), sort_keys=False))
        assert run_named("train", ["--params", str(params)]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
    assert not (tmp_path / "models" / "raw.pt").exists() and not (tmp_path / "checkpoints" / "last.pt").exists()


def _conditional_mlp() -> ConditionalMLP:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ConditionalMLP(2, hidden=16, blocks=1, emb_dim=8, num_classes=3)


def test_labels_train_a_conditional_network_as_ho_and_salimans_algorithm_1(tmp_path):
    """With labels, each step drops the batch's label indices to the null label (probability label_dropout, drawn
    from the training generator after the batch) and gives them to the loss: the inline loop's bits exactly."""
    s, p = _settings(ema_decay=0.5), 0.25
    loss, data = build_loss("dsm", VPSDE(), "eps"), _points()
    labels = torch.randint(3, (len(data),), generator=torch.Generator().manual_seed(5))
    new = _run(tmp_path, s, net=_conditional_mlp(), data=data, loss=loss, labels=labels, label_dropout=p)

    model, gen, null_share = _conditional_mlp(), torch.Generator().manual_seed(s.seed), []
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    for _ in range(s.steps):
        idx = torch.randint(len(data), (s.batch_size,), generator=gen)
        cond = drop_labels(label_index(labels[idx]), p, gen)
        null_share.append(float((cond == 0).float().mean()))
        step_loss = loss(model, data[idx], cond=cond, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        step_loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
    assert _same_bits(new.model.state_dict(), model.state_dict())
    assert 0 < sum(null_share) / len(null_share) < 0.5  # some labels were dropped, most were kept


def test_label_dropout_one_trains_only_the_null_label(tmp_path):
    out = _run(tmp_path, _settings(), net=_conditional_mlp(), labels=torch.zeros(256, dtype=torch.long),
               label_dropout=1.0)
    start = _conditional_mlp().label_emb.weight
    rows = out.model.label_emb.weight.detach()
    assert not torch.equal(rows[0], start[0]) and torch.equal(rows[1:], start[1:].detach())


def test_progress_shows_steps_images_per_second_and_the_time_left(tmp_path, capsys):
    """The train bar (stderr): step count, steps/s, the time left, the last loss row and images/s (batch x
    steps/s); the sample stage's bar over the samples is checked with the stages (tests/test_stages.py)."""
    net = ConditionalMLP(2, hidden=8, blocks=1, emb_dim=8)
    settings = TrainSettings(40, 32, 1e-3, 1.0, 0.99, 1_000, 5, 0)
    train(net, build_loss("dsm", VPSDE(), "eps"), TrainData(torch.randn(64, 2)), settings,
          Checkpoints(tmp_path, {}), Hooks(progress=True))
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    last = [line for line in err if line.startswith("train:")][-1]
    assert "40/40" in last and "step/s" in last and "loss=" in last and "img/s=" in last, last
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", last), last  # elapsed < left


def test_a_loss_with_a_schedule_is_told_each_step_and_a_resumed_run_its_own(tmp_path):
    """train() calls loss.set_step(step) before each optimisation step (easy consistency tuning's stages,
    pipeline.consistency): steps 0..k−1, then, resumed from the checkpoint at k, k..n−1; the same weights as one
    uninterrupted run."""
    class Scheduled:
        def __init__(self):
            self.steps = []

        def set_step(self, step):
            self.steps.append(step)

        def __call__(self, model, x, generator=None):
            return _regression(model, x) * (1 + self.steps[-1])

    first, whole = Scheduled(), Scheduled()
    _run(tmp_path / "a", _settings(steps=5, checkpoint_every=5), loss=first)
    resumed = Scheduled()
    done = _run(tmp_path / "a", _settings(steps=9, checkpoint_every=5), loss=resumed)
    once = _run(tmp_path / "b", _settings(steps=9, checkpoint_every=5), loss=whole)
    assert first.steps == [0, 1, 2, 3, 4] and resumed.steps == [5, 6, 7, 8] and whole.steps == list(range(9))
    assert done.resumed_from == 5 and _same_bits(done.model.state_dict(), once.model.state_dict())
