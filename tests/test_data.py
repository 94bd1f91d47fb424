"""Tests for pipeline.data.toy2d: generators, file loading and splits."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.datasets

from pipeline.data import DATASETS, DataError, load_file, prepare_splits, sample_toy
from pipeline.data.toy2d import GENERATIVE

COUNTS = dict(n_train=50, n_test=30, n_reference=20)


def _gmm():
    """A small 2-D mixture with one diagonal and one full covariance."""
    from pipeline.gmm import GaussianMixture

    return GaussianMixture.from_params(
        weights=[0.3, 0.7],
        means=[[-2.0, 0.0], [2.0, 1.0]],
        covs=[[0.5, 0.2], [[1.0, 0.3], [0.3, 0.5]]],
    )


def _splits(name: str, seed: int, **kw) -> dict[str, np.ndarray]:
    """prepare_splits for a generative set with the small default counts."""
    gmm = _gmm() if name == "gmm" else None
    return prepare_splits(name, seed=seed, gmm=gmm, **{**COUNTS, **kw})


def test_datasets_list():
    assert DATASETS == ("swissroll", "moons", "checkerboard", "8gaussians", "gmm", "file")


@pytest.mark.parametrize("name", GENERATIVE)
def test_sample_toy_shape_dtype_determinism(name):
    gmm = _gmm() if name == "gmm" else None
    a = sample_toy(name, 64, seed=3, gmm=gmm)
    b = sample_toy(name, 64, seed=3, gmm=gmm)
    c = sample_toy(name, 64, seed=4, gmm=gmm)
    assert a.shape == (64, 2) and a.dtype == np.float64 and a.flags.c_contiguous
    assert np.isfinite(a).all()
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


@pytest.mark.parametrize("name", GENERATIVE)
def test_prepare_splits_shapes_and_determinism(name):
    s1, s2, s3 = _splits(name, 0), _splits(name, 0), _splits(name, 1)
    assert set(s1) == {"train", "test", "reference"}
    for key, n in (("train", 50), ("test", 30), ("reference", 20)):
        assert s1[key].shape == (n, 2) and s1[key].dtype == np.float64
        assert s1[key].tobytes() == s2[key].tobytes()
        assert s1[key].tobytes() != s3[key].tobytes()


@pytest.mark.parametrize("name", GENERATIVE)
def test_prepare_splits_is_one_sample_split_in_order(name):
    s = _splits(name, 5)
    gmm = _gmm() if name == "gmm" else None
    whole = sample_toy(name, 100, seed=5, gmm=gmm)
    joined = np.concatenate([s["train"], s["test"], s["reference"]])
    assert joined.tobytes() == whole.tobytes()


def test_swissroll_matches_cs492_recipe_bit_for_bit():
    n, seed = 1000, 7
    x, _ = sklearn.datasets.make_swiss_roll(n, noise=0.0, hole=True, random_state=seed)
    x = x[:, [0, 2]]
    expected = (x - x.mean()) / x.std() * 2
    assert sample_toy("swissroll", n, seed).tobytes() == expected.tobytes()


def test_swissroll_scalar_standardisation_over_the_whole_sample():
    s = prepare_splits("swissroll", n_train=500, n_test=300, n_reference=200, seed=0)
    joined = np.concatenate([s["train"], s["test"], s["reference"]])
    assert abs(joined.mean()) < 1e-12
    assert joined.std() == pytest.approx(2.0, rel=1e-12)
    # Scalar, not per column: the columns keep different means.
    assert abs(joined[:, 0].mean() - joined[:, 1].mean()) > 1e-3


def test_moons_scalar_standardised_and_noise_used():
    x = sample_toy("moons", 400, 0, noise=0.1)
    assert abs(x.mean()) < 1e-12 and x.std() == pytest.approx(2.0, rel=1e-12)
    assert x.tobytes() != sample_toy("moons", 400, 0).tobytes()


def test_checkerboard_on_filled_squares():
    x = sample_toy("checkerboard", 4000, 0)
    assert (x >= -4).all() and (x < 4).all()
    cells = np.floor(x / 2).astype(int)
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    # All 8 filled squares are hit.
    assert len({tuple(c) for c in cells}) == 8


def test_eight_gaussians_radius():
    x = sample_toy("8gaussians", 4000, 0)
    r = np.linalg.norm(x, axis=1)
    assert np.median(r) == pytest.approx(4 / 1.414, abs=0.1)


def test_gmm_requires_mixture_and_unknown_name():
    with pytest.raises(DataError, match="gmm"):
        sample_toy("gmm", 10, 0)
    with pytest.raises(DataError, match="data.name"):
        sample_toy("spiral", 10, 0)


def test_negative_counts_rejected():
    with pytest.raises(DataError, match="data.n_test"):
        prepare_splits("moons", n_train=10, n_test=-1, n_reference=0, seed=0)


# ---- file data --------------------------------------------------------------------


def test_load_npy(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "pts.npy", arr)
    x = load_file(tmp_path / "pts.npy")
    assert x.dtype == np.float64 and x.shape == (4, 3)
    np.testing.assert_array_equal(x, arr)


def test_load_csv_with_and_without_header(tmp_path):
    (tmp_path / "a.csv").write_text("x,y\n1,2\n3.5,-4e-1\n")
    (tmp_path / "b.csv").write_text("1,2\n3.5,-4e-1\n\n")
    expected = np.array([[1.0, 2.0], [3.5, -0.4]])
    np.testing.assert_array_equal(load_file(tmp_path / "a.csv"), expected)
    np.testing.assert_array_equal(load_file(tmp_path / "b.csv"), expected)


def _write_bad(tmp_path, case):
    """Create the bad file for `case` and return its path."""
    p = {
        "missing": tmp_path / "nope.npy",
        "extension": tmp_path / "pts.txt",
        "one_d": tmp_path / "one_d.npy",
        "nan": tmp_path / "nan.npy",
        "inf_csv": tmp_path / "inf.csv",
        "non_numeric": tmp_path / "bad.csv",
        "ragged": tmp_path / "ragged.csv",
        "empty_csv": tmp_path / "empty.csv",
        "one_row": tmp_path / "one.npy",
        "object": tmp_path / "obj.npy",
    }[case]
    if case == "extension":
        p.write_text("1,2\n3,4\n")
    elif case == "one_d":
        np.save(p, np.arange(5.0))
    elif case == "nan":
        np.save(p, np.array([[0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]]))
    elif case == "inf_csv":
        p.write_text("1,2\ninf,3\n")
    elif case == "non_numeric":
        p.write_text("x,y\n1,2\n3,abc\n")
    elif case == "ragged":
        p.write_text("1,2\n3\n")
    elif case == "empty_csv":
        p.write_text("x,y\n")
    elif case == "one_row":
        np.save(p, np.zeros((1, 2)))
    elif case == "object":
        np.save(p, np.array([[1, "a"], [2, "b"]], dtype=object), allow_pickle=True)
    return p


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing", "does not exist"),
        ("extension", ".npy and .csv"),
        ("one_d", "2-D"),
        ("nan", "NaN"),
        ("inf_csv", "NaN or infinite"),
        ("non_numeric", "non-numeric"),
        ("ragged", "columns"),
        ("empty_csv", "no data rows"),
        ("one_row", "at least 2 rows"),
        ("object", "npy"),
    ],
)
def test_bad_files_raise_data_error(tmp_path, case, words):
    p = _write_bad(tmp_path, case)
    with pytest.raises(DataError, match="data.path") as err:
        load_file(p)
    assert words in str(err.value) and str(p) in str(err.value)
    # prepare_splits fails the same way, before any work.
    with pytest.raises(DataError, match="data.path"):
        prepare_splits("file", path=p, n_train=1, n_test=0, n_reference=0, seed=0)


def test_file_splits_shuffle_deterministically(tmp_path):
    arr = np.arange(40, dtype=np.float64).reshape(20, 2)
    np.save(tmp_path / "pts.npy", arr)
    kw = dict(path=tmp_path / "pts.npy", n_train=10, n_test=5, n_reference=3)
    s1 = prepare_splits("file", seed=0, **kw)
    s2 = prepare_splits("file", seed=0, **kw)
    s3 = prepare_splits("file", seed=1, **kw)
    assert {k: v.shape for k, v in s1.items()} == {
        "train": (10, 2), "test": (5, 2), "reference": (3, 2)
    }
    joined = np.concatenate([s1["train"], s1["test"], s1["reference"]])
    assert all(v.tobytes() == s2[k].tobytes() for k, v in s1.items())
    assert joined.tobytes() != np.concatenate(list(s3.values())).tobytes()
    # Rows are kept whole and none is used twice.
    assert len({tuple(r) for r in joined}) == 18
    assert {tuple(r) for r in joined} <= {tuple(r) for r in arr}


def test_file_too_few_rows(tmp_path):
    np.save(tmp_path / "pts.npy", np.zeros((5, 2)))
    with pytest.raises(DataError, match="data.path") as err:
        prepare_splits("file", path=tmp_path / "pts.npy", seed=0, n_train=4, n_test=2,
                       n_reference=1)
    assert "5 rows" in str(err.value) and "7" in str(err.value)


def test_file_without_path():
    with pytest.raises(DataError, match="data.path"):
        prepare_splits("file", n_train=1, n_test=0, n_reference=0, seed=0)


# --------------------------------------------------------------------------- class labels of the 2-D sets


@pytest.mark.parametrize("name, n_classes", [("moons", 2), ("8gaussians", 8), ("gmm", 2)])
def test_labelled_sets_give_each_point_its_class(name, n_classes):
    """moons: sklearn's moon; 8gaussians: the nearest centre (well separated); gmm: the drawing component, which
    the points' responsibilities recover; the points keep the bits of the unlabelled draw."""
    from pipeline.data.prepare import prepare_data
    from pipeline.data.toy2d import TOY_CLASSES, toy_label_splits

    gmm = _gmm() if name == "gmm" else None
    labels, classes = toy_label_splits(name, seed=2, gmm=gmm, **COUNTS)
    splits = _splits(name, 2)
    assert len(classes) == n_classes and {k: len(v) for k, v in labels.items()} == COUNTS_BY_SPLIT
    y, x = np.concatenate(list(labels.values())), np.concatenate(list(splits.values()))
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(n_classes))
    if name == "moons":
        assert np.array_equal(y, sklearn.datasets.make_moons(100, random_state=2)[1])
    elif name == "8gaussians":
        h = 1 / np.sqrt(2)
        centers = 4 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (h, h), (h, -h), (-h, h), (-h, -h)]) / 1.414
        nearest = np.argmin(((x[:, None] - centers[None]) ** 2).sum(-1), 1)
        assert (nearest == y).mean() > 0.97 and classes == TOY_CLASSES["8gaussians"]
    else:
        import torch

        resp = gmm.responsibilities(torch.from_numpy(x)).argmax(1).numpy()
        assert (resp == y).mean() > 0.9
    prepared = prepare_data(name, seed=2, gmm=gmm, **COUNTS)
    assert prepared.record["num_classes"] == n_classes and prepared.record["classes"] == classes
    assert all(np.array_equal(prepared.y[k], labels[k]) for k in labels)
    assert all(prepared.x[k].tobytes() == splits[k].astype("float32").tobytes() for k in splits)


@pytest.mark.parametrize("name", ["swissroll", "checkerboard"])
def test_sets_without_classes_have_no_labels(name):
    from pipeline.data.prepare import NO_LABEL, prepare_data
    from pipeline.data.toy2d import toy_label_splits

    assert toy_label_splits(name, seed=0, **COUNTS) is None
    prepared = prepare_data(name, seed=0, **COUNTS)
    assert prepared.record["num_classes"] == 0 and all((v == NO_LABEL).all() for v in prepared.y.values())


COUNTS_BY_SPLIT = {"train": COUNTS["n_train"], "test": COUNTS["n_test"], "reference": COUNTS["n_reference"]}


def test_point_record_has_no_image_keys():
    """The record of a 2-D set keeps exactly its keys, in order (data/record.json byte for byte): the image-only
    keys (duplicates, skipped_links, converted) never appear."""
    import json

    from pipeline.data.prepare import prepare_data

    record = prepare_data("swissroll", seed=0, **COUNTS).record
    assert json.dumps(record) == ('{"kind": "points", "name": "swissroll", "shape": [2], "num_classes": 0, '
                                  '"classes": [], "n_train": 50, "n_test": 30, "n_reference": 20}')
