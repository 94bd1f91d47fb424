"""A small domain classifier for image data: test accuracy, class histograms and `fid_domain`.

Inception features (pipeline.metrics.fid) were trained on ImageNet photographs; on 8x8 digits or
28x28 MNIST they measure the data set only loosely. So next to FID we train a small CNN on the
train split and use it three ways: (1) its accuracy on the test split (a check that its features
mean something), (2) the histogram of its predicted classes over generated samples (mode coverage),
(3) its penultimate-layer features, whose Fréchet distance (Heusel et al. 2017's formula,
`pipeline.metrics.fid.frechet_distance`) between samples and the test split is `fid_domain` —
the "FID with a domain classifier" used for MNIST-like data since Heusel et al.

Pixels enter the network scaled to [-1, 1] (x / 127.5 - 1) by `scale_pixels`, never as raw uint8.
Training is deterministic: the initial weights come from `torch.manual_seed(seed)` inside
`torch.random.fork_rng` (the global RNG is left alone), the minibatches from a
`torch.Generator` seeded with `seed`; the same seed gives the same bits on the same machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

# The keys of a classifier's spec that fix its architecture (load_classifier rebuilds from them).
_ARCH_KEYS = ("shape", "num_classes", "width", "feature_dim")


def scale_pixels(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (N, C, H, W) in [0, 255] -> float32 tensor in [-1, 1]: x / 127.5 - 1."""
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8, got {x.dtype}")
    return x.to(torch.float32) / 127.5 - 1.0


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (padding 1) -> GroupNorm (up to 8 groups) -> SiLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.GroupNorm(math.gcd(8, c_out), c_out),
        nn.SiLU(),
    )


class DomainClassifier(nn.Module):
    """conv-GroupNorm-SiLU blocks with two stride-2 downsamplings, global average pool,
    Linear -> feature_dim (the features), SiLU, Linear -> num_classes.

    Input (B, C, H, W) float in [-1, 1] (see `scale_pixels`); any H, W >= 4 (8x8 -> 2x2,
    28x28 -> 7x7, 32x32 -> 8x8 before the pool). `features(x)` -> (B, feature_dim);
    `forward(x)` -> (B, num_classes) logits.
    """

    def __init__(self, shape: tuple[int, int, int], num_classes: int, width: int, feature_dim: int):
        super().__init__()
        channels = int(shape[0])
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.feature_dim = int(feature_dim)
        w = self.width
        self.body = nn.Sequential(
            _conv_block(channels, w),
            _conv_block(w, w),
            _conv_block(w, 2 * w, stride=2),
            _conv_block(2 * w, 2 * w),
            _conv_block(2 * w, 2 * w, stride=2),
        )
        self.embed = nn.Linear(2 * w, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def spec(self) -> dict:
        """The architecture as plain data: shape (list), num_classes, width, feature_dim."""
        return {
            "shape": list(self.shape),
            "num_classes": self.num_classes,
            "width": self.width,
            "feature_dim": self.feature_dim,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of scaled images (B, C, H, W)."""
        return self.embed(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) of scaled images (B, C, H, W)."""
        return self.head(F.silu(self.features(x)))


def build_classifier(
    shape: tuple[int, int, int], num_classes: int, width: int = 32, feature_dim: int = 64
) -> nn.Module:
    """A fresh `DomainClassifier` for images of `shape` (C, H, W) and `num_classes` classes."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W), got {shape}")
    if num_classes < 2 or width < 1 or feature_dim < 1:
        raise ValueError(
            f"need num_classes >= 2, width >= 1, feature_dim >= 1; "
            f"got {num_classes}, {width}, {feature_dim}"
        )
    return DomainClassifier(shape, num_classes, width, feature_dim)


def _check_images(x: np.ndarray, model: DomainClassifier | None = None) -> np.ndarray:
    """x as a uint8 (N, C, H, W) array (matching the model's shape when given), or ValueError."""
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
    if model is not None and tuple(x.shape[1:]) != model.shape:
        raise ValueError(f"images of shape {x.shape[1:]} for a classifier of {model.shape}")
    return x


def train_classifier(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device="cpu",
    progress: bool = False,
    width: int = 32,
    feature_dim: int = 64,
) -> nn.Module:
    """Train a `DomainClassifier` on uint8 images x (N, C, H, W) with labels y (N,) int in
    [0, num_classes): `steps` Adam steps (learning rate `lr`) on cross-entropy, minibatches of
    `batch_size` drawn uniformly with replacement. Deterministic in `seed` (see module docstring).
    Returns the model in eval mode on `device`.
    """
    x = _check_images(x)
    y = np.asarray(y)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"labels must be integers of shape ({x.shape[0]},), got {y.dtype} {y.shape}"
        )
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(tuple(x.shape[1:]), num_classes, width, feature_dim)
    model = model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(np.ascontiguousarray(x))
    y_all = torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="domain classifier", disable=not progress):
        idx = torch.randint(x.shape[0], (batch_size,), generator=gen)
        logits = model(scale_pixels(x_all[idx]).to(device))
        loss = F.cross_entropy(logits, y_all[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def _batched(model: DomainClassifier, x: np.ndarray, fn, batch_size: int, device) -> np.ndarray:
    """Concatenate fn(model, scaled batch) over batches of x, as float64 numpy."""
    x = _check_images(x, model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, x.shape[0], batch_size):
            batch = scale_pixels(x[start : start + batch_size]).to(device)
            out.append(fn(model, batch).cpu().to(torch.float64).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.empty((0,))


def classifier_features(
    model: nn.Module, x: np.ndarray, batch_size: int = 512, device="cpu"
) -> np.ndarray:
    """Penultimate features (N, feature_dim) float64 of uint8 images x (N, C, H, W).

    The feature space of `fid_domain` = frechet_distance(features(samples), features(test)).
    """
    feats = _batched(model, x, lambda m, b: m.features(b), batch_size, device)
    return feats.reshape(-1, model.feature_dim)


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 512, device="cpu") -> np.ndarray:
    """Predicted classes (N,) int64 (argmax of the logits) of uint8 images x (N, C, H, W)."""
    logits = _batched(model, x, lambda m, b: m(b), batch_size, device)
    return logits.reshape(-1, model.num_classes).argmax(axis=1).astype(np.int64)


def accuracy(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512, device="cpu"
) -> float:
    """Fraction of images x (N, C, H, W) uint8 whose predicted class equals y (N,)."""
    y = np.asarray(y)
    pred = predict(model, x, batch_size=batch_size, device=device)
    if y.shape != pred.shape:
        raise ValueError(f"labels of shape {y.shape} for {pred.shape[0]} images")
    return float(np.mean(pred == y))


def class_histogram(pred: np.ndarray, num_classes: int) -> list[float]:
    """Fraction of predictions (N,) in each of num_classes classes (a list summing to 1)."""
    pred = np.asarray(pred)
    if pred.ndim != 1 or pred.size == 0:
        raise ValueError(f"pred must be a non-empty (N,) array, got shape {pred.shape}")
    if pred.min() < 0 or pred.max() >= num_classes:
        raise ValueError(
            f"predictions must lie in [0, {num_classes}), got [{pred.min()}, {pred.max()}]"
        )
    counts = np.bincount(pred.astype(np.int64), minlength=num_classes)
    return [float(c) / pred.size for c in counts]


def classifier_file(model: nn.Module, spec: dict | None = None) -> dict:
    """{"config": spec, "state_dict": ...}: plain data for torch.save, loadable with
    torch.load(weights_only=True). `spec` (default: model.spec()) must hold the architecture
    keys shape, num_classes, width, feature_dim, and may add more (e.g. training settings).
    """
    config = dict(model.spec() if spec is None else spec)
    missing = [k for k in _ARCH_KEYS if k not in config]
    if missing:
        raise ValueError(f"classifier spec lacks {missing}")
    config["shape"] = [int(s) for s in config["shape"]]
    arch = {k: config[k] for k in _ARCH_KEYS}
    if arch != model.spec():
        raise ValueError(f"spec {arch} does not describe the model {model.spec()}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"config": config, "state_dict": state}


def load_classifier(obj: dict | str | Path, device="cpu") -> nn.Module:
    """The classifier (eval mode) from `classifier_file`'s dict or a file torch.save'd from it."""
    if not isinstance(obj, dict):
        obj = torch.load(obj, map_location="cpu", weights_only=True)
    config = obj["config"]
    model = build_classifier(
        tuple(config["shape"]), config["num_classes"], config["width"], config["feature_dim"]
    )
    model.load_state_dict(obj["state_dict"])
    return model.to(torch.device(device)).eval()
