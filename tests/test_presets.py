"""The paper presets (presets/*.yaml): each validates on params.yaml, resolves to the published settings,
trains two steps of a scaled-down copy through the library, and `python -m presets` writes and refuses as
documented."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import presets
from pipeline import config, defaults, nets, pixels
from pipeline.losses import build_loss
import families
from pipeline.noise import choose_noise_scales
from pipeline.train import Checkpoints, Hooks, TrainData, TrainSettings, image_batches, train
from presets.__main__ import main as presets_main

REPO = Path(__file__).resolve().parents[1]
PARAMS = (REPO / "params.yaml").read_text(encoding="utf-8")
CIFAR = {"kind": "images", "shape": [3, 32, 32]}
D = 3 * 32 * 32

# The published settings each preset must resolve to (the sources are in each preset's comments).
# clip: the paper's max gradient norm (None: no clipping); reduction: how the paper reduces its per-pixel loss
# over the pixel dimensions ("mean" or "half_sum"); factor: our per-example loss / the paper's, so that our
# train.grad_clip = clip * factor clips exactly as the paper's clip does on its loss.
PAPER = {
    "ddpm-cifar10": dict(process="discrete_vp", loss="eps_mse", sampler="ancestral", steps=800_000, batch=128,
                         lr=2e-4, warmup=5_000, ema=0.9999, ema_warmup=False, clip=1.0, reduction="mean", factor=D,
                         scaling="minus_one_one", net=(128, [1, 2, 2, 2], 2, [16], 0.1)),
    "ncsnv2-cifar10": dict(process="noise_scales", loss="dsm", sampler="annealed_langevin", steps=300_000, batch=128,
                           lr=1e-4, warmup=0, ema=0.999, ema_warmup=False, clip=None, reduction="half_sum", factor=1,
                           scaling="zero_one", net=(128, [1, 2, 2, 2], 2, [16], 0.0)),
    "sde-vp-cifar10": dict(process="vp", loss="dsm", sampler="pc", steps=1_300_000, batch=128, lr=2e-4,
                           warmup=5_000, ema=0.9999, ema_warmup=True, clip=1.0, reduction="mean", factor=D / 2,
                           scaling="minus_one_one", net=(128, [1, 2, 2, 2], 2, [16], 0.1)),
    "sde-subvp-cifar10": dict(process="subvp", loss="dsm", sampler="pc", steps=1_300_000, batch=128, lr=2e-4,
                              warmup=5_000, ema=0.9999, ema_warmup=True, clip=1.0, reduction="mean", factor=D / 2,
                              scaling="minus_one_one", net=(128, [1, 2, 2, 2], 2, [16], 0.1)),
    "sde-ve-cifar10": dict(process="ve", loss="dsm", sampler="pc", steps=1_300_000, batch=128, lr=2e-4,
                           warmup=5_000, ema=0.999, ema_warmup=True, clip=1.0, reduction="half_sum", factor=1,
                           scaling="zero_one", net=(128, [1, 2, 2, 2], 4, [16], 0.1)),
}


def _resolved(name: str) -> config.Config:
    return presets.apply(name, PARAMS)[1]


def _plan(cfg: config.Config):
    return families.plan(cfg)


def _process(cfg: config.Config, kind: str, train_model_space: np.ndarray):
    """The forward process as the noise_scales stage builds it (NCSN's scales and VE's sigma range from noise.*)."""
    n, m = cfg.noise, cfg.method
    sigmas: list[float] = []
    if kind in ("noise_scales", "ve"):
        sigmas = choose_noise_scales(train_model_space, families.get(m.name).noise_defaults, n.sigma_max, n.sigma_min, n.num_scales,
                                     n.fallback_num_scales, n.steps_per_scale, n.step_size, n.max_exact_pairwise,
                                     cfg.seed).sigmas
    return families.get(m.name).build_process(kind, m, sigmas)


def _loss(cfg: config.Config, p, process):
    scaling = defaults.scaling_for(p.process, cfg.data.scaling)
    options = families.get(cfg.method.name).loss_options(p.loss, cfg.method, pixels.discrete_decoder(scaling))
    return build_loss(p.loss, process, p.parameterization, **options)


def test_preset_list():
    assert presets.names() == sorted(PAPER)
    with pytest.raises(presets.PresetError, match="ddpm-cifar10"):
        presets.path_of("no-such-preset")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_preset_validates_and_holds_only_differences(name):
    """Merged onto params.yaml the preset validates; every key it sets exists in params.yaml and differs from it
    (the preset holds only the differences); every other line of params.yaml, comments included, is kept."""
    text, cfg, keys = presets.apply(name, PARAMS)
    base = config.to_dict(presets.validate_text(PARAMS))
    merged = config.to_dict(cfg)
    for key in keys:
        section, leaf = key.rsplit(".", 1)
        old, new = base, merged
        for part in section.split("."):
            old, new = old[part], new[part]
        assert leaf in old, f"{name}: {key} is not a key of params.yaml"
        assert old[leaf] != new[leaf], f"{name}: {key} equals params.yaml's value; leave it out of the preset"
    kept = [line for line in PARAMS.splitlines() if line.strip().startswith("#")]
    assert all(line in text.splitlines() for line in kept)
    assert presets.merge(PARAMS, []) == PARAMS  # the round trip alone changes nothing


@pytest.mark.parametrize("name", sorted(PAPER))
def test_preset_resolves_to_the_published_settings(name):
    want, cfg = PAPER[name], _resolved(name)
    p = _plan(cfg)
    assert (p.process, p.loss, p.sampler) == (want["process"], want["loss"], want["sampler"])
    t = defaults.train_settings(cfg.train.model_dump(), CIFAR)
    assert (t["steps"], t["batch_size"], t["lr"], t["ema_warmup"]) == (want["steps"], want["batch"], want["lr"],
                                                                        want["ema_warmup"])
    assert (cfg.train.warmup, cfg.train.ema_decay, cfg.ema.method) == (want["warmup"], want["ema"], "decay")
    assert cfg.train.precision == "fp32" and cfg.train.accumulate == 1 and t["lr_decay"] == "none"  # constant lr
    assert cfg.train.grad_clip == (None if want["clip"] is None else want["clip"] * want["factor"])
    assert cfg.data.name == "cifar10" and cfg.data.hflip and not cfg.data.dequantize
    assert defaults.scaling_for(p.process, cfg.data.scaling) == want["scaling"]
    spec = defaults.network_spec(cfg.model.model_dump(), CIFAR, p.parameterization)
    assert (spec["channels"], spec["channel_mult"], spec["num_res_blocks"], spec["attn_resolutions"],
            spec["dropout"]) == want["net"]
    if p.process in ("noise_scales", "ve"):
        assert (cfg.noise.sigma_max, cfg.noise.sigma_min) == (50.0, 0.01)
    if name == "ncsnv2-cifar10":  # Song & Ermon 2020, CIFAR-10 config: L=232, T=5, eps=6.2e-6
        assert (cfg.noise.num_scales, cfg.noise.steps_per_scale, cfg.noise.step_size) == (232, 5, 6.2e-6)


def test_ddpm_preset_parameter_count():
    """Ho et al. 2020 (appendix B): 35.7M parameters, 35,746,307 in the official code, built from the spec the
    preset resolves to (meta device: no memory, no init)."""
    cfg = _resolved("ddpm-cifar10")
    spec = defaults.network_spec(cfg.model.model_dump(), CIFAR, _plan(cfg).parameterization)
    with torch.device("meta"):
        net = nets.build_network(spec, seed=0)
    assert sum(p.numel() for p in net.parameters()) == 35_746_307


class _Zero(nn.Module):
    """A network that outputs 0: every parameterization's residual std * score + z is then z itself."""

    def forward(self, x, c, y=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_grad_clip_is_the_papers_in_our_loss_units(name):
    """Our per-example loss is `factor` x the paper's: at a zero network both are sums of z^2, E = factor x
    E[paper] with E[paper] = 1 (mean over pixels) or D/2 (half the sum), so grad_clip = clip * factor clips as
    the paper does. Checked in expectation (8 x 3,072 squared normals: 0.9 % standard error), not on the draws."""
    want, cfg = PAPER[name], _resolved(name)
    p = _plan(cfg)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = 2 * x - 1 if want["scaling"] == "minus_one_one" else x
    process = _process(cfg, p.process, x.numpy())
    ours = _loss(cfg, p, process)(_Zero(), x, generator=torch.Generator().manual_seed(0)).mean().item()
    paper = 1.0 if want["reduction"] == "mean" else D / 2
    assert ours == pytest.approx(want["factor"] * paper, rel=0.05)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_preset_trains_two_steps_scaled_down(name, tmp_path):
    """The preset's process, loss, parameterization, transform and train.* settings (lr, clip, EMA and its
    warm-up, lr warm-up, precision) through pipeline.train.train on 16 random CIFAR-shaped images, with the
    width cut to 8, 2 steps and batch 4: finite weights and losses, and the weights moved."""
    cfg = _resolved(name)
    p = _plan(cfg)
    data = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scaling = defaults.scaling_for(p.process, cfg.data.scaling)
    process = _process(cfg, p.process, pixels.to_model(data, scaling).numpy())
    loss = _loss(cfg, p, process)
    spec = defaults.network_spec({**cfg.model.model_dump(), "channels": 8}, CIFAR, p.parameterization)
    net = nets.build_network(spec, seed=cfg.seed)
    before = [q.detach().clone() for q in net.parameters()]
    t = cfg.train
    resolved = defaults.train_settings(t.model_dump(), CIFAR)
    settings = TrainSettings(2, 4, resolved["lr"], t.grad_clip, t.ema_decay, t.checkpoint_every, 1, cfg.seed,
                             ema_warmup=resolved["ema_warmup"], precision=t.precision, channels_last=t.channels_last,
                             compile=t.compile, accumulate=t.accumulate, warmup=t.warmup)
    transform = image_batches(scaling, dequantize=cfg.data.dequantize, hflip=cfg.data.hflip)
    result = train(net, loss, TrainData(data, transform), settings, Checkpoints(tmp_path, {"preset": name}),
                   Hooks(progress=False))
    assert [s for s, _ in result.loss_rows] == [1, 2] and all(math.isfinite(v) for _, v in result.loss_rows)
    for module in (result.model, result.ema):
        assert all(torch.isfinite(q).all() for q in module.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, result.model.parameters()))


def test_cli_writes_validated_params_and_refuses_bad_input(tmp_path, capsys):
    params = tmp_path / "params.yaml"  # tmp_path is no git repository: presets merge onto the file itself
    params.write_text(PARAMS, encoding="utf-8")
    for bad in (["ddpm-cifar10", "-S", "train.stepz=3"], ["ddpm-cifar10", "-S", "train.lr=-1"],
                ["ddpm-cifar10", "-S", "data.download=false"], ["no-such-preset"], ["ddpm-cifar10", "-S", "lr"]):
        assert presets_main([*bad, "--params", str(params)]) == 2
        assert params.read_text(encoding="utf-8") == PARAMS  # refused before anything is written
    err = capsys.readouterr().err
    for named in ("train.stepz: unknown key", "train.lr: must be", "set data.path", "no preset 'no-such-preset'",
                  "override 'lr'"):
        assert named in err
    assert presets_main(["ncsnv2-cifar10", "--check", "--params", str(params)]) == 0
    assert params.read_text(encoding="utf-8") == PARAMS
    assert presets_main(["sde-ve-cifar10", "--params", str(params), "-S", "data.path=/data/cifar10",
                         "-S", "data.download=false", "-S", "model.channel_mult=[1, 2, 2]"]) == 0
    assert "dvc exp run -n sde-ve-cifar10" in capsys.readouterr().out
    cfg = config.load(params)
    assert (cfg.method.sde, cfg.data.path, cfg.data.download, cfg.model.channel_mult) == ("ve", "/data/cifar10",
                                                                                         False, [1, 2, 2])
    assert presets_main(["--params", str(params)]) == 0 and "ddpm-cifar10" in capsys.readouterr().out
