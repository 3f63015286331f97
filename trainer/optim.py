"""The optimizer and its learning-rate schedule (stepped once per optimizer step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on conv/linear weights only: decaying biases and BN scales just fights the norm.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of cfg.lr after ``step`` optimizer steps: linear warmup, then the schedule."""
    total = cfg.epochs * steps_per_epoch
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        # One-cycle: from lr/25 up to lr (over warmup, 25% of the run by default), then cosine to ~0.
        warm = warm or max(1, round(0.25 * total))
        if step < warm:
            return 1 / 25 + (1 - 1 / 25) * step / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 1e-4 / 25 + (1 - 1e-4 / 25) * 0.5 * (1 + math.cos(math.pi * t))
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr_gamma ** ((step // steps_per_epoch) // cfg.lr_step_epochs)
    return 1.0  # constant


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (not per epoch), so warmup and cosine are smooth."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))
