"""``--resume``: whether a checkpoint can continue this run, and the training state it restores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import Checkpoint, CheckpointError
from trainer.config import TrainConfig
from trainer.engine import TrainState


class ResumeError(RuntimeError):
    """--resume points at something that cannot continue this run."""


def load_resume_checkpoint(cfg: TrainConfig, model_args: dict[str, Any]) -> Checkpoint:
    path = Path(cfg.resume or "")
    if path.is_dir():
        path = path / "checkpoint.pt"  # the latest epoch, not best.pt
    try:
        ckpt = Checkpoint.load(path)
    except CheckpointError as e:
        raise ResumeError(f"cannot resume: {e}") from e
    if ckpt.arch != cfg.arch:
        raise ResumeError(
            f"cannot resume: {path} holds a '{ckpt.arch}' model but this run's arch is '{cfg.arch}'; "
            f"resume with --arch {ckpt.arch} (or leave --arch out) or start a new run in another --out"
        )
    if ckpt.meta.dataset != cfg.dataset:
        raise ResumeError(
            f"cannot resume: {path} was trained on '{ckpt.meta.dataset}', this run is on '{cfg.dataset}'"
        )
    if ckpt.model_args != model_args:
        raise ResumeError(f"cannot resume: {path} has model args {ckpt.model_args}, this run {model_args}")
    if ckpt.optimizer is None or ckpt.scheduler is None:
        raise ResumeError(
            f"cannot resume: {path} has no optimizer/scheduler state (not a training checkpoint)"
        )
    return ckpt


def restore(ckpt: Checkpoint, state: TrainState, device: torch.device) -> tuple[int, list[dict[str, Any]]]:
    """Weights, optimizer, schedule, EMA, scaler and RNG as the checkpoint left them; returns the
    epochs it completed and their history. ``state.model`` is the unwrapped model here."""
    # With EMA, state_dict is the evaluated EMA copy and train_state_dict the optimized weights.
    assert ckpt.optimizer is not None and ckpt.scheduler is not None  # load_resume_checkpoint checked
    state.model.load_state_dict(ckpt.train_state_dict or ckpt.state_dict)
    state.optimizer.load_state_dict(ckpt.optimizer)
    state.scheduler.load_state_dict(ckpt.scheduler)
    if state.ema is not None:
        state.ema.module.load_state_dict(ckpt.state_dict)
        state.ema.updates = int(ckpt.ema_updates or 0)
    if state.scaler is not None and ckpt.scaler:
        state.scaler.load_state_dict(ckpt.scaler)
    ckpt.restore_rng(device)
    epoch = int(ckpt.epoch)
    return epoch, [dict(r) for r in ckpt.history or [] if r["epoch"] <= epoch]
