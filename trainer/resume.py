"""``--resume``: whether a checkpoint can continue this run, and the training state it restores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.checkpoint import CheckpointError, checkpoint_meta, load_checkpoint
from trainer.config import TrainConfig
from trainer.engine import ModelEMA
from trainer.outputs import restore_rng_state


class ResumeError(RuntimeError):
    """--resume points at something that cannot continue this run."""


def load_resume_checkpoint(cfg: TrainConfig, model_args: dict[str, Any]) -> dict[str, Any]:
    path = Path(cfg.resume or "")
    if path.is_dir():
        path = path / "checkpoint.pt"  # the latest epoch, not best.pt
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise ResumeError(f"cannot resume: {e}") from e
    if ckpt["arch"] != cfg.arch:
        raise ResumeError(
            f"cannot resume: {path} holds a '{ckpt['arch']}' model but this run's arch is '{cfg.arch}'; "
            f"resume with --arch {ckpt['arch']} (or leave --arch out) or start a new run in another --out"
        )
    dataset = checkpoint_meta(ckpt).dataset
    if dataset != cfg.dataset:
        raise ResumeError(f"cannot resume: {path} was trained on '{dataset}', this run is on '{cfg.dataset}'")
    if ckpt["model_args"] != model_args:
        raise ResumeError(f"cannot resume: {path} has model args {ckpt['model_args']}, this run {model_args}")
    if ckpt.get("optimizer") is None or ckpt.get("scheduler") is None:
        raise ResumeError(
            f"cannot resume: {path} has no optimizer/scheduler state (not a training checkpoint)"
        )
    return ckpt


def restore(
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: ModelEMA | None,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
) -> tuple[int, list[dict[str, Any]]]:
    """Weights, optimizer, schedule, EMA, scaler and RNG as the checkpoint left them; returns the
    epochs it completed and their history."""
    # With EMA, state_dict is the evaluated EMA copy and train_state_dict the optimized weights.
    model.load_state_dict(ckpt.get("train_state_dict") or ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ema is not None:
        ema.module.load_state_dict(ckpt["state_dict"])
        ema.updates = int(ckpt.get("ema_updates", 0))
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("rng"):
        restore_rng_state(ckpt["rng"], device)
    epoch = int(ckpt["epoch"])
    return epoch, [dict(r) for r in ckpt.get("history", []) if r["epoch"] <= epoch]
