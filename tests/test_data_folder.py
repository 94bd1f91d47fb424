"""Tests for reading a user's folder of pictures (pipeline.data.images._load_folder, and prepare_data): links,
copies across splits, empty classes, transparency and CMYK, small pictures, memory. Tiny PNGs in tmp_path."""

from __future__ import annotations

import os
import weakref

import numpy as np
import pytest
from PIL import Image

import pipeline.data.images as images
from pipeline.data.images import load_image_data
from pipeline.data.prepare import prepare_data
from pipeline.data.toy2d import DataError

AUTO = dict(n_train="auto", n_test="auto", n_reference="auto", seed=0)


def save_png(path, arr: np.ndarray, mode: str | None = None) -> None:
    """A PNG from an (H, W) or (H, W, C) uint8 array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


def distinct(tmp, classes=("a", "b"), n=6, size=(5, 5), seed=0):
    """n distinct grayscale PNGs in each class subfolder of tmp; pixel (0, 0) numbers them."""
    rng = np.random.default_rng(seed)
    k = 0
    for c in classes:
        for i in range(n):
            a = rng.integers(0, 256, size, dtype=np.uint8)
            a[0, 0] = k
            save_png(tmp / c / f"{i}.png", a)
            k += 1


def as_bytes(x: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in x}


# ---------------------------------------------------------------- 1. links


def test_link_loop_and_links_out_of_the_folder_are_skipped(tmp_path, capsys):
    root = tmp_path / "data"
    distinct(root)  # 12 pictures
    os.symlink("..", root / "a" / "up")  # the loop that once turned 12 pictures into 492
    outside = tmp_path / "outside"
    save_png(outside / "o.png", np.full((5, 5), 9, np.uint8))
    os.symlink(outside, root / "b" / "elsewhere")
    os.symlink(outside / "o.png", root / "b" / "o.png")
    p = prepare_data("folder", path=str(root), **AUTO)
    assert p.record["n_train"] + p.record["n_test"] + p.record["n_reference"] == 12
    assert p.record["skipped_links"] == 3
    assert not as_bytes(p.x["test"]) & as_bytes(p.x["train"])
    assert not as_bytes(p.x["reference"]) & as_bytes(p.x["train"])
    err = capsys.readouterr().err
    assert "skipped 3 symbolic link(s)" in err and "a loop" in err and "out of the folder" in err


def test_links_inside_the_folder_are_still_read(tmp_path):
    # A link to a picture elsewhere in data.path is the user's choice: read, and a copy for the record.
    root = tmp_path / "data"
    distinct(root)
    os.symlink(root / "a" / "0.png", root / "b" / "x.png")
    d = load_image_data("folder", path=str(root))
    assert len(d.train) == 13 and d.notes["skipped_links"] == 0


# ---------------------------------------------------------------- 2. copies across splits


def test_duplicates_across_splits_are_counted(tmp_path):
    root = tmp_path / "data"
    distinct(root, classes=("a",), n=20)
    for i in range(10):  # a user's folder often holds the same picture twice
        (root / "a" / f"copy{i}.png").write_bytes((root / "a" / f"{i}.png").read_bytes())
    p = prepare_data("folder", path=str(root), **AUTO)
    train, test, ref = (as_bytes(p.x[k]) for k in ("train", "test", "reference"))
    want = {
        "train_test": sum(img.tobytes() in train for img in p.x["test"]),
        "train_reference": sum(img.tobytes() in train for img in p.x["reference"]),
        "test_reference": sum(img.tobytes() in test for img in p.x["reference"]),
    }
    assert p.record["duplicates"] == want and sum(want.values()) > 0


def test_train_and_test_subfolders_with_the_same_files_are_refused(tmp_path):
    root = tmp_path / "data"
    distinct(root, classes=("train",), n=10)
    (root / "test").mkdir()
    for f in (root / "train").iterdir():
        (root / "test" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match=f"data.path = '{root}'.*appears at least twice") as err:
        prepare_data("folder", path=str(root), **AUTO)
    assert "not splits" in str(err.value)


def test_test_split_all_copies_of_training_images_is_refused(tmp_path):
    x = np.zeros((10, 1, 4, 4), np.uint8)
    x[9] += 1  # one image differs; the test image (seed 0) is one of the nine copies
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"data.path = .*x\.npy.*every one of the 1 test images"):
        prepare_data("file", path=str(tmp_path / "x.npy"), n_train=8, n_test=1, n_reference=1, seed=0)


# ---------------------------------------------------------------- 3. empty class subfolder


def test_empty_class_subfolder_is_refused(tmp_path):
    root = tmp_path / "data"
    distinct(root, classes=("ant", "cat"), n=2)
    (root / "bee").mkdir()
    (root / "bee" / "notes.txt").write_text("no pictures yet")
    with pytest.raises(DataError, match=f"data.path = '{root}'.*bee/.*hold no images"):
        load_image_data("folder", path=str(root))


# ---------------------------------------------------------------- 4. transparency and CMYK


def test_transparency_composited_over_white_and_cmyk_recorded(tmp_path):
    root = tmp_path / "data" / "x"
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[0, 2, 3] = 0, 255, 128  # the rest stays transparent black
    rgba[1:, :, 3] = 255
    save_png(root / "1rgba.png", rgba, "RGBA")
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0], la[..., 1] = 40, 255
    la[0, 0, 1] = 0
    save_png(root / "2la.png", la, "LA")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(root / "3p.png", transparency=0)
    cmyk = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4, 4), dtype=np.uint8), "CMYK")
    cmyk.save(root / "4cmyk.tif")
    (root / "4cmyk.tif").rename(root / "4cmyk.webp")  # any listed extension: PIL reads the content
    want_cmyk = np.asarray(Image.open(root / "4cmyk.webp").convert("RGB")).transpose(2, 0, 1)
    d = load_image_data("folder", path=str(tmp_path / "data"))
    x = d.train.x
    assert x[0, :, 0, 0].tolist() == [255, 255, 255]  # transparent: white, not the black it hid
    assert x[0, :, 0, 1].tolist() == [200, 100, 0]  # opaque: kept
    want = [round(c * 128 / 255 + 255 * (1 - 128 / 255)) for c in (200, 100, 0)]
    assert np.abs(x[0, :, 0, 2].astype(int) - want).max() <= 1
    assert x[1, :, 0, 0].tolist() == [255] * 3 and x[1, :, 1, 1].tolist() == [40] * 3
    assert x[2, :, 0, 0].tolist() == [255] * 3 and x[2, :, 1, 1].tolist() == [10, 20, 30]
    assert np.array_equal(x[3], want_cmyk)
    assert d.notes["converted"] == {"CMYK": 1, "LA": 1, "P+transparency": 1, "RGBA": 1}
    assert "composited over opaque white" in d.source and "CMYK (1) by PIL's convert('RGB')" in d.source
    p = prepare_data("folder", path=str(tmp_path / "data"), n_train=2, n_test=1, n_reference=1, seed=0)
    assert p.record["converted"] == d.notes["converted"]


# ---------------------------------------------------------------- 5. pictures smaller than data.image_size


def test_small_pictures_refused_unless_upscale(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    save_png(root / "a" / "big.png", rng.integers(0, 256, (12, 10), dtype=np.uint8))
    save_png(root / "a" / "small.png", rng.integers(0, 256, (12, 5), dtype=np.uint8))  # 5 wide
    save_png(root / "b" / "tiny.png", rng.integers(0, 256, (3, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"data.image_size = 8: .*small\.png.* 5x12.*data.upscale: true"):
        prepare_data("folder", path=str(root), image_size=8, n_train=1, n_test=1, n_reference=1, seed=0)
    d = load_image_data("folder", path=str(root), image_size=8, upscale=True)
    assert d.train.x.shape == (3, 1, 8, 8) and "enlarged" in d.source
    p = prepare_data("folder", path=str(root), image_size=8, upscale=True, n_train=1, n_test=1, n_reference=1,
                     seed=0)
    assert p.x["train"].shape[1:] == (1, 8, 8)
    assert load_image_data("folder", path=str(root), image_size=3).train.x.shape == (3, 1, 3, 3)
    with pytest.raises(DataError, match="data.upscale"):
        load_image_data("folder", path=str(root), image_size=3, upscale="yes")


# ---------------------------------------------------------------- 8. large photos, one at a time


def test_photos_resized_one_at_a_time_with_a_progress_bar(tmp_path, monkeypatch, capsys):
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(5):
        save_png(root / f"{i}.png", rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    opened, most_alive = [], []
    real_open = images._open_image

    def tracked(p):
        most_alive.append(sum(r() is not None for r in opened))
        img = real_open(p)
        opened.append(weakref.ref(img))
        return img

    monkeypatch.setattr(images, "_open_image", tracked)
    monkeypatch.setattr(images, "PROGRESS_MIN_FILES", 3, raising=False)
    d = load_image_data("folder", path=str(root), image_size=16)
    assert d.train.x.shape == (5, 3, 16, 16) and len(opened) == 5
    assert max(most_alive) == 0  # each photo freed before the next is decoded
    assert "reading images" in capsys.readouterr().err
