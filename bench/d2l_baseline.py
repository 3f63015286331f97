"""The baseline of bench/train_bench.py: d2l's ``train_ch6`` loop over a per-sample ``DataLoader``,
with the same model, initialization, optimizer and schedule as the trainer's config.

``TorchvisionStyleDataset`` builds each sample as d2l's ``load_data_fashion_mnist`` does
(torchvision's PIL path, ``ToTensor`` + ``Normalize``); ``PerSampleDataset`` is a lighter
numpy-to-tensor path, a lower bound on that loop's data cost.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trainer.config import TrainConfig
from trainer.data import DatasetInfo, Split
from trainer.train import build_model


class PerSampleDataset(Dataset):
    """A light per-sample Dataset: one numpy image in, one normalized float tensor out, no PIL.

    Cheaper than what torchvision does per sample (``TorchvisionStyleDataset``): a lower bound on
    the d2l loop's data cost (``--baseline-data tensor``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo) -> None:
        self.images = x.numpy()  # (N, C, H, W) uint8
        self.labels = y.tolist()
        self.mean = torch.tensor(info.mean).view(-1, 1, 1)
        self.std = torch.tensor(info.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.images[i]).float().div(255)  # ToTensor: (C, H, W) in [0, 1]
        return (img - self.mean) / self.std, self.labels[i]  # Normalize


class TorchvisionStyleDataset(PerSampleDataset):
    """What d2l's ``load_data_fashion_mnist`` runs per sample (default ``--baseline-data torchvision``).

    That is ``torchvision.datasets.FashionMNIST.__getitem__`` (the uint8 array becomes a PIL image,
    ``Image.fromarray(img, mode="L")``; CIFAR: an RGB image from HWC) followed by
    ``transforms.ToTensor()`` and ``transforms.Normalize(mean, std)``, the torchvision reference
    scripts' normalization (d2l itself skips it; both loops normalize here, so the models match).
    torchvision's own transforms are used when it imports; otherwise these are line-for-line
    copies of its ``to_tensor`` and ``normalize`` for PIL input.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo) -> None:
        super().__init__(x, y, info)
        hwc = self.images.transpose(0, 2, 3, 1)  # (N, H, W, C), how torchvision stores CIFAR
        self.pil_arrays = hwc[..., 0] if hwc.shape[-1] == 1 else np.ascontiguousarray(hwc)
        self.mode = "L" if hwc.shape[-1] == 1 else "RGB"
        self.mean_list, self.std_list = list(info.mean), list(info.std)
        self.transform = _torchvision_transform(self.mean_list, self.std_list) or self._copy_of_torchvision

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.pil_arrays[i], mode=self.mode)
        return self.transform(img), self.labels[i]

    def _copy_of_torchvision(self, pic: Image.Image) -> torch.Tensor:
        # torchvision.transforms.functional.to_tensor, PIL branch
        img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
        img = img.view(pic.size[1], pic.size[0], len(pic.getbands())).permute((2, 0, 1)).contiguous()
        img = img.to(dtype=torch.get_default_dtype()).div(255)
        # torchvision.transforms.functional.normalize (inplace=False)
        img = img.clone()
        mean = torch.as_tensor(self.mean_list, dtype=img.dtype, device=img.device)
        std = torch.as_tensor(self.std_list, dtype=img.dtype, device=img.device)
        if (std == 0).any():
            raise ValueError(
                f"std evaluated to zero after conversion to {img.dtype}, leading to division by zero."
            )
        return img.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def _torchvision_transform(mean: list[float], std: list[float]):
    try:
        from torchvision import transforms
    except Exception:  # not installed, or (here) a CUDA build that fails to import beside the CPU torch
        return None
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def evaluate_accuracy(net: nn.Module, loader: DataLoader) -> float:
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


DATASETS = {"torchvision": TorchvisionStyleDataset, "tensor": PerSampleDataset}


def d2l_style(
    cfg: TrainConfig,
    workers: int,
    dataset: tuple[DatasetInfo, Split, Split],
    data: str,
    wait: Callable[[], None],
) -> dict[str, float]:
    """d2l's train_ch6 loop with the same model/init/optimizer/schedule as ``cfg``; ``wait()``
    runs before each epoch and before the evaluation (the lockstep turns), outside the timing."""
    info, train, test = dataset
    if cfg.max_train is not None and cfg.max_train < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_train]
        train = dataclasses.replace(train, x=train.x[keep], y=train.y[keep])
    torch.manual_seed(cfg.seed)
    net, _ = build_model(cfg, info)
    train_iter = DataLoader(
        DATASETS[data](train.x, train.y, info), batch_size=cfg.batch_size, shuffle=True, num_workers=workers
    )
    test_iter = DataLoader(
        DATASETS[data](test.x, test.y, info), batch_size=cfg.batch_size, num_workers=workers
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    loss = nn.CrossEntropyLoss()
    train_seconds, images = 0.0, 0
    for _ in range(cfg.epochs):
        wait()
        net.train()
        start = time.perf_counter()
        for x, y in train_iter:
            optimizer.zero_grad()
            y_hat = net(x)
            l = loss(y_hat, y)  # noqa: E741 (d2l's name)
            l.backward()
            optimizer.step()
            with torch.no_grad():  # train_ch6's per-batch metric.add(loss sum, correct, count)
                metric = (
                    float(l * x.shape[0]),
                    float((y_hat.argmax(1).type(y.dtype) == y).sum()),
                    x.shape[0],
                )
            images += metric[2]
        train_seconds += time.perf_counter() - start
    wait()
    return {
        "images_per_s": images / train_seconds,
        "test_acc": evaluate_accuracy(net, test_iter),
    }
