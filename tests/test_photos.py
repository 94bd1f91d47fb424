"""data.name: photos (pipeline/data/photos.py): crops of scikit-learn's two sample photographs, offline, with no
pixel of a held-out crop in any training crop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config
from pipeline.data.images import _to_gray, default_split_sizes, load_image_data, split_image_data
from pipeline.data.photos import (CLASSES, CROP, CROPS_PER_PHOTO, REGIONS, crop_positions, load_photos, photo_crops,
                                  region_mask)
from pipeline.errors import DataError

SPLITS = ("train", "test", "reference")


@pytest.fixture(scope="module")
def photos():
    return load_photos()


@pytest.fixture(scope="module")
def crops():
    return photo_crops(0, None)


@pytest.fixture(scope="module")
def data():
    return load_image_data("photos", seed=0)


def test_default_splits_are_rgb_uint8_with_both_classes(data):
    assert data.classes == ["china", "flower"] == list(CLASSES) and data.shape == (3, 16, 16)
    sizes = default_split_sizes("photos", data)
    assert sizes == (4000, 500, 500)
    splits = split_image_data(data, *sizes, seed=0)
    for k, n in zip(SPLITS, sizes):
        x, y = splits[k].x, splits[k].y
        assert x.dtype == np.uint8 and x.shape == (n, 3, 16, 16), k
        assert y.dtype == np.int64 and set(y.tolist()) == {0, 1}, k
    assert np.bincount(splits["train"].y).tolist() == [2000, 2000]
    assert "load_sample_images" in data.source and "box" in data.source and "4x5 grid" in data.source


def test_the_same_params_give_the_same_bytes(data):
    again = load_image_data("photos", seed=0)
    for pool in ("train", "test"):
        a, b = getattr(data, pool), getattr(again, pool)
        assert a.x.tobytes() == b.x.tobytes() and a.y.tobytes() == b.y.tobytes()
    assert again.source == data.source


def test_the_loader_hands_over_the_crops_of_the_reported_boxes(data, crops, photos):
    assert data.train.x.tobytes() == crops["train"].x.tobytes()
    assert data.test.x.tobytes() == crops["held_out"].x.tobytes()
    for region in REGIONS:
        c = crops[region]
        assert c.boxes.shape == (len(c.x), 4) and len(c.x) == len(photos) * CROPS_PER_PHOTO[region]
        assert ((c.boxes[:, 2] - c.boxes[:, 0]) == CROP).all() and ((c.boxes[:, 3] - c.boxes[:, 1]) == CROP).all()
        for i in (0, len(c.x) - 1):  # one crop of each photo
            t, l, b, r = c.boxes[i]
            want = Image.fromarray(photos[c.y[i]][t:b, l:r]).resize((16, 16), Image.Resampling.BOX)
            assert np.array_equal(c.x[i], np.asarray(want).transpose(2, 0, 1))


def test_no_held_out_pixel_is_in_a_training_crop(crops, photos):
    for k, photo in enumerate(photos):
        h, w = photo.shape[:2]
        masks = {r: region_mask(h, w, r) for r in REGIONS}
        assert not (masks["train"] & masks["held_out"]).any() and (masks["train"] | masks["held_out"]).all()
        covered = {}
        for region in REGIONS:
            boxes = crops[region].boxes[crops[region].y == k]
            assert len(np.unique(boxes, axis=0)) == len(boxes)  # drawn without replacement
            covered[region] = np.zeros((h, w), bool)
            for t, l, b, r in boxes:
                assert masks[region][t:b, l:r].all(), (region, (t, l, b, r))
                covered[region][t:b, l:r] = True
        assert not (covered["train"] & covered["held_out"]).any()
        # Both regions spread over the whole photo: every quarter of rows and of columns holds crops of each.
        for region in REGIONS:
            assert all(covered[region][i * h // 4:(i + 1) * h // 4].any() for i in range(4)), region
            assert all(covered[region][:, j * w // 4:(j + 1) * w // 4].any() for j in range(4)), region


def test_crop_positions_are_exactly_the_squares_inside_a_region(photos):
    h, w = photos[0].shape[:2]
    for region in REGIONS:
        # pixels of the region in every CROP x CROP window, from the summed-area table
        s = np.pad(region_mask(h, w, region).astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        count = s[CROP:, CROP:] - s[:-CROP, CROP:] - s[CROP:, :-CROP] + s[:-CROP, :-CROP]
        want = {(int(t), int(l)) for t, l in zip(*np.nonzero(count == CROP * CROP))}
        assert {tuple(p) for p in crop_positions(h, w, region).tolist()} == want and len(want) > 20_000


def test_another_seed_draws_other_crops(crops):
    other = photo_crops(1, None)
    for region in REGIONS:
        assert not np.array_equal(crops[region].boxes, other[region].boxes)
        assert crops[region].x.tobytes() != other[region].x.tobytes()
        assert np.array_equal(crops[region].y, other[region].y)


@pytest.mark.parametrize("size", [32, 64])
def test_other_image_sizes(size, crops):
    d = load_image_data("photos", seed=0, image_size=size)
    assert d.shape == (3, size, size) and d.train.x.shape == (4000, 3, size, size) and f"{size}x{size}" in d.source
    if size == CROP:  # the crops as cut, and the same boxes whatever the size
        photo = load_photos()[int(crops["train"].y[0])]
        t, l, b, r = crops["train"].boxes[0]
        assert np.array_equal(d.train.x[0], photo[t:b, l:r].transpose(2, 0, 1)) and "not resized" in d.source


def test_an_image_size_above_the_crop_side_is_refused():
    with pytest.raises(DataError, match=r"data\.image_size = 65: .*at most 64"):
        load_image_data("photos", seed=0, image_size=65)
    with pytest.raises(config.ConfigError, match=r"data\.image_size: 128 .*at most 64"):
        config.validate({"data": {"name": "photos", "image_size": 128}})
    cfg = config.validate({"data": {"name": "photos", "image_size": 64, "channels": 1}})
    assert cfg.data.kind == "images"


def test_one_channel_is_the_luma_of_the_colour_crops(data):
    gray = load_image_data("photos", seed=0, channels=1)
    assert gray.shape == (1, 16, 16) and gray.train.x.dtype == np.uint8
    assert np.array_equal(gray.train.x, _to_gray(data.train.x)) and np.array_equal(gray.test.x, _to_gray(data.test.x))
    assert np.array_equal(gray.train.y, data.train.y) and "grayscale" in gray.source
    assert np.array_equal(load_image_data("photos", seed=0, channels=3).train.x, data.train.x)


def test_the_prepare_stage_on_photos(tmp_path, monkeypatch):
    from stages.common import run_named
    from test_stages import TINY, _deep_merge, _write_params

    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    sizes = {"n_train": 40, "n_test": 10, "n_reference": 10}
    _write_params(tmp_path / "params.yaml", _deep_merge(TINY, {"data": {"name": "photos", **sizes}}))
    assert run_named("prepare", ["--params", "params.yaml"]) == 0
    record = json.loads(Path("data/record.json").read_text())
    assert record["kind"] == "images" and record["name"] == "photos" and record["shape"] == [3, 16, 16]
    assert record["classes"] == ["china", "flower"] and record["duplicates"]["train_test"] == 0
    for split in SPLITS:
        x, y = np.load(f"data/{split}.npy"), np.load(f"data/{split}_labels.npy")
        assert x.dtype == np.uint8 and x.shape == (sizes[f"n_{split}"], 3, 16, 16) and set(y.tolist()) <= {0, 1}
