"""Contract tier of pipeline.kinds: both data kinds behind one interface, on points (B, 2) and images (B, 1, 8, 8).

Round trips to and from model space (uint8 pixels exactly), the unit of distances, every figure a non-empty PNG,
and the nearest-neighbour check against a brute-force numpy oracle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import pixels
from pipeline.inverse import Mask
from pipeline.kinds import HIDDEN_PIXEL, NEIGHBOURS, Evaluation, Images, Points, kind_of

B = 12
POINTS = {"kind": "points", "shape": [2]}
IMAGES = {"kind": "images", "shape": [1, 8, 8], "num_classes": 10, "classes": [str(k) for k in range(10)]}
PNG = b"\x89PNG\r\n\x1a\n"


def _items(kind, n: int, seed: int) -> np.ndarray:
    """n stored items of the kind: float32 points (n, 2) or uint8 images (n, 1, 8, 8)."""
    rng = np.random.default_rng(seed)
    if kind.name == "points":
        return rng.normal(size=(n, 2)).astype(np.float32)
    return rng.integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8)


KINDS = {"points": lambda: kind_of(POINTS), "images-zero_one": lambda: kind_of(IMAGES, "zero_one"),
         "images-minus_one_one": lambda: kind_of(IMAGES, "minus_one_one")}


@pytest.fixture(params=list(KINDS))
def kind(request):
    return KINDS[request.param]()


def test_kind_of_picks_the_record_kind():
    assert isinstance(kind_of(POINTS), Points) and isinstance(kind_of(IMAGES, "zero_one"), Images)
    assert kind_of(IMAGES, "zero_one").scaling == "zero_one" and kind_of(POINTS).scaling is None
    with pytest.raises(KeyError):
        kind_of({"kind": "audio"})


def test_round_trip_to_model_and_back(kind):
    x = _items(kind, B, 0)
    if kind.name == "images":  # every level, the ends included
        x.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    m = kind.to_model(x)
    assert m.dtype == torch.float32 and tuple(m.shape) == x.shape
    back = kind.to_output(m)
    assert back.dtype == x.dtype and back.shape == x.shape
    np.testing.assert_array_equal(back, x)  # exactly: pixels are levels, points float32 as they are


def test_images_to_model_is_the_pixel_map_and_within_the_value_range():
    x = _items(kind_of(IMAGES), B, 1)
    for scaling in pixels.SCALINGS:
        kind = kind_of(IMAGES, scaling)
        m = kind.to_model(x)
        torch.testing.assert_close(m, pixels.to_model(torch.from_numpy(x), scaling), rtol=0, atol=0)
        low, high = kind.value_range()
        assert (low, high) == pixels.pixel_range(scaling) and low <= float(m.min()) and float(m.max()) <= high


def test_points_have_no_range_and_no_scaling():
    points = kind_of(POINTS)
    with pytest.raises(ValueError, match="no range"):
        points.value_range()
    assert points.for_process("noise_scales", "auto") is points and points.noise_record() == {}


def test_images_take_the_scaling_of_the_process():
    images = kind_of(IMAGES)
    assert images.for_process("noise_scales", "auto").noise_record() == {"scaling": "zero_one"}
    assert images.for_process("discrete_vp", "auto").noise_record() == {"scaling": "minus_one_one"}
    assert images.for_process("discrete_vp", "zero_one").scaling == "zero_one"


def test_likelihood_input_dtypes(kind):
    x = _items(kind, B, 2)
    held = kind.likelihood_input(x)
    assert held.dtype == (torch.float64 if kind.name == "points" else torch.uint8)
    np.testing.assert_array_equal(held.numpy(), x)


def test_the_unit_of_distances(kind, tmp_path):
    """Distances are in stored levels over the unit: a pixel level is 1/255, a point coordinate 1; the same moves
    in both kinds (points = pixels / 255) measure the same."""
    assert kind.unit == (1.0 if kind.name == "points" else 255.0)
    pix = np.random.default_rng(3).integers(0, 256, size=(3, 5, 1, 8, 8), dtype=np.uint8)  # (P, K, *D)
    x = pix if kind.name == "images" else (pix.reshape(3, 5, -1)[..., :2] / 255.0).astype(np.float64)
    ev = Evaluation(None, None, "cpu", None, tmp_path / "curves.png")
    found = kind.interpolate_metrics(x, "slerp", ev)
    flat = (pix.astype(np.float64) / 255.0).reshape(3, 5, -1)
    flat = flat if kind.name == "images" else flat[..., :2]
    steps = np.sqrt(((flat[:, 1:] - flat[:, :-1]) ** 2).mean(-1))  # RMS over the coordinates
    assert found["frame_distance"] == pytest.approx(steps.mean())
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000, path


def test_every_figure_writes_a_png(kind, tmp_path):
    x = _items(kind, B, 4)
    held_out = _items(kind, 3 * B, 5)
    kind.samples_figure(tmp_path / "samples.png", x, held_out, "samples")
    trajectory = [(t, kind.to_model(_items(kind, 4, 6 + i))) for i, t in enumerate((1.0, 0.5, 0.0))]
    kind.trajectory_figure(tmp_path / "trajectory.png", trajectory, "trajectory")
    mask = np.zeros(x.shape, np.uint8)
    mask.reshape(B, -1)[:, : mask[0].size // 2] = 1
    outputs = np.stack([_items(kind, B, 7), _items(kind, B, 8)])  # (M, n, *D)
    operator = Mask(torch.from_numpy(mask), x.shape)
    shown = kind.measurement_view(operator, operator(kind.to_model(x)))
    # the known part as stored, mid-grey (images) where generated
    assert (shown[mask == 1] == x[mask == 1]).all()
    if kind.name == "images":
        assert (shown[mask == 0] == HIDDEN_PIXEL).all()
    kind.inverse_figure(tmp_path / "inpaint.png", x, shown, ["replace", "repaint"], outputs,
                        {"replace": 10, "repaint": 30}, "inpainting")
    kind.inverse_figure(tmp_path / "inverse.png", x, _items(kind, B, 10), ["replace", "dps"], outputs,
                        {"replace": 10, "dps": 20}, "inverse problem")
    kind.edit_figure(tmp_path / "edit.png", x, [0.5, 1.0], outputs, "SDEdit")
    rows = _items(kind, 3 * 4, 9).reshape(3, 4, *x.shape[1:])  # (P, K, *D)
    kind.interpolation_figure(tmp_path / "interpolation.png", rows, np.linspace(0, 1, 4), held_out, "interpolation")
    kind.neighbours_figure(tmp_path / "neighbours.png", x[:3], held_out, "sample")
    for name in ("samples", "trajectory", "inpaint", "inverse", "edit", "interpolation", "neighbours"):
        _png(tmp_path / f"{name}.png")


def test_nearest_matches_a_brute_force_oracle(kind):
    items, train = _items(kind, 6, 10), _items(kind, 200, 11)
    idx = kind.nearest(items, train)
    d = np.sqrt(((items.reshape(6, 1, -1).astype(np.float64) - train.reshape(1, 200, -1).astype(np.float64)) ** 2)
                .sum(-1))
    oracle = np.argsort(d, axis=1, kind="stable")[:, :NEIGHBOURS]
    # no ties among the first NEIGHBOURS + 1 distances, so the order is defined
    nearest_d = np.sort(d, axis=1)[:, : NEIGHBOURS + 1]
    assert (np.diff(nearest_d, axis=1) > 1e-6).all()
    assert idx.shape == (6, NEIGHBOURS)
    np.testing.assert_array_equal(idx, oracle)
    np.testing.assert_array_equal(kind.nearest(items, train, 3), oracle[:, :3])
