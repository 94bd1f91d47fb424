"""Small colour images that need no network: random square crops of scikit-learn's two sample photographs.

photo_crops(seed, image_size) returns {"train": PhotoCrops, "held_out": PhotoCrops}; each holds x, uint8
(N, 3, S, S) RGB crops resized to S = image_size (default PHOTOS_IMAGE_SIZE = 16); y, int64 (N,) labels, the photo
each crop came from (0 china, 1 flower); and boxes, int64 (N, 4) (top, left, bottom, right) of each crop in its
photo's (427, 640) pixels. Train crops lie in one region of each photo and held-out crops in the rest, so no pixel
of a held-out crop is in any training crop (region_mask).

Geometry. Each photo is cut into a GRID (4 rows x 5 columns) of tiles of about 107 x 128 pixels; tile (i, j) belongs
to the train region when i + j is even, to the held-out region otherwise (a checkerboard). Tiles of one region touch
only at corners, so a CROP x CROP square (64 px, under a tile's side) lies inside one region exactly when it lies
inside one of its tiles; crop_positions lists those squares. A checkerboard, not a band of columns, because the
held-out region must look like the train region: the flower photo's right 30 % is dark background only.

Randomness: the boxes of (region r, photo k) are drawn without replacement by np.random.default_rng([seed, r, k]),
so one seed gives byte-identical arrays, and no two crops of one region share a box.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.defaults import PHOTOS_CROP, PHOTOS_IMAGE_SIZE
from pipeline.errors import DataError

# sklearn.datasets.load_sample_images's files, in label order; the class names are their stems.
PHOTOS = ("china.jpg", "flower.jpg")
CLASSES = tuple(Path(f).stem for f in PHOTOS)
CROP = PHOTOS_CROP
# Tiles per photo: rows, columns.
GRID = (4, 5)
REGIONS = ("train", "held_out")
# Crops drawn per photo: 2 x 2,000 train crops, 2 x 500 held-out ones (test and reference, data.n_test and
# data.n_reference: auto take half each). A region of one photo has about 28,500 crop positions.
CROPS_PER_PHOTO = {"train": 2_000, "held_out": 500}


@dataclass(frozen=True, eq=False)
class PhotoCrops:
    """Crops of one region: x uint8 (N, 3, S, S), y int64 (N,) the photo's index, boxes int64 (N, 4)
    (top, left, bottom, right) in the photo, bottom and right exclusive."""

    x: np.ndarray
    y: np.ndarray
    boxes: np.ndarray


def load_photos() -> list[np.ndarray]:
    """The photographs of PHOTOS as uint8 (H, W, 3) RGB arrays, in label order (sklearn's load_sample_images)."""
    import sklearn.datasets  # here: it costs every stage a second to import

    bunch = sklearn.datasets.load_sample_images()
    by_name = {Path(f).name: np.asarray(img, np.uint8) for f, img in zip(bunch.filenames, bunch.images)}
    return [by_name[f] for f in PHOTOS]


def tile_edges(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(row edges (GRID[0] + 1,), column edges (GRID[1] + 1,)): tile (i, j) is rows[i]:rows[i + 1],
    cols[j]:cols[j + 1]."""
    rows = np.rint(np.linspace(0, height, GRID[0] + 1)).astype(np.int64)
    cols = np.rint(np.linspace(0, width, GRID[1] + 1)).astype(np.int64)
    return rows, cols


def tile_region(i: int, j: int) -> str:
    """The region of tile (i, j): "train" when i + j is even, else "held_out"."""
    return REGIONS[(i + j) % 2]


def region_mask(height: int, width: int, region: str) -> np.ndarray:
    """bool (height, width): True at the pixels of `region` ("train" or "held_out")."""
    rows, cols = tile_edges(height, width)
    mask = np.zeros((height, width), bool)
    for i in range(GRID[0]):
        for j in range(GRID[1]):
            if tile_region(i, j) == region:
                mask[rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = True
    return mask


def crop_positions(height: int, width: int, region: str) -> np.ndarray:
    """int64 (P, 2): (top, left) of every CROP x CROP square inside one tile of `region`, tile by tile."""
    rows, cols = tile_edges(height, width)
    found = []
    for i in range(GRID[0]):
        for j in range(GRID[1]):
            if tile_region(i, j) != region:
                continue
            tops = np.arange(rows[i], rows[i + 1] - CROP + 1)
            lefts = np.arange(cols[j], cols[j + 1] - CROP + 1)
            t, l = np.meshgrid(tops, lefts, indexing="ij")
            found.append(np.stack([t.ravel(), l.ravel()], axis=1))
    return np.concatenate(found).astype(np.int64)


def draw_boxes(height: int, width: int, region: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """int64 (n, 4) boxes (top, left, bottom, right) of n distinct crop positions of `region`, drawn by rng."""
    positions = crop_positions(height, width, region)
    top_left = positions[rng.choice(len(positions), size=n, replace=False)]
    return np.concatenate([top_left, top_left + CROP], axis=1)


def _crop(photo: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """uint8 (3, size, size): the box of photo, resized with PIL's box filter (the mean over each output pixel's
    footprint) unless size is CROP."""
    from PIL import Image

    top, left, bottom, right = (int(v) for v in box)
    a = photo[top:bottom, left:right]
    if size != CROP:
        a = np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BOX))
    return a.transpose(2, 0, 1)


def check_image_size(image_size: int | None) -> int:
    """The side S of the crops: image_size, or PHOTOS_IMAGE_SIZE for None; more than CROP is refused."""
    size = PHOTOS_IMAGE_SIZE if image_size is None else int(image_size)
    if size > CROP:
        raise DataError(
            f"data.image_size = {size}: data.name photos resizes {CROP}x{CROP} crops of its photographs, so "
            f"data.image_size must be at most {CROP} (null: {PHOTOS_IMAGE_SIZE})"
        )
    return size


def photo_crops(seed: int, image_size: int | None) -> dict[str, PhotoCrops]:
    """{"train", "held_out"}: CROPS_PER_PHOTO[region] crops of each photo in its region, resized to image_size.

    seed (the params' top-level seed) seeds one generator per region and photo, np.random.default_rng([seed, r, k]).
    """
    size = check_image_size(image_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer for data.name photos, got {seed!r}")
    photos = load_photos()
    out = {}
    for r, region in enumerate(REGIONS):
        xs, ys, all_boxes = [], [], []
        for k, photo in enumerate(photos):
            rng = np.random.default_rng([int(seed), r, k])
            n = CROPS_PER_PHOTO[region]
            boxes = draw_boxes(photo.shape[0], photo.shape[1], region, n, rng)
            xs.append(np.stack([_crop(photo, b, size) for b in boxes]))
            ys.append(np.full(n, k, np.int64))
            all_boxes.append(boxes)
        out[region] = PhotoCrops(np.concatenate(xs), np.concatenate(ys), np.concatenate(all_boxes))
    return out


def photos_source(seed: int, image_size: int | None) -> str:
    """The data record's sentence on where the crops come from (no final full stop)."""
    size = check_image_size(image_size)
    n_train, n_held = (len(PHOTOS) * CROPS_PER_PHOTO[r] for r in REGIONS)
    resized = f"resized to {size}x{size} with PIL's box (area-averaging) filter" if size != CROP else "not resized"
    return (
        f"scikit-learn load_sample_images ({', '.join(PHOTOS)}: 427x640 RGB JPEG photographs, CC BY 2.0; class = "
        f"the photo): {n_train} train + {n_held} held-out random {CROP}x{CROP} crops, drawn with seed {seed}, "
        f"train crops inside the tiles (i + j even) of a {GRID[0]}x{GRID[1]} grid of each photo and held-out crops "
        f"inside the other tiles, so no held-out pixel is in a training crop; {resized}"
    )
