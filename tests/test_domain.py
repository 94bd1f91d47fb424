"""Tests for pipeline.metrics.domain: the small domain classifier behind `fid_domain`.

Trained on scikit-learn's 8x8 digits (1,797 images, pixel values 0..16 scaled to 0..255): the
first 1,200 for training, the other 597 for testing; 200 Adam steps of 64 images, lr 3e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from pipeline.metrics import domain
from pipeline.metrics.fid import frechet_distance

STEPS, BATCH, LR = 200, 64, 3e-3
N_TRAIN = 1200


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions on 2 shared cores run far faster on one torch thread (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """(x uint8 (1797, 1, 8, 8) in 0..255, y int64 (1797,))."""
    d = load_digits()
    x = np.round(d.images * 255 / 16).astype(np.uint8)[:, None]
    return x, d.target.astype(np.int64)


@pytest.fixture(scope="module")
def trained(digits, one_thread):
    x, y = digits
    return domain.train_classifier(
        x[:N_TRAIN], y[:N_TRAIN], 10, steps=STEPS, batch_size=BATCH, lr=LR, seed=0
    )


def test_digits_accuracy_histogram_and_fid_domain(digits, trained):
    x, y = digits
    x_test, y_test = x[N_TRAIN:], y[N_TRAIN:]
    assert not trained.training
    assert domain.accuracy(trained, x_test, y_test) >= 0.9

    pred = domain.predict(trained, x_test, batch_size=100)
    assert pred.shape == (len(x_test),) and pred.dtype == np.int64
    hist = domain.class_histogram(pred, 10)
    assert len(hist) == 10 and sum(hist) == pytest.approx(1.0, abs=1e-12)
    assert max(hist) < 0.2  # the test split is balanced (~10% per digit)

    f_train = domain.classifier_features(trained, x[:N_TRAIN])
    f_test = domain.classifier_features(trained, x_test, batch_size=100)
    assert f_test.shape == (len(x_test), 64) and f_test.dtype == np.float64
    noise = np.random.default_rng(0).integers(0, 256, x_test.shape, dtype=np.uint8)
    f_noise = domain.classifier_features(trained, noise)
    self_fd = frechet_distance(f_test, f_test)
    real_fd = frechet_distance(f_train, f_test)
    noise_fd = frechet_distance(f_noise, f_test)
    assert abs(self_fd) < 1e-4 * real_fd
    assert real_fd < 0.1 * noise_fd


def test_same_seed_same_bits(digits):
    x, y = digits
    kw = dict(steps=15, batch_size=32, lr=LR)
    m1 = domain.train_classifier(x[:300], y[:300], 10, seed=3, **kw)
    state = torch.get_rng_state()
    m2 = domain.train_classifier(x[:300], y[:300], 10, seed=3, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the global torch RNG is left alone
    m3 = domain.train_classifier(x[:300], y[:300], 10, seed=4, **kw)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_classifier_file_round_trip(tmp_path, digits, trained):
    x, _ = digits
    spec = trained.spec() | {"steps": STEPS, "seed": 0}
    path = tmp_path / "classifier.pt"
    torch.save(domain.classifier_file(trained, spec), path)
    obj = torch.load(path, weights_only=True)
    assert obj["config"] == {"shape": [1, 8, 8], "num_classes": 10, "width": 32,
                             "feature_dim": 64, "steps": STEPS, "seed": 0}
    for loaded in (domain.load_classifier(obj), domain.load_classifier(path)):
        assert not loaded.training
        np.testing.assert_array_equal(
            domain.classifier_features(loaded, x[:50]), domain.classifier_features(trained, x[:50])
        )
    with pytest.raises(ValueError, match="does not describe"):
        domain.classifier_file(trained, spec | {"width": 16})


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_shapes(shape):
    model = domain.build_classifier(shape, num_classes=10, width=8, feature_dim=16)
    x = np.random.default_rng(0).integers(0, 256, (5, *shape), dtype=np.uint8)
    scaled = domain.scale_pixels(x)
    assert scaled.min() >= -1 and scaled.max() <= 1 and scaled.dtype == torch.float32
    with torch.no_grad():
        assert model(scaled).shape == (5, 10)
        assert model.features(scaled).shape == (5, 16)
    assert domain.classifier_features(model, x, batch_size=2).shape == (5, 16)
    assert domain.predict(model, x).shape == (5,)
    trained = domain.train_classifier(x, np.arange(5) % 3, 3, steps=2, batch_size=4, lr=1e-3,
                                      seed=0, width=8, feature_dim=16)
    assert trained.spec() == {"shape": list(shape), "num_classes": 3, "width": 8, "feature_dim": 16}


def test_input_checks(trained):
    with pytest.raises(ValueError, match="uint8"):
        domain.scale_pixels(np.zeros((2, 1, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        domain.classifier_features(trained, np.zeros((2, 1, 28, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match="lie in"):
        domain.class_histogram(np.array([0, 10]), 10)
    assert domain.class_histogram(np.array([0, 0, 2, 1]), 4) == [0.5, 0.25, 0.25, 0.0]
