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


def _tile(images: np.ndarray, nrow: int, pad: int = 1) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 (H', W', C) mosaic, nrow images a row (torchvision.utils.make_grid)."""
    import torch
    from torchvision.utils import make_grid

    grid = make_grid(torch.from_numpy(np.ascontiguousarray(images)), nrow=nrow, padding=pad, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def _show(ax, mosaic: np.ndarray) -> None:
    if mosaic.shape[2] == 1:
        ax.imshow(mosaic[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def image_grid(path: str | Path, images: np.ndarray, title: str = "", nrow: int = 8) -> None:
    """A grid of uint8 images (N, C, H, W), nrow a row; make_grid replicates 1-channel images to RGB."""
    mosaic = _tile(images, nrow)
    fig, ax = plt.subplots(figsize=(6, 6 * mosaic.shape[0] / mosaic.shape[1] + 0.4))
    _show(ax, mosaic)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def image_trajectory(path: str | Path, frames: Sequence[tuple[float, np.ndarray]], title: str = "") -> None:
    """The sampling trajectory of a few images: column j is x at time t_j (uint8 (K, C, H, W) each), row i one sample."""
    k = len(frames[0][1])
    stacked = np.stack([f for _, f in frames], axis=1).reshape(-1, *frames[0][1].shape[1:])  # row-major: sample, time
    mosaic = _tile(stacked, nrow=len(frames))
    fig, ax = plt.subplots(figsize=(1.1 * len(frames) + 0.5, 1.1 * k + 0.8))
    _show(ax, mosaic)
    step = mosaic.shape[1] / len(frames)
    ax.set_xticks([step * (j + 0.5) for j in range(len(frames))], [f"{t:.3g}" for t, _ in frames], fontsize=7)
    ax.set_xlabel("t (sampling runs left to right)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def point_trajectory(path: str | Path, frames: Sequence[tuple[float, np.ndarray]], title: str = "") -> None:
    """Points (K, D) at each recorded time, one panel per time (first two coordinates)."""
    fig, axes = plt.subplots(1, len(frames), figsize=(2.2 * len(frames), 2.5), squeeze=False)
    for ax, (t, pts) in zip(axes[0], frames):
        y = pts[:, 1] if pts.shape[1] > 1 else np.zeros(len(pts))
        ax.scatter(pts[:, 0], y, s=2, alpha=0.5)
        ax.set_title(f"t = {t:.3g}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def nearest_neighbours(path: str | Path, samples: np.ndarray, neighbours: np.ndarray, title: str = "") -> None:
    """Memorisation check: row i is sample i (uint8 (K, C, H, W)) then its nearest training images (K, M, C, H, W)."""
    rows = np.concatenate([samples[:, None], neighbours], axis=1)
    mosaic = _tile(rows.reshape(-1, *samples.shape[1:]), nrow=rows.shape[1])
    fig, ax = plt.subplots(figsize=(1.0 * rows.shape[1] + 0.5, 1.0 * rows.shape[0] + 0.8))
    _show(ax, mosaic)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def class_histogram(path: str | Path, fractions: Sequence[float], reference: Sequence[float], classes: Sequence[str],
                    title: str = "") -> None:
    """The classifier's class frequencies of the samples next to those of held-out data."""
    x = np.arange(len(fractions))
    fig, ax = plt.subplots(figsize=(0.6 * len(x) + 2.5, 3.2))
    ax.bar(x - 0.2, fractions, 0.4, label="samples")
    ax.bar(x + 0.2, reference, 0.4, label="held-out data")
    ax.set_xticks(x, [str(c)[:10] for c in classes], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("fraction")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def nearest_points(path: str | Path, samples: np.ndarray, neighbours: np.ndarray, train: np.ndarray,
                   title: str = "") -> None:
    """Samples (K, D) and their nearest training points (K, M, D) over the training cloud (first two coordinates)."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    y = lambda a: a[:, 1] if a.shape[1] > 1 else np.zeros(len(a))  # noqa: E731
    flat = neighbours.reshape(-1, neighbours.shape[-1])
    ax.scatter(train[:, 0], y(train), s=1, alpha=0.15, color="grey")
    ax.scatter(flat[:, 0], y(flat), s=6, color="tab:blue")
    ax.scatter(samples[:, 0], y(samples), s=14, color="tab:orange")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- controllable generation (sample.task)


def image_columns(path: str | Path, columns: Sequence[tuple[str, np.ndarray]], title: str = "") -> None:
    """Side by side: column j is a labelled stack of uint8 images (K, C, H, W), row i the same item in every column
    (inpainting: original, input, each method; editing: input, each t0; interpolation: one frame a column)."""
    k = len(columns[0][1])
    if any(len(images) != k for _, images in columns):
        raise ValueError("every column needs the same number of images")
    stacked = np.stack([images for _, images in columns], axis=1).reshape(-1, *columns[0][1].shape[1:])
    mosaic = _tile(stacked, nrow=len(columns))
    fig, ax = plt.subplots(figsize=(1.0 * len(columns) + 0.8, 1.0 * k + 0.9))
    _show(ax, mosaic)
    step = mosaic.shape[1] / len(columns)
    ax.set_xticks([step * (j + 0.5) for j in range(len(columns))], [name for name, _ in columns], fontsize=7,
                  rotation=30, ha="right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def point_panels(path: str | Path, panels: Sequence[tuple[str, np.ndarray]], data: np.ndarray, title: str = "") -> None:
    """One panel per labelled point set (N, D) over the held-out cloud `data` (first two coordinates), shared limits."""
    (x0, x1), (y0, y1) = _limits(data, *[p for _, p in panels])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2), squeeze=False)
    for ax, (name, pts) in zip(axes[0], panels):
        ax.scatter(data[:, 0], data[:, 1], s=1, alpha=0.15, color="grey")
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color="tab:orange")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def point_paths(path: str | Path, paths: np.ndarray, data: np.ndarray, title: str = "") -> None:
    """Interpolation paths (P, K, D) of points, each a line from its first (circle) to its last frame (square), over
    the held-out cloud `data` (first two coordinates)."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(data[:, 0], data[:, 1], s=1, alpha=0.15, color="grey")
    for p in paths:
        line, = ax.plot(p[:, 0], p[:, 1], "-", marker=".", markersize=4, linewidth=1)
        ax.plot(p[0, 0], p[0, 1], "o", color=line.get_color())
        ax.plot(p[-1, 0], p[-1, 1], "s", color=line.get_color())
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def bridge_paths(path: str | Path, paths: np.ndarray, start: np.ndarray, end: np.ndarray, title: str = "") -> None:
    """A bridge's walks (P, K, D), each a thin line from its start (circle) to its end (square), over the held-out
    clouds of the end it starts from (blue) and of the end it reaches (orange); first two coordinates."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(start[:, 0], start[:, 1], s=1, alpha=0.15, color="tab:blue", label="start (held out)")
    ax.scatter(end[:, 0], end[:, 1], s=1, alpha=0.15, color="tab:orange", label="end (held out)")
    for p in paths:
        ax.plot(p[:, 0], p[:, 1], "-", color="black", linewidth=0.5, alpha=0.6)
        ax.plot(p[0, 0], p[0, 1], "o", color="tab:blue", markersize=3)
        ax.plot(p[-1, 0], p[-1, 1], "s", color="tab:orange", markersize=3)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7, markerscale=6)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def metric_curves(path: str | Path, x: Sequence[float], curves: Mapping[str, Sequence[float]], xlabel: str,
                  title: str = "") -> None:
    """One panel per named curve y(x) (e.g. the distance from the input and the FID against SDEdit's t0)."""
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.2), squeeze=False)
    for ax, (name, y) in zip(axes[0], curves.items()):
        ax.plot(x, y, "o-")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def pit_histograms(path: str | Path, pits: Mapping[str, np.ndarray], ks: Mapping[str, float], title: str = "",
                   bins: int = 20) -> None:
    """Histograms of probability-integral transforms F(x_u | x_K) in [0, 1], one panel per method: flat (the dashed
    line) for an exact conditional sampler; `ks` is each one's Kolmogorov-Smirnov statistic."""
    fig, axes = plt.subplots(1, len(pits), figsize=(3.0 * len(pits), 2.8), squeeze=False)
    for ax, (name, u) in zip(axes[0], pits.items()):
        ax.hist(u, bins=bins, range=(0, 1), density=True, alpha=0.7)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{name}: KS {ks[name]:.3f}", fontsize=8)
        ax.set_xlabel("F(x_u | x_K)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def guidance_tradeoff(path: str | Path, weights: Sequence[float], fids: Sequence[float], accuracies: Sequence[float],
                      title: str = "", fid_name: str = "FID") -> None:
    """FID against the classifier's accuracy on guided samples, one point per guidance weight w (labelled)."""
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    ax.plot(accuracies, fids, "o-")
    for w, a, f in zip(weights, accuracies, fids):
        ax.annotate(f"w={w:g}", (a, f), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("cond_accuracy (classifier on guided samples)")
    ax.set_ylabel(fid_name)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
