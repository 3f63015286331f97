"""The training configuration: one frozen dataclass, built in ``trainer.__main__.main`` from the CLI.

Components receive the fields they need; the checkpoint stores ``dataclasses.asdict(cfg)`` (a plain
dict, never a pickled namespace), which is also how ``--resume`` reads the original settings back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "onecycle", "step", "constant")
INITS = ("default", "xavier", "kaiming")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUGMENTS = ("none", "flip", "crop", "crop-flip")

# The ablation knobs exist on these builders only; anything else rejects them.
KNOB_ARCHS: dict[str, tuple[str, ...]] = {
    "lenet5": ("activation", "pool", "batchnorm", "dropout", "width", "fc_width"),
    "alexnet": ("activation", "pool", "batchnorm", "dropout", "width"),
    "fmnist_net": ("width", "dropout", "wide_stem"),
}
MODEL_KNOBS = ("activation", "pool", "batchnorm", "dropout", "width", "fc_width", "wide_stem")


class ConfigError(ValueError):
    """Settings that cannot work together; the message says which flag to change."""


@dataclass(frozen=True)
class TrainConfig:
    # what to train on what
    arch: str = "lenet5"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    max_train: int | None = None  # a seeded random subset of the training set (quick runs, ablations)
    preset: str | None = None  # recorded for the summary; the values are already filled in
    # model knobs (None = the builder's default); see KNOB_ARCHS
    activation: str | None = None
    pool: str | None = None
    batchnorm: bool | None = None
    dropout: float | None = None
    width: int | None = None
    fc_width: int | None = None
    wide_stem: bool | None = None
    init: str = "default"
    # optimization
    epochs: int = 10
    batch_size: int = 256  # global: split across DDP processes
    eval_batch_size: int = 1024
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0  # on conv/linear weights only, not biases or norm parameters
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_step_epochs: int = 30  # schedule=step: multiply by lr_gamma every lr_step_epochs
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    augment: str = "none"  # batched random crop and/or horizontal flip (flip only where labels allow)
    ema_decay: float = 0.0  # per-step EMA of the weights; 0 disables; the EMA weights are evaluated and saved
    tta_flip: bool = False  # also report accuracy averaged over the image and its mirror
    # execution
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default
    tune_malloc: bool = True  # fixed glibc mmap/trim thresholds (trainer/hostmem.py): no page-fault churn
    # outputs
    out: str = "runs/train"
    resume: str | None = None
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        def choose(field: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, field)
            if value not in allowed:
                raise ConfigError(
                    f"--{field.replace('_', '-')} '{value}' is not one of: {', '.join(allowed)}"
                )

        choose("optimizer", OPTIMIZERS)
        choose("schedule", SCHEDULES)
        choose("init", INITS)
        choose("device", DEVICES)
        choose("precision", PRECISIONS)
        choose("augment", AUGMENTS)
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ConfigError(
                f"--warmup-epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}"
            )
        if self.max_train is not None and self.max_train < 1:
            raise ConfigError(f"--max-train must be >= 1, got {self.max_train}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ConfigError("--nesterov needs --optimizer sgd and --momentum > 0")
        given = [k for k in MODEL_KNOBS if getattr(self, k) is not None]
        allowed = KNOB_ARCHS.get(self.arch, ())
        bad = [k for k in given if k not in allowed]
        if bad:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in bad)
            takers = sorted(a for a, knobs in KNOB_ARCHS.items() if all(k in knobs for k in bad))
            raise ConfigError(
                f"{flags} cannot be set for arch '{self.arch}'"
                + (f"; it applies to: {', '.join(takers)}" if takers else "")
            )

    def model_knobs(self) -> dict[str, Any]:
        """The arch keyword arguments given explicitly (the rest stay at the builder's defaults)."""
        return {k: getattr(self, k) for k in MODEL_KNOBS if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Rebuild from a checkpoint's ``config``; keys this version does not know are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
