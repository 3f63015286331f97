"""Datasets as in-memory uint8 tensors, plus batched GPU-friendly normalization and augmentation.

Readers are our own (no torchvision): IDX files for MNIST / Fashion-MNIST, the CIFAR "python"
batches for CIFAR-10/100, and a generated ``synthetic`` set for tests. Each split is one
``(N, C, H, W)`` uint8 tensor, so the training loop indexes batches directly, moves them to the
device as bytes (4x less traffic than float) and normalizes/augments there, on the whole batch.

    info, train, test = load_dataset("fashion-mnist")
    xb = augment(to_float(train.x[idx].to(dev), info), info, generator=g)   # (B, 1, 28, 28) float32
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.datasets import cifar, idx
from trainer.datasets._types import DatasetError, DatasetInfo, Split
from trainer.datasets.synthetic import make_synthetic

__all__ = [
    "DatasetError",
    "DatasetInfo",
    "Split",
    "augment",
    "list_datasets",
    "load_dataset",
    "to_float",
]

FASHION_MNIST_CLASSES = (
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
MNIST_CLASSES = tuple(str(d) for d in range(10))

# Published per-channel statistics of the training sets, for pixels in [0, 1].
STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# Where each dataset is looked for when no data_dir is given (first hit wins); downloads go to the last.
DEFAULT_DIRS = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist", "data/fashion-mnist"),
    "mnist": ("data/mnist",),
    "cifar10": ("data/cifar10",),
    "cifar100": ("data/cifar100",),
    "cifar100-coarse": ("data/cifar100",),
}

_DOWNLOAD = "pass --download (needs torchvision) or --data-dir DIR pointing at the files"
HOW_TO_GET = {
    "fashion-mnist": "install the Debian package: `apt-get install -y dataset-fashion-mnist` (files land in "
    f"/usr/share/datasets/fashion-mnist), or {_DOWNLOAD} (the four IDX files, .gz or raw)",
    "mnist": "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz from an MNIST mirror (e.g. https://ossci-datasets.s3.amazonaws.com/mnist/) "
    f"into data/mnist, or {_DOWNLOAD}",
    "cifar10": "put https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (read as is, or extracted to "
    f"cifar-10-batches-py/) into data/cifar10, or {_DOWNLOAD}",
    "cifar100": "put https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (read as is, or extracted to "
    f"cifar-100-python/) into data/cifar100, or {_DOWNLOAD}",
}
HOW_TO_GET["cifar100-coarse"] = HOW_TO_GET["cifar100"]

SYNTHETIC = {"synthetic": (1, 28), "synthetic-rgb": (3, 32)}  # name -> (channels, image size)
DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "cifar100-coarse", *SYNTHETIC)


def list_datasets() -> list[str]:
    return list(DATASETS)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    synthetic_train: int = 2048,
    synthetic_test: int = 512,
    seed: int = 0,
) -> tuple[DatasetInfo, Split, Split]:
    """``(info, train, test)`` for a registry name; DatasetError names any missing/corrupt file."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    if name in SYNTHETIC:
        return load_synthetic(name, synthetic_train, synthetic_test, seed)
    folders = [Path(data_dir)] if data_dir is not None else [Path(d) for d in DEFAULT_DIRS[name]]
    if name in ("fashion-mnist", "mnist"):
        return load_idx_dataset(name, folders, download)
    return load_cifar(name, folders, download)


def load_idx_dataset(name: str, folders: list[Path], download: bool) -> tuple[DatasetInfo, Split, Split]:
    # torchvision's FashionMNIST(root)/MNIST(root) keep the files in root/<Class>/raw.
    subdirs = ("raw", "FashionMNIST/raw" if name == "fashion-mnist" else "MNIST/raw")
    stems = [stem for pair in idx.SPLIT_FILES.values() for stem in pair]

    def find(folder: Path) -> list[Path | None]:
        return [idx.find_file(folder, stem, subdirs) for stem in stems]

    # The first folder holding any of the four files is the dataset: a half-populated folder is an
    # error about the missing file there, not a silent fall-through to another copy.
    found = next((f for f in map(find, folders) if any(f)), None)
    if found is None and download:
        fetch(name, folders[-1])
        found = find(folders[-1])
    if found is None or not all(found):
        folder = folders[0] if found is None else next(p for p in found if p is not None).parent
        missing = stems[0] if found is None else stems[found.index(None)]
        raise DatasetError(
            f"{name}: {folder / missing}(.gz) not found"
            + (
                f" (also looked in {', '.join(map(str, folders[1:]))})"
                if found is None and len(folders) > 1
                else ""
            )
            + f". To get it: {HOW_TO_GET[name]}"
        )
    classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    paths = dict(zip(stems, found, strict=True))
    train, test = (
        idx.load_idx_split(paths[images], paths[labels], len(classes))  # type: ignore[arg-type]
        for images, labels in idx.SPLIT_FILES.values()
    )
    mean, std = STATS[name]
    info = DatasetInfo(
        name=name,
        class_names=classes,
        mean=mean,
        std=std,
        channels=1,
        image_size=int(train.x.shape[-1]),
        hflip=name == "fashion-mnist",  # a mirrored 2 or 7 is not a 2 or 7; a mirrored shoe is a shoe
        crop_padding=2,
    )
    return info, train, test


def load_cifar(name: str, folders: list[Path], download: bool) -> tuple[DatasetInfo, Split, Split]:
    layout = cifar.CIFAR10 if name == "cifar10" else cifar.CIFAR100
    source = next((s for s in (cifar.locate(f, layout) for f in folders) if s is not None), None)
    if source is None and download:
        fetch(name, folders[-1])
        source = cifar.locate(folders[-1], layout)
    if source is None:
        raise DatasetError(
            f"{name}: neither {folders[0] / layout.folder / layout.test} nor {folders[0] / layout.archive} "
            f"exists. To get it: {HOW_TO_GET[name]}"
        )
    blobs = cifar.read_members(source, layout, (*layout.train, layout.test, layout.meta))
    origin = (lambda n: str(source / n)) if source.is_dir() else (lambda n: f"{source}:{layout.folder}/{n}")
    if name == "cifar10":
        label_key, names_key, num_classes = b"labels", b"label_names", 10
    elif name == "cifar100":
        label_key, names_key, num_classes = b"fine_labels", b"fine_label_names", 100
    else:  # CIFAR-100's coarse labels: the 20 super-classes
        label_key, names_key, num_classes = b"coarse_labels", b"coarse_label_names", 20
    train = cifar.decode_batches([(origin(n), blobs[n]) for n in layout.train], label_key, num_classes)
    test = cifar.decode_batches([(origin(layout.test), blobs[layout.test])], label_key, num_classes)
    classes = cifar.decode_names(blobs[layout.meta], origin(layout.meta), names_key, num_classes)
    mean, std = STATS["cifar10" if name == "cifar10" else "cifar100"]
    info = DatasetInfo(name, classes, mean, std, channels=3, image_size=32, hflip=True, crop_padding=4)
    return info, train, test


def load_synthetic(name: str, n_train: int, n_test: int, seed: int) -> tuple[DatasetInfo, Split, Split]:
    channels, size = SYNTHETIC[name]
    num_classes = 10
    train = make_synthetic(n_train, num_classes, channels, size, seed)
    test = make_synthetic(n_test, num_classes, channels, size, seed + 1_000_003)  # a disjoint stream
    # Statistics of this very training set (it is generated, there is nothing to publish).
    pixels = train.x.double().div(255).transpose(0, 1).reshape(channels, -1)  # (C, N*H*W)
    mean = tuple(round(float(v), 4) for v in pixels.mean(1))
    std = tuple(round(max(float(v), 1e-3), 4) for v in pixels.std(1))
    info = DatasetInfo(
        name=name,
        class_names=tuple(f"pattern{k}" for k in range(num_classes)),
        mean=mean,
        std=std,
        channels=channels,
        image_size=size,
        hflip=False,  # the bar's orientation is part of the class
        crop_padding=2 if size <= 28 else 4,
    )
    return info, train, test


def fetch(name: str, root: Path) -> None:
    """Download with torchvision into ``root`` (our readers then find torchvision's layout)."""
    try:
        import torchvision.datasets as tvd  # optional: never a dependency of the project
    except Exception as e:  # ImportError, or a torchvision built against another torch
        raise DatasetError(
            f"{name}: --download needs a working torchvision ({type(e).__name__}: {e}). "
            f"Get the files by hand instead: {HOW_TO_GET[name]}"
        ) from e
    cls = {
        "fashion-mnist": tvd.FashionMNIST,
        "mnist": tvd.MNIST,
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
        "cifar100-coarse": tvd.CIFAR100,
    }[name]
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except Exception as e:  # network errors, checksum mismatches
        raise DatasetError(
            f"{name}: download into {root} failed ({e}). To get it by hand: {HOW_TO_GET[name]}"
        ) from e


def to_float(x_uint8: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """(B, C, H, W) uint8 -> (x/255 - mean)/std float32, on x's device."""
    c = x_uint8.shape[-3]
    if c != info.channels:
        raise ValueError(
            f"{info.name} images have {info.channels} channel(s), got a tensor of shape {tuple(x_uint8.shape)}"
        )
    std = torch.tensor(info.std, dtype=torch.float32, device=x_uint8.device).view(c, 1, 1)
    mean = torch.tensor(info.mean, dtype=torch.float32, device=x_uint8.device).view(c, 1, 1)
    # One multiply-add instead of three passes: x * (1 / (255 std)) - mean / std.
    return torch.addcmul(-mean / std, x_uint8.to(torch.float32), 1.0 / (255.0 * std))


def augment(
    x: torch.Tensor, info: DatasetInfo, generator: torch.Generator | None = None, fill: float = 0.0
) -> torch.Tensor:
    """Random crop (zero padding ``info.crop_padding``) and, if ``info.hflip``, random horizontal flip.

    Batched on x's device: every sample gets its own offsets and flip, applied by one gather from a
    padded copy. Random numbers come from ``generator`` (on its own device) so a seeded generator
    gives the same batch every time. ``fill`` is the padding value (0 = black for [0, 1] pixels,
    the mean colour for normalized ones).
    """
    if x.dim() != 4:
        raise ValueError(f"augment expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    p = info.crop_padding
    dev = x.device
    rng_dev = generator.device if generator is not None else dev
    padded = F.pad(x, (p, p, p, p), value=fill) if p > 0 else x  # (B, C, H+2p, W+2p)
    pw = w + 2 * p
    off = torch.randint(0, 2 * p + 1, (2, b), generator=generator, device=rng_dev).to(dev)  # (2, B)
    rows = off[0, :, None] + torch.arange(h, device=dev)  # (B, H) source row of each output row
    cols = off[1, :, None] + torch.arange(w, device=dev)  # (B, W) source column of each output column
    if info.hflip:
        flip = torch.rand(b, generator=generator, device=rng_dev).to(dev) < 0.5  # (B,)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    # One gather over the flattened padded planes (faster than 3-tensor advanced indexing on CPU and GPU).
    src = (rows[:, :, None] * pw + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)  # (B, C, H*W)
    return padded.reshape(b, c, -1).gather(2, src).reshape(b, c, h, w)  # (B, C, H, W)
