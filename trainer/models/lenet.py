"""LeNet-5 exactly as d2l (Dive into Deep Learning) builds it, plus the ablation knobs.

Defaults reproduce d2l's LeNet (sigmoid, average pooling, no BN, no dropout): 61,706 parameters on
1x28x28 with 10 classes.
"""

from __future__ import annotations

from torch import Tensor, nn

from trainer.models._api import register_model
from trainer.models._blocks import activation_and_pool, make_activation


class LeNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        activation: str = "sigmoid",
        pool: str = "avg",
        batchnorm: bool = False,
        dropout: float = 0.0,
        width: int = 1,
        fc_width: int = 1,
    ) -> None:
        super().__init__()
        c1, c2 = 6 * width, 16 * width
        f1, f2 = 120 * fc_width, 84 * fc_width

        def conv_block(cin: int, cout: int, padding: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, padding=padding, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            layers += activation_and_pool(activation, pool, 2, 2)  # max-pool runs before the activation
            return layers

        # 28 -> conv(pad 2) 28 -> pool 14 -> conv 10 -> pool 5; 32 -> 32 -> 16 -> 12 -> 6
        self.features = nn.Sequential(*conv_block(in_channels, c1, 2), *conv_block(c1, c2, 0))
        spatial = ((image_size // 2) - 4) // 2

        def fc_block(fin: int, fout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Linear(fin, fout, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm1d(fout))
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            return layers

        self.classifier = nn.Sequential(
            nn.Flatten(),
            *fc_block(c2 * spatial * spatial, f1),
            *fc_block(f1, f2),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.features(x))


@register_model()
def lenet5(**kwargs: object) -> LeNet:
    return LeNet(**kwargs)  # type: ignore[arg-type]
