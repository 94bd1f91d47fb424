"""Image data sets as uint8 (N, C, H, W) arrays: digits, photo crops, Fashion-MNIST, MNIST, CIFAR-10, folders, files.

Every loader returns an `ImageData`: an official train pool, an official test pool (empty
when the set has none), the class names and one sentence saying where the pixels came
from and how they were mapped to 8 bits. `split_image_data` turns it into the
train / test / reference splits of the prepare stage; `reference` is a second held-out
sample used only for the metric floors (docs/design.md, "Metrics, defined once").

Formats read here (no network unless data.download is true):
- idx (MNIST, Fashion-MNIST): http://yann.lecun.com/exdb/mnist/ "FILE FORMATS", big-endian,
  magic 0x00000803 (uint8 images, 3 dims) and 0x00000801 (uint8 labels, 1 dim), plain or .gz.
- CIFAR-10 "python version": https://www.cs.toronto.edu/~kriz/cifar.html, pickled dicts with
  "data" (N, 3072) uint8, row-major, the 1024 red then green then blue values, and "labels".
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.photos import CLASSES as PHOTO_CLASSES
from pipeline.data.photos import photo_crops, photos_source
from pipeline.data.toy2d import DataError
from pipeline.defaults import DATA_PATH
from pipeline.names import IMAGE_SETS

IMAGE_DATASETS = IMAGE_SETS
# Debian package dataset-fashion-mnist: the four official idx .gz files, unchanged.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Where data.download puts mnist / fashion_mnist / cifar10 when data.path is not set
# (relative to the working directory, the repository root for the stages).
DOWNLOAD_ROOT = Path(DATA_PATH)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
MNIST_CLASSES = [str(d) for d in range(10)]
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_META = "batches.meta"


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """A set of images and their labels: x uint8 (N, C, H, W), y int64 (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        # Loader bugs, not user errors: every loader must hand over exactly this layout.
        if self.x.dtype != np.uint8 or self.x.ndim != 4:
            got = f"{self.x.dtype} {self.x.shape}"
            raise ValueError(f"ImageSplit.x must be uint8 (N, C, H, W), got {got}")
        if self.y.dtype != np.int64 or self.y.shape != (self.x.shape[0],):
            got = f"{self.y.dtype} {self.y.shape}"
            raise ValueError(f"ImageSplit.y must be int64 ({self.x.shape[0]},), got {got}")

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True, eq=False)
class ImageData:
    """A loaded image set: the train pool, the test pool (empty if there is no official one),
    class names (len = num_classes) and `source`, one sentence on provenance and 8-bit mapping.

    The test pool supplies both test and reference images (disjoint parts of it). `notes` are extra
    keys for the data record (a folder's "skipped_links" and "converted"); empty for the others.
    """

    train: ImageSplit
    test: ImageSplit
    classes: list[str]
    source: str
    notes: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """The number of classes, len(classes)."""
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        x = self.train.x if len(self.train) else self.test.x
        c, h, w = x.shape[1:]
        return int(c), int(h), int(w)


# ---------------------------------------------------------------------------- helpers


def _bad(path: str | os.PathLike, what: str) -> DataError:
    """A DataError naming data.path, the file or folder and the problem."""
    return DataError(f"data.path = {str(path)!r}: {what}")


def _split(x: np.ndarray, y: np.ndarray) -> ImageSplit:
    """ImageSplit with contiguous uint8 / int64 copies."""
    return ImageSplit(np.ascontiguousarray(x, dtype=np.uint8), np.ascontiguousarray(y, dtype=np.int64))


def _empty_like(x: np.ndarray) -> ImageSplit:
    """An ImageSplit with no images of x's (C, H, W)."""
    return _split(np.zeros((0, *x.shape[1:]), np.uint8), np.zeros(0, np.int64))


def _check_options(image_size: int | None, channels: int | None, upscale: bool = False) -> None:
    """Validate data.image_size, data.channels and data.upscale."""
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1
    ):
        raise DataError(
            f"data.image_size must be a positive integer or null (keep the size), got {image_size!r}"
        )
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise DataError(f"data.channels must be 1 (grayscale), 3 (RGB) or null (keep), got {channels!r}")
    if not isinstance(upscale, (bool, np.bool_)):
        raise DataError(f"data.upscale must be true or false, got {upscale!r}")


def _to_gray(x: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) uint8 RGB -> (N, 1, H, W) uint8, bit-exact with PIL's convert("L").

    PIL uses ITU-R 601-2 luma, L = (19595 R + 38470 G + 7471 B + 2^15) >> 16; the same
    integer formula here keeps folders (converted by PIL) and arrays consistent.
    """
    r, g, b = (x[:, i].astype(np.uint32) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)[:, None]


def _resize_crop_pil(img, image_size: int):
    """PIL image -> PIL image of image_size x image_size: bicubic shorter side, centre crop."""
    import torchvision.transforms.functional as tf
    from torchvision.transforms import InterpolationMode

    img = tf.resize(img, image_size, interpolation=InterpolationMode.BICUBIC)
    return tf.center_crop(img, [image_size, image_size])


def _convert(x: np.ndarray, image_size: int | None, channels: int | None) -> np.ndarray:
    """uint8 (N, C, H, W) -> uint8 (N, C', S, S): channels first, then resize and crop.

    channels 1 from RGB is PIL's luma, 3 from grayscale repeats the channel; image_size
    resizes the shorter side to S (bicubic, PIL) and centre-crops S x S. None keeps it.
    """
    if channels is not None and channels != x.shape[1]:
        x = _to_gray(x) if channels == 1 else np.repeat(x, 3, axis=1)
    if image_size is None or x.shape[2:] == (image_size, image_size):
        return np.ascontiguousarray(x)
    from PIL import Image

    out = np.empty((x.shape[0], x.shape[1], image_size, image_size), np.uint8)
    for i, img in enumerate(x):
        pil = Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0))
        a = np.asarray(_resize_crop_pil(pil, image_size))
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return out


def _conversion_note(image_size: int | None, channels: int | None) -> str:
    """The source-sentence tail describing _convert's work ('' if none)."""
    parts = []
    if channels == 1:
        parts.append("converted to grayscale with PIL's ITU-R 601-2 luma")
    elif channels == 3:
        parts.append("grayscale repeated to 3 channels where needed")
    if image_size is not None:
        parts.append(f"resized (bicubic, shorter side) and centre-cropped to {image_size}x{image_size}")
    return ("; " + ", ".join(parts)) if parts else ""


def _finish(train: ImageSplit, test: ImageSplit, classes, source, image_size, channels) -> ImageData:
    """Apply _convert to both pools and record it in `source`."""
    return ImageData(
        train=_split(_convert(train.x, image_size, channels), train.y),
        test=_split(_convert(test.x, image_size, channels), test.y),
        classes=list(classes),
        source=source + _conversion_note(image_size, channels) + ".",
    )


# ---------------------------------------------------------------------------- digits


def _load_digits(seed: int, image_size, channels) -> ImageData:
    """scikit-learn's 8x8 digits, shuffled with `seed`, all in the train pool (no official test split)."""
    import sklearn.datasets  # here: it costs every stage a second to import

    d = sklearn.datasets.load_digits()
    # Values are counts 0..16 of set pixels in 4x4 blocks; this spreads them over 0..255.
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(x.shape[0])
    train = _split(x[order], y[order])
    source = (
        "scikit-learn load_digits (UCI optical recognition of handwritten digits, "
        f"{x.shape[0]} 8x8 images, values 0..16), mapped to 8 bits as round(v * 255 / 16), "
        f"shuffled with seed {seed}"
    )
    return _finish(train, _empty_like(train.x), MNIST_CLASSES, source, image_size, channels)


# ---------------------------------------------------------------------------- photos


def _load_photos(seed: int, image_size, channels) -> ImageData:
    """Crops of scikit-learn's two sample photographs (pipeline.data.photos): the train pool from one region of each
    photo, the test pool (test and reference) from the rest; image_size None is 16, channels 1 is PIL's luma."""
    crops = photo_crops(seed, image_size)
    train, held = crops["train"], crops["held_out"]
    source = photos_source(seed, image_size) + (_conversion_note(None, 1) if channels == 1 else "") + "."
    return ImageData(
        train=_split(_convert(train.x, None, channels), train.y),
        test=_split(_convert(held.x, None, channels), held.y),
        classes=list(PHOTO_CLASSES),
        source=source,
    )


# ---------------------------------------------------------------------------- idx (MNIST, Fashion-MNIST)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """uint8 array from an idx file (plain or .gz): (N, H, W) images or (N,) labels.

    Format (LeCun's MNIST page): big-endian int32 magic 0x00000803 (ubyte, 3 dims) or
    0x00000801 (ubyte, 1 dim), then one big-endian int32 per dimension, then the bytes.
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise _bad(path, f"cannot read the idx file ({err})") from None
    if len(raw) < 4:
        raise _bad(path, f"not an idx file: {len(raw)} bytes, too short for the magic number")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC):
        raise _bad(
            path,
            f"not an idx ubyte file: magic number 0x{magic:08x}, expected 0x{IDX_IMAGES_MAGIC:08x} "
            f"(images) or 0x{IDX_LABELS_MAGIC:08x} (labels); replace it with the official file",
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _bad(path, f"truncated idx header: {len(raw)} bytes, need {header}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise _bad(
            path, f"idx header says shape {dims} ({expected} bytes) but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx_dir(candidates: list[Path]) -> Path | None:
    """The first directory holding all four idx files (each plain or .gz), else None."""
    for d in candidates:
        if d.is_dir() and all(_idx_file(d, name) is not None for name in IDX_FILES.values()):
            return d
    return None


def _idx_file(directory: Path, name: str) -> Path | None:
    """directory/name.gz or directory/name, whichever exists (gz first: it is the official file)."""
    for p in (directory / f"{name}.gz", directory / name):
        if p.is_file():
            return p
    return None


def _read_idx_pair(directory: Path, images: str, labels: str, num_classes: int) -> ImageSplit:
    """(N, 1, H, W) images and (N,) labels from two idx files, checked against each other."""
    img_path, lab_path = _idx_file(directory, images), _idx_file(directory, labels)
    x, y = read_idx(img_path), read_idx(lab_path)
    if x.ndim != 3:
        raise _bad(img_path, f"expected an idx image file (3 dims), got shape {x.shape}")
    if y.ndim != 1:
        raise _bad(lab_path, f"expected an idx label file (1 dim), got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise _bad(lab_path, f"{y.shape[0]} labels for {x.shape[0]} images in {img_path.name}")
    if y.size and int(y.max()) >= num_classes:
        raise _bad(lab_path, f"label {int(y.max())} is out of range for {num_classes} classes")
    return _split(x[:, None], y)


def _load_idx_set(
    name: str, path: str | None, download: bool, image_size, channels
) -> ImageData:
    """mnist or fashion_mnist from the four idx files; see load_image_data for the search order."""
    fashion = name == "fashion_mnist"
    sub = "FashionMNIST" if fashion else "MNIST"  # torchvision's <root>/<sub>/raw layout
    if path is not None:
        root = Path(path)
        # Debian's package last for the default data.path, which holds no idx files unless they were put there
        candidates = [root, root / sub / "raw"] + ([FASHION_MNIST_DIR] if fashion and root == DOWNLOAD_ROOT else [])
    elif fashion:
        root = DOWNLOAD_ROOT
        candidates = [FASHION_MNIST_DIR, root / sub / "raw"]
    else:
        root = DOWNLOAD_ROOT
        candidates = [root, root / sub / "raw"]
    directory = _find_idx_dir(candidates)
    fetched = False
    if directory is None and download:
        import torchvision.datasets as tvd

        cls = tvd.FashionMNIST if fashion else tvd.MNIST
        try:
            cls(root=str(root), train=True, download=True)
        except Exception as err:  # network and archive errors come in many types
            raise DataError(
                f"data.download: true could not download {sub} into {str(root)!r} ({err}); "
                "check the network or set data.path to a folder with the four idx files"
            ) from None
        directory = _find_idx_dir([root / sub / "raw"])
        fetched = True
    if directory is None:
        where = " or ".join(repr(str(c)) for c in candidates)
        files = ", ".join(f"{f}.gz" for f in IDX_FILES.values())
        if fashion:
            raise DataError(
                f"Fashion-MNIST not found: no folder {where} holds the four idx files ({files}). "
                "Install the Debian package dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`; "
                "`make` does it), or set data.path to a folder with the four idx files, "
                "or set data.download: true"
            )
        raise DataError(
            f"MNIST not found: no folder {where} holds the four idx files ({files}). "
            "Set data.path to a folder with them (directly or in torchvision's MNIST/raw/), "
            "or set data.download: true to fetch them with torchvision"
        )
    classes = FASHION_MNIST_CLASSES if fashion else MNIST_CLASSES
    k = len(classes)
    train = _read_idx_pair(directory, IDX_FILES["train_images"], IDX_FILES["train_labels"], k)
    test = _read_idx_pair(directory, IDX_FILES["test_images"], IDX_FILES["test_labels"], k)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise _bad(directory, f"train images are {train.x.shape[2:]} but test images {test.x.shape[2:]}")
    title = "Fashion-MNIST" if fashion else "MNIST"
    how = "downloaded with torchvision to" if fetched else "read from"
    source = (
        f"{title} official idx files {how} {str(directory)!r} "
        f"({len(train)} train + {len(test)} test images), already 8-bit grayscale, used as stored"
    )
    return _finish(train, test, classes, source, image_size, channels)


# ---------------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds dicts, lists, strings, numbers and numpy arrays.

    The CIFAR-10 files are pickles; refusing every other global keeps a pickle from a
    user-given folder from running arbitrary code.
    """

    def find_class(self, module: str, name: str):
        multiarray_modules = ("numpy.core.multiarray", "numpy._core.multiarray")
        if name in ("_reconstruct", "scalar") and module in multiarray_modules:
            try:
                from numpy._core import multiarray
            except ImportError:  # numpy 1.x
                from numpy.core import multiarray
            return getattr(multiarray, name)
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            # Protocol-5 pickles (Python 3.14's default) rebuild arrays from a raw buffer.
            try:
                from numpy._core import numeric
            except ImportError:  # numpy 1.x
                from numpy.core import numeric
            return numeric._frombuffer
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch file")


def _load_pickle(path: Path) -> dict:
    """The dict in one CIFAR-10 batch file, with str keys."""
    try:
        with open(path, "rb") as f:
            # latin1: the official files are Python 2 pickles whose str values are bytes.
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as err:
        raise _bad(path, f"not a readable CIFAR-10 python batch file ({err})") from None
    if not isinstance(obj, dict):
        raise _bad(path, f"expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_cifar_batch(path: Path, num_classes: int) -> ImageSplit:
    """(N, 3, 32, 32) uint8 RGB and (N,) labels from one batch file."""
    if not path.is_file():
        raise _bad(path.parent, f"missing CIFAR-10 file {path.name}; re-extract cifar-10-python.tar.gz")
    d = _load_pickle(path)
    if "data" not in d or "labels" not in d:
        raise _bad(path, f"batch dict lacks 'data' or 'labels' (keys {sorted(map(str, d))})")
    x, y = d["data"], np.asarray(d["labels"])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise _bad(path, f"'data' must be a uint8 array (N, 3072), got {got}")
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise _bad(path, f"'labels' must be {x.shape[0]} integers, got {y.dtype} {y.shape}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise _bad(path, f"labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
    # Row-major planes: 1024 red, then 1024 green, then 1024 blue values, each 32x32 rows.
    return _split(x.reshape(-1, 3, 32, 32), y)


def _find_cifar_dir(root: Path) -> Path | None:
    """root/cifar-10-batches-py or root itself, whichever holds batches.meta; else None."""
    for d in (root / CIFAR10_DIRNAME, root):
        if (d / CIFAR10_META).is_file():
            return d
    return None


def _load_cifar10(path: str | None, download: bool, image_size, channels) -> ImageData:
    """CIFAR-10 from the official python pickles; torchvision only downloads them."""
    root = Path(path) if path is not None else DOWNLOAD_ROOT
    directory = _find_cifar_dir(root)
    fetched = False
    if directory is None and download:
        import torchvision.datasets as tvd

        try:
            tvd.CIFAR10(root=str(root), train=True, download=True)
        except Exception as err:  # network and archive errors come in many types
            raise DataError(
                f"data.download: true could not download CIFAR-10 into {str(root)!r} ({err}); "
                f"check the network or set data.path to a folder with {CIFAR10_DIRNAME}/"
            ) from None
        directory = _find_cifar_dir(root)
        fetched = True
    if directory is None:
        raise DataError(
            f"CIFAR-10 not found: neither {str(root / CIFAR10_DIRNAME)!r} nor {str(root)!r} holds "
            f"{CIFAR10_META}. Set data.path to the folder containing {CIFAR10_DIRNAME}/ (or to that "
            "folder itself, the extracted cifar-10-python.tar.gz), or set data.download: true"
        )
    meta = _load_pickle(directory / CIFAR10_META)
    classes = meta.get("label_names")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise _bad(directory / CIFAR10_META, "'label_names' must be a non-empty list of strings")
    parts = [_read_cifar_batch(directory / b, len(classes)) for b in CIFAR10_TRAIN_BATCHES]
    train = _split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    test = _read_cifar_batch(directory / CIFAR10_TEST_BATCH, len(classes))
    how = "downloaded with torchvision to" if fetched else "read from"
    source = (
        f"CIFAR-10 official python batches {how} {str(directory)!r} "
        f"({len(train)} train + {len(test)} test 32x32 RGB images), already 8-bit, used as stored"
    )
    return _finish(train, test, classes, source, image_size, channels)


# ---------------------------------------------------------------------------- folders

# From this many files on, reading a folder shows a tqdm bar on stderr: a few hundred photos take seconds.
PROGRESS_MIN_FILES = 200
# Modes that carry transparency (besides P with a transparent index); see _flatten.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# PIL's errors for a file that is not a readable image, besides UnidentifiedImageError and DecompressionBombError
# (its guard on huge pictures), which are named where PIL is imported.
_UNREADABLE = (OSError, ValueError, SyntaxError)
# Why a symbolic link was not followed, as the stderr line words it.
_LINK_REASONS = {
    "outside": "lead out of the folder",
    "loop": "lead back into a folder that holds them (a loop)",
    "again": "lead to a folder already read",
}


def _is_image(p: Path) -> bool:
    """A visible file with one of IMAGE_EXTENSIONS (any case)."""
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _real(p: Path) -> Path | None:
    """p with every link resolved; None when its links loop."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
        return None


def _link_trouble(link: Path, root: Path) -> str | None:
    """Why symbolic link `link` must not be followed ("outside", "loop"), None if it may be; root is resolved.

    A target outside root would read pictures that are not in data.path; a folder target that holds the link
    (`up -> ..`) would read the same pictures again and again, into every split.
    """
    real = _real(link)
    if real is None:
        return "loop"
    if real != root and root not in real.parents:
        return "outside"
    here = _real(link.parent)
    if real.is_dir() and here is not None and (here == real or real in here.parents):
        return "loop"
    return None


def _images_under(d: Path, root: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """Image files anywhere below d, sorted, hidden names skipped; links followed only inside root (resolved).

    os.walk does not follow links; each link is judged by _link_trouble, and a folder reached twice (two
    links, or a link to a subfolder) is read once. Links not followed go to `skipped` with their reason.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    tops = [d]
    while tops:
        top = tops.pop(0)
        if _real(top) in seen:
            skipped.append((top, "again"))
            continue
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            here = Path(dirpath)
            seen.add(_real(here))
            kept = []
            for n in dirnames:
                p = here / n
                if n.startswith("."):
                    continue
                if not p.is_symlink():
                    kept.append(n)
                elif (why := _link_trouble(p, root)) is not None:
                    skipped.append((p, why))
                else:
                    tops.append(p)
            dirnames[:] = kept
            for n in filenames:
                p = here / n
                if not _is_image(p):
                    continue
                if p.is_symlink() and (why := _link_trouble(p, root)) is not None:
                    skipped.append((p, why))
                else:
                    found.append(p)
    return sorted(found)


def _skipped_line(root: Path, skipped: list[tuple[Path, str]]) -> str:
    """The stderr line that says which symbolic links were not followed."""
    counts = {why: sum(w == why for _, w in skipped) for why in _LINK_REASONS}
    parts = ", ".join(f"{n} {_LINK_REASONS[why]}" for why, n in counts.items() if n)
    first = skipped[0][0]
    try:
        example = f"{os.path.relpath(first, root)} -> {os.readlink(first)}"
    except (OSError, ValueError):
        example = os.path.relpath(first, root)
    return (
        f"data.path = {str(root)!r}: skipped {len(skipped)} symbolic link(s) ({parts}), e.g. {example}; "
        "copy the pictures they lead to into the folder if they belong to the data"
    )


def _open_image(p: Path):
    """The decoded PIL image; 16-bit grayscale mapped to 8 bits as round(v * 255 / 65535)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as img:
            img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, *_UNREADABLE) as err:
        raise _bad(p, f"unreadable image ({err}); remove or replace the file") from None
    if img.mode.startswith("I;16"):
        # PIL's own I;16 -> L conversion clips at 255 instead of scaling.
        v = np.asarray(img).astype(np.uint32)
        img = Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        raise _bad(
            p, f"PIL mode {img.mode} (32-bit integer or float) is not supported; save it as 8- or 16-bit"
        )
    return img


def _peek(p: Path) -> tuple[tuple[int, int], bool]:
    """((width, height), grayscale?) of an image from its header; palettes are decoded for their colours."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as img:
            mode, size = img.mode, img.size
            # 16-bit grayscale becomes L in _open_image; I and F are refused there.
            gray = mode.startswith("I;16") or mode in ("I", "F") or _is_gray(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, *_UNREADABLE) as err:
        raise _bad(p, f"unreadable image ({err}); remove or replace the file") from None
    if mode in ("I", "F"):
        raise _bad(p, f"PIL mode {mode} (32-bit integer or float) is not supported; save it as 8- or 16-bit")
    return (int(size[0]), int(size[1])), gray


def _is_gray(img) -> bool:
    """True for single-luminance modes (1, L, LA) and palettes whose colours are all grey."""
    if img.mode in ("1", "L", "LA", "La"):
        return True
    if img.mode in ("P", "PA"):
        rgb = np.asarray(img.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return False


def _flatten(img, p: Path):
    """(img without transparency or ink channels, the record's key of the rule applied or None).

    The one rule: RGBA, LA, PA and P with a transparent index are composited over opaque white with PIL's
    Image.alpha_composite (c * a / 255 + 255 * (1 - a / 255); an opaque pixel keeps its colour, a fully
    transparent one becomes white, whatever colour it hid); CMYK goes through PIL's convert("RGB") (no colour
    profile). Keys: the mode, "P+transparency" for a palette with a transparent index.
    """
    from PIL import Image

    try:
        if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
            key = "P+transparency" if img.mode == "P" else img.mode
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba), key
        if img.mode == "CMYK":
            return img.convert("RGB"), "CMYK"
    except ValueError as err:  # a mode PIL cannot convert to RGBA
        raise _bad(p, f"PIL cannot convert mode {img.mode} ({err}); save it as RGB, RGBA or gray") from None
    return img, None


def _converted_note(converted: dict[str, int]) -> str:
    """The source-sentence words for _flatten's conversions ('' if none)."""
    alpha = ", ".join(f"{m}: {n}" for m, n in converted.items() if m != "CMYK")
    parts = []
    if alpha:
        parts.append(f"transparency ({alpha}) composited over opaque white with PIL's alpha_composite")
    if "CMYK" in converted:
        parts.append(f"CMYK ({converted['CMYK']}) by PIL's convert('RGB'), without a colour profile")
    return "".join("; " + p for p in parts)


def _too_small(image_size: int, p: Path, size: tuple[int, int], n_small: int) -> DataError:
    """The refusal of a picture whose shorter side is under data.image_size."""
    return DataError(
        f"data.image_size = {image_size}: {str(p)!r} is {size[0]}x{size[1]} (width x height), smaller than "
        f"{image_size} on its shorter side ({n_small} such image(s) in data.path); lower data.image_size, "
        "remove the small images, or set data.upscale: true to enlarge them (bicubic)"
    )


def _list_folder(root: Path, real_root: Path) -> tuple[list[str], list[list[Path]], list[tuple[Path, str]]]:
    """(class names, each class's image files, the links skipped): ImageFolder style, or one flat class."""
    skipped: list[tuple[Path, str]] = []
    direct, subdirs = [], []
    for p in sorted(root.iterdir()):
        image, folder = _is_image(p), (p.is_dir() and not p.name.startswith("."))
        if (image or folder) and p.is_symlink() and (why := _link_trouble(p, real_root)) is not None:
            skipped.append((p, why))
        elif image:
            direct.append(p)
        elif folder:
            subdirs.append(p)
    by_class = [(d.name, _images_under(d, real_root, skipped)) for d in subdirs]
    filled = [(c, files) for c, files in by_class if files]
    if direct and filled:
        raise _bad(
            root,
            f"images lie both directly in the folder ({direct[0].name}, ...) and in subfolders "
            f"({filled[0][0]}/, ...); put all of them in class subfolders or all in one flat folder",
        )
    if direct:  # subfolders without images beside a flat folder are not classes
        by_class = [(real_root.name or "images", direct)]
    elif filled and len(filled) < len(by_class):
        empty = [f"{c}/" for c, files in by_class if not files]
        raise _bad(
            root,
            f"class subfolder(s) {', '.join(empty)} hold no images ({', '.join(IMAGE_EXTENSIONS)}); put "
            "images in them or remove them (an empty class would shift the label of every class after it)",
        )
    if not filled and not direct:
        raise _bad(root, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder or its subfolders")
    return [c for c, _ in by_class], [files for _, files in by_class], skipped


def _load_folder(path: str | None, image_size, channels, upscale: bool = False) -> ImageData:
    """Images of a folder, ImageFolder style: class subfolders, or one class for a flat folder.

    Two passes: the headers (sizes, colour) first, so that every refusal comes before any decoding; then each
    picture decoded, flattened (_flatten), converted and resized straight into the output array, so that
    memory holds one photo at a time besides the uint8 (N, C, H, W) result.
    """
    if path is None:
        raise DataError("data.path must be set to a folder of images when data.name is 'folder'")
    root = Path(path)
    if not root.is_dir():
        raise _bad(root, "folder does not exist; set data.path to a folder of images")
    real_root = _real(root)
    classes, per_class, skipped = _list_folder(root, real_root)
    if skipped:
        print(_skipped_line(root, skipped), file=sys.stderr)
    files = [f for fs in per_class for f in fs]
    labels = np.concatenate([np.full(len(fs), k, np.int64) for k, fs in enumerate(per_class)])
    heads = [_peek(f) for f in files]
    if channels is None:
        channels = 1 if all(gray for _, gray in heads) else 3
    if image_size is None:
        sizes = {}
        for f, (size, _) in zip(files, heads):
            sizes.setdefault(size, f)
        if len(sizes) > 1:
            (s1, f1), (s2, f2) = list(sizes.items())[:2]
            raise _bad(
                root,
                f"images have different sizes, e.g. {f1.name} is {s1[0]}x{s1[1]} and {f2.name} is "
                f"{s2[0]}x{s2[1]} (width x height); set data.image_size to resize and centre-crop "
                "them all to one square size",
            )
        width, height = heads[0][0]
    else:
        width = height = image_size
        small = [(f, size) for f, (size, _) in zip(files, heads) if min(size) < image_size]
        if small and not upscale:
            raise _too_small(image_size, small[0][0], small[0][1], len(small))
    from tqdm import tqdm

    mode = "L" if channels == 1 else "RGB"
    x = np.empty((len(files), channels, height, width), np.uint8)
    converted: dict[str, int] = {}
    bar = tqdm(files, desc="reading images", unit="image", file=sys.stderr, leave=False, mininterval=1.0,
               disable=len(files) < PROGRESS_MIN_FILES)
    for i, f in enumerate(bar):
        im, key = _flatten(_open_image(f), f)
        if key is not None:
            converted[key] = converted.get(key, 0) + 1
        im = im.convert(mode)
        if image_size is not None:
            im = _resize_crop_pil(im, image_size)
        a = np.asarray(im)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if a.shape != x.shape[1:]:  # a header that lied about the size
            raise _bad(f, f"decodes to {a.shape[2]}x{a.shape[1]}, not the {width}x{height} of its header")
        x[i] = a
    converted = dict(sorted(converted.items()))
    source = (
        f"{len(files)} images in {len(classes)} class(es) from folder {str(root)!r}, decoded with PIL "
        f"and converted to 8-bit {'grayscale (L)' if channels == 1 else 'RGB'} by PIL's convert "
        f"(16-bit grayscale as round(v * 255 / 65535){_converted_note(converted)})"
    )
    if image_size is not None:
        source += f", resized (bicubic, shorter side) and centre-cropped to {image_size}x{image_size}"
        if upscale and small:
            source += f" ({len(small)} smaller image(s) enlarged, data.upscale: true)"
    train = _split(x, labels)
    notes = {"skipped_links": len(skipped), "converted": converted}
    return ImageData(
        train=train, test=_empty_like(train.x), classes=classes, source=source + ".", notes=notes
    )


# ---------------------------------------------------------------------------- public


def load_image_data(
    name: str,
    *,
    path: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    seed: int = 0,
    upscale: bool = False,
) -> ImageData:
    """Load image set `name` (one of IMAGE_DATASETS) as uint8 (N, C, H, W) pools.

    - digits: scikit-learn load_digits, 1,797 images (1, 8, 8), v -> round(v * 255 / 16),
      shuffled with `seed`; all in `train`, `test` empty.
    - photos: random 64x64 crops of scikit-learn's china.jpg and flower.jpg (class = the photo), drawn
      with `seed` and resized (PIL box filter) to image_size (null: 16), (3, S, S); 4,000 train crops
      from one region of each photo, 1,000 held-out crops from the rest in `test` (pipeline.data.photos).
    - fashion_mnist: the four official idx files in data.path (directly or in
      <path>/FashionMNIST/raw/), else in FASHION_MNIST_DIR; 60,000 + 10,000 images (1, 28, 28).
    - mnist: the same four idx files in data.path (or DOWNLOAD_ROOT), directly or in
      <path>/MNIST/raw/; 60,000 + 10,000 images (1, 28, 28).
    - cifar10: the official python batches in <path>/cifar-10-batches-py/ or <path> itself
      (path defaults to DOWNLOAD_ROOT); 50,000 + 10,000 images (3, 32, 32).
    - folder: the images under data.path (see _load_folder); all in `train`, `test` empty.
      Class subfolders must each hold an image; symbolic links are followed only inside
      data.path and never into a folder that holds them (notes["skipped_links"]); RGBA, LA,
      PA and P with transparency are composited over white, CMYK goes through PIL's
      convert("RGB") (notes["converted"], see _flatten).

    download: fetch mnist / fashion_mnist / cifar10 with torchvision into data.path (or
    DOWNLOAD_ROOT) when they are not found. channels (1 or 3) and image_size (S) convert
    every image: channels first, then shorter side to S (bicubic) and a centre S x S crop.
    upscale (folder only): enlarge pictures whose shorter side is under S instead of refusing
    them. Sets with an empty `test` get their test and reference images from the train pool
    in split_image_data.
    """
    _check_options(image_size, channels, upscale)
    if name == "digits":
        return _load_digits(seed, image_size, channels)
    if name == "photos":
        return _load_photos(seed, image_size, channels)
    if name in ("fashion_mnist", "mnist"):
        return _load_idx_set(name, path, download, image_size, channels)
    if name == "cifar10":
        return _load_cifar10(path, download, image_size, channels)
    if name == "folder":
        return _load_folder(path, image_size, channels, upscale)
    raise DataError(
        f"data.name must be one of {IMAGE_DATASETS} for images (a uint8 .npy file goes through "
        f"load_uint8_file), got {name!r}"
    )


# What a data.name: file of images must hold, for the refusals of load_uint8_file.
IMAGE_FILE_FORM = "a uint8 array (N, C, H, W) with C = 1 or 3 channels and values 0..255"


def load_uint8_file(
    path: str | os.PathLike,
    labels_path: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    upscale: bool = False,
) -> ImageData:
    """ImageData from a uint8 .npy of shape (N, C, H, W), C in (1, 3), all in the train pool.

    labels_path: an optional .npy of N integers >= 0 (classes "0".."K-1" for K = max + 1);
    without it every label is 0 and the one class is "unlabelled". `test` is empty, so
    split_image_data carves test and reference from this pool. channels and image_size convert
    as in load_image_data; images smaller than image_size are refused unless `upscale`.
    """
    _check_options(image_size, channels, upscale)
    path = Path(path)
    if not path.is_file():
        raise _bad(path, f"file does not exist; set data.path to a .npy holding {IMAGE_FILE_FORM}")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise _bad(path, f"not a readable .npy file ({err})") from None
    if not isinstance(x, np.ndarray):
        raise _bad(path, f"a data.name: file of images must be {IMAGE_FILE_FORM}, got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise _bad(
            path,
            f"images must be uint8 (0..255), got {x.dtype} {x.shape}: a data.name: file of images must be "
            f"{IMAGE_FILE_FORM}; scale the values to 0..255 and save x.astype(np.uint8) "
            "(a 2-D array (N, D) is read as points)",
        )
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        hint = ""
        if x.ndim == 3:
            hint = "; for grayscale (N, H, W) save x[:, None]"
        elif x.ndim == 4 and x.shape[3] in (1, 3):
            hint = "; for channels-last (N, H, W, C) save x.transpose(0, 3, 1, 2)"
        raise _bad(
            path,
            f"images must have shape (N, C, H, W) with C = 1 or 3, got {x.shape}: a data.name: file of "
            f"images must be {IMAGE_FILE_FORM}{hint}",
        )
    if x.shape[0] == 0:
        raise _bad(path, "the array holds no images")
    if image_size is not None and min(x.shape[2:]) < image_size and not upscale:
        h, w = x.shape[2:]
        raise _too_small(image_size, path, (w, h), x.shape[0])
    if labels_path is None:
        y, classes = np.zeros(x.shape[0], np.int64), ["unlabelled"]
    else:
        y, classes = _load_labels(Path(labels_path), path, x.shape[0])
    train = _split(x, y)
    if image_size is None and channels in (None, x.shape[1]):
        source = f"{x.shape[0]} uint8 images {tuple(x.shape[1:])} from {str(path)!r}, used as stored"
    else:
        train = _split(_convert(x, image_size, channels), y)
        source = f"{x.shape[0]} uint8 images {tuple(x.shape[1:])} from {str(path)!r}" + _conversion_note(
            image_size, channels
        )
    return ImageData(train=train, test=_empty_like(train.x), classes=classes, source=source + ".")


def _load_labels(lp: Path, path: Path, n: int) -> tuple[np.ndarray, list[str]]:
    """(labels (n,), class names "0".."K-1") from data.labels_path, checked against the n images of path."""

    def bad(what: str) -> DataError:
        return DataError(f"data.labels_path = {str(lp)!r} (for data.path = {str(path)!r}): {what}")

    try:
        y = np.load(lp, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise bad(f"labels are not a readable .npy file ({err})") from None
    if not isinstance(y, np.ndarray) or not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        got = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
        raise bad(f"labels must be a 1-D integer array, got {got}")
    if y.shape[0] != n:
        raise bad(
            f"{y.shape[0]} labels for {n} images in {path.name}; data.labels_path must hold one integer "
            "label per image, in the order of the images"
        )
    if n and int(y.min()) < 0:
        raise bad(f"labels must be >= 0, got {int(y.min())}")
    return y, [str(k) for k in range(int(y.max()) + 1)]


def _digests(x: np.ndarray) -> list[bytes]:
    """A 16-byte BLAKE2b digest of each image of x (N, C, H, W): equal bytes, equal digests.

    Digests, not the bytes themselves, so that a set of large images is not held twice in memory.
    """
    x = np.ascontiguousarray(x)
    return [hashlib.blake2b(img, digest_size=16).digest() for img in x]


def split_duplicates(splits: dict[str, ImageSplit]) -> dict[str, int]:
    """Images of one split that are byte for byte an image of another split, counted.

    {"train_test": test images found in train, "train_reference": reference images found in train,
    "test_reference": reference images found in test}.
    """
    d = {k: _digests(splits[k].x) for k in ("train", "test", "reference")}
    train, test = set(d["train"]), set(d["test"])
    return {
        "train_test": sum(h in train for h in d["test"]),
        "train_reference": sum(h in train for h in d["reference"]),
        "test_reference": sum(h in test for h in d["reference"]),
    }


def check_held_out(
    data: ImageData, splits: dict[str, ImageSplit], duplicates: dict[str, int], where: str
) -> None:
    """Refuse a test split that is not held out: every test image a copy of a training image, or (a pool
    without an official test split) every image of the pool present at least twice, so that any split leaks.

    where: "data.path = '...'" (or the data.name), the start of the message.
    """
    n_test = len(splits["test"])
    if n_test == 0:
        return
    hint = (
        "look for symbolic links back into the folder and for subfolders holding the same files (a folder's "
        "subfolders are classes, not splits: train/ and test/ would be two classes), remove the copies"
    )
    if duplicates["train_test"] == n_test:
        raise DataError(
            f"{where}: every one of the {n_test} test images is byte for byte a training image, so the test "
            f"split is not held out (and {duplicates['train_reference']} of {len(splits['reference'])} "
            f"reference images too); {hint}"
        )
    if len(data.test) == 0:
        counts: dict[bytes, int] = {}
        for h in _digests(data.train.x):
            counts[h] = counts.get(h, 0) + 1
        if min(counts.values()) > 1:
            raise DataError(
                f"{where}: every one of the {len(data.train)} images appears at least twice "
                f"({len(counts)} distinct images), so no test image can be held out of training "
                f"({duplicates['train_test']} of {n_test} test images are training images in this split); "
                f"{hint}"
            )


def _check_count(key: str, v) -> int:
    """A non-negative integer split size, else DataError naming data.<key>."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise DataError(f"data.{key} must be a non-negative integer (or auto), got {v!r}")
    return int(v)


def split_image_data(
    data: ImageData, n_train: int, n_test: int, n_reference: int, seed: int
) -> dict[str, ImageSplit]:
    """{"train", "test", "reference"} ImageSplits of n_train, n_test, n_reference images.

    With an official test pool: train = the first n_train of a seeded permutation of
    data.train; test = the first n_test and reference = the next n_reference of a seeded
    permutation of data.test (disjoint). Without one (data.test empty: digits, folder,
    file): ONE permutation of data.train gives test first, then reference, then train.
    """
    n_train = _check_count("n_train", n_train)
    n_test = _check_count("n_test", n_test)
    n_reference = _check_count("n_reference", n_reference)
    if n_train < 1:
        raise DataError(f"data.n_train must be at least 1, got {n_train}")
    rng = np.random.default_rng(seed)
    n_pool, n_held = len(data.train), len(data.test)
    if n_held == 0:
        total = n_train + n_test + n_reference
        if total > n_pool:
            raise DataError(
                f"data.n_train + data.n_test + data.n_reference = {n_train} + {n_test} + {n_reference} = "
                f"{total}, but the data set has only {n_pool} images (no official test split, so all "
                "three come from one pool); lower them or set them to auto"
            )
        perm = rng.permutation(n_pool)
        a, b = n_test, n_test + n_reference
        idx = {"test": perm[:a], "reference": perm[a:b], "train": perm[b:total]}
        return {k: _split(data.train.x[i], data.train.y[i]) for k, i in idx.items()}
    if n_train > n_pool:
        raise DataError(
            f"data.n_train = {n_train}, but the training split has only {n_pool} images; "
            "lower it or set it to auto"
        )
    if n_test + n_reference > n_held:
        raise DataError(
            f"data.n_test + data.n_reference = {n_test} + {n_reference} = {n_test + n_reference}, but the "
            f"test split has only {n_held} images (both come from it, disjoint); "
            "lower them or set them to auto"
        )
    p_train, p_test = rng.permutation(n_pool), rng.permutation(n_held)
    i_train, i_test, i_ref = p_train[:n_train], p_test[:n_test], p_test[n_test : n_test + n_reference]
    return {
        "train": _split(data.train.x[i_train], data.train.y[i_train]),
        "test": _split(data.test.x[i_test], data.test.y[i_test]),
        "reference": _split(data.test.x[i_ref], data.test.y[i_ref]),
    }


def default_split_sizes(name: str, data: ImageData) -> tuple[int, int, int]:
    """(n_train, n_test, n_reference) that data.n_train / n_test / n_reference: auto mean.

    digits: 300 test, 300 reference, the rest (1,197) train. An official test pool
    (fashion_mnist, mnist, cifar10) or a held-out one (photos: 4,000 / 500 / 500): all of train,
    half the test pool each for test and reference. Otherwise (folder, file): k = max(1, min(1000,
    N // 5)) each, the rest train.
    """
    n = len(data.train)
    if name == "digits" and len(data.test) == 0:
        n_test = n_ref = 300
    elif len(data.test) > 0:
        return n, len(data.test) // 2, len(data.test) // 2
    else:
        n_test = n_ref = max(1, min(1000, n // 5))
    if n - n_test - n_ref < 1:
        raise DataError(
            f"data.n_train: auto leaves no training image: the data set has {n} images and "
            f"{n_test} + {n_ref} go to test and reference; add images or set data.n_test / data.n_reference"
        )
    return n - n_test - n_ref, n_test, n_ref
