"""IDX readers for MNIST and Fashion-MNIST (LeCun's format, gzipped or raw).

An IDX file is a 4-byte big-endian magic (0x0000, dtype code 0x08 = ubyte, ndim), ndim big-endian
uint32 dims, then the bytes. Images are magic 2051 (N, 28, 28), labels magic 2049 (N,). Every
check names the file: a truncated download is the usual failure and must not surface as a reshape
error three frames deep.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from trainer.datasets._types import DatasetError, Split

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
GZIP_MAGIC = b"\x1f\x8b"

# split -> (images stem, labels stem), the names every mirror uses
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its suffix)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path} is a truncated or corrupt gzip file ({e}); download it again") from e


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Decode one IDX file of unsigned bytes, checking magic, dims and exact length."""
    raw = read_bytes(path)
    if len(raw) < 4:
        raise DatasetError(f"{path} is truncated: {len(raw)} bytes, not even an IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise DatasetError(
            f"{path} has IDX magic {got}, expected {magic} (ubyte {kind}); wrong file or corrupt download"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated: {len(raw)} bytes, header needs {header}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DatasetError(
            f"{path} is {what}: {len(raw)} bytes, expected {expected} for dims {dims}; download it again"
        )
    # frombuffer is zero-copy on immutable bytes; copy once so torch gets a writable array.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def find_file(folder: Path, stem: str, subdirs: tuple[str, ...]) -> Path | None:
    """``stem`` or ``stem.gz`` in ``folder`` or a torchvision-style subfolder (``MNIST/raw``)."""
    # Some mirrors spell "train-images.idx3-ubyte" with a dot.
    dotted = stem.replace("-idx", ".idx")
    for sub in ("", *subdirs):
        for name in (stem, dotted):
            for suffix in (".gz", ""):
                path = folder / sub / (name + suffix)
                if path.is_file():
                    return path
    return None


def load_idx_split(images: Path, labels: Path, num_classes: int) -> Split:
    """Images + labels files -> Split, checking they agree."""
    x = read_idx(images, IMAGES_MAGIC)  # (N, H, W)
    y = read_idx(labels, LABELS_MAGIC)  # (N,)
    if x.ndim != 3:
        raise DatasetError(f"{images} holds {x.ndim}-d data, expected (N, H, W) images")
    if y.ndim != 1:
        raise DatasetError(f"{labels} holds {y.ndim}-d data, expected (N,) labels")
    if x.shape[0] != y.shape[0]:
        raise DatasetError(
            f"{images} has {x.shape[0]} images but {labels} has {y.shape[0]} labels; "
            "the files are from different splits or one is corrupt"
        )
    if y.size and int(y.max()) >= num_classes:
        raise DatasetError(f"{labels} has label {int(y.max())}, expected 0..{num_classes - 1}")
    return Split(x=torch.from_numpy(x).unsqueeze(1), y=torch.from_numpy(y).long())  # (N, 1, H, W)
