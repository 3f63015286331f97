"""The training configuration: one frozen dataclass, built in ``trainer.__main__.main`` from the CLI
with ``cnnstack.cli.parse_config``; it checks itself and raises one ``ConfigError`` naming every
problem.

Components receive the fields they need; the checkpoint stores ``dataclasses.asdict(cfg)`` (a plain
dict, never a pickled namespace), which is also how ``--resume`` reads the original settings back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cnnstack.cli import require

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
        require(self.problems())

    def problems(self) -> list[str]:
        """One message per setting that cannot work, naming the flag to change."""
        # The registries import torch: read at validation, not at import.
        from trainer.data import list_datasets
        from trainer.models import ACTIVATIONS, POOLS, list_models

        problems = []
        if self.arch not in list_models():
            problems.append(f"unknown arch '{self.arch}'; choose one of: {', '.join(list_models())}")
        if self.dataset not in list_datasets():
            problems.append(f"unknown dataset '{self.dataset}'; choose one of: {', '.join(list_datasets())}")
        for name, allowed in [
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("init", INITS),
            ("device", DEVICES),
            ("precision", PRECISIONS),
            ("augment", AUGMENTS),
            ("activation", ACTIVATIONS),
            ("pool", POOLS),
        ]:
            value = getattr(self, name)
            if value is not None and value not in allowed:
                problems.append(f"{_flag(name)} '{value}' is not one of: {', '.join(allowed)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_train", "width", "fc_width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{_flag(name)} must be >= 1, got {value}")
        for name in ("label_smoothing", "ema_decay", "dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                problems.append(f"{_flag(name)} must be in [0, 1), got {value}")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            problems.append(f"--warmup-epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            problems.append("--nesterov needs --optimizer sgd and --momentum > 0")
        return problems + self._knob_problems()

    def _knob_problems(self) -> list[str]:
        """Model knobs given for an arch whose builder has no such argument."""
        given = [k for k in MODEL_KNOBS if getattr(self, k) is not None]
        allowed = KNOB_ARCHS.get(self.arch, ())
        bad = [k for k in given if k not in allowed]
        if not bad:
            return []
        takers = sorted(a for a, knobs in KNOB_ARCHS.items() if all(k in knobs for k in bad))
        return [
            f"{', '.join(map(_flag, bad))} cannot be set for arch '{self.arch}'"
            + (f"; it applies to: {', '.join(takers)}" if takers else "")
        ]

    def model_knobs(self) -> dict[str, Any]:
        """The arch keyword arguments given explicitly (the rest stay at the builder's defaults)."""
        return {k: getattr(self, k) for k in MODEL_KNOBS if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")
