"""Tests for pipeline.data.images: every format written in its official layout in tmp_path."""

from __future__ import annotations

import gzip
import pickle
import re
from collections import Counter

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from pipeline.data.images import (
    FASHION_MNIST_DIR,
    IMAGE_DATASETS,
    ImageData,
    ImageSplit,
    _convert,
    default_split_sizes,
    load_image_data,
    load_uint8_file,
    read_idx,
    split_image_data,
)
from pipeline.data.toy2d import DataError

# ---------------------------------------------------------------- writers of the official formats


def write_idx(path, arr: np.ndarray, gz: bool = True, magic: int | None = None) -> None:
    """An idx ubyte file: big-endian magic 0x0000080<ndim>, big-endian int32 dims, the bytes."""
    arr = np.asarray(arr, np.uint8)
    magic = (0x0800 | arr.ndim) if magic is None else magic
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(raw)


def idx_set(directory, n_train=20, n_test=10, seed=0, gz=True):
    """The four MNIST-style idx files in `directory`; returns (train_x, train_y, test_x, test_y)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tx = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    ty = rng.integers(0, 10, n_train).astype(np.uint8)
    vx = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    vx[:, 0, 0] = np.arange(n_test)  # every test image distinct, for disjointness checks
    vy = rng.integers(0, 10, n_test).astype(np.uint8)
    sfx = ".gz" if gz else ""
    write_idx(directory / f"train-images-idx3-ubyte{sfx}", tx, gz)
    write_idx(directory / f"train-labels-idx1-ubyte{sfx}", ty, gz)
    write_idx(directory / f"t10k-images-idx3-ubyte{sfx}", vx, gz)
    write_idx(directory / f"t10k-labels-idx1-ubyte{sfx}", vy, gz)
    return tx, ty, vx, vy


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_set(directory, per_batch=4, n_test=6, bytes_keys=True):
    """cifar-10-batches-py/ under `directory` with tiny batches; returns (train_x flat, train_y)."""
    d = directory / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        if i == 1:
            x[0] = 0
            x[0, 0] = 255  # image 0, pixel (0, 0): pure red (the R plane comes first)
            x[0, 1024 + 1 * 32 + 2] = 200  # pixel (row 1, col 2): green 200
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({key("data"): x, key("labels"): y, key("batch_label"): f"batch {i}"}, f, protocol=2)
        xs.append(x)
        ys += y
    vx = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({key("data"): vx, key("labels"): list(range(n_test))}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({key("label_names"): CIFAR_NAMES, key("num_vis"): 3072}, f)
    return np.concatenate(xs), np.array(ys)


def save_png(path, arr: np.ndarray) -> None:
    """A PNG from an (H, W) or (H, W, 3) uint8 array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def rows(x: np.ndarray) -> Counter:
    """The images of x as a multiset of their bytes."""
    return Counter(img.tobytes() for img in x)


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_image_data("digits", seed=0)


def test_names():
    assert IMAGE_DATASETS == ("digits", "photos", "fashion_mnist", "mnist", "cifar10", "folder")


def test_digits_pixels_labels_and_mapping(digits):
    sk = sklearn.datasets.load_digits()
    assert isinstance(digits, ImageData)
    assert digits.train.x.shape == (1797, 1, 8, 8) and digits.train.x.dtype == np.uint8
    assert len(digits.test) == 0 and digits.shape == (1, 8, 8)
    assert digits.train.x.min() == 0 and digits.train.x.max() == 255
    assert digits.num_classes == 10 and set(digits.train.y.tolist()) == set(range(10))
    assert "round(v * 255 / 16)" in digits.source
    # Explicit values of the mapping: 1 -> 15.94 -> 16, 8 -> 127.5 -> 128, 16 -> 255.
    table = {v: round(v * 255 / 16) for v in range(17)}
    assert (table[1], table[8], table[16]) == (16, 128, 255)
    assert set(np.unique(digits.train.x).tolist()) <= set(table.values())
    # Same images and labels as sklearn's, mapped pixel by pixel, in a shuffled order.
    mapped = np.vectorize(table.get)(sk.images.astype(int)).astype(np.uint8)
    want = Counter((m.tobytes(), int(t)) for m, t in zip(mapped, sk.target))
    got = Counter((x[0].tobytes(), int(t)) for x, t in zip(digits.train.x, digits.train.y))
    assert got == want


def test_digits_default_split(digits):
    sizes = default_split_sizes("digits", digits)
    assert sizes == (1197, 300, 300)
    a = split_image_data(digits, *sizes, seed=0)
    assert [len(a[k]) for k in ("train", "test", "reference")] == [1197, 300, 300]
    # A multiset partition of the pool: disjoint even if two digits happen to look alike.
    assert rows(a["train"].x) + rows(a["test"].x) + rows(a["reference"].x) == rows(digits.train.x)
    b = split_image_data(digits, *sizes, seed=0)
    c = split_image_data(digits, *sizes, seed=1)
    for k in a:
        assert np.array_equal(a[k].x, b[k].x) and np.array_equal(a[k].y, b[k].y)
    assert not np.array_equal(a["test"].x, c["test"].x)
    assert np.array_equal(load_image_data("digits", seed=0).train.x, digits.train.x)


# ---------------------------------------------------------------- idx: Fashion-MNIST and MNIST


def test_read_idx_plain_gz_and_malformed(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "a", arr, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    write_idx(tmp_path / "bad.gz", arr, magic=0x00000903)
    with pytest.raises(DataError, match="magic number 0x00000903"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + b"\x00" * 8 + b"\x00" * 5)
    with pytest.raises(DataError, match="data.path.*bytes"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_tiny_roundtrip(tmp_path):
    tx, ty, vx, vy = idx_set(tmp_path)
    d = load_image_data("fashion_mnist", path=str(tmp_path))
    assert d.shape == (1, 28, 28) and d.num_classes == 10
    assert d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot"
    assert np.array_equal(d.train.x[:, 0], tx) and np.array_equal(d.train.y, ty.astype(np.int64))
    assert np.array_equal(d.test.x[:, 0], vx) and np.array_equal(d.test.y, vy.astype(np.int64))
    assert default_split_sizes("fashion_mnist", d) == (20, 5, 5)
    s = split_image_data(d, 20, 5, 5, seed=3)
    assert rows(s["test"].x) + rows(s["reference"].x) == rows(d.test.x)  # disjoint halves
    assert rows(s["train"].x) == rows(d.train.x)
    with pytest.raises(DataError, match=r"data.n_test \+ data.n_reference = 6 \+ 5 = 11.*only 10"):
        split_image_data(d, 20, 6, 5, seed=3)
    with pytest.raises(DataError, match="data.n_train = 21.*only 20"):
        split_image_data(d, 21, 5, 5, seed=3)


def test_fashion_mnist_refusals(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist") as err:
        load_image_data("fashion_mnist", path=str(tmp_path / "missing"))
    assert "data.path" in str(err.value) and "data.download" in str(err.value)
    idx_set(tmp_path)
    # The magic written little-endian, a common mistake.
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(10, np.uint8), magic=0x01080000)
    with pytest.raises(DataError, match="t10k-labels.*magic number 0x01080000"):
        load_image_data("fashion_mnist", path=str(tmp_path))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((10, 1, 1), np.uint8))
    with pytest.raises(DataError, match="t10k-labels.*expected an idx label file"):
        load_image_data("fashion_mnist", path=str(tmp_path))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="9 labels for 10 images"):
        load_image_data("fashion_mnist", path=str(tmp_path))


def test_fashion_mnist_debian_package():
    # The Makefile installs dataset-fashion-mnist; the default path must hold the real files.
    assert FASHION_MNIST_DIR.is_dir(), "install it: apt-get install dataset-fashion-mnist"
    d = load_image_data("fashion_mnist")
    assert d.train.x.shape == (60000, 1, 28, 28) and d.test.x.shape == (10000, 1, 28, 28)
    assert d.num_classes == 10 and set(np.unique(d.train.y).tolist()) == set(range(10))
    assert np.bincount(d.test.y).tolist() == [1000] * 10  # the official test set is balanced
    assert default_split_sizes("fashion_mnist", d) == (60000, 5000, 5000)


def test_mnist_both_layouts_and_refusal(tmp_path):
    tx, ty, _, _ = idx_set(tmp_path / "flat", seed=5)
    d = load_image_data("mnist", path=str(tmp_path / "flat"))
    assert np.array_equal(d.train.x[:, 0], tx) and np.array_equal(d.train.y, ty)
    assert d.classes == [str(k) for k in range(10)]
    # torchvision's layout <root>/MNIST/raw/, with the extracted (plain) files it leaves there.
    tx2, _, vx2, _ = idx_set(tmp_path / "tv" / "MNIST" / "raw", seed=6, gz=False)
    d2 = load_image_data("mnist", path=str(tmp_path / "tv"))
    assert np.array_equal(d2.train.x[:, 0], tx2) and np.array_equal(d2.test.x[:, 0], vx2)
    with pytest.raises(DataError) as err:
        load_image_data("mnist", path=str(tmp_path / "empty"), download=False)
    assert "data.path" in str(err.value) and "data.download" in str(err.value)


# ---------------------------------------------------------------- CIFAR-10


def test_cifar10_pickles(tmp_path):
    flat, ys = cifar_set(tmp_path)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        d = load_image_data("cifar10", path=str(path))
        assert d.train.x.shape == (20, 3, 32, 32) and d.test.x.shape == (6, 3, 32, 32)
        assert d.classes == CIFAR_NAMES and d.num_classes == 10
        assert d.train.x[0, :, 0, 0].tolist() == [255, 0, 0]  # red stays red: channel order R, G, B
        assert d.train.x[0, :, 1, 2].tolist() == [0, 200, 0]
        assert np.array_equal(d.train.x.reshape(20, -1), flat) and np.array_equal(d.train.y, ys)
        assert d.test.y.tolist() == list(range(6))
    assert default_split_sizes("cifar10", d) == (20, 3, 3)
    g = load_image_data("cifar10", path=str(tmp_path), channels=1, image_size=16)
    assert g.shape == (1, 16, 16) and g.train.x.dtype == np.uint8 and "grayscale" in g.source


def test_cifar10_str_keys_and_refusals(tmp_path):
    cifar_set(tmp_path / "a", bytes_keys=False)
    assert load_image_data("cifar10", path=str(tmp_path / "a")).train.x.shape == (20, 3, 32, 32)
    with pytest.raises(DataError) as err:
        load_image_data("cifar10", path=str(tmp_path / "missing"))
    assert "data.path" in str(err.value) and "data.download" in str(err.value)
    d = tmp_path / "a" / "cifar-10-batches-py"
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, f)
    with pytest.raises(DataError, match=r"data_batch_3.*\(N, 3072\)"):
        load_image_data("cifar10", path=str(tmp_path / "a"))
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing CIFAR-10 file data_batch_3"):
        load_image_data("cifar10", path=str(tmp_path / "a"))
    # A pickle that would run code when loaded is refused, not executed.
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump(Counter(), f)  # any global outside numpy arrays
    with pytest.raises(DataError, match="not allowed"):
        load_image_data("cifar10", path=str(tmp_path / "a"))


# ---------------------------------------------------------------- conversion


def test_convert_gray_matches_pil_and_resizes():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 3, 10, 14), dtype=np.uint8)
    g = _convert(x, None, 1)
    pil = np.stack([np.asarray(Image.fromarray(i.transpose(1, 2, 0)).convert("L")) for i in x])
    assert np.array_equal(g[:, 0], pil)
    assert _convert(g, None, 3).shape == (3, 3, 10, 14)
    assert np.array_equal(_convert(g, None, 3)[:, 2], g[:, 0])
    r = _convert(x, 6, None)
    assert r.shape == (3, 3, 6, 6) and r.dtype == np.uint8
    assert _convert(x, None, None) is not None and np.array_equal(_convert(x, None, None), x)
    with pytest.raises(DataError, match="data.channels"):
        load_image_data("digits", channels=2)
    with pytest.raises(DataError, match="data.image_size"):
        load_image_data("digits", image_size=0)
    with pytest.raises(DataError, match="data.name"):
        load_image_data("imagenet")


# ---------------------------------------------------------------- folders


def test_folder_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {}
    for cls, n in (("zebra", 2), ("ant", 3)):
        for i in range(n):
            a = rng.integers(0, 256, (6, 5), dtype=np.uint8)
            save_png(tmp_path / cls / f"{i}.PNG", a)
            imgs[(cls, i)] = a
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_image_data("folder", path=str(tmp_path))
    assert d.classes == ["ant", "zebra"] and len(d.test) == 0
    assert d.shape == (1, 6, 5)  # all grayscale: one channel
    assert d.train.y.tolist() == [0, 0, 0, 1, 1]  # sorted classes, sorted files
    assert np.array_equal(d.train.x[0, 0], imgs[("ant", 0)])
    assert np.array_equal(d.train.x[4, 0], imgs[("zebra", 1)])
    assert default_split_sizes("folder", d) == (3, 1, 1)
    s = split_image_data(d, 3, 1, 1, seed=0)
    assert rows(s["train"].x) + rows(s["test"].x) + rows(s["reference"].x) == rows(d.train.x)
    with pytest.raises(DataError, match=r"data.n_train \+ data.n_test \+ data.n_reference.*only 5"):
        split_image_data(d, 4, 1, 1, seed=0)


def test_folder_flat_channels_and_sizes(tmp_path):
    flat = tmp_path / "faces"
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    save_png(flat / "a.png", rgb)
    save_png(flat / "b.png", np.full((8, 8), 77, np.uint8))
    d = load_image_data("folder", path=str(flat))
    assert d.classes == ["faces"] and d.train.y.tolist() == [0, 0]
    assert d.shape == (3, 8, 8)  # one colour image makes all RGB
    assert d.train.x[0, :, 0, 0].tolist() == [255, 0, 0] and d.train.x[1, :, 3, 3].tolist() == [77] * 3
    g = load_image_data("folder", path=str(flat), channels=1)
    assert g.shape == (1, 8, 8) and g.train.x[0, 0, 0, 0] == 76  # PIL luma of pure red
    # Mixed sizes: refused without data.image_size, exactly S x S with it.
    save_png(flat / "c.png", np.zeros((12, 20), np.uint8))
    with pytest.raises(DataError, match=r"8x8.*20x12.*data.image_size"):
        load_image_data("folder", path=str(flat))
    r = load_image_data("folder", path=str(flat), image_size=6)
    assert r.train.x.shape == (3, 3, 6, 6) and "6x6" in r.source


def test_folder_refusals(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_data("folder", path=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_data("folder", path=str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    save_png(bad / "ok.png", np.zeros((4, 4), np.uint8))
    (bad / "x.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match=r"x\.png.*unreadable"):
        load_image_data("folder", path=str(bad))
    mixed = tmp_path / "mixed"
    save_png(mixed / "a.png", np.zeros((4, 4), np.uint8))
    save_png(mixed / "cls" / "b.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="both directly"):
        load_image_data("folder", path=str(mixed))
    with pytest.raises(DataError, match="data.path must be set"):
        load_image_data("folder")


# ---------------------------------------------------------------- uint8 files


def test_uint8_file(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (10, 3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    d = load_uint8_file(tmp_path / "x.npy")
    assert np.array_equal(d.train.x, x) and d.classes == ["unlabelled"] and d.train.y.tolist() == [0] * 10
    assert len(d.test) == 0 and d.shape == (3, 4, 4)
    assert default_split_sizes("file", d) == (6, 2, 2)
    np.save(tmp_path / "y.npy", np.arange(10) % 4)
    d = load_uint8_file(tmp_path / "x.npy", tmp_path / "y.npy")
    assert d.num_classes == 4 and d.train.y.dtype == np.int64
    assert d.train.y.tolist() == [0, 1, 2, 3] * 2 + [0, 1]
    assert isinstance(d.train, ImageSplit)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((2, 1, 4, 4), np.float32), "uint8"),
        (np.zeros((2, 4, 4), np.uint8), r"\(N, C, H, W\)"),
        (np.zeros((2, 2, 4, 4), np.uint8), "C = 1 or 3"),
    ],
)
def test_uint8_file_refusals(tmp_path, arr, match):
    np.save(tmp_path / "x.npy", arr)
    with pytest.raises(DataError, match=f"data.path.*{match}"):
        load_uint8_file(tmp_path / "x.npy")


def test_uint8_file_label_mismatch(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 1, 2, 2), np.uint8))
    np.save(tmp_path / "y.npy", np.zeros(4, np.int64))
    with pytest.raises(DataError, match="data.path.*4 labels for 5 images"):
        load_uint8_file(tmp_path / "x.npy", tmp_path / "y.npy")
    with pytest.raises(DataError, match="data.path.*does not exist"):
        load_uint8_file(tmp_path / "missing.npy")


def test_split_count_validation(digits):
    with pytest.raises(DataError, match="data.n_test"):
        split_image_data(digits, 10, -1, 0, seed=0)
    with pytest.raises(DataError, match="data.n_train must be at least 1"):
        split_image_data(digits, 0, 1, 1, seed=0)
    s = split_image_data(digits, 5, 0, 0, seed=0)
    assert len(s["train"]) == 5 and len(s["test"]) == 0 and s["test"].x.shape[1:] == (1, 8, 8)


# ---------------------------------------------------------------- hardening of user files (data.name: file)


@pytest.mark.parametrize(
    "arr, hint",
    [
        (np.zeros((6, 1, 4, 4), np.float32), "scale the values to 0..255"),
        (np.zeros((6, 4, 4), np.float64), "scale the values to 0..255"),
        (np.zeros((6, 4, 4), np.uint8), r"x\[:, None\]"),
        (np.zeros((6, 4, 4, 3), np.uint8), r"x.transpose\(0, 3, 1, 2\)"),
    ],
)
def test_file_float_or_3d_gets_the_image_message(tmp_path, arr, hint):
    from pipeline.data.prepare import prepare_data

    np.save(tmp_path / "x.npy", arr)
    with pytest.raises(DataError, match=r"data.path.*uint8 array \(N, C, H, W\)") as err:
        prepare_data("file", path=str(tmp_path / "x.npy"), n_train=2, n_test=1, n_reference=1, seed=0)
    assert "expected a 2-D array" not in str(err.value)  # the points loader's words, no help for images
    assert re.search(hint, str(err.value))


def test_file_two_d_float_stays_points(tmp_path):
    from pipeline.data.prepare import prepare_data

    np.save(tmp_path / "pts.npy", np.arange(20.0).reshape(10, 2))
    p = prepare_data("file", path=str(tmp_path / "pts.npy"), n_train=6, n_test=2, n_reference=2, seed=0)
    assert p.record["kind"] == "points" and p.x["train"].shape == (6, 2)


def test_labels_length_mismatch_names_data_labels_path(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 1, 2, 2), np.uint8))
    np.save(tmp_path / "y.npy", np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"data.labels_path = .*y\.npy.*4 labels for 5 images"):
        load_uint8_file(tmp_path / "x.npy", tmp_path / "y.npy")


def test_file_small_images_refused_unless_upscale(tmp_path):
    from pipeline.data.prepare import prepare_data

    x = np.random.default_rng(0).integers(0, 256, (6, 1, 4, 5), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    kw = dict(path=str(tmp_path / "x.npy"), n_train=4, n_test=1, n_reference=1, seed=0)
    with pytest.raises(DataError, match=r"data.image_size = 8: .*x\.npy.* 5x4.*data.upscale: true"):
        prepare_data("file", image_size=8, **kw)
    p = prepare_data("file", image_size=8, upscale=True, **kw)
    assert p.x["train"].shape == (4, 1, 8, 8) and "8x8" in p.record["source"]
    # Without data.image_size the images stay as stored, upscale or not.
    assert load_uint8_file(tmp_path / "x.npy", upscale=True).train.x.tobytes() == x.tobytes()


def test_image_record_counts_duplicates(tmp_path):
    from pipeline.data.prepare import prepare_data

    p = prepare_data("digits", n_train="auto", n_test="auto", n_reference="auto", seed=0)
    assert set(p.record["duplicates"]) == {"train_test", "train_reference", "test_reference"}
    train = rows(p.x["train"])
    assert p.record["duplicates"]["train_test"] == sum(img.tobytes() in train for img in p.x["test"])
