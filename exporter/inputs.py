"""Images the checks run on: the real test set of the checkpoint's dataset when its files are there,
else uniform noise of the model's input shape (seeded), and the report says which.

Everything here is float32 pixels in [0, 1], (N, C, H, W): what the exported graph takes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnstack.contract import ModelMeta

NOISE_SAMPLES = 512  # parity inputs drawn from the metadata when no dataset is available


@dataclass(frozen=True)
class EvalData:
    x: np.ndarray  # (N, C, H, W) float32 in [0, 1]
    y: np.ndarray | None  # (N,) int64 labels, None for noise
    source: str  # human-readable: "fashion-mnist test set (10000 images)" / "uniform noise ..."
    real: bool


def _load_splits(meta: ModelMeta, data_dir: Path | None):
    return _load_splits_cached(meta.dataset, data_dir)


@functools.lru_cache(maxsize=2)  # a batch export reads each dataset once, not once per checkpoint
def _load_splits_cached(dataset: str, data_dir: Path | None):
    """``(train, test, None)`` or ``(None, None, why)`` when the dataset cannot be read."""
    try:
        from trainer.data import DatasetError, load_dataset
    except ImportError as e:  # a trainer without dataset readers
        return None, None, f"trainer.data unavailable ({e})"
    try:
        _, train, test = load_dataset(dataset, data_dir=data_dir)
    except (DatasetError, ValueError, OSError) as e:
        return None, None, str(e)
    return train, test, None


def _to_model_input(x_uint8, meta: ModelMeta) -> np.ndarray:
    """(N, C, h, w) uint8 tensor -> (N, C, H, W) float32 in [0, 1] at the model's input size."""
    import torch
    import torch.nn.functional as F

    x = x_uint8.to(torch.float32) / 255.0
    c, h, w = meta.input_shape
    if x.shape[1] != c:
        raise ValueError(f"{meta.dataset} images have {x.shape[1]} channels, the model expects {c}")
    if tuple(x.shape[2:]) != (h, w):  # a model trained on resized images (e.g. AlexNet at 224)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x.contiguous().numpy()


def noise(meta: ModelMeta, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n, *meta.input_shape), dtype=np.float32)  # (N, C, H, W) in [0, 1)


def load_eval_data(meta: ModelMeta, data_dir: Path | None, samples: int, seed: int) -> EvalData:
    """The test set (first ``samples`` images; 0 = all) or seeded noise when it is unavailable."""
    _, test, why = _load_splits(meta, data_dir)
    if test is None:
        n = samples or NOISE_SAMPLES
        return EvalData(
            noise(meta, n, seed),
            None,
            f"uniform noise in [0, 1] of shape {list(meta.input_shape)} ({n} images, seed {seed}): "
            f"no test set ({why})",
            real=False,
        )
    n = min(samples, len(test)) if samples else len(test)
    x = _to_model_input(test.x[:n], meta)
    y = test.y[:n].numpy().astype(np.int64)
    if int(y.max()) >= meta.num_classes:
        raise ValueError(
            f"{meta.dataset} labels go up to {int(y.max())}, the model has {meta.num_classes} classes"
        )
    return EvalData(x, y, f"{meta.dataset} test set ({n} of {len(test)} images)", real=True)


def load_calibration(
    meta: ModelMeta, data_dir: Path | None, samples: int, seed: int
) -> tuple[np.ndarray, str]:
    """INT8 calibration images: a seeded random subset of the training split, else noise."""
    train, _, why = _load_splits(meta, data_dir)
    if train is None:
        return noise(meta, samples, seed + 1), f"uniform noise ({samples} images): no training set ({why})"
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(train), size=min(samples, len(train)), replace=False))
    return _to_model_input(train.x[idx], meta), f"{meta.dataset} training set ({len(idx)} random images)"
