"""Small-input AlexNet for the ablation study, with the same ablation knobs as LeNet.

It keeps AlexNet's plan (5 convs, 3 overlapping pools, 3 FC layers with dropout) but cuts the
parameter count to "nearly 1/256 of the original design": every width of d2l's AlexNet divided by 16,
which divides each layer's parameters by 16 * 16 = 256::

    d2l (224 px):  conv 96 - 256 - 384 - 384 - 256, FC 4096 - 4096   (46.8 M params)
    here (28 px):  conv  6 -  16 -  24 -  24 -  16, FC  256 -  256   (~149 k params with width=1)

Shrunk for 28/32 px inputs: the 11x11 stride-4 first conv (which would leave 6 px of a 28 px image)
becomes 5x5 stride 1, and the 3x3 stride-2 pools get padding 1, so both 28 and 32 px end at 4x4::

    28: conv5 28 -> pool 14 -> conv5 14 -> pool 7 -> 3x conv3 7 -> pool 4   (16 x 4 x 4 = 256 features)
    32: conv5 32 -> pool 16 -> conv5 16 -> pool 8 -> 3x conv3 8 -> pool 4

``width`` multiplies every width (width=4 gives 24-64-96-96-64 / FC 1024, ~1/16 of the original).
Knobs: ``activation`` (relu default), ``pool`` (max default), ``batchnorm`` (after each
conv and hidden FC, before the activation, as in LeNet), ``dropout`` after both hidden FC layers.
"""

from __future__ import annotations

from torch import Tensor, nn

from trainer.models._api import register_model
from trainer.models._blocks import activation_and_pool, make_activation, pooled_size

# d2l AlexNet widths divided by 16 ("1/256 of the parameters").
CONV_WIDTHS = (6, 16, 24, 24, 16)
FC_WIDTH = 256


class AlexNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        activation: str = "relu",
        pool: str = "max",
        batchnorm: bool = False,
        dropout: float = 0.5,
        width: int = 1,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        c1, c2, c3, c4, c5 = (c * width for c in CONV_WIDTHS)
        fc = FC_WIDTH * width

        def conv(cin: int, cout: int, k: int, pooled: bool = False) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            if pooled:
                # Overlapping 3x3/2 pools as in AlexNet; padding 1 keeps 28 px from shrinking to 2x2.
                # A max-pool runs before the activation (the same function, less work).
                layers += activation_and_pool(activation, pool, 3, 2, 1)
            else:
                layers.append(make_activation(activation))
            return layers

        self.features = nn.Sequential(
            *conv(in_channels, c1, 5, pooled=True),  # (B, c1, S/2, S/2)
            *conv(c1, c2, 5, pooled=True),  # (B, c2, S/4, S/4)
            *conv(c2, c3, 3),
            *conv(c3, c4, 3),
            *conv(c4, c5, 3, pooled=True),  # (B, c5, 4, 4) for 28 and 32 px
        )
        spatial = image_size
        for _ in range(3):
            spatial = pooled_size(spatial, 3, 2, 1)

        def fc_block(fin: int, fout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Linear(fin, fout, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm1d(fout))
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            return layers

        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, c5 * spatial * spatial)
            *fc_block(c5 * spatial * spatial, fc),
            *fc_block(fc, fc),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.features(x))


@register_model()
def alexnet(**kwargs: object) -> AlexNet:
    return AlexNet(**kwargs)  # type: ignore[arg-type]
