"""Point-cloud metrics: chamfer distance (CS492 convention) and exact W1 (EMD), with floors.

Definitions are docs/design.md, "Metrics, defined once": `cd` is the squared-Euclidean chamfer
distance summed over both directions, computed on clouds of 100 points and averaged;
`emd` is the exact 1-Wasserstein distance with uniform weights and Euclidean cost.
Each is reported next to its floor, the same metric between two independent samples
of the true distribution.
"""

from __future__ import annotations

import warnings

import numpy as np

# Bound the (rows, M, D) difference block of the nearest-neighbour search to ~32 MB.
_BLOCK_ELEMENTS = 4_000_000
# POT's network-simplex return code for an optimal solution (ot.lp.emd_wrap.check_result).
_OT_OPTIMAL = 1


def _as_points(x: np.ndarray, name: str) -> np.ndarray:
    """(N, D) float64 view of `x`, or ValueError naming the argument."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {x.shape}")
    return x


def _check_same_dim(x: np.ndarray, y: np.ndarray) -> None:
    """ValueError unless both clouds live in the same dimension D."""
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"point dimensions differ: {x.shape[1]} vs {y.shape[1]}")


def _nearest_sq_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,) squared Euclidean distance from each row of x (N, D) to its nearest row of y (M, D).

    Differences are formed explicitly (not |x|²+|y|²-2x·y) so a point's distance to
    itself is exactly 0; rows are processed in blocks to bound memory.
    """
    rows = max(1, _BLOCK_ELEMENTS // (y.shape[0] * y.shape[1]))
    out = np.empty(x.shape[0], dtype=np.float64)
    for start in range(0, x.shape[0], rows):
        diff = x[start : start + rows, None, :] - y[None, :, :]
        out[start : start + rows] = np.einsum("nmd,nmd->nm", diff, diff).min(axis=1)
    return out


def chamfer_distance(x: np.ndarray, y: np.ndarray) -> float:
    """CD of x (N, D) and y (M, D): mean_x min_y ‖x−y‖² + mean_y min_x ‖x−y‖² (CS492 convention)."""
    x, y = _as_points(x, "x"), _as_points(y, "y")
    _check_same_dim(x, y)
    return float(_nearest_sq_dist(x, y).mean() + _nearest_sq_dist(y, x).mean())


def chamfer_clouds(gen: np.ndarray, ref: np.ndarray, cloud_size: int = 100) -> float:
    """Mean CD over paired clouds: gen, ref (N, D) -> N // cloud_size clouds of cloud_size points.

    docs/design.md, "Metrics, defined once", `cd`: 10,000 generated vs 10,000 held-out points give 100 clouds of 100.
    Points are grouped in order; a remainder of N mod cloud_size points is dropped.
    """
    gen, ref = _as_points(gen, "gen"), _as_points(ref, "ref")
    _check_same_dim(gen, ref)
    if gen.shape[0] != ref.shape[0]:
        raise ValueError(
            f"chamfer_clouds needs equal sizes, got {gen.shape[0]} and {ref.shape[0]} points"
        )
    if cloud_size < 1 or gen.shape[0] < cloud_size:
        raise ValueError(
            f"need at least cloud_size = {cloud_size} (>= 1) points, got {gen.shape[0]}"
        )
    k = gen.shape[0] // cloud_size
    gen_clouds = gen[: k * cloud_size].reshape(k, cloud_size, -1)
    ref_clouds = ref[: k * cloud_size].reshape(k, cloud_size, -1)
    return float(np.mean([chamfer_distance(g, r) for g, r in zip(gen_clouds, ref_clouds)]))


def earth_movers_distance(x: np.ndarray, y: np.ndarray, num_itermax: int = 10_000_000) -> float:
    """Exact W1 between x (N, D) and y (M, D), uniform weights, Euclidean cost (POT ot.emd2).

    Raises RuntimeError unless the network simplex reports an optimal solution
    (e.g. when it stops at `num_itermax` iterations).
    """
    import ot  # here, not at the top: POT imports scikit-learn and pandas, 2 s that image runs never need

    x, y = _as_points(x, "x"), _as_points(y, "y")
    _check_same_dim(x, y)
    a = np.full(x.shape[0], 1.0 / x.shape[0])
    b = np.full(y.shape[0], 1.0 / y.shape[0])
    cost = ot.dist(x, y, metric="euclidean")
    # POT only warns on failure; we turn its status into an error below instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        value, log = ot.emd2(a, b, cost, numItermax=int(num_itermax), log=True)
    if log["result_code"] != _OT_OPTIMAL:
        raise RuntimeError(
            f"EMD solver did not reach optimality (code {log['result_code']}: "
            f"{log['warning']}); num_itermax was {num_itermax}"
        )
    return float(value)


def pointcloud_metrics(
    gen: np.ndarray,
    test: np.ndarray,
    reference: np.ndarray,
    *,
    cloud_size: int = 100,
    emd_n: int | None = None,
) -> dict[str, float]:
    """{"cd", "cd_floor", "emd", "emd_floor"} for gen vs test, floors from reference vs test.

    All three arrays are (N, D). EMD uses the first `emd_n` points of each when given
    (exact W1 is super-quadratic in N).
    """
    if emd_n is not None and emd_n < 1:
        raise ValueError(f"emd_n must be a positive integer or None, got {emd_n}")
    sl = slice(None) if emd_n is None else slice(0, emd_n)
    return {
        "cd": chamfer_clouds(gen, test, cloud_size),
        "cd_floor": chamfer_clouds(reference, test, cloud_size),
        "emd": earth_movers_distance(gen[sl], test[sl]),
        "emd_floor": earth_movers_distance(reference[sl], test[sl]),
    }
