"""CIFAR-10/100 readers for the "python version" batches (pickled dicts), from a folder or the .tar.gz.

Layouts accepted under a root folder (torchvision's ``CIFAR10(root)`` writes the first two)::

    root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    root/cifar-10-python.tar.gz
    root = the batches folder itself, or root = the .tar.gz file

The pickles are read with an unpickler that only resolves the numpy globals a batch needs, so a
tampered file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.datasets._types import DatasetError, Split


@dataclass(frozen=True)
class CifarLayout:
    folder: str  # folder inside the archive
    archive: str
    train: tuple[str, ...]
    test: str
    meta: str


CIFAR10 = CifarLayout(
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test="test_batch",
    meta="batches.meta",
)
CIFAR100 = CifarLayout(
    folder="cifar-100-python", archive="cifar-100-python.tar.gz", train=("train",), test="test", meta="meta"
)

_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # numpy 2 renamed numpy.core -> numpy._core; the original (Python 2) batches use the old name.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(blob: bytes, source: str) -> dict[bytes, Any]:
    try:
        d = _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # truncated pickle, foreign object, wrong file
        raise DatasetError(
            f"{source} is not a readable CIFAR python batch (truncated or corrupt): {e}"
        ) from e
    if not isinstance(d, dict):
        raise DatasetError(f"{source} is not a CIFAR python batch: holds a {type(d).__name__}, not a dict")
    # Batches written by Python 3 code have str keys; the originals have bytes keys.
    return {k.encode() if isinstance(k, str) else k: v for k, v in d.items()}


def locate(root: Path, layout: CifarLayout) -> Path | None:
    """The batches folder or the archive under ``root`` (see module docstring), else None."""
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        return root
    for folder in (root / layout.folder, root):
        if (folder / layout.test).is_file():
            return folder
    if (root / layout.archive).is_file():
        return root / layout.archive
    return None


def read_members(source: Path, layout: CifarLayout, names: tuple[str, ...]) -> dict[str, bytes]:
    """Raw bytes of the named batch files, from the folder or straight out of the archive."""
    out: dict[str, bytes] = {}
    if source.is_dir():
        for name in names:
            path = source / name
            if not path.is_file():
                raise DatasetError(f"{path} is missing (the CIFAR folder is incomplete)")
            out[name] = path.read_bytes()
        return out
    try:
        # One sequential pass: seeking backwards in a .tar.gz means decompressing from the start again.
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                name = Path(member.name).name
                f = tar.extractfile(member) if member.isfile() and name in names else None
                if f is not None:
                    out[name] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{source} is a truncated or corrupt archive ({e}); download it again") from e
    missing = [n for n in names if n not in out]
    if missing:
        raise DatasetError(f"{source} has no member(s) {', '.join(f'{layout.folder}/{n}' for n in missing)}")
    return out


def decode_batches(
    blobs: list[tuple[str, bytes]], label_key: bytes, num_classes: int, image_size: int = 32
) -> Split:
    """Concatenate python batches into one (N, 3, 32, 32) uint8 Split."""
    xs, ys = [], []
    for source, blob in blobs:
        d = _unpickle(blob, source)
        if b"data" not in d or label_key not in d:
            raise DatasetError(
                f"{source} lacks b'data' or {label_key!r}: keys are {sorted(d)}; wrong CIFAR version?"
            )
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[label_key], dtype=np.int64)
        pixels = 3 * image_size * image_size
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
            raise DatasetError(f"{source}: data is {data.dtype} {data.shape}, expected uint8 (N, {pixels})")
        if labels.shape != (data.shape[0],):
            raise DatasetError(f"{source} has {data.shape[0]} images but {labels.size} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetError(f"{source} has labels outside 0..{num_classes - 1}")
        xs.append(data)
        ys.append(labels)
    # Rows are 1024 R, then 1024 G, then 1024 B bytes, row-major: a plain reshape gives NCHW.
    x = np.concatenate(xs).reshape(-1, 3, image_size, image_size)
    return Split(x=torch.from_numpy(x), y=torch.from_numpy(np.concatenate(ys)))


def decode_names(blob: bytes, source: str, key: bytes, expected: int) -> tuple[str, ...]:
    d = _unpickle(blob, source)
    if key not in d:
        raise DatasetError(f"{source} lacks {key!r}: keys are {sorted(d)}")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in d[key])
    if len(names) != expected:
        raise DatasetError(f"{source} lists {len(names)} class names under {key!r}, expected {expected}")
    return names
