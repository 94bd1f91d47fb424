"""Figures: samples against data, the noise schedule, the loss curve. Written atomically as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no screen on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import io  # noqa: E402

_META = {"Software": None}  # keep PNG bytes free of version strings that vary between installs


def _save(fig, path: str | Path) -> None:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata=_META)
    plt.close(fig)


def _limits(*clouds: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    pts = np.concatenate([c[:, :2] for c in clouds])
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    pad = 0.1 * (hi - lo)
    return (lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1])


def scatter_samples(path: str | Path, samples: np.ndarray, data: np.ndarray, title: str = "") -> None:
    """Side-by-side scatter of held-out data and samples (first two coordinates)."""
    xlim, ylim = _limits(samples, data)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.3), sharex=True, sharey=True)
    for ax, pts, name, color in ((axes[0], data, "held-out data", "tab:blue"), (axes[1], samples, "samples", "tab:orange")):
        ax.scatter(pts[:, 0], pts[:, 1] if pts.shape[1] > 1 else np.zeros(len(pts)), s=1, alpha=0.4, color=color)
        ax.set_title(f"{name} ({len(pts)})")
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def density_comparison(path: str | Path, samples: np.ndarray, data: np.ndarray, title: str = "", bins: int = 80) -> None:
    """2-D histograms of data and samples on the same grid (first two coordinates)."""
    xlim, ylim = _limits(samples, data)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.3), sharex=True, sharey=True)
    for ax, pts, name in ((axes[0], data, "held-out data"), (axes[1], samples, "samples")):
        y = pts[:, 1] if pts.shape[1] > 1 else np.zeros(len(pts))
        ax.hist2d(pts[:, 0], y, bins=bins, range=[xlim, ylim], cmap="viridis")
        ax.set_title(name)
        ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def noise_schedule(path: str | Path, sigmas: Sequence[float], step_sizes: Sequence[float], title: str = "") -> None:
    """The noise scales sigma_i and Langevin step sizes alpha_i against the scale index, log scale."""
    fig, ax = plt.subplots(figsize=(6, 4))
    idx = np.arange(1, len(sigmas) + 1)
    ax.semilogy(idx, sigmas, "o-", ms=3, label="sigma_i")
    ax.semilogy(idx, step_sizes, "s-", ms=3, label="alpha_i (Langevin step)")
    ax.set_xlabel("scale i")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def process_schedule(path: str | Path, t: Sequence[float], mean_coef: Sequence[float], std: Sequence[float],
                     title: str = "", xlabel: str = "t") -> None:
    """A forward process's marginal x_t = mean_coef(t) x0 + std(t) z against time."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, mean_coef, lw=1.5, label="mean_coef(t)")
    ax.plot(t, std, lw=1.5, label="std(t)")
    if max(std) > 2:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def loss_curve(path: str | Path, steps: Sequence[int], losses: Sequence[float], title: str = "") -> None:
    """Training loss against step (log scale when positive)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, lw=1)
    if len(losses) and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def metric_bars(path: str | Path, metrics: Mapping[str, float], floors: Mapping[str, Optional[float]]) -> None:
    """Each metric next to its floor."""
    names = list(metrics)
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 3.5))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [metrics[n] for n in names], 0.4, label="model")
    ax.bar(x + 0.2, [floors.get(n) or 0.0 for n in names], 0.4, label="floor (true vs true)")
    ax.set_xticks(x, names)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
