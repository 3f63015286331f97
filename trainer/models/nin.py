"""Network in Network (Lin et al. 2013) as d2l builds it, with a small-input first block.

Four NiN blocks (a kxk conv followed by two 1x1 convs, each with ReLU), max-pools between them, and no
fully connected layer: the last block outputs one channel per class and global average pooling turns
each map into a logit. As in d2l and the paper the last block keeps its ReLU, so logits are >= 0.

d2l's first block (11x11 stride 4, for 224 px) becomes 5x5 stride 1 and the 3x3/2 pools get padding 1::

    28: block 28 -> pool 14 -> block 14 -> pool 7 -> block 7 -> pool 4 -> class block 4 -> GAP
    32: block 32 -> pool 16 -> block 16 -> pool 8 -> block 8 -> pool 4 -> class block 4 -> GAP

``batchnorm=True`` adds BatchNorm after every conv (not in d2l; NiN trains slowly without it).
"""

from __future__ import annotations

from torch import Tensor, nn

from trainer.models._api import register_model
from trainer.models._blocks import conv_bn_relu, init_weights


def nin_block(cin: int, cout: int, kernel_size: int, batchnorm: bool) -> nn.Sequential:
    return nn.Sequential(
        conv_bn_relu(cin, cout, kernel_size, batchnorm=batchnorm),
        conv_bn_relu(cout, cout, 1, batchnorm=batchnorm),
        conv_bn_relu(cout, cout, 1, batchnorm=batchnorm),
    )


class NiN(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        batchnorm: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        del image_size  # global average pooling makes the net size-independent
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.features = nn.Sequential(
            nin_block(in_channels, 96, 5, batchnorm),  # (B, 96, S, S)
            nn.MaxPool2d(3, 2, 1),  # (B, 96, S/2, S/2)
            nin_block(96, 256, 5, batchnorm),
            nn.MaxPool2d(3, 2, 1),  # (B, 256, S/4, S/4)
            nin_block(256, 384, 3, batchnorm),
            nn.MaxPool2d(3, 2, 1),  # (B, 384, 4, 4) at 28/32 px
            nn.Dropout(dropout),
            nin_block(384, num_classes, 3, batchnorm),  # (B, num_classes, 4, 4)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.head(self.features(x))


@register_model()
def nin(**kwargs: object) -> NiN:
    return NiN(**kwargs)  # type: ignore[arg-type]
