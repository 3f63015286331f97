"""DenseNet-121 (Huang et al. 2016): growth rate 32, dense blocks of 6-12-24-16 layers, small-input stem.

torchvision's DenseNet-BC layout (bottleneck 1x1 conv to 4 * growth channels, then 3x3 conv to
``growth_rate`` new channels, pre-activation BN-ReLU; transitions halve channels with a 1x1 conv and
halve the size with a 2x2 average pool). The 224 px stem (7x7/2 conv + 3x3/2 max-pool) is replaced by
one 3x3 stride-1 conv to 2 * growth channels, as in the CIFAR DenseNets, so the blocks run at::

    32: 32 (64 -> 256 ch) -> 16 (128 -> 512) -> 8 (256 -> 1024) -> 4 (512 -> 1024) -> GAP
    28: 28                -> 14              -> 7               -> 3               -> GAP
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.models._api import register_model
from trainer.models._blocks import init_weights


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck) -> BN-ReLU-conv3x3: ``growth_rate`` new feature maps."""

    def __init__(self, cin: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        mid = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, cin, H, W) -> (B, growth_rate, H, W)
        # BN is not in place, so the in-place ReLU never touches x (still needed for the concat).
        out = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(out)))


class DenseBlock(nn.Module):
    def __init__(self, num_layers: int, cin: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(cin + i * growth_rate, growth_rate, bn_size) for i in range(num_layers)
        )
        self.out_channels = cin + num_layers * growth_rate

    def forward(self, x: Tensor) -> Tensor:  # (B, cin, H, W) -> (B, out_channels, H, W)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


def transition(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.AvgPool2d(2, 2),  # (B, cout, H/2, W/2)
    )


class DenseNet(nn.Module):
    def __init__(
        self,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        growth_rate: int = 32,
        bn_size: int = 4,
    ) -> None:
        super().__init__()
        del image_size  # global average pooling makes the head size-independent
        channels = 2 * growth_rate
        stages: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        ]  # (B, 64, S, S)
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bn_size)
            stages.append(block)
            channels = block.out_channels
            if i != len(block_config) - 1:
                stages.append(transition(channels, channels // 2))  # compression 0.5
                channels //= 2
        stages += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*stages)  # (B, 1024, S/8, S/8) for DenseNet-121
        fc = nn.Linear(channels, num_classes)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
        init_weights(self)
        nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.head(self.features(x))


@register_model()
def densenet121(**kwargs: object) -> DenseNet:
    return DenseNet((6, 12, 24, 16), **kwargs)  # type: ignore[arg-type]
