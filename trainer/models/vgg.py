"""VGG-11 and VGG-16 for 28/32 px inputs (the CIFAR variant of Simonyan & Zisserman's configs A and D).

The conv stacks are the paper's (3x3 convs, 64 -> 512 channels, five 2x2 max-pools), with BatchNorm
after every conv by default (``batchnorm=False`` gives the original plain VGG).

Small inputs: five halvings take 32 px to exactly 1x1, but would collapse 28 px
(28 -> 14 -> 7 -> 3 -> 1 -> 0). The pools therefore use ``ceil_mode=True``, which is a no-op on even
sizes and keeps the partial border window on odd ones, so 28 px goes 28 -> 14 -> 7 -> 4 -> 2 -> 1 and
every pool stage stays in both cases (no per-size special casing, same graph for every input size).
An ``AdaptiveAvgPool2d(1)`` then makes the head independent of the input size (it is the identity at
1x1), and the 224 px head (25088 -> 4096 -> 4096) becomes 512 -> 512 -> classes with dropout, as in
the usual CIFAR VGGs.
"""

from __future__ import annotations

from torch import Tensor, nn

from trainer.models._api import register_model
from trainer.models._blocks import init_weights

# Channel plans; "M" is a 2x2 max-pool.
CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_features(cfg: list[int | str], in_channels: int, batchnorm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = in_channels
    for v in cfg:
        if v == "M":
            # ceil_mode: 7 px -> 4 px instead of 3 (see module docstring).
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            continue
        assert isinstance(v, int)
        layers.append(nn.Conv2d(cin, v, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        cin = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(
        self,
        cfg: list[int | str],
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        batchnorm: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        del image_size  # the adaptive pool makes the head size-independent
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.features = make_features(cfg, in_channels, batchnorm)  # (B, 512, 1, 1) at 28/32 px
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(512, 512), nn.ReLU(inplace=True)]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(512, num_classes))
        self.classifier = nn.Sequential(*head)
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.avgpool(self.features(x)))


@register_model()
def vgg11(**kwargs: object) -> VGG:
    return VGG(CFGS["vgg11"], **kwargs)  # type: ignore[arg-type]


@register_model()
def vgg16(**kwargs: object) -> VGG:
    return VGG(CFGS["vgg16"], **kwargs)  # type: ignore[arg-type]
