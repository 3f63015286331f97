"""trainer.data CIFAR-10/100 readers: python batches written by the tests, from folders and archives."""

from __future__ import annotations

import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainer.data import DatasetError, Split, load_dataset


def _check_cifar_pixels(split: Split, data: np.ndarray) -> None:
    # Row layout: 1024 red, 1024 green, 1024 blue bytes, each 32x32 row-major.
    assert (
        split.x.shape == (len(data), 3, 32, 32) and split.x.dtype == torch.uint8 and split.x.is_contiguous()
    )
    i, c, r, col = len(data) - 1, 2, 5, 31
    assert int(split.x[i, c, r, col]) == int(data[i, c * 1024 + r * 32 + col])
    np.testing.assert_array_equal(split.x.reshape(len(data), -1).numpy(), data)


def _tar_gz(src: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return archive


@pytest.mark.parametrize("source", ["folder", "archive-in-root", "archive-path", "batches-folder"])
def test_cifar10_round_trip(tmp_path: Path, source: str, cifar_writer: Callable[..., Any]) -> None:
    written = cifar_writer(tmp_path / "src", "cifar10")
    batches = tmp_path / "src" / "cifar-10-batches-py"
    if source == "folder":
        data_dir = tmp_path / "src"
    elif source == "batches-folder":
        data_dir = batches
    else:
        (tmp_path / "root").mkdir()
        data_dir = _tar_gz(batches, tmp_path / "root" / "cifar-10-python.tar.gz")
        if source == "archive-in-root":
            data_dir = data_dir.parent
    info, train, test = load_dataset("cifar10", data_dir=data_dir)
    train_data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    _check_cifar_pixels(train, train_data)
    _check_cifar_pixels(test, written["test_batch"][0])
    expected = np.concatenate([written[f"data_batch_{i}"][1]["labels"] for i in range(1, 6)])
    np.testing.assert_array_equal(train.y.numpy(), expected)
    assert train.y.dtype == torch.int64
    assert info.class_names == tuple(f"c10_{i}" for i in range(10))  # from batches.meta
    assert (info.channels, info.image_size, info.hflip, info.crop_padding) == (3, 32, True, 4)
    assert info.mean == (0.4914, 0.4822, 0.4465)


@pytest.mark.parametrize(
    ("name", "key", "n_classes"), [("cifar100", "fine", 100), ("cifar100-coarse", "coarse", 20)]
)
def test_cifar100_fine_and_coarse(
    tmp_path: Path, name: str, key: str, n_classes: int, cifar_writer: Callable[..., Any]
) -> None:
    written = cifar_writer(tmp_path, "cifar100")
    info, train, test = load_dataset(name, data_dir=tmp_path)
    _check_cifar_pixels(train, written["train"][0])
    np.testing.assert_array_equal(train.y.numpy(), written["train"][1][f"{key}_labels"])
    np.testing.assert_array_equal(test.y.numpy(), written["test"][1][f"{key}_labels"])
    assert info.class_names == tuple(f"{key}_{i}" for i in range(n_classes))
    assert info.name == name and info.mean == (0.5071, 0.4865, 0.4409)


def test_cifar_truncated_batch_names_the_file(tmp_path: Path, cifar_writer: Callable[..., Any]) -> None:
    cifar_writer(tmp_path, "cifar10")
    target = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    target.write_bytes(target.read_bytes()[:500])
    with pytest.raises(DatasetError, match="truncated or corrupt") as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(target) in str(e.value)


def test_cifar_pickle_cannot_run_code(tmp_path: Path, cifar_writer: Callable[..., Any]) -> None:
    cifar_writer(tmp_path, "cifar10")
    target = tmp_path / "cifar-10-batches-py" / "test_batch"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    target.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DatasetError, match="not allowed") as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(target) in str(e.value) and not marker.exists()


def test_cifar_label_count_mismatch_and_missing_batch(
    tmp_path: Path, cifar_writer: Callable[..., Any]
) -> None:
    cifar_writer(tmp_path, "cifar100")
    target = tmp_path / "cifar-100-python" / "test"
    d = pickle.loads(target.read_bytes())
    d[b"coarse_labels"] = d[b"coarse_labels"][:-1]
    target.write_bytes(pickle.dumps(d))
    with pytest.raises(DatasetError, match="8 images but 7 labels") as e:
        load_dataset("cifar100-coarse", data_dir=tmp_path)
    assert str(target) in str(e.value)
    (tmp_path / "cifar-100-python" / "train").unlink()
    with pytest.raises(DatasetError, match="train is missing"):
        load_dataset("cifar100", data_dir=tmp_path)


def test_cifar_truncated_archive_and_missing_dir(tmp_path: Path, cifar_writer: Callable[..., Any]) -> None:
    cifar_writer(tmp_path / "src", "cifar10")
    archive = _tar_gz(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DatasetError, match="truncated or corrupt archive") as e:
        load_dataset("cifar10", data_dir=archive)
    assert str(archive) in str(e.value)
    with pytest.raises(DatasetError, match="cifar-100-python.tar.gz.*--data-dir"):
        load_dataset("cifar100", data_dir=tmp_path / "nowhere")
