"""The four loads of the front-door comparison, and the real test images their requests carry;
bench/front_door_bench.py drives cnn-serve and the echo servers with them, bench/torchserve_peer.py
TorchServe."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loadtest.payload import load_images

# (model, images per request, requests in flight)
LOADS = [("lenet", 1, 1), ("lenet", 1, 64), ("lenet", 32, 64), ("fmnist", 1, 64)]
SHAPES = {"lenet": (1, 28, 28), "fmnist": (1, 28, 28)}
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def test_images(model: str, images: int) -> np.ndarray:
    """The first ``images`` real test images (synthetic without the dataset), (images, C, H, W)."""
    source = str(FASHION_TEST) if FASHION_TEST.is_file() else "synthetic"
    return load_images(source, SHAPES[model], images, seed=0)
