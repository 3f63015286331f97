"""Fixtures shared by every test package.

``CNN_REQUIRE_GPU=1`` (a GPU host's check, bench/gpu_check.sh) turns every skip of a ``gpu`` test
into a failure, with the skip's reason: there a missing library or driver must not read as
'skipped'.

Dataset fixtures write small files in the real on-disk formats (IDX, CIFAR python batches), so
tests exercise the real readers without downloads; ``fashion_mnist_dir`` is the real dataset and
skips when it is not installed.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

IdxWriter = Callable[..., Path]


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False, magic: int | None = None) -> Path:
    """Write ``array`` (uint8) as an IDX file; ``magic`` overrides the header's (for corrupt files)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim  # 2049 for (N,), 2051 for (N, H, W)
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    return path


@pytest.fixture
def idx_writer() -> IdxWriter:
    """``idx_writer(path, array, gz=False, magic=None) -> path``."""
    return write_idx


def write_mnist_like(
    folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0, size: int = 28
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A complete four-file MNIST-style folder of random images, labels 0..9 cycling; returns the arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        images, labels = IDX_FILES[split]
        suffix = ".gz" if gz else ""
        write_idx(folder / (images + suffix), x, gz=gz)
        write_idx(folder / (labels + suffix), y, gz=gz)
        out[split] = (x, y)
    return out


@pytest.fixture
def mnist_writer() -> Callable[..., dict]:
    """``mnist_writer(folder, n_train=60, n_test=20, gz=True, seed=0) -> {split: (images, labels)}``."""
    return write_mnist_like


@pytest.fixture
def fake_mnist_dir(tmp_path: Path) -> Path:
    """A tiny gzipped MNIST/Fashion-MNIST-style folder (60 train / 20 test images, 28x28)."""
    folder = tmp_path / "mnist"
    write_mnist_like(folder)
    return folder


def write_cifar(
    root: Path, kind: str = "cifar10", n_per_batch: int = 8, seed: int = 0
) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """CIFAR "python" batches under ``root/cifar-10-batches-py`` or ``root/cifar-100-python``.

    Returns {batch file name: (data (N, 3072) uint8, {label key: labels})}. Written like the
    originals: bytes keys, numpy data, list labels.
    """
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta_name, meta = "batches.meta", {b"label_names": [f"c10_{i}".encode() for i in range(10)]}
    else:
        folder = root / "cifar-100-python"
        names = ["train", "test"]
        meta_name = "meta"
        meta = {
            b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
        }
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        n = n_per_batch * (5 if kind != "cifar10" and name == "train" else 1)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        if kind == "cifar10":
            labels = {"labels": rng.integers(0, 10, n)}
        else:
            labels = {"fine_labels": rng.integers(0, 100, n), "coarse_labels": rng.integers(0, 20, n)}
        d = {
            b"data": data,
            b"batch_label": name.encode(),
            **{k.encode(): v.tolist() for k, v in labels.items()},
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
        out[name] = (data, labels)
    (folder / meta_name).write_bytes(pickle.dumps(meta, protocol=2))
    return out


@pytest.fixture
def cifar_writer() -> Callable[..., dict]:
    """``cifar_writer(root, kind="cifar10"|"cifar100", n_per_batch=8) -> {batch: (data, labels)}``."""
    return write_cifar


@pytest.fixture
def fashion_mnist_dir() -> Path:
    """The real Fashion-MNIST (Debian package dataset-fashion-mnist); skips when absent."""
    missing = [
        name
        for pair in IDX_FILES.values()
        for name in pair
        if not (FASHION_MNIST_DIR / f"{name}.gz").is_file()
    ]
    if missing:
        pytest.skip(
            f"real Fashion-MNIST not installed ({FASHION_MNIST_DIR}); apt-get install -y dataset-fashion-mnist"
        )
    return FASHION_MNIST_DIR


REQUIRE_GPU = "CNN_REQUIRE_GPU"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(REQUIRE_GPU) == "1" and item.get_closest_marker("gpu"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"{REQUIRE_GPU}=1, and this gpu test could not run: {reason.removeprefix('Skipped: ')}"
        )
