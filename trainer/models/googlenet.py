"""GoogLeNet (Inception v1, Szegedy et al. 2014) with a small-input stem.

The nine Inception blocks (3a-3b, 4a-4e, 5a-5b) and their channel splits are the paper's (as in d2l,
with the 5x5 branch kept 5x5). No auxiliary classifiers. Each conv is conv + BatchNorm + ReLU as in
torchvision's GoogLeNet (``batchnorm=False`` gives the plain v1 convs of d2l).

The 224 px stem (7x7/2 conv, pool, 1x1 + 3x3 convs, pool: /4 twice) would leave 7 px of a 28 px
image before the first Inception block. Here the stem keeps the 64 -> 64 (1x1) -> 192 convs but uses
3x3 stride 1 and a single 3x3/2 max-pool, so the Inception stages run at::

    28: stem 28 -> pool 14 (3a, 3b) -> pool 7 (4a-4e) -> pool 4 (5a, 5b) -> GAP
    32: stem 32 -> pool 16 (3a, 3b) -> pool 8 (4a-4e) -> pool 4 (5a, 5b) -> GAP
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.models._api import register_model
from trainer.models._blocks import conv_bn_relu, init_weights


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: c1 + c2[1] + c3[1] + c4 output channels."""

    def __init__(
        self,
        cin: int,
        c1: int,
        c2: tuple[int, int],
        c3: tuple[int, int],
        c4: int,
        batchnorm: bool,
    ) -> None:
        super().__init__()
        self.branch1 = conv_bn_relu(cin, c1, 1, batchnorm=batchnorm)
        self.branch2 = nn.Sequential(
            conv_bn_relu(cin, c2[0], 1, batchnorm=batchnorm),
            conv_bn_relu(c2[0], c2[1], 3, batchnorm=batchnorm),
        )
        self.branch3 = nn.Sequential(
            conv_bn_relu(cin, c3[0], 1, batchnorm=batchnorm),
            conv_bn_relu(c3[0], c3[1], 5, batchnorm=batchnorm),
        )
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_relu(cin, c4, 1, batchnorm=batchnorm))
        self.out_channels = c1 + c2[1] + c3[1] + c4

    def forward(self, x: Tensor) -> Tensor:  # (B, cin, H, W) -> (B, out_channels, H, W)
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        batchnorm: bool = True,
        dropout: float = 0.4,
    ) -> None:
        super().__init__()
        del image_size  # global average pooling makes the head size-independent
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        bn = batchnorm
        self.stem = nn.Sequential(
            conv_bn_relu(in_channels, 64, 3, batchnorm=bn),  # (B, 64, S, S)
            conv_bn_relu(64, 64, 1, batchnorm=bn),
            conv_bn_relu(64, 192, 3, batchnorm=bn),  # (B, 192, S, S)
            nn.MaxPool2d(3, 2, 1),  # (B, 192, S/2, S/2)
        )
        self.stage3 = nn.Sequential(
            Inception(192, 64, (96, 128), (16, 32), 32, bn),  # 256 channels
            Inception(256, 128, (128, 192), (32, 96), 64, bn),  # 480
            nn.MaxPool2d(3, 2, 1),  # (B, 480, S/4, S/4)
        )
        self.stage4 = nn.Sequential(
            Inception(480, 192, (96, 208), (16, 48), 64, bn),  # 512
            Inception(512, 160, (112, 224), (24, 64), 64, bn),  # 512
            Inception(512, 128, (128, 256), (24, 64), 64, bn),  # 512
            Inception(512, 112, (144, 288), (32, 64), 64, bn),  # 528
            Inception(528, 256, (160, 320), (32, 128), 128, bn),  # 832
            nn.MaxPool2d(3, 2, 1),  # (B, 832, 4, 4) at 28/32 px
        )
        self.stage5 = nn.Sequential(
            Inception(832, 256, (160, 320), (32, 128), 128, bn),  # 832
            Inception(832, 384, (192, 384), (48, 128), 128, bn),  # 1024
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 1024)
            nn.Dropout(dropout),
            nn.Linear(1024, num_classes),
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.head(self.stage5(self.stage4(self.stage3(self.stem(x)))))


@register_model()
def googlenet(**kwargs: object) -> GoogLeNet:
    return GoogLeNet(**kwargs)  # type: ignore[arg-type]
