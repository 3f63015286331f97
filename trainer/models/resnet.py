"""ResNet-18 and ResNet-34 (He et al. 2015), CIFAR-style.

torchvision's BasicBlock ResNets with the 224 px stem (7x7/2 conv + 3x3/2 max-pool, /4 before the
first stage) replaced by a single 3x3 stride-1 conv and no max-pool, as in the usual CIFAR ResNets, so
the four stages run at::

    32: 32 (64 ch) -> 16 (128) -> 8 (256) -> 4 (512) -> GAP
    28: 28 (64 ch) -> 14 (128) -> 7 (256) -> 4 (512) -> GAP

Downsampling blocks use a 1x1 stride-2 conv + BN shortcut (option B of the paper).
``zero_init_residual`` zero-initializes each block's last BN (torchvision's option; off by default).
"""

from __future__ import annotations

from torch import Tensor, nn

from trainer.models._api import register_model
from trainer.models._blocks import init_weights


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:  # (B, cin, H, W) -> (B, cout, H/stride, W/stride)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out-of-place add: the shortcut may be the block's input itself.
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        layers: tuple[int, int, int, int],
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        del image_size  # global average pooling makes the head size-independent
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),  # (B, 64, S, S)
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        cin = 64
        for i, (blocks, cout) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages  # (B, 512, S/8, S/8) at the end
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))
        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


@register_model()
def resnet18(**kwargs: object) -> ResNet:
    return ResNet((2, 2, 2, 2), **kwargs)  # type: ignore[arg-type]


@register_model()
def resnet34(**kwargs: object) -> ResNet:
    return ResNet((3, 4, 6, 3), **kwargs)  # type: ignore[arg-type]
