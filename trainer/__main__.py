"""``python -m trainer`` / ``cnn-train``: parse flags into a TrainConfig and run ``trainer.train.main``.

Precedence of settings: TrainConfig defaults < the checkpoint's config (``--resume``) < ``--preset``
< flags given on the command line. Exit codes: 0 done, 2 bad input (unknown arch/dataset/preset,
invalid or conflicting flags, unusable --out, a --resume that does not match), 3 the loss diverged,
130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnstack.cli import ConfigError, parse_config
from trainer import config as C
from trainer.config import TrainConfig
from trainer.presets import PRESETS, get_preset

# (channels, image size, classes) per dataset, so --list-archs/--summary need no data on disk.
DATASET_SHAPES = {
    "fashion-mnist": (1, 28, 10),
    "mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "cifar100-coarse": (3, 32, 20),
    "synthetic": (1, 28, 10),
    "synthetic-rgb": (3, 32, 10),
}
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class TrainCommand(TrainConfig):
    """What ``cnn-train`` was asked: train ``config()``, or only list the archs / show one's layers."""

    list_archs: bool = False
    summary: bool = False

    def config(self) -> TrainConfig:
        return TrainConfig(**{k: getattr(self, k) for k in _DEFAULTS})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnn-train",
        description="Train a classic CNN on MNIST / Fashion-MNIST / CIFAR. Presets: "
        + "; ".join(f"{n}: {pr.description}" for n, pr in PRESETS.items()),
        # Only flags actually given land in the namespace: that is how presets know what to fill in.
        argument_default=argparse.SUPPRESS,
    )

    def add(*flags: str, help: str, **kw: Any) -> None:
        name = flags[-1].lstrip("-").replace("-", "_")
        if name in _DEFAULTS:
            help += f" (default: {_DEFAULTS[name]})"
        p.add_argument(*flags, help=help, **kw)

    boolean = {"action": argparse.BooleanOptionalAction}
    add("--preset", help="named recipe filling in defaults; explicit flags override it", metavar="NAME")
    add("--arch", help="model architecture (see --list-archs)")
    add(
        "--dataset", help="fashion-mnist, mnist, cifar10, cifar100, cifar100-coarse, synthetic, synthetic-rgb"
    )
    add("--data-dir", help="folder holding the dataset files")
    add("--download", help="download the dataset with torchvision if it is missing", **boolean)
    add("--max-train", help="train on a seeded random subset of this many images", type=int)
    add("--activation", help="lenet5/alexnet: sigmoid, relu or tanh")
    add("--pool", help="lenet5/alexnet: avg or max")
    add("--batchnorm", help="lenet5/alexnet: BatchNorm after each conv and hidden FC layer", **boolean)
    add("--dropout", help="lenet5/alexnet/fmnist_net: dropout probability", type=float)
    add(
        "--width",
        help="lenet5/alexnet/fmnist_net: channel width multiplier (fmnist_net: base channels)",
        type=int,
    )
    add("--fc-width", help="lenet5: hidden FC width multiplier", type=int)
    add(
        "--wide-stem",
        help="fmnist_net: the 28x28 first stage outputs 2x the base channels and stage 2 opens with no conv",
        **boolean,
    )
    add("--init", help="weight init", choices=C.INITS)
    add("--epochs", help="epochs to train", type=int)
    add("-b", "--batch-size", help="global batch size (split across DDP processes)", type=int)
    add("--eval-batch-size", help="batch size of evaluation", type=int)
    add("--optimizer", help="optimizer", choices=C.OPTIMIZERS)
    add("--lr", help="peak learning rate", type=float)
    add("--momentum", help="SGD momentum", type=float)
    add("--nesterov", help="Nesterov momentum (SGD)", **boolean)
    add("--weight-decay", help="L2 weight decay on conv/linear weights", type=float)
    add("--schedule", help="learning-rate schedule, stepped every batch", choices=C.SCHEDULES)
    add("--warmup-epochs", help="linear warmup (fractions allowed; onecycle: its ramp-up)", type=float)
    add("--lr-step-epochs", help="schedule=step: decay every this many epochs", type=int)
    add("--lr-gamma", help="schedule=step: decay factor", type=float)
    add("--label-smoothing", help="cross-entropy label smoothing", type=float)
    add("--augment", help="batched on-device augmentation (flip only where labels allow)", choices=C.AUGMENTS)
    add(
        "--ema-decay",
        help="EMA of the weights per step (0 = off); the EMA weights are evaluated and saved",
        type=float,
    )
    add(
        "--tta-flip",
        help="also report accuracy averaged with the mirrored image (summary: test_acc_tta)",
        **boolean,
    )
    add("--seed", help="random seed (init, batch order, augmentation)", type=int)
    add("--device", help="where to train", choices=C.DEVICES)
    add(
        "--precision",
        help="auto = on CUDA bf16 (fp16 where the GPU lacks it); on a CPU fp32, or bf16 where oneDNN runs it "
        "natively and a short timed probe finds this model >= 1.1x faster in it (the choice and why are printed)",
        choices=C.PRECISIONS,
    )
    add(
        "--channels-last",
        help="NHWC memory format (faster convolutions on CPU oneDNN and tensor cores)",
        **boolean,
    )
    add("--compile", help="torch.compile the model", **boolean)
    add("--threads", help="torch intra-op threads", type=int)
    add(
        "--tune-malloc",
        help="keep freed activation memory in the heap (glibc mallopt) instead of page-faulting it back "
        "every step; off keeps glibc's defaults",
        **boolean,
    )
    add("--out", help="output folder")
    add(
        "--resume",
        help="continue the run in this folder (or checkpoint file) from its last epoch",
        metavar="DIR",
    )
    add("--overwrite", help="replace a previous run in --out instead of refusing", **boolean)
    add("--quiet", help="no progress bar (the per-epoch log line stays)", **boolean)
    p.add_argument(
        "--list-archs", action="store_true", default=False, help="list architectures with parameter counts"
    )
    p.add_argument(
        "--summary", action="store_true", default=False, help="print the layer table of --arch and exit"
    )
    return p


def layered_defaults(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """The value of each flag not given: TrainConfig's default < the resumed run's < the preset's."""
    explicit = {k: v for k, v in vars(parser.parse_args(argv)).items() if k in _DEFAULTS}
    values: dict[str, Any] = dict(_DEFAULTS)
    if explicit.get("resume"):
        values.update(resumed_config(explicit["resume"]))
        values.update(resume=explicit["resume"], overwrite=False)
        path = Path(explicit["resume"])
        values["out"] = str(path if path.is_dir() else path.parent)  # continue in place
    if explicit.get("preset"):
        preset = dict(get_preset(explicit["preset"]).values)
        if explicit.get("arch", preset.get("arch")) != preset.get("arch"):
            # The preset's model knobs describe its own arch; another --arch keeps only the recipe.
            preset = {k: v for k, v in preset.items() if k not in C.MODEL_KNOBS}
        values.update(preset, preset=explicit["preset"])
    return values


def resumed_config(resume: str) -> dict[str, Any]:
    from trainer.checkpoint import load_checkpoint

    path = Path(resume)
    ckpt = load_checkpoint(path / "checkpoint.pt" if path.is_dir() else path)
    config = ckpt.get("config") or {}
    return {k: v for k, v in config.items() if k in _DEFAULTS}  # settings a later version added: dropped


def list_archs(dataset: str) -> str:
    from trainer.models.summary import describe_archs

    c, s, k = DATASET_SHAPES[dataset]
    rows = describe_archs(in_channels=c, image_size=s, num_classes=k)
    lines = [f"architectures for {dataset} ({c}x{s}x{s}, {k} classes):"]
    lines += [f"  {name:<14} {params:>12,} params" for name, params in rows]
    return "\n".join(lines)


def arch_summary(cfg: TrainConfig) -> str:
    from trainer.models import get_model
    from trainer.models.summary import summarize

    c, s, k = DATASET_SHAPES[cfg.dataset]
    model = get_model(cfg.arch, in_channels=c, num_classes=k, image_size=s, **cfg.model_knobs())
    return summarize(model, (c, s, s))


def after_divergence(cfg: TrainConfig) -> str:
    """What was kept of a run whose loss diverged, and what to try."""
    ckpt = Path(cfg.out) / "checkpoint.pt"
    kept = (
        f"the last good checkpoint is kept in {ckpt}"
        if ckpt.is_file()
        else "no epoch finished, so no checkpoint was written"
    )
    return (
        f"training stopped, {kept}. The learning rate is probably too high: "
        f"try a lower --lr (e.g. {cfg.lr / 10:g}), a --warmup-epochs, or --precision fp32"
    )


def parse_command(argv: Sequence[str] | None) -> TrainCommand:
    """The flags over the layered defaults, validated; a problem is a usage error (exit 2)."""
    from trainer.checkpoint import CheckpointError

    parser = build_parser()
    try:
        parser.set_defaults(**layered_defaults(parser, argv))
    except (ConfigError, CheckpointError) as e:  # an unknown --preset, an unreadable --resume
        parser.error(str(e))
    return parse_config(TrainCommand, parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    command = parse_command(argv)
    if command.list_archs:
        print(list_archs(command.dataset))
        return 0
    if command.summary:
        print(arch_summary(command))
        return 0
    cfg = command.config()
    from trainer.engine import NonFiniteLossError
    from trainer.train import INPUT_ERRORS
    from trainer.train import main as train_main

    try:
        train_main(cfg)
    except INPUT_ERRORS as e:
        print(f"cnn-train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as e:
        print(f"cnn-train: error: {e}; {after_divergence(cfg)}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"\ncnn-train: interrupted; continue with --resume {cfg.out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
