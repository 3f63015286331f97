"""A small generated dataset for tests and smoke runs: learnable, deterministic, no files.

Class k of K is a Gaussian blob at angle 2*pi*k/K on a circle around the centre plus a bar through
the centre at angle pi*k/K, jittered by up to 1.5 px, scaled by a random contrast and covered in
noise. Both cues survive a +/-2 px random crop, so a LeNet learns it within an epoch or two, while
the noise keeps it from being solved by a single pixel. RGB variants tint each class differently.
"""

from __future__ import annotations

import math

import torch

from trainer.datasets._types import Split


def make_synthetic(n: int, num_classes: int, channels: int, size: int, seed: int) -> Split:
    """``n`` images (balanced classes, shuffled), (n, channels, size, size) uint8."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]  # (n,)
    k = y.float()
    centre = (size - 1) / 2
    radius = 0.3 * size
    angle = 2 * math.pi * k / num_classes
    jitter = (torch.rand(n, 2, generator=g, dtype=torch.float32) * 2 - 1) * 1.5  # (n, 2)
    cy = (centre + radius * torch.sin(angle) + jitter[:, 0])[:, None, None]  # (n, 1, 1)
    cx = (centre + radius * torch.cos(angle) + jitter[:, 1])[:, None, None]
    yy = torch.arange(size, dtype=torch.float32)[None, :, None]  # (1, H, 1)
    xx = torch.arange(size, dtype=torch.float32)[None, None, :]  # (1, 1, W)
    sigma = size / 10
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))  # (n, H, W)

    theta = (math.pi * k / num_classes)[:, None, None]
    oy, ox = yy - centre - jitter[:, 0, None, None], xx - centre - jitter[:, 1, None, None]
    dist = (ox * torch.sin(theta) - oy * torch.cos(theta)).abs()  # distance to the bar's line
    within = ((ox**2 + oy**2) <= (0.22 * size) ** 2).float()
    bar = torch.exp(-(dist**2) / 2) * within  # (n, H, W)

    contrast = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=g, dtype=torch.float32)
    img = contrast * (blob + 0.6 * bar)  # (n, H, W) in about [0, 1.6]
    if channels == 1:
        img = img[:, None]  # (n, 1, H, W)
    else:
        # Class tint: a fixed colour per class on the colour wheel, never black.
        hue = 2 * math.pi * torch.arange(num_classes, dtype=torch.float32) / num_classes
        phases = torch.arange(channels, dtype=torch.float32) * 2 * math.pi / channels
        tint = 0.55 + 0.45 * torch.cos(hue[:, None] - phases[None, :])  # (K, C)
        img = img[:, None] * tint[y][:, :, None, None]  # (n, C, H, W)
    noise = 0.08 * torch.randn(img.shape, generator=g, dtype=torch.float32)
    x = ((img + noise).clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return Split(x=x, y=y.long())
