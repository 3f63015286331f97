"""One training run between its epochs: what ``train.setup`` builds, what each epoch adds to its
history, and what the run reports (its checkpoint, its summary)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnstack.contract import ModelMeta
from trainer.checkpoint import Checkpoint, cpu_state_dict
from trainer.config import TrainConfig
from trainer.data import DatasetInfo, Split
from trainer.engine import EpochPlan, EvalResult, TrainState
from trainer.models import count_parameters


@dataclass
class Run:
    """The data, the model and what trains it, the settings every epoch reads, the history so far."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    info: DatasetInfo
    train: Split  # on the device
    test: Split
    model: nn.Module  # unwrapped: what checkpoints hold
    model_args: dict[str, Any]  # get_model(cfg.arch, **model_args) rebuilds it
    state: TrainState  # what the steps use: state.model is the DDP / compiled wrapper, if any
    plan: EpochPlan  # batch size per process, precision, augmentation, the ranks
    malloc_tuned: bool
    compile_s: float | None = None
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_acc: float = -1.0

    @property
    def eval_model(self) -> nn.Module:
        return self.state.ema.module if self.state.ema is not None else self.model

    @property
    def meta(self) -> ModelMeta:
        i = self.info
        return ModelMeta(self.cfg.arch, i.name, i.input_shape, i.mean, i.std, i.class_names)

    @property
    def tta_flip(self) -> bool:
        return self.cfg.tta_flip and self.info.hflip

    def checkpoint(self, epoch: int, commit: str | None) -> Checkpoint:
        """The checkpoint after ``epoch``: the evaluated (EMA) weights, and all --resume needs."""
        ema, scaler = self.state.ema, self.state.scaler
        return Checkpoint(
            arch=self.cfg.arch,
            model_args=self.model_args,
            meta=self.meta,
            state_dict=cpu_state_dict(self.eval_model),
            optimizer=self.state.optimizer.state_dict(),
            scheduler=self.state.scheduler.state_dict(),
            epoch=epoch,
            metrics=dict(self.history[-1]),
            config=self.cfg.to_dict(),
            git_commit=commit,
            rng=Checkpoint.capture_rng(self.device),
            history=self.history,
            train_state_dict=cpu_state_dict(self.model) if ema is not None else None,
            ema_updates=ema.updates if ema is not None else None,
            scaler=scaler.state_dict() if scaler is not None else None,
            precision=self.plan.precision,
            world_size=self.plan.dist_info.world_size,
        )

    def summary(self, result: EvalResult, t0: float) -> dict[str, Any]:
        """Final and best accuracy, per-class accuracy, speed, settings (summary.json)."""
        cfg, history = self.cfg, self.history
        return {
            "test_acc": result.acc,
            "test_acc_tta": result.acc_tta,
            "tta_flip": self.tta_flip,
            "test_loss": result.loss,
            "best_test_acc": self.best_acc,
            "best_epoch": max(history, key=lambda r: r["test_acc"])["epoch"],
            "per_class_acc": dict(zip(self.info.class_names, result.per_class_acc(), strict=True)),
            "params": count_parameters(self.model),
            "wall_time_s": time.perf_counter() - t0,
            "train_time_s": sum(r["seconds"] for r in history),
            "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
            "arch": cfg.arch,
            "dataset": self.info.name,
            "preset": cfg.preset,
            "epochs": cfg.epochs,
            "precision": self.plan.precision,
            "device": str(self.device),
            "world_size": self.plan.dist_info.world_size,
            "ema_decay": cfg.ema_decay,
            "malloc_tuned": self.malloc_tuned,
            "compile_s": self.compile_s,
            "config": dataclasses.asdict(cfg),
        }
