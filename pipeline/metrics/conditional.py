"""Metrics of class-conditional samples under classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598).

Guidance trades sample quality for fidelity to the requested class: `cond_accuracy` measures the fidelity
(how often a classifier gives a sample the class it was generated for), `per_class_fid` the quality class by
class, each FID next to its floor at the same N (docs/design.md, "Metrics, defined once"; FID is biased upwards at
small N and only comparable at equal N, Heusel et al. 2017). The classifier is the domain classifier for
images (pipeline.metrics.domain.predict), a k-nearest-neighbour classifier for the labelled 2-D sets (moons,
8gaussians) and the mixture's own Bayes classifier for `gmm` data. `guidance_table` lays the metrics out
over the guidance weights w.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from pipeline.gmm import GaussianMixture
from pipeline.metrics.fid import fid_by_svd

# The columns of `guidance_table`, in order (the metric keys of sample_metrics plus the two above).
GUIDANCE_COLUMNS = ("w", "cond_accuracy", "fid", "fid_domain", "kid", "fid_class_mean")
MISSING = "—"


def _labels(y: np.ndarray, name: str) -> np.ndarray:
    """y as a 1-D int64 array, or ValueError naming the argument."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array (N,), got {y.dtype} {y.shape}")
    return y.astype(np.int64)


def cond_accuracy(predicted: np.ndarray, requested: np.ndarray) -> float:
    """Fraction of samples whose predicted class equals the class they were generated for; both (N,) ints, N >= 1.

    The class-fidelity half of guidance's trade-off (Ho & Salimans 2022, sec. 4: guidance raises it at the
    cost of diversity)."""
    predicted, requested = _labels(predicted, "predicted"), _labels(requested, "requested")
    if predicted.shape != requested.shape:
        raise ValueError(f"{predicted.shape[0]} predictions for {requested.shape[0]} requested classes")
    if predicted.size == 0:
        raise ValueError("cond_accuracy needs at least one sample")
    return float(np.mean(predicted == requested))


def _labelled_features(feats: np.ndarray, labels: np.ndarray, num_classes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float64 features and their (N,) labels in [0, num_classes), checked against each other."""
    feats = np.asarray(feats, dtype=np.float64)
    labels = _labels(labels, f"{name}_labels")
    if feats.ndim != 2:
        raise ValueError(f"{name}_feats must be (N, D), got shape {feats.shape}")
    if labels.shape[0] != feats.shape[0]:
        raise ValueError(f"{labels.shape[0]} {name}_labels for {feats.shape[0]} {name}_feats")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name}_labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return feats, labels


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def per_class_fid(sample_feats: np.ndarray, sample_labels: np.ndarray, test_feats: np.ndarray,
                  test_labels: np.ndarray, reference_feats: np.ndarray | None = None,
                  reference_labels: np.ndarray | None = None, *, num_classes: int,
                  min_n: int = 2) -> dict[str, list | float | None]:
    """FID of each class's samples against the test features of that class, at equal N, with its floor.

    Features (N, D), (M, D), (R, D) with labels (N,), (M,), (R,) in [0, num_classes); sample labels are the
    classes the samples were generated for. Class k uses n_k = min(#samples of k, #test of k): the first n_k
    rows of each side (Heusel et al. 2017's FID is biased by N, so both sides are equal in size). Its floor is
    the FID of the first rows of the reference of class k against the same n_k test rows, n capped by
    #reference of k (`fid_per_class_floor_n`). A class with fewer than `min_n` rows (>= 2: a covariance needs
    two points) gets None. Returns fid_per_class, fid_per_class_floor (None everywhere without a reference),
    fid_per_class_n, fid_per_class_floor_n (lists of num_classes), fid_class_mean and fid_class_mean_floor
    (means over the classes with a value; None when none has one).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if min_n < 2:
        raise ValueError(f"min_n must be >= 2 (a covariance needs two points), got {min_n}")
    if (reference_feats is None) != (reference_labels is None):
        raise ValueError("reference_feats and reference_labels must be given together")
    sample_feats, sample_labels = _labelled_features(sample_feats, sample_labels, num_classes, "sample")
    test_feats, test_labels = _labelled_features(test_feats, test_labels, num_classes, "test")
    if sample_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"feature dimensions differ: samples {sample_feats.shape[1]}, test {test_feats.shape[1]}")
    has_reference = reference_feats is not None
    if has_reference:
        reference_feats, reference_labels = _labelled_features(reference_feats, reference_labels, num_classes,
                                                               "reference")
        if reference_feats.shape[1] != test_feats.shape[1]:
            raise ValueError(f"feature dimensions differ: reference {reference_feats.shape[1]}, "
                             f"test {test_feats.shape[1]}")

    fids, floors, ns, floor_ns = [], [], [], []
    for k in range(num_classes):
        samples_k, test_k = sample_feats[sample_labels == k], test_feats[test_labels == k]
        n = min(len(samples_k), len(test_k))
        ns.append(int(n))
        fids.append(fid_by_svd(samples_k[:n], test_k[:n]) if n >= min_n else None)
        if not has_reference:
            floors.append(None)
            floor_ns.append(0)
            continue
        reference_k = reference_feats[reference_labels == k]
        n_floor = min(n, len(reference_k))
        floor_ns.append(int(n_floor))
        floors.append(fid_by_svd(reference_k[:n_floor], test_k[:n_floor]) if n_floor >= min_n else None)
    return {"fid_per_class": fids, "fid_per_class_floor": floors, "fid_per_class_n": ns,
            "fid_per_class_floor_n": floor_ns, "fid_class_mean": _mean(fids), "fid_class_mean_floor": _mean(floors)}


def _points(x: np.ndarray, name: str) -> np.ndarray:
    """x as an (N, D) float64 array, or ValueError naming the argument."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be an (N, D) array, got shape {x.shape}")
    return x


def point_class_predictions(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, k: int = 15) -> np.ndarray:
    """Predicted classes (N,) int64 of points x (N, D) by a k-nearest-neighbour classifier of the labelled
    training points train_x (M, D), train_y (M,) (Euclidean distance, majority vote; sklearn's
    KNeighborsClassifier). For the labelled 2-D sets (moons, 8gaussians), whose classes have no closed-form
    posterior."""
    from sklearn.neighbors import KNeighborsClassifier  # here: importing sklearn costs every caller a second

    train_x, x = _points(train_x, "train_x"), _points(x, "x")
    train_y = _labels(train_y, "train_y")
    if train_y.shape[0] != train_x.shape[0]:
        raise ValueError(f"{train_y.shape[0]} train_y for {train_x.shape[0]} train_x")
    if x.shape[1] != train_x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} coordinates, train_x {train_x.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= train_x.shape[0]:
        raise ValueError(f"k must be an integer in [1, {train_x.shape[0]}] (the training points), got {k!r}")
    if x.shape[0] == 0:
        return np.empty((0,), dtype=np.int64)
    knn = KNeighborsClassifier(n_neighbors=int(k)).fit(train_x, train_y)
    return knn.predict(x).astype(np.int64)


def mixture_class_predictions(mixture: GaussianMixture, x: np.ndarray) -> np.ndarray:
    """Predicted components (N,) int64 of points x (N, D): argmax_k r_k(x) of the mixture's exact
    responsibilities, the Bayes classifier (the least error possible) when the classes are its components
    (`gmm` data, pipeline.data.toy2d.toy_label_splits)."""
    x = _points(x, "x")
    if x.shape[1] != mixture.dim:
        raise ValueError(f"the mixture has dimension {mixture.dim}, x has {x.shape[1]} coordinates")
    if x.shape[0] == 0:
        return np.empty((0,), dtype=np.int64)
    resp = mixture.responsibilities(torch.from_numpy(np.ascontiguousarray(x)))
    return resp.argmax(dim=1).numpy().astype(np.int64)


def _cell(value) -> str:
    """A table cell: 4 significant digits, MISSING for an absent, None or non-finite value."""
    if value is None or isinstance(value, bool):
        return MISSING
    try:
        v = float(value)
    except (TypeError, ValueError):
        return MISSING
    return f"{v:.4g}" if math.isfinite(v) else MISSING


def guidance_table(rows: Sequence[Mapping]) -> str:
    """A Markdown table of the metrics over guidance weights w (Ho & Salimans 2022, eq. (6)), one row per dict.

    Columns GUIDANCE_COLUMNS; rows sorted by w; a missing, None or non-finite value shows as "—". Every row
    needs a finite "w"."""
    if not rows:
        raise ValueError("guidance_table needs at least one row")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or _cell(row.get("w")) == MISSING:
            raise ValueError(f"row {i} has no finite guidance weight 'w': {row!r}")
    ordered = sorted(rows, key=lambda row: float(row["w"]))
    lines = ["| " + " | ".join(GUIDANCE_COLUMNS) + " |",
             "|" + "|".join("---:" for _ in GUIDANCE_COLUMNS) + "|"]
    for row in ordered:
        cells = [f"{float(row['w']):g}"] + [_cell(row.get(c)) for c in GUIDANCE_COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
