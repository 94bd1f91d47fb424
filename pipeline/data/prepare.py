"""The prepare stage's library call: any data set -> train / test / reference splits, labels and the data record.

Two kinds (docs/design.md, "Images, devices, several GPUs"): points, float arrays (N, D); images, uint8
arrays (N, C, H, W) with integer labels. The record says which, once, and every later stage reads
it instead of guessing from a shape.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from pipeline.data.images import (IMAGE_DATASETS, ImageData, check_held_out, default_split_sizes, load_image_data,
                                  load_uint8_file, split_duplicates, split_image_data)
from pipeline.data.toy2d import DataError, prepare_splits, toy_label_splits
from pipeline.defaults import POINT_SIZES

if TYPE_CHECKING:
    from pipeline.gmm import GaussianMixture

SPLITS = ("train", "test", "reference")
NO_LABEL = -1  # the label of every point of a 2-D set without classes (swissroll, checkerboard, file)


@dataclass(frozen=True)
class Prepared:
    """x[split] (float32 points or uint8 images), y[split] int64 labels, and the data record (JSON)."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    record: dict


def _is_image_file(path: Optional[str]) -> bool:
    """A data.name: file is images when its .npy array has 3 or more dimensions: points are (N, D), so a float or
    3-D array is a failed image file, and the image loader's message (uint8 (N, C, H, W)) is the one that helps."""
    if path is None or Path(path).suffix.lower() != ".npy":
        return False
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return False  # let the point loader give its error
    return isinstance(arr, np.ndarray) and arr.ndim >= 3


def _size(value, auto: int) -> int:
    return auto if value == "auto" else int(value)


def _images(data: ImageData, name: str, n_train, n_test, n_reference, seed: int, path: Optional[str]) -> Prepared:
    auto = default_split_sizes(name, data)
    sizes = [_size(v, a) for v, a in zip((n_train, n_test, n_reference), auto)]
    splits = split_image_data(data, *sizes, seed=seed)
    # Copies across splits are common in users' folders: counted always, refused when the test split is all copies.
    duplicates = split_duplicates(splits)
    where = f"data.path = {str(path)!r}" if path is not None else f"data.name = {name!r}"
    check_held_out(data, splits, duplicates, where)
    if duplicates["train_test"] or duplicates["train_reference"]:
        print(f"{where}: {duplicates['train_test']} of {len(splits['test'])} test and {duplicates['train_reference']} "
              f"of {len(splits['reference'])} reference images are byte for byte training images (the data record's "
              "'duplicates')", file=sys.stderr)
    record = {"kind": "images", "name": name, "shape": list(data.shape), "num_classes": data.num_classes,
              "classes": list(data.classes), "source": data.source, "pixels": "uint8 (N, C, H, W), 0..255",
              **{f"n_{k}": int(len(splits[k].x)) for k in SPLITS}, "duplicates": duplicates, **data.notes}
    return Prepared({k: splits[k].x for k in SPLITS}, {k: splits[k].y.astype(np.int64) for k in SPLITS}, record)


def prepare_data(name: str, *, n_train, n_test, n_reference, seed: int, noise: float = 0.0,
                 gmm: "GaussianMixture | None" = None, path: Optional[str] = None, labels_path: Optional[str] = None,
                 download: bool = False, image_size: Optional[int] = None, channels=None,
                 upscale: bool = False) -> Prepared:
    """Load or draw data set `name` and split it; 'auto' sizes resolve per data set (pipeline.defaults and
    pipeline.data.images.default_split_sizes). Points are float32 (N, D); their labels are the classes of moons,
    8gaussians and gmm (pipeline.data.toy2d.toy_label_splits), NO_LABEL for the sets without classes.

    Images are uint8 (N, C, H, W); their record adds "duplicates" (images of one split byte for byte in another,
    pipeline.data.images.split_duplicates) and, for a folder, "skipped_links" and "converted". upscale (data.upscale):
    a folder's or file's images smaller than image_size are enlarged instead of refused."""
    channels = None if channels == "auto" else channels
    if name in IMAGE_DATASETS:
        data = load_image_data(name, path=path, download=download, image_size=image_size, channels=channels,
                               seed=seed, upscale=upscale)
        return _images(data, name, n_train, n_test, n_reference, seed, path)
    if name == "file" and _is_image_file(path):
        data = load_uint8_file(path, labels_path, image_size=image_size, channels=channels, upscale=upscale)
        return _images(data, name, n_train, n_test, n_reference, seed, path)
    if labels_path is not None:
        raise DataError("data.labels_path is for a uint8 image array (N, C, H, W); points carry no labels")
    sizes = {k: _size(v, POINT_SIZES) for k, v in zip(SPLITS, (n_train, n_test, n_reference))}
    splits = prepare_splits(name, n_train=sizes["train"], n_test=sizes["test"], n_reference=sizes["reference"],
                            seed=seed, noise=noise, gmm=gmm, path=path)
    x = {k: splits[k].astype("float32") for k in SPLITS}
    labelled = toy_label_splits(name, n_train=sizes["train"], n_test=sizes["test"], n_reference=sizes["reference"],
                                seed=seed, noise=noise, gmm=gmm)
    y, classes = labelled if labelled is not None else ({k: np.full(len(x[k]), NO_LABEL) for k in SPLITS}, [])
    record = {"kind": "points", "name": name, "shape": list(x["train"].shape[1:]), "num_classes": len(classes),
              "classes": classes, **{f"n_{k}": int(len(x[k])) for k in SPLITS}}
    return Prepared(x, {k: y[k].astype(np.int64) for k in SPLITS}, record)


# data.target of a Schrödinger bridge besides the 2-D sets and a file: the standard normal N(0, I) of the source's
# dimension.
GAUSSIAN_TARGET = "gaussian"


def target_seed(seed: int) -> int:
    """The seed of the target's draw: another stream than the source's, so that a set bridged to itself (swissroll
    to swissroll) is drawn twice independently."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])


def prepare_target(name: str, *, dim: int, n_train, n_test, n_reference, seed: int, noise: float = 0.0,
                   gmm: "GaussianMixture | None" = None, path: Optional[str] = None,
                   source: Optional[dict] = None) -> dict[str, np.ndarray]:
    """The target of a Schrödinger bridge (method.name: schrodinger_bridge): {split: float32 (n, dim)} in the sizes
    of the source's splits ('auto' as for points), a 2-D set, GAUSSIAN_TARGET or a file of points, drawn with
    target_seed(seed). source: the source's data record; a bridge joins point sets, so images are refused."""
    if source is not None and source["kind"] != "points":
        raise DataError(f"data.target joins two point sets; data.name: {source['name']} holds images")
    sizes = {k: _size(v, POINT_SIZES) for k, v in zip(SPLITS, (n_train, n_test, n_reference))}
    if name == GAUSSIAN_TARGET:
        x = np.random.default_rng(target_seed(seed)).standard_normal((sum(sizes.values()), dim))
        bounds = np.cumsum([0] + [sizes[k] for k in SPLITS])
        splits = {k: x[bounds[i]:bounds[i + 1]] for i, k in enumerate(SPLITS)}
    else:
        splits = prepare_splits(name, n_train=sizes["train"], n_test=sizes["test"], n_reference=sizes["reference"],
                                seed=target_seed(seed), noise=noise, gmm=gmm, path=path)
    if splits["train"].shape[1:] != (dim,):
        raise DataError(f"data.target ({name}) holds points of shape {list(splits['train'].shape[1:])}, but the "
                        f"source data.name has {dim} coordinates: a bridge joins two sets of the same dimension")
    return {k: np.ascontiguousarray(splits[k], dtype=np.float32) for k in SPLITS}
