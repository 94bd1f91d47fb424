"""Toy point-cloud data: 2-D generators, a known Gaussian mixture, and user files.

Every generator takes an explicit integer seed; the same seed gives the same bytes.
`prepare_splits` is what the prepare stage calls: it returns train / test / reference
arrays, where `reference` is an independent held-out sample of the true distribution
used only for the metric floors (docs/design.md, "Metrics, defined once").
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import DataError  # noqa: F401  (re-exported: pipeline.data.DataError)
from pipeline.names import POINT_SETS

if TYPE_CHECKING:  # only for annotations: the mixture is built by the caller
    from pipeline.gmm import GaussianMixture

DATASETS = (*POINT_SETS, "file")
GENERATIVE = DATASETS[:-1]
FILE_EXTENSIONS = (".npy", ".csv")


def _scalar_standardize(x: np.ndarray, scale: float = 2.0) -> np.ndarray:
    """(N, D) -> (N, D): (x - mean) / std * scale with ONE mean and std over all entries.

    The CS492 swiss-roll recipe standardises with scalars, not per column; the CD anchor
    0.1975 depends on it, and we use the same rule for every sklearn set.
    """
    return (x - x.mean()) / x.std() * scale


def swissroll(n: int, seed: int, noise: float = 0.0) -> np.ndarray:
    """(n, 2) swiss roll: the CS492 assignment recipe (noise=0.0 reproduces it bit for bit)."""
    import sklearn.datasets  # here, not at the top: it costs every stage a second to import

    x, _ = sklearn.datasets.make_swiss_roll(n, noise=noise, hole=True, random_state=seed)
    return _scalar_standardize(x[:, [0, 2]])


def moons(n: int, seed: int, noise: float = 0.0) -> np.ndarray:
    """(n, 2) two moons: sklearn make_moons, scalar-standardised to std 2 like the swiss roll."""
    return moons_labelled(n, seed, noise)[0]


def moons_labelled(n: int, seed: int, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """moons and each point's moon (n,) int64: 0 the upper (outer) one, 1 the lower (sklearn's y)."""
    import sklearn.datasets

    x, y = sklearn.datasets.make_moons(n, noise=noise, random_state=seed)
    return _scalar_standardize(x), y.astype(np.int64)


def checkerboard(n: int, seed: int) -> np.ndarray:
    """(n, 2) uniform on the 8 dark squares (side 2) of a 4x4 board on [-4, 4]^2.

    The distribution of FFJORD's "checkerboard" toy (Grathwohl et al. 2019): cell (i, j),
    i, j in {-2, -1, 0, 1}, is filled when i + j is even.
    """
    rng = np.random.default_rng(seed)
    col = rng.integers(-2, 2, size=n)
    # Same parity as the column: one of the two filled rows of each pair of rows.
    row = 2 * rng.integers(-1, 1, size=n) + (col % 2)
    u = rng.random((n, 2))
    return 2.0 * (np.stack([col, row], axis=1) + u)


def eight_gaussians(n: int, seed: int) -> np.ndarray:
    """(n, 2) mixture of 8 equal Gaussians on a circle, FFJORD's definition.

    Centres: scale 4 times the unit vectors (±1, 0), (0, ±1), (±1/√2, ±1/√2); each point
    is centre + 0.5·z, then everything is divided by 1.414 (FFJORD's literal constant),
    so the radius is ≈ 2.83 and the per-component std ≈ 0.354.
    """
    return eight_gaussians_labelled(n, seed)[0]


# The class names of the labelled 2-D sets, in label order (8gaussians: the compass point of each centre).
TOY_CLASSES = {"moons": ["upper", "lower"], "8gaussians": ["E", "W", "N", "S", "NE", "SE", "NW", "SW"]}


def eight_gaussians_labelled(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8gaussians and each point's centre (n,) int64, in the order of TOY_CLASSES["8gaussians"]."""
    rng = np.random.default_rng(seed)
    h = 1.0 / math.sqrt(2.0)
    centers = 4.0 * np.array(
        [(1, 0), (-1, 0), (0, 1), (0, -1), (h, h), (h, -h), (-h, h), (-h, -h)], dtype=np.float64
    )
    k = rng.integers(0, 8, size=n)
    z = rng.standard_normal((n, 2))
    return (centers[k] + 0.5 * z) / 1.414, k.astype(np.int64)


def sample_toy(
    name: str,
    n: int,
    seed: int,
    *,
    noise: float = 0.0,
    gmm: GaussianMixture | None = None,
) -> np.ndarray:
    """(n, D) float64 sample of generative set `name` (any of DATASETS except "file").

    `noise` is passed to the sklearn sets (swissroll, moons) and ignored by the others.
    """
    if name == "swissroll":
        x = swissroll(n, seed, noise)
    elif name == "moons":
        x = moons(n, seed, noise)
    elif name == "checkerboard":
        x = checkerboard(n, seed)
    elif name == "8gaussians":
        x = eight_gaussians(n, seed)
    elif name == "gmm":
        if gmm is None:
            raise DataError("data.name is 'gmm' but no mixture was given (data.gmm)")
        import torch  # here: the other sets are numpy's, and prepare then starts without torch (~1.5 s)

        x = gmm.sample(n, torch.Generator().manual_seed(seed)).numpy()
    elif name == "file":
        raise DataError("data.name 'file' is not a generator: use load_file / prepare_splits")
    else:
        raise DataError(f"data.name must be one of {DATASETS}, got {name!r}")
    return np.ascontiguousarray(x, dtype=np.float64)


def _bad(path: Path, what: str) -> DataError:
    """A DataError naming the params key, the file and the problem."""
    return DataError(f"data.path = {str(path)!r}: {what}")


def _is_float(field: str) -> bool:
    """True if `field` parses as a Python float."""
    try:
        float(field)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> np.ndarray:
    """(N, D) float64 from a comma-separated numeric file with an optional header row."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    # A first row with no numeric field is a header of column names.
    if rows and not any(_is_float(c) for c in rows[0]):
        rows = rows[1:]
    if not rows:
        raise _bad(path, "the CSV file has no data rows")
    width = len(rows[0])
    values = []
    for i, row in enumerate(rows):
        if len(row) != width:
            raise _bad(path, f"CSV data row {i + 1} has {len(row)} columns, expected {width}")
        try:
            values.append([float(c) for c in row])
        except ValueError:
            bad = next(c for c in row if not _is_float(c))
            raise _bad(path, f"non-numeric value {bad!r} in CSV data row {i + 1}") from None
    return np.asarray(values, dtype=np.float64)


def _read_npy(path: Path) -> np.ndarray:
    """The array stored in an .npy file (no pickles), checked to be real-numeric."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise _bad(path, f"not a readable numeric .npy file ({err})") from None
    if not isinstance(arr, np.ndarray):
        raise _bad(path, "not a single .npy array")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise _bad(path, f"array dtype {arr.dtype} is not an integer or real float type")
    return arr.astype(np.float64)


def load_file(path: str | os.PathLike) -> np.ndarray:
    """(N, D) float64 points from a .npy or .csv file, validated (N >= 2, D >= 1, finite)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_EXTENSIONS:
        raise _bad(path, f"unsupported extension {path.suffix!r}; allowed are .npy and .csv")
    if not path.is_file():
        raise _bad(path, "file does not exist")
    x = _read_npy(path) if suffix == ".npy" else _read_csv(path)
    if x.ndim != 2:
        raise _bad(path, f"expected a 2-D array (N, D), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise _bad(path, f"the array is empty (shape {x.shape})")
    if x.shape[0] < 2:
        raise _bad(path, f"need at least 2 rows (points), got shape {x.shape}")
    n_bad = int(np.count_nonzero(~np.isfinite(x)))
    if n_bad:
        raise _bad(path, f"{n_bad} entries are NaN or infinite")
    return np.ascontiguousarray(x)


def toy_label_splits(name: str, *, n_train: int, n_test: int, n_reference: int, seed: int, noise: float = 0.0,
                     gmm: GaussianMixture | None = None) -> tuple[dict[str, np.ndarray], list[str]] | None:
    """The class labels of prepare_splits' points, split the same way, and the class names; None for the sets
    without classes (swissroll, checkerboard, file). moons: its moon; 8gaussians: its centre; gmm: its component.

    The sample is drawn again with the same seed (a few milliseconds for 2-D sets), so the points themselves keep
    their bits whether or not anyone asks for labels."""
    total = _check_counts(n_train, n_test, n_reference)
    if name == "moons":
        y, classes = moons_labelled(total, seed, noise)[1], TOY_CLASSES["moons"]
    elif name == "8gaussians":
        y, classes = eight_gaussians_labelled(total, seed)[1], TOY_CLASSES["8gaussians"]
    elif name == "gmm" and gmm is not None:
        import torch

        y = gmm.sample_labelled(total, torch.Generator().manual_seed(seed))[1].numpy().astype(np.int64)
        classes = [f"component {k}" for k in range(gmm.weights.shape[0])]
    else:
        return None
    a, b = n_train, n_train + n_test
    return {"train": y[:a], "test": y[a:b], "reference": y[b:total]}, classes


def _check_counts(n_train: int, n_test: int, n_reference: int) -> int:
    """Validate the split sizes; return their total."""
    for key, v in (("n_train", n_train), ("n_test", n_test), ("n_reference", n_reference)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise DataError(f"data.{key} must be a non-negative integer, got {v!r}")
    if n_train < 1:
        raise DataError(f"data.n_train must be at least 1, got {n_train}")
    return int(n_train + n_test + n_reference)


def prepare_splits(
    name: str,
    *,
    n_train: int,
    n_test: int,
    n_reference: int,
    seed: int,
    noise: float = 0.0,
    gmm: GaussianMixture | None = None,
    path: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """{"train": (n_train, D), "test": (n_test, D), "reference": (n_reference, D)} float64.

    Generative sets: ONE sample of n_train + n_test + n_reference points (so the scalar
    standardisation is shared), split in order, train first. "file": the rows shuffled
    with `seed`, then split in the same order.
    """
    total = _check_counts(n_train, n_test, n_reference)
    if name == "file":
        if path is None:
            raise DataError("data.path must be set when data.name is 'file'")
        data = load_file(path)
        if data.shape[0] < total:
            raise _bad(
                Path(path),
                f"the file has {data.shape[0]} rows but n_train + n_test + n_reference = "
                f"{n_train} + {n_test} + {n_reference} = {total} are needed",
            )
        x = data[np.random.default_rng(seed).permutation(data.shape[0])[:total]]
    else:
        x = sample_toy(name, total, seed, noise=noise, gmm=gmm)
    a, b = n_train, n_train + n_test
    return {
        "train": np.ascontiguousarray(x[:a]),
        "test": np.ascontiguousarray(x[a:b]),
        "reference": np.ascontiguousarray(x[b:total]),
    }
