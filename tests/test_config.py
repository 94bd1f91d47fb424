"""Tests for pipeline.config: the defaults validate, and bad input is refused with the key named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import config, defaults, devices
from pipeline.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_validate_and_round_trip():
    cfg = config.load(REPO / "params.yaml")
    assert cfg.method.name == "ncsnv2" and cfg.data.name == "swissroll"
    again = config.validate(config.to_dict(cfg))
    assert again == cfg


def test_yaml12_floats_as_dvc_writes_them(tmp_path):
    # `dvc exp run -S train.lr=1e-3` writes 1e-3, a string under YAML 1.1.
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  lr: 1e-3\nnoise:\n  step_size: 2e-5\n")
    cfg = config.load(p)
    assert cfg.train.lr == 1e-3 and cfg.noise.step_size == 2e-5


@pytest.mark.parametrize("raw, words", [
    # unknown keys, at the top and inside a section: named, with what is allowed
    ({"trian": {}}, ["trian: unknown key", "allowed under the top level", "train"]),
    ({"train": {"learning_rate": 0.1}}, ["train.learning_rate: unknown key", "allowed under train", "lr"]),
    ({"data": {"gmm": {"weigths": [1.0]}}}, ["data.gmm.weigths: unknown key", "weights"]),
    # wrong types (strict: no silent coercion of "10" or 1.5)
    ({"train": {"steps": "10"}}, ["train.steps", "integer"]),
    ({"train": {"steps": 1.5}}, ["train.steps", "integer"]),
    ({"model": {"scale_by_sigma": "yes"}}, ["model.scale_by_sigma", "boolean"]),
    ({"noise": {"sigma_max": "big"}}, ["noise.sigma_max", "'auto'"]),
    # out of range
    ({"train": {"lr": 0.0}}, ["train.lr", "'auto' or a number > 0"]),
    ({"train": {"ema_decay": 1.0}}, ["train.ema_decay", "less than 1"]),
    ({"noise": {"sigma_max": -1.0}}, ["noise.sigma_max", "'auto' or a number > 0"]),
    ({"noise": {"num_scales": 1}}, ["noise.num_scales", ">= 2"]),
    ({"model": {"emb_dim": 7}}, ["model.emb_dim", "even"]),
    ({"eval": {"n": 20000}}, ["eval.n (20000) must be <= sample.n"]),
    # allowed values of a choice are listed
    ({"data": {"name": "spiral"}}, ["data.name", "swissroll", "8gaussians", "file"]),
    ({"method": {"name": "ddpm2"}}, ["method.name", "ncsnv2", "exact_score"]),
    # combinations
    ({"method": {"name": "exact_score"}}, ["exact_score needs data.name: gmm"]),
    ({"data": {"name": "gmm", "gmm": {"weights": [0.5, 0.6]}}}, ["data.gmm", "sum to 1"]),
    ({"data": {"name": "file"}}, ["data.path must name a .npy or .csv"]),
    ({"data": {"name": "file", "path": "points.txt"}}, ["data.path must end in .npy or .csv"]),
    ({"data": {"name": "file", "path": "/nonexistent/points.npy"}}, ["data.path", "does not exist"]),
    # images: keys that only apply to images, missing files, sizes
    ({"data": {"hflip": True}}, ["data.hflip applies to images", "swissroll"]),
    ({"data": {"scaling": "zero_one"}}, ["data.scaling applies to images"]),
    ({"data": {"name": "folder"}}, ["data.name: folder needs data.path", "directory"]),
    ({"data": {"name": "cifar10"}}, ["cifar10 needs its official files", "data.download: true"]),
    ({"data": {"name": "mnist"}}, ["mnist needs its official files", "data.path"]),
    ({"data": {"name": "digits", "channels": 2}}, ["data.channels"]),
    ({"data": {"name": "digits", "n_test": 100}, "eval": {"fid_n": 200}}, ["eval.fid_n (200) must be <= data.n_test"]),
    ({"model": {"arch": "unet"}}, ["model.arch: unet is for images"]),
    ({"data": {"name": "digits"}, "method": {"name": "sde"}, "eval": {"likelihood": True, "divergence": "exact"}},
     ["eval.divergence: exact", "rademacher"]),
    ({"model": {"channel_mult": []}}, ["model.channel_mult", "non-empty"]),
    ({"model": {"dropout": 1.0}}, ["model.dropout", "[0, 1)"]),
    ({"train": {"device": "tpu"}}, ["train.device", "cuda"]),
    ({"data": {"labels_path": "y.npy"}}, ["data.labels_path", "file"]),
    ({"method": {"sb": {False: 1}}}, ["method.sb.False: Input should be a valid string"]),  # a YAML key `no`
    ({"eval": {"fid_against": "reference"}}, ["eval.fid_against", "'test' or 'train'"]),
    ({"eval": {"fid_seeds": 0}}, ["eval.fid_seeds", "greater than or equal to 1"]),
    # post-hoc EMA: the key that moved, widths out of range, posthoc where training keeps no snapshots
    ({"train": {"ema": False}}, ["train.ema: moved to ema.method", "none"]),
    ({"train": {"posthoc": {"sigma_rels": [0.05, 0.3]}}}, ["train.posthoc.sigma_rels", "(0, 0.2887]"]),
    ({"train": {"posthoc": {"sigma_rels": [0.05, 0.05]}}}, ["train.posthoc.sigma_rels", "differ"]),
    ({"train": {"posthoc": {"snapshot_every": 0}}}, ["train.posthoc.snapshot_every", "integer >= 1"]),
    ({"ema": {"method": "posthoc", "sigma_rel": 0.5}}, ["ema.sigma_rel", "less than or equal to 0.288"]),
    ({"ema": {"sigma_rel": 0.08}}, ["ema.sigma_rel is the width of the post-hoc EMA", "ema.method: posthoc"]),
    ({"train": {"posthoc": {"sigma_rels": []}}, "ema": {"method": "posthoc"}},
     ["ema.method: posthoc", "train.posthoc.sigma_rels", "empty"]),
    ({"data": {"name": "gmm"}, "method": {"name": "exact_score"}, "ema": {"method": "posthoc"}},
     ["ema.method: posthoc", "exact_score trains otherwise", "decay or none"]),
    # sample.task: inverse
    ({"data": {"name": "digits"}, "sample": {"task": "inverse", "inverse": {"operator": "colorize"}}},
     ["sample.inverse.operator: colorize needs colour images", "digits is grey"]),
    ({"data": {"name": "photos", "image_size": 15}, "sample": {"task": "inverse", "inverse": {"operator": "downsample",
                                                                                              "factor": 2}}},
     ["sample.inverse.factor (2) must divide the image side data.image_size (15)"]),
    ({"sample": {"task": "inverse", "inverse": {"operator": "matrix", "matrix": [[1, 1, 1]]}}},
     ["sample.inverse.matrix has rows of 3 entries", "2-D points"]),
    ({"sample": {"task": "inverse", "inverse": {"operator": "matrix"}}}, ["sample.inverse.matrix, a K x D list"]),
    ({"sample": {"task": "inverse", "inverse": {"operator": "blur"}}},
     ["sample.inverse.operator: blur measures images", "swissroll is points"]),
    ({"data": {"name": "digits"}, "sample": {"task": "inverse", "inverse": {"operator": "matrix", "matrix": [[1]]}}},
     ["sample.inverse.operator: matrix measures points"]),
    ({"sample": {"task": "inverse", "inverse": {"operator": "matrix", "matrix": [[1, 1]], "noise": 0.1}}},
     ["sample.inverse.method replace puts the measurement into x exactly", "use dps"]),
    ({"sample": {"task": "inverse", "inverse": {"operator": "matrix", "matrix": [[1, 1]], "noise": -0.1,
                                                "method": "dps"}}}, ["sample.inverse.noise", "greater than or equal"]),
    ({"sample": {"task": "inverse", "inverse": {"operator": "matrix", "matrix": [[1, 1]], "factor": 4}}},
     ["sample.inverse.factor applies to sample.inverse.operator: downsample"]),
    ({"sample": {"inverse": {"operator": "blur"}}}, ["sample.inverse.* applies to sample.task: inverse"]),
    ({"eval": {"fid_seeds": 3}}, ["eval.fid_seeds: 3 repeats FID on images", "swissroll is points"]),
    ({"data": {"name": "digits"}, "eval": {"fid_seeds": 2}, "sample": {"task": "edit"}},
     ["eval.fid_seeds: 2", "sample.task: edit"]),
    ({"data": {"name": "digits"}, "eval": {"fid_seeds": 3, "fid_n": 100}, "sample": {"n": 200}},
     ["sample.n (200) must be >= eval.fid_seeds x eval.fid_n (3 x 100)"]),
    ({"method": {"name": "ddpm"}, "sample": {"clip_denoised": True}}, ["sample.clip_denoised", "point set"]),
    # class conditioning and guidance
    ({"sample": {"guidance": 1.0}}, ["sample.guidance guides a class-conditional model", "method.conditional: true"]),
    ({"sample": {"classes": [1]}}, ["sample.classes guides a class-conditional model"]),
    ({"method": {"conditional": True}}, ["method.conditional needs class labels", "swissroll", "moons, 8gaussians"]),
    ({"data": {"name": "digits"}, "method": {"name": "sohl_dickstein", "conditional": True}},
     ["Sohl-Dickstein's learned kernels have no score to guide", "ddpm"]),
    ({"method": {"label_dropout": 1.0}}, ["method.label_dropout", "less than 1"]),
    ({"data": {"name": "moons"}, "method": {"conditional": True}, "sample": {"classes": []}},
     ["sample.classes must be 'auto' or a non-empty list"]),
    ({"data": {"name": "digits"}, "method": {"name": "sohl_dickstein"}, "sample": {"clip_denoised": True}},
     ["sample.clip_denoised", "no x0_hat"]),
    # sample.task and its keys
    ({"sample": {"inpaint": {"method": "repaint"}}}, ["sample.inpaint.* applies to sample.task: inpaint"]),
    ({"sample": {"edit": {"t0": 0.5}}}, ["sample.edit.* applies to sample.task: edit", "generate"]),
    ({"sample": {"task": "edit", "edit": {"t0": [0.5, 1.5]}}}, ["sample.edit.t0", "fraction in (0, 1]"]),
    ({"sample": {"task": "interpolate", "interpolate": {"frames": 1}}}, ["sample.interpolate.frames"]),
    ({"sample": {"task": "inpaint", "inpaint": {"mask": "box"}}}, ["mask: box is for images", "first or random"]),
    ({"data": {"name": "digits"}, "sample": {"task": "inpaint", "inpaint": {"mask": "first"}}},
     ["mask: first keeps coordinate 0 of points", "box, half or random"]),
    ({"method": {"name": "ddpm"}, "sample": {"task": "inpaint", "inpaint": {"method": ["replace", "langevin"]}}},
     ["langevin is Song & Ermon's Algorithm 2", "not ancestral", "replace, repaint, mcg or dps"]),
    ({"sample": {"task": "inpaint", "inpaint": {"method": "mcg", "alpha": -1.0}}}, ["sample.inpaint.alpha", ">= 0"]),
    ({"data": {"name": "moons"}, "method": {"conditional": True}, "sample": {"task": "edit", "guidance": 1.0}},
     ["sample.guidance and sample.classes steer sample.task: generate", "null label"]),
    ({"sample": {"task": "edit", "n": 20_000}}, ["sample.n (20000) must be <= data.n_test (10000)", "held-out"]),
    ({"sample": {"task": "interpolate", "devices": 2}}, ["sample.devices: 2 shards sample.task: generate only"]),
    ({"method": {"name": "sde"}, "sample": {"task": "edit", "sampler": "ode"}}, ["rk45", "euler or heun"]),
    # flow matching: its own section, its velocity and the ODE
    ({"method": {"name": "flow_matching", "fm": {"coupling": "sinkhorn"}}},
     ["method.fm.coupling", "independent", "minibatch_ot"]),
    ({"method": {"name": "flow_matching", "fm": {"sigma_min": 1.0}}}, ["method.fm.sigma_min", "less than 1"]),
    ({"method": {"name": "flow_matching", "fm": {"reflows": 1}}}, ["method.fm.reflows"]),
    ({"method": {"name": "edm", "fm": {"coupling": "minibatch_ot"}}},
     ["method.fm is for method.name: flow_matching", "edm"]),
    ({"method": {"name": "flow_matching"}, "sample": {"sampler": "edm_heun"}},
     ["sample.sampler: edm_heun", "m = 1 − t > 0", "ode", "dpm_solver"]),
    ({"method": {"name": "flow_matching", "sde": "vp"}}, ["method.sde: vp", "linear one"]),
    ({"method": {"name": "flow_matching", "parameterization": "eps"}}, ["velocity", "got eps"]),
    ({"method": {"name": "flow_matching", "loss": "dsm"}}, ["method.loss: auto", "got dsm"]),
    ({"method": {"name": "sde", "parameterization": "velocity"}}, ["velocity", "flow matching's", "is no score"]),
    ({"data": {"name": "moons"}, "method": {"name": "flow_matching", "conditional": True}},
     ["method.conditional", "velocity"]),
    ({"method": {"name": "flow_matching"}, "sample": {"task": "inpaint", "sampler": "ode", "ode_method": "heun"}},
     ["sample.task: inpaint", "generate or interpolate"]),
    # a consistency model: made by the distill stage, sampled by its own sampler
    ({"sample": {"sampler": "consistency"}}, ["sample.sampler: consistency", "distill.method: cd"]),
    ({"method": {"name": "edm"}, "distill": {"method": "cd"}, "sample": {"sampler": "edm_heun"}},
     ["sample.sampler: edm_heun", "sample.sampler: consistency (or auto)"]),
    ({"method": {"name": "edm"}, "distill": {"method": "cd"}, "eval": {"likelihood": True}},
     ["eval.likelihood", "consistency model"]),
    ({"method": {"name": "sohl_dickstein"}, "distill": {"method": "cd"}}, ["distill.method", "learned kernels"]),
    ({"data": {"name": "gmm"}, "method": {"name": "exact_score"}, "distill": {"method": "cd"}},
     ["distill.method", "exact_score has none"]),
    ({"distill": {"method": "ct"}}, ["distill.method", "'none', 'cd' or 'ect'"]),
    ({"distill": {"method": "ect"}}, ["distill.method: ect draws continuous times", "method.name: ncsnv2",
                                      "noise_scales", "distill.method: cd"]),
    ({"method": {"name": "ddpm"}, "distill": {"method": "ect"}}, ["distill.method: ect", "discrete_vp"]),
    ({"data": {"name": "moons"}, "method": {"conditional": True}, "distill": {"method": "cd"}},
     ["distill.method: cd distils an unconditional model", "method.conditional: false"]),
    ({"method": {"name": "edm"}, "distill": {"method": "cd"}, "sample": {"task": "edit"}},
     ["sample.task: edit", "generate or interpolate"]),
    ({"distill": {"num_scales": 1}}, ["distill.num_scales", "greater than or equal to 2"]),
])
def test_bad_input_names_the_key_and_what_is_allowed(raw, words):
    with pytest.raises(ConfigError) as info:
        config.validate(raw)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as info:
        config.validate({"train": {"lr": -1.0, "steps": "x"}, "sample": {"n": 0}})
    msg = str(info.value)
    assert "train.lr" in msg and "train.steps" in msg and "sample.n" in msg


def test_not_a_mapping_and_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        config.validate([1, 2])
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


def test_file_data_path_accepted_when_present(tmp_path):
    p = tmp_path / "pts.npy"
    np.save(p, np.zeros((10, 2)))
    cfg = config.validate({"data": {"name": "file", "path": str(p)}})
    assert cfg.data.path == str(p)


def test_image_data_sets_validate_with_auto_sizes():
    for name in ("digits", "photos", "fashion_mnist"):
        cfg = config.validate({"data": {"name": name}})
        assert cfg.data.kind == "images" and cfg.data.n_train == "auto" and cfg.model.arch == "auto"
    assert config.validate({}).data.kind == "points"


def test_file_data_kind_is_left_to_the_file(tmp_path):
    p = tmp_path / "images.npy"
    np.save(p, np.zeros((10, 1, 4, 4), dtype=np.uint8))
    assert config.validate({"data": {"name": "file", "path": str(p)}}).data.kind is None


@pytest.mark.parametrize("setting, sampler, kind, data, want", [
    ("auto", "ancestral", "score", "images", True),
    ("auto", "ddim", "score", "images", True),
    ("auto", "pc", "score", "images", False),  # score_sde's samplers do not clip
    ("auto", "ode", "score", "images", False),
    ("auto", "ancestral", "kernel", "images", False),  # Sohl-Dickstein: no x0_hat
    ("auto", "ancestral", "score", "points", False),  # the 2-D default keeps its bits
    (True, "pc", "score", "images", True),
    (False, "ddim", "score", "images", False),
])
def test_clip_denoised_auto_clips_images_under_ancestral_and_ddim(setting, sampler, kind, data, want):
    assert defaults.clip_denoised(setting, sampler, kind, {"kind": data}) is want


DIGITS_RECORD = {"kind": "images", "shape": [1, 8, 8]}


@pytest.mark.parametrize("setting, data, native, want", [
    ("auto", DIGITS_RECORD, True, "bf16"),  # images on bf16 hardware
    ("auto", DIGITS_RECORD, False, "fp32"),  # emulated bf16 would be slower than fp32
    ("auto", {"kind": "points", "shape": [2]}, True, "fp32"),  # the 2-D default keeps its bits
    ("fp32", DIGITS_RECORD, True, "fp32"),  # a set value wins (the paper presets set fp32)
    ("fp16", {"kind": "points", "shape": [2]}, False, "fp16"),
])
def test_precision_auto_is_bf16_for_images_on_bf16_hardware_only(setting, data, native, want):
    train = config.TrainParams(precision=setting).model_dump()
    assert defaults.train_settings(train, data, bf16=native)["precision"] == want


@pytest.mark.parametrize("setting, data, want", [
    ("auto", DIGITS_RECORD, "cosine"),  # measured on digits (pipeline.defaults.IMAGE_LR_DECAY)
    ("auto", {"kind": "images", "shape": [3, 64, 64]}, "cosine"),
    ("auto", {"kind": "points", "shape": [2]}, "none"),  # the 2-D default keeps its bits
    ("none", DIGITS_RECORD, "none"),  # a set value wins (the paper presets keep their constant lr)
    ("linear", {"kind": "points", "shape": [2]}, "linear"),
])
def test_lr_decay_auto_is_cosine_for_images_and_none_for_points(setting, data, want):
    train = config.TrainParams(lr_decay=setting).model_dump()
    assert defaults.train_settings(train, data)["lr_decay"] == want


def test_bf16_native_asks_the_device(monkeypatch):
    """CUDA: torch's bf16 support; the CPU: oneDNN's bf16 kernels (emulated elsewhere); anything else: no."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert devices.bf16_native(torch.device("cuda", 0)) is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert devices.bf16_native(torch.device("cuda", 0)) is False
    for native in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert devices.bf16_native(torch.device("cpu")) is native
    assert devices.bf16_native(torch.device("meta")) is False
