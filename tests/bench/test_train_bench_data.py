"""bench/train_bench.py's d2l baseline: its copy of torchvision's per-sample path (PIL image,
ToTensor, Normalize) gives the same tensors as the plain numpy path, for 1- and 3-channel data."""

from __future__ import annotations

import pytest
import torch

from bench.d2l_baseline import PerSampleDataset, TorchvisionStyleDataset
from trainer.datasets._types import DatasetInfo


@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_path_matches_the_tensor_path(channels: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, channels, 8, 8), dtype=torch.uint8, generator=g)  # (N, C, H, W)
    y = torch.arange(5)
    info = DatasetInfo("t", tuple("abcde"), (0.3,) * channels, (0.4,) * channels, channels, 8, True, 2)
    light, pil = PerSampleDataset(x, y, info), TorchvisionStyleDataset(x, y, info)
    assert len(pil) == 5
    for i in range(5):
        (a, la), (b, lb) = light[i], pil[i]
        assert b.shape == (channels, 8, 8) and b.dtype == torch.float32 and la == lb == i
        torch.testing.assert_close(a, b)
    # The pixel values really went through: image 0 normalized by hand.
    torch.testing.assert_close(pil[0][0], (x[0].float() / 255 - 0.3) / 0.4)
