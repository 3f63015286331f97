"""Helpers of the exporter tests. Checkpoints made by the tests themselves (schema v1, via trainer.checkpoint) and a fast exporter run.

Untrained models get their BatchNorm statistics from the images they are checked on (as training
would): with the initial running stats (mean 0, var 1), or stats of other images, activations of
deep nets grow layer after layer, and logits of 1e2..1e5 put fp32 rounding (~1e-6 relative) above
the absolute 1e-4 parity tolerance. Trained nets have logits of order 10.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from cnnstack.contract import ModelMeta
from exporter.__main__ import main
from trainer.checkpoint import Checkpoint, save_checkpoint
from trainer.models import get_model

# Fast settings: a parity batch of 64 (the smallest the gate allows), few batch-1 images, short timing.
FAST_CHECKS = ["--parity-samples", "64", "--parity-batch", "64", "--batch1-samples", "4"]
FAST = [*FAST_CHECKS, "--bench-seconds", "0.05"]
HEAVY_ARCHS = {"densenet121", "googlenet", "resnet34", "vgg16"}  # the slowest to export: marked slow


def synthetic_meta(arch: str, dataset: str = "synthetic") -> ModelMeta:
    from trainer.data import load_dataset

    info, _, _ = load_dataset("synthetic")
    return ModelMeta(arch, dataset, info.input_shape, info.mean, info.std, info.class_names)


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Running stats = the statistics of ``x`` (normalized images), layer by layer, as training sets them."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's stats
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def make_model(arch: str, meta: ModelMeta, seed: int = 0) -> nn.Module:
    """Untrained ``arch`` whose BatchNorm stats come from the images it will be checked on: the
    synthetic training split, or noise when the checkpoint's dataset is another one (whose files the
    tests hide, so the exporter checks on noise too)."""
    from trainer.data import load_dataset

    torch.manual_seed(seed)
    model = get_model(
        arch, in_channels=meta.channels, num_classes=meta.num_classes, image_size=meta.image_size
    )
    if meta.dataset == "synthetic":
        pixels = load_dataset("synthetic")[1].x[:64].float() / 255  # (64, 1, 28, 28) in [0, 1]
    else:
        pixels = torch.rand(64, *meta.input_shape, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(meta.mean).view(1, -1, 1, 1), torch.tensor(meta.std).view(1, -1, 1, 1)
    calibrate_batchnorm(model, (pixels - mean) / std)
    return model.eval()


def write_checkpoint(path: Path, model: nn.Module, meta: ModelMeta, **overrides) -> Path:
    """A checkpoint of ``model`` after one epoch; ``overrides`` replace keys of the file's dict."""
    model_args = {
        "in_channels": meta.channels,
        "num_classes": meta.num_classes,
        "image_size": meta.image_size,
    }
    ckpt = Checkpoint(meta.arch, model_args, meta, model.state_dict(), epoch=1, metrics={"test_acc": 0.5})
    save_checkpoint(path, {**ckpt.to_dict(), **overrides})
    return path


def train_briefly(
    model: nn.Module, dataset: str, steps: int, data_dir: Path | None = None, lr: float = 0.1
) -> None:
    """A few SGD steps on the dataset's training split (what a short training run gives)."""
    from trainer.data import load_dataset, to_float

    info, train, _ = load_dataset(dataset, data_dir=data_dir)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(to_float(train.x[idx], info)), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def run_export(*args: str | os.PathLike[str]) -> int:
    return main([str(a) for a in args])


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (to prove a repository unchanged)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def published_tree(root: Path) -> dict[str, bytes]:
    """The part of a repository Triton reads: no hidden entries (.failed reports, .tmp-*)."""
    return {k: v for k, v in tree(root).items() if not k.startswith(".")}
