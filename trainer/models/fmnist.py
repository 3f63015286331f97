"""``fmnist_net``: a compact VGG/ResNet-style CNN sized for fast, accurate Fashion-MNIST on a CPU.

The compute sits where it is cheap: one 3x3 conv at full resolution, then the wide layers at 14x14
and 7x7, each stage a conv + a residual pair of 3x3 convs with BatchNorm::

    28x28: conv3x3  1 -> c          + BN, max-pool 2, ReLU          (B, c, 14, 14)
    14x14: conv3x3  c -> 2c         + BN + ReLU, residual block 2c,  max-pool 2   (B, 2c, 7, 7)
     7x7:  conv3x3 2c -> 4c         + BN + ReLU, residual block 4c
    head:  global max-pool + global avg-pool (concatenated), dropout, linear 8c -> classes

    wide_stem: 28x28: conv3x3 1 -> 2c + BN, max-pool 2, ReLU; 14x14: residual block 2c, max-pool 2; ...

``width`` sets c (default 32: ~ 0.5 M parameters at 28 px). ``wide_stem`` makes the 28x28 stage
output 2c channels and drops stage 2's opening conv (c -> 2c): one conv (10% of the FLOPs) fewer.
Works for any square input >= 8 px and any channel count
(CIFAR too), but the preset that uses it is ``fmnist-fast``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.models._api import register_model


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    """conv3x3 -> BN -> ReLU at constant resolution: (B, cin, S, S) -> (B, cout, S, S)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class Residual(nn.Module):
    """x + conv_bn(conv_bn(x)): two 3x3 convs at constant width and resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class FMNISTNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        width: int = 32,
        dropout: float = 0.0,
        wide_stem: bool = False,
    ) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"fmnist_net needs images of at least 8x8 pixels, got {image_size}")
        c = width
        stem = 2 * c if wide_stem else c
        # The first max-pool runs before its ReLU: the same function (max commutes with ReLU), with
        # the ReLU and its backward on a quarter of the elements. Parameter names stay those of
        # conv_bn + MaxPool2d, so checkpoints of either order load.
        self.features = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem)
            ),  # (B, stem, S, S)
            nn.Sequential(nn.MaxPool2d(2), nn.ReLU(inplace=True)),  # (B, stem, S/2, S/2)
            nn.Identity() if wide_stem else conv_bn(c, 2 * c),  # (B, 2c, S/2, S/2)
            Residual(2 * c),  # (B, 2c, S/2, S/2)
            nn.MaxPool2d(2),  # (B, 2c, S/4, S/4)
            conv_bn(2 * c, 4 * c),
            Residual(4 * c),  # (B, 4c, S/4, S/4)
        )
        # Fixed-size pools, not Adaptive*: AdaptiveAvgPool2d's backward hands back a contiguous
        # gradient that makes every later ReLU backward take a slow mixed-layout path under
        # channels_last (many times slower in profiles).
        spatial = image_size // 4
        self.max_pool = nn.MaxPool2d(spatial)
        self.avg_pool = nn.AvgPool2d(spatial)
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 8c)
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(8 * c, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        f = self.features(x)  # (B, 4c, S/4, S/4)
        pooled = torch.cat([self.max_pool(f), self.avg_pool(f)], dim=1)  # (B, 8c, 1, 1)
        return self.classifier(pooled)


@register_model()
def fmnist_net(**kwargs: object) -> FMNISTNet:
    return FMNISTNet(**kwargs)  # type: ignore[arg-type]
