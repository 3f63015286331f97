"""trainer.data: real on-disk formats written by the tests, errors that name the file, augmentation."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.data import DatasetError, DatasetInfo, Split, augment, list_datasets, load_dataset, to_float

FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def test_registry_names_and_unknown_name() -> None:
    names = list_datasets()
    for name in (
        "fashion-mnist",
        "mnist",
        "cifar10",
        "cifar100",
        "cifar100-coarse",
        "synthetic",
        "synthetic-rgb",
    ):
        assert name in names
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*fashion-mnist.*cifar100-coarse"):
        load_dataset("imagenet")


# ---------------------------------------------------------------- IDX (MNIST / Fashion-MNIST)


@pytest.mark.parametrize("layout", ["gz", "raw", "torchvision", "dotted"])
def test_idx_round_trip(tmp_path: Path, layout: str, mnist_writer: Callable[..., Any]) -> None:
    folder = tmp_path / "d"
    arrays = mnist_writer(folder / ("MNIST/raw" if layout == "torchvision" else ""), gz=layout != "raw")
    if layout == "dotted":  # some mirrors name them train-images.idx3-ubyte
        for f in folder.iterdir():
            f.rename(f.with_name(f.name.replace("-idx", ".idx")))
    info, train, test = load_dataset("mnist", data_dir=folder)
    for split, (x, y) in zip((train, test), (arrays["train"], arrays["test"]), strict=True):
        assert (
            split.x.dtype == torch.uint8 and split.x.shape == (len(x), 1, 28, 28) and split.x.is_contiguous()
        )
        assert split.y.dtype == torch.int64 and split.y.shape == (len(y),)
        np.testing.assert_array_equal(split.x[:, 0].numpy(), x)
        np.testing.assert_array_equal(split.y.numpy(), y)
    assert info.name == "mnist" and info.class_names == tuple("0123456789")
    assert (info.mean, info.std, info.channels, info.image_size) == ((0.1307,), (0.3081,), 1, 28)
    assert info.hflip is False and info.crop_padding == 2


def test_fashion_mnist_from_data_dir_has_real_class_names(fake_mnist_dir: Path) -> None:
    info, train, _ = load_dataset("fashion-mnist", data_dir=str(fake_mnist_dir))
    assert info.class_names == FMNIST_CLASSES
    assert (info.mean, info.std, info.hflip) == ((0.2860,), (0.3530,), True)
    assert len(train) == 60


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_names_the_file(tmp_path: Path, gz: bool, mnist_writer: Callable[..., Any]) -> None:
    mnist_writer(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    target = tmp_path / f"train-images-idx3-ubyte{suffix}"
    target.write_bytes(target.read_bytes()[:-100])  # a download cut short
    with pytest.raises(DatasetError, match="truncated") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(target) in str(e.value)


def test_idx_longer_than_header_says(tmp_path: Path, mnist_writer: Callable[..., Any]) -> None:
    mnist_writer(tmp_path, gz=False)
    target = tmp_path / "t10k-labels-idx1-ubyte"
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(DatasetError, match="longer than its header") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(target) in str(e.value)


def test_wrong_magic_names_the_file(
    tmp_path: Path, mnist_writer: Callable[..., Any], idx_writer: Callable[..., Any]
) -> None:
    mnist_writer(tmp_path)
    # A labels file where the images file should be: magic 2049, not 2051.
    target = tmp_path / "train-images-idx3-ubyte.gz"
    idx_writer(target, np.zeros(60, np.uint8), gz=True)
    with pytest.raises(DatasetError, match="magic 2049, expected 2051") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(target) in str(e.value)
    idx_writer(target, np.zeros((60, 28, 28), np.uint8), gz=True, magic=0x0D0803)  # int32 dtype code
    with pytest.raises(DatasetError, match=str(target)):
        load_dataset("mnist", data_dir=tmp_path)


def test_count_mismatch_names_both_files(
    tmp_path: Path, mnist_writer: Callable[..., Any], idx_writer: Callable[..., Any]
) -> None:
    mnist_writer(tmp_path, n_test=20)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    idx_writer(labels, np.zeros(19, np.uint8), gz=True)
    with pytest.raises(DatasetError, match="20 images.*19 labels") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(labels) in str(e.value) and str(tmp_path / "t10k-images-idx3-ubyte.gz") in str(e.value)


def test_label_out_of_range(
    tmp_path: Path, mnist_writer: Callable[..., Any], idx_writer: Callable[..., Any]
) -> None:
    mnist_writer(tmp_path)
    idx_writer(tmp_path / "train-labels-idx1-ubyte.gz", np.full(60, 10, np.uint8), gz=True)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.gz has label 10, expected 0..9"):
        load_dataset("mnist", data_dir=tmp_path)


def test_corrupt_gzip_names_the_file(tmp_path: Path, mnist_writer: Callable[..., Any]) -> None:
    mnist_writer(tmp_path)
    target = tmp_path / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DatasetError, match="corrupt gzip") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(target) in str(e.value)


def test_missing_dir_says_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", data_dir=missing)
    msg = str(e.value)
    assert str(missing / "train-images-idx3-ubyte") in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg and "--download" in msg and "--data-dir" in msg
    with pytest.raises(DatasetError, match="--data-dir") as e:
        load_dataset("mnist", data_dir=missing)
    assert "https://" in str(e.value)


def test_half_populated_dir_names_the_missing_file(tmp_path: Path, mnist_writer: Callable[..., Any]) -> None:
    mnist_writer(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\(\.gz\) not found"):
        load_dataset("mnist", data_dir=tmp_path)


def test_download_without_torchvision_explains_manual_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail, no network
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DatasetError, match="needs a working torchvision") as e:
        load_dataset("mnist", data_dir=tmp_path / "m", download=True)
    assert "train-images-idx3-ubyte.gz" in str(e.value)  # how to get the files by hand
    with pytest.raises(DatasetError, match="needs a working torchvision.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path / "c", download=True)


# ---------------------------------------------------------------- synthetic


@pytest.mark.parametrize(("name", "shape"), [("synthetic", (1, 28, 28)), ("synthetic-rgb", (3, 32, 32))])
def test_synthetic_is_deterministic_balanced_and_shaped(name: str, shape: tuple[int, int, int]) -> None:
    info, train, test = load_dataset(name, synthetic_train=200, synthetic_test=50, seed=3)
    _, train2, test2 = load_dataset(name, synthetic_train=200, synthetic_test=50, seed=3)
    _, train3, _ = load_dataset(name, synthetic_train=200, synthetic_test=50, seed=4)
    assert torch.equal(train.x, train2.x) and torch.equal(test.y, test2.y)
    assert not torch.equal(train.x, train3.x)
    assert train.x.shape == (200, *shape) and test.x.shape == (50, *shape) and train.x.dtype == torch.uint8
    assert torch.bincount(train.y, minlength=10).tolist() == [20] * 10
    assert not torch.equal(train.x[:50], test.x)  # the test split is its own draw
    assert info.input_shape == shape and info.num_classes == 10
    assert len(info.mean) == shape[0] and all(s > 0 for s in info.std)
    # mean/std describe the training pixels they normalize
    pix = train.x.double().div(255).transpose(0, 1).reshape(shape[0], -1)
    np.testing.assert_allclose(info.mean, pix.mean(1).numpy(), atol=1e-4)


def test_synthetic_is_learnable() -> None:
    # A linear softmax model, 60 full-batch steps on normalized pixels, must fit well above chance.
    info, train, test = load_dataset("synthetic", synthetic_train=1000, synthetic_test=300, seed=0)
    xtr, xte = to_float(train.x, info).flatten(1), to_float(test.x, info).flatten(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(xtr.shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(60):
        loss = F.cross_entropy(model(xtr), train.y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    acc = (model(xte).argmax(1) == test.y).float().mean()
    assert acc > 0.8, f"test accuracy {acc:.2f}: synthetic classes are not separable enough"


# ---------------------------------------------------------------- to_float / augment

MNIST_INFO = DatasetInfo(
    "mnist", tuple("0123456789"), (0.1307,), (0.3081,), 1, 28, hflip=False, crop_padding=2
)
RGB_INFO = DatasetInfo(
    "rgb", ("a", "b"), (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), 3, 8, hflip=True, crop_padding=3
)


def test_to_float_normalizes_per_channel() -> None:
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 3, 1, 3).contiguous()
    out = to_float(x, RGB_INFO)
    assert out.dtype == torch.float32 and out.shape == x.shape and out.device == x.device
    for c, (m, s) in enumerate(zip(RGB_INFO.mean, RGB_INFO.std, strict=True)):
        expected = torch.tensor([(0 - m) / s, (1 - m) / s, (0.2 - m) / s])
        torch.testing.assert_close(out[1, c, 0], expected, rtol=0, atol=1e-5)
    y = to_float(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8), MNIST_INFO)
    torch.testing.assert_close(y, torch.full((1, 1, 2, 2), (1 - 0.1307) / 0.3081))
    with pytest.raises(ValueError, match="3 channel"):
        to_float(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), RGB_INFO)


def _find_crop(out: torch.Tensor, src: torch.Tensor, pad: int) -> list[tuple[int, int, bool]]:
    """All (dy, dx, flipped) whose manual crop of zero-padded ``src`` (C, H, W) equals ``out``."""
    h, w = src.shape[1:]
    padded = F.pad(src, (pad, pad, pad, pad))
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            hits += [
                (dy, dx, flip) for flip in (False, True) if torch.equal(out, crop.flip(2) if flip else crop)
            ]
    return hits


@pytest.mark.parametrize("info", [RGB_INFO, MNIST_INFO], ids=["rgb-hflip", "mnist-noflip"])
def test_augment_is_a_per_sample_crop_and_flip(info: DatasetInfo) -> None:
    g = torch.Generator().manual_seed(0)
    x = (
        torch.rand(64, info.channels, info.image_size, info.image_size, generator=g) + 0.1
    )  # no zeros: crops unique
    out = augment(x, info, generator=torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    transforms = []
    for i in range(len(x)):
        hits = _find_crop(out[i], x[i], info.crop_padding)
        assert len(hits) == 1, f"sample {i} is not a crop/flip of its input"
        transforms.append(hits[0])
    offsets = {(dy, dx) for dy, dx, _ in transforms}
    flips = [f for *_, f in transforms]
    assert len(offsets) > 5  # per-sample offsets, not one shift for the batch
    assert any(o != (info.crop_padding, info.crop_padding) for o in offsets)
    if info.hflip:
        assert 10 < sum(flips) < 54
    else:
        assert not any(flips)  # digits are never mirrored


def test_augment_is_deterministic_given_the_generator() -> None:
    x = torch.rand(32, 3, 8, 8)
    a = augment(x, RGB_INFO, generator=torch.Generator().manual_seed(1))
    b = augment(x, RGB_INFO, generator=torch.Generator().manual_seed(1))
    c = augment(x, RGB_INFO, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_without_padding_or_flip_is_identity_and_pads_with_fill() -> None:
    x = torch.rand(4, 1, 6, 6)
    info = DatasetInfo("t", ("a",), (0.0,), (1.0,), 1, 6, hflip=False, crop_padding=0)
    assert torch.equal(augment(x, info, torch.Generator().manual_seed(0)), x)
    # A huge pad forces most output pixels into the padding: they must hold `fill`.
    big = DatasetInfo("t", ("a",), (0.0,), (1.0,), 1, 6, hflip=False, crop_padding=20)
    out = augment(torch.ones(8, 1, 6, 6), big, torch.Generator().manual_seed(0), fill=-3.0)
    assert set(out.unique().tolist()) <= {1.0, -3.0} and (out == -3.0).any()


@pytest.mark.gpu
def test_augment_and_to_float_on_cuda() -> None:
    from trainer.cuda import why_no_cuda

    if why_no_cuda():
        pytest.skip(why_no_cuda())
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, device="cuda")
    xf = to_float(x, RGB_INFO)
    assert xf.device == x.device
    # Same generator seed on the CPU and on the GPU input: same random draws, same result.
    out_gpu = augment(xf, RGB_INFO, generator=torch.Generator().manual_seed(3))
    out_cpu = augment(xf.cpu(), RGB_INFO, generator=torch.Generator().manual_seed(3))
    assert out_gpu.device == x.device
    torch.testing.assert_close(out_gpu.cpu(), out_cpu)
    g = torch.Generator(device="cuda").manual_seed(3)
    assert augment(xf, RGB_INFO, generator=g).device == x.device


def test_split_validates_dtypes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        Split(x=torch.zeros(2, 1, 4, 4), y=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(x=torch.zeros(2, 1, 4, 4, dtype=torch.uint8), y=torch.zeros(3, dtype=torch.int64))


# ---------------------------------------------------------------- real Fashion-MNIST


@pytest.mark.integration
def test_real_fashion_mnist(fashion_mnist_dir: Path) -> None:
    t0 = time.perf_counter()
    info, train, test = load_dataset("fashion-mnist", data_dir=fashion_mnist_dir)
    elapsed = time.perf_counter() - t0
    assert (len(train), len(test)) == (60000, 10000)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.y).tolist() == [6000] * 10
    assert torch.bincount(test.y).tolist() == [1000] * 10
    assert info.class_names == FMNIST_CLASSES
    # The published statistics match the decoded pixels (catches a wrong offset or byte order).
    pix = train.x.float().div(255)
    assert abs(float(pix.mean()) - 0.2860) < 1e-3 and abs(float(pix.std()) - 0.3530) < 1e-3
    print(f"real Fashion-MNIST decode: {elapsed:.2f} s")
    # The default location is the Debian package's; loading without data_dir finds it.
    if fashion_mnist_dir == Path("/usr/share/datasets/fashion-mnist"):
        _, train2, _ = load_dataset("fashion-mnist")
        assert torch.equal(train2.y, train.y)
