"""Fidelity, diversity and copying of generated items, each next to its floor: precision, recall, density and
coverage of feature sets (prdc), FID's bootstrap interval, and the memorised fraction.

Definitions: docs/design.md, "Metrics, defined once". The floors are the same numbers for the reference split
against the test split at the same N: what a model that draws fresh items from the data distribution would get.
"""

from __future__ import annotations

import contextlib
import io
from typing import Union

import numpy as np
import torch

# Nearest neighbours that set each real item's ball in precision, recall, density and coverage (Naeem et al. 2020
# use k = 5 throughout, their sec. 4; Kynkäänniemi et al. 2019 use 3).
PRDC_K = 5
# Bootstrap resamples of FID's interval (each an N x N eigenvalue problem: ~1 s at N = 2,000 on the 2-core CPU), and
# its level.
FID_BOOTSTRAP, FID_LEVEL = 50, 0.95
# A sample counts as memorised when it is closer to a training item than all but this fraction of held-out items.
MEMORISED_QUANTILE = 0.01


def prdc(real: np.ndarray, fake: np.ndarray, k: int = PRDC_K) -> dict[str, float]:
    """Precision and recall (Kynkäänniemi et al. 2019, eqs. 1-3: the k-NN balls of each set as its manifold),
    density and coverage (Naeem et al. 2020, eqs. 3-4) of fake features (M, D) against real ones (N, D), by
    `prdc.compute_prdc` (the authors' implementation)."""
    from prdc import compute_prdc

    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} need more than {k} items each side, got {len(real)} "
                         f"and {len(fake)}")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the two counts
        found = compute_prdc(np.asarray(real, np.float32), np.asarray(fake, np.float32), k)
    return {name: float(value) for name, value in found.items()}


def prdc_metrics(real: np.ndarray, fake: np.ndarray, suffix: str = "") -> dict[str, float]:
    """prdc of fake against real under the names the metrics record uses: precision{suffix}, recall{suffix}, ..."""
    return {f"{name}{suffix}": value for name, value in prdc(real, fake).items()}


def expected_coverage(n: int, m: int, k: int = PRDC_K) -> float:
    """Expected coverage of M fake items drawn from the same distribution as the N real ones (Naeem et al. 2020,
    Lemma 2): 1 - prod_{i=1..k} (N - i) / (N + M - i), the chance that a real item's k nearest among the N - 1 other
    real and the M fake items are not all real."""
    i = np.arange(1, k + 1)
    return float(1.0 - np.prod((n - i) / (n + m - i)))


def nearest_distances(items: np.ndarray, train: np.ndarray, device: Union[str, torch.device] = "cpu",
                      block: int = 2048) -> np.ndarray:
    """Euclidean distance (n,) from each item (n, *D) to its nearest training item (N, *D), over all coordinates
    (pixels as stored for images), in blocks of the training set; float64 for float data, float32 for uint8."""
    dtype = torch.float64 if np.issubdtype(items.dtype, np.floating) else torch.float32
    x = torch.as_tensor(items.reshape(len(items), -1), dtype=dtype, device=device)
    best = torch.full((len(x),), float("inf"), dtype=dtype, device=device)
    for start in range(0, len(train), block):
        t = torch.as_tensor(train[start:start + block].reshape(-1, x.shape[1]), dtype=dtype, device=device)
        best = torch.minimum(best, torch.cdist(x, t).min(1).values)
    return best.cpu().numpy().astype(np.float64)


def memorisation(samples: np.ndarray, test: np.ndarray, reference: np.ndarray, train: np.ndarray, quantile: float,
                 device: Union[str, torch.device] = "cpu") -> dict[str, float]:
    """The fraction of samples closer to a training item than the `quantile` of the test items' distances to the
    training set (a held-out item is that close that often), and its floor: the same fraction of the reference
    split, about `quantile` by construction. Many more samples than that so close to training items are copies."""
    threshold = float(np.quantile(nearest_distances(test, train, device), quantile))
    return {"memorised": float(np.mean(nearest_distances(samples, train, device) <= threshold)),
            "memorised_floor": float(np.mean(nearest_distances(reference, train, device) <= threshold)),
            "memorised_quantile": float(quantile), "memorised_distance": threshold}


def fid_bootstrap(sample: np.ndarray, reference: np.ndarray, resamples: int = FID_BOOTSTRAP,
                  level: float = FID_LEVEL, seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval of FID at the N of `sample` (N, D) against fixed reference features (M, D): FID ± z
    times the standard deviation of the FIDs of `resamples` resamples of the sample's rows with replacement (the
    normal bootstrap interval, Efron & Tibshirani 1993, sec. 13.3; not the percentile one, because resampling
    with replacement repeats rows and so shifts every resample's FID up, as a smaller N does).

    It covers the FID at this N (its mean over sample sets) at `level`; the FID of a second independent sample set
    varies as much as this one, so the interval covers that at about 2 Φ(z / √2) - 1 (83 % for 95 %;
    tests/test_fidelity.py measures both). Each resample's FID is exact and cheap: with X the sample rows and Σr
    the reference covariance, Tr((Σr Σs)^½) is the sum of the square roots of the eigenvalues of
    H X_I Σr X_Iᵀ H / (N - 1) (H centres, I the resampled rows), an N x N matrix gathered from G = X Σr Xᵀ
    computed once (fid_by_svd's identity)."""
    from scipy.stats import norm

    x, r = np.asarray(sample, np.float64), np.asarray(reference, np.float64)
    n = len(x)
    if n < 2 or resamples < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 rows and 2 resamples, got {n} and {resamples}")
    mu_r, cov_r = r.mean(0), np.cov(r, rowvar=False)
    gram_r, gram = x @ cov_r @ x.T, x @ x.T

    def fid_of(idx: np.ndarray) -> float:
        return _fid_of_rows(x[idx].mean(0), _centred(gram_r[np.ix_(idx, idx)]), _centred(gram[np.ix_(idx, idx)]),
                            mu_r, cov_r, n)

    rng = np.random.default_rng(seed)
    spread = np.std([fid_of(rng.integers(0, n, n)) for _ in range(resamples)], ddof=1)
    half = float(norm.ppf(0.5 + level / 2.0)) * spread
    point = fid_of(np.arange(n))
    return point - half, point + half


def _centred(g: np.ndarray) -> np.ndarray:
    """H g H with H = I - 11ᵀ/n: the Gram matrix of the centred rows."""
    return g - g.mean(0, keepdims=True) - g.mean(1, keepdims=True) + g.mean()


def _fid_of_rows(mu: np.ndarray, gram_r: np.ndarray, gram: np.ndarray, mu_r: np.ndarray, cov_r: np.ndarray,
                 n: int) -> float:
    """FID of rows whose mean is mu, centred Gram matrices under Σr and the identity given, against (mu_r, cov_r)."""
    eig = np.linalg.eigvalsh((gram_r + gram_r.T) / 2.0)
    # rank <= min(N - 1, D): the rest are rounding, whose square roots would add up
    eig = np.where(eig > eig.max() * len(eig) * np.finfo(float).eps, eig, 0.0)
    cross = np.sqrt(eig).sum() / np.sqrt(n - 1)
    return float(((mu - mu_r) ** 2).sum() + np.trace(cov_r) + np.trace(gram) / (n - 1) - 2.0 * cross)


def fid_over_sets(fids: "list[float]") -> dict:
    """The FIDs of K sample sets of N each (K >= 2), drawn with different seeds against the same reference: their
    mean, their minimum (the number EDM reports, Karras et al. 2022, appendix F.1: the best of three), their
    standard deviation across sets (ddof 1: the spread one set's FID has from seed to seed) and each set's FID."""
    f = np.asarray(fids, np.float64)
    if len(f) < 2:
        raise ValueError(f"a spread over sample sets needs at least 2 sets, got {len(f)}")
    return {"fid_mean": float(f.mean()), "fid_min": float(f.min()), "fid_std": float(f.std(ddof=1)),
            "fid_sets": len(f), "fid_per_set": {str(k): float(v) for k, v in enumerate(f)}}
