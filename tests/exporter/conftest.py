"""Fixtures of the exporter tests: checkpoints written by the tests (see tests.exporter.helpers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.exporter.helpers import make_model, synthetic_meta, train_briefly, write_checkpoint
from trainer.models import get_model

CheckpointFactory = Callable[..., Path]


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> CheckpointFactory:
    """``make_checkpoint(arch="lenet5", name=None, dataset="synthetic", seed=0, **ckpt_overrides) -> path``."""

    def make(
        arch: str = "lenet5", name: str | None = None, dataset: str = "synthetic", seed: int = 0, **kw
    ) -> Path:
        meta = synthetic_meta(arch, dataset)
        path = tmp_path / "ckpts" / (name or f"{arch}-{seed}.pt")
        return write_checkpoint(path, make_model(arch, meta, seed), meta, **kw)

    return make


@pytest.fixture(scope="session")
def trained_lenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LeNet-5 (ReLU, max-pool) after 150 SGD steps on the synthetic set: well above chance."""
    meta = synthetic_meta("lenet5")
    torch.manual_seed(0)
    model = get_model("lenet5", in_channels=1, num_classes=10, image_size=28, activation="relu", pool="max")
    # lr 0.01: at 0.05 the loss spikes after ~30 steps and whether the ReLUs come back depends on
    # the CPU's rounding (AVX2 dispatch left it at chance); 0.01 converges alike on every kernel.
    train_briefly(model, "synthetic", steps=150, lr=0.01)
    path = tmp_path_factory.mktemp("trained") / "lenet-trained.pt"
    args = {"in_channels": 1, "num_classes": 10, "image_size": 28, "activation": "relu", "pool": "max"}
    return write_checkpoint(path, model, meta, model_args=args)
