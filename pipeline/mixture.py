"""Checks of Gaussian-mixture parameters in float64 NumPy, without torch: params validation (config.py) runs them
in every stage, and importing torch there would cost a stage that needs no torch (report, ema) two seconds."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def as_cov(c: Sequence, dim: int) -> np.ndarray:
    """A covariance (D, D) from a length-D diagonal or a DxD matrix, checked symmetric positive definite."""
    t = np.asarray(c, dtype=np.float64)
    if not np.isfinite(t).all():
        raise ValueError(f"a covariance must hold finite numbers, got {t.tolist()}")
    if t.ndim == 1:
        if t.shape[0] != dim:
            raise ValueError(f"a diagonal covariance needs {dim} entries, got {t.shape[0]}")
        if (t <= 0).any():
            raise ValueError(f"diagonal covariance entries must be > 0, got {t.tolist()}")
        return np.diag(t)
    if t.shape != (dim, dim):
        raise ValueError(f"a covariance must be a list of {dim} numbers or a {dim}x{dim} matrix, got shape {tuple(t.shape)}")
    if not np.allclose(t, t.T):
        raise ValueError("a covariance matrix must be symmetric")
    if np.linalg.eigvalsh(t).min() <= 0:
        raise ValueError("a covariance matrix must be positive definite")
    return t


def mixture_arrays(weights: Sequence[float], means: Sequence[Sequence[float]],
                   covs: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (weights (K,) normalised, means (K, D), covs (K, D, D)); ValueError naming what is wrong."""
    w = np.asarray(weights, dtype=np.float64)
    mu = np.asarray(means, dtype=np.float64)
    if w.ndim != 1 or mu.ndim != 2 or mu.shape[0] != w.shape[0]:
        raise ValueError(f"need K weights and K means of equal dimension, got {len(weights)} weights and means of shape {tuple(mu.shape)}")
    if len(covs) != w.shape[0]:
        raise ValueError(f"need one covariance per component ({w.shape[0]}), got {len(covs)}")
    if not (np.isfinite(w).all() and np.isfinite(mu).all()):
        raise ValueError(f"weights and means must be finite numbers, got {w.tolist()} and {mu.tolist()}")
    if (w <= 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
        raise ValueError(f"weights must be > 0 and sum to 1, got {w.tolist()}")
    cov = np.stack([as_cov(c, mu.shape[1]) for c in covs])
    return w / w.sum(), mu, cov
