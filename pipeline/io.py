"""Atomic, byte-deterministic writers and readers for every file a stage produces.

A killed stage must leave the previous file or none, never half a file (docs/design.md,
"Stages and their contracts"), and the same arrays must give the same bytes so that
`dvc repro --force` twice yields identical outputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

# The process's umask, read once (reading it means setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)
# A fixed zip timestamp: numpy's savez stamps the current time, which breaks byte equality.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes it 0600; the output gets what open() would give it
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as sorted, indented JSON, atomically and deterministically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of an .npz archive of `arrays` with fixed timestamps (loadable by np.load)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr_buf = io.BytesIO()
            np.lib.format.write_array(arr_buf, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, arr_buf.getvalue())
    return buf.getvalue()


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save arrays as .npz atomically with byte-identical output for identical input."""
    write_bytes(path, npz_bytes(arrays))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array as .npy atomically."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    write_bytes(path, buf.getvalue())


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an .npz file (no pickles)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """torch.save atomically; `obj` must hold only tensors and plain containers.

    Saved through a buffer: torch.save names the archive's root folder after the file, and the
    temporary file's random name would make the bytes differ from run to run.
    """
    import torch  # here, not at the top: stages that write no model (report, ema) never import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def load_torch(path: str | os.PathLike, mmap: bool = False) -> Any:
    """torch.load with weights_only=True: nothing but tensors and plain containers. A file that pickles anything
    else (an object a full unpickler would run code for) is refused with a DataError naming it, which every stage
    turns into a message and exit status 2 rather than a traceback. mmap: the tensors are mapped from the file and
    read when used (a large file's metadata without its weights)."""
    import pickle

    import torch

    from pipeline.errors import DataError

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice to load it unsafely; keep only what it found, e.g. "Unsupported
        # global: GLOBAL mymodule.MyClass was not an allowed global by default."
        found = [ln.split("WeightsUnpickler error:", 1)[1].split(" Please use")[0].strip()
                 for ln in str(err).splitlines() if "WeightsUnpickler error:" in ln]
        raise DataError(f"{path} is not a weights-only model file: it holds more than tensors and plain containers"
                        + (f" ({found[0]})" if found else "")) from None


def check_torch_archive(path: str | os.PathLike) -> None:
    """Refuse (ValueError) a file that is not a torch.save zip archive with its data.pkl, without importing torch;
    load_torch's weights-only unpickler still judges what the pickle holds when the model is used."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a model file written by torch.save ({err})") from None
    if not any(n.endswith("/data.pkl") for n in names):
        raise ValueError(f"{path} is a zip file but not a torch.save archive (no data.pkl)")
