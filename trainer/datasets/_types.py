"""Types shared by the dataset readers and ``trainer.data`` (re-exported there)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DatasetError(RuntimeError):
    """A dataset file is missing or corrupt; the message names the file and how to get it."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the training loop, the exporter and the visualizer need to know about a dataset."""

    name: str  # registry name (trainer.data.list_datasets())
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, for pixels in [0, 1]
    std: tuple[float, ...]
    channels: int
    image_size: int  # H == W
    hflip: bool  # a horizontal flip keeps the label (not for digits)
    crop_padding: int  # zero padding of the random crop (2 for 28 px, 4 for 32 px)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


@dataclass(frozen=True)
class Split:
    """One split held in memory as a single tensor: the whole dataset fits (<= 180 MB for CIFAR)."""

    x: torch.Tensor  # (N, C, H, W) uint8, contiguous
    y: torch.Tensor  # (N,) int64

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"Split.x must be (N, C, H, W) uint8, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"Split.y must be ({self.x.shape[0]},) int64, got {self.y.dtype} {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])
