"""The ablation grid: change one factor at a time against a baseline, same data and budget.

    python -m trainer.ablate [--dataset fashion-mnist] [--epochs 5] [--arch lenet5|alexnet] [--out DIR]
                             [--max-train N] [--lr LR] [--seed S]

Variants: max vs average pooling, plain SGD vs SGD + Nesterov momentum, ReLU vs
sigmoid, BatchNorm vs none, batch 128 vs 64. Each variant is a full ``trainer.train.main`` run
(``dataclasses.replace`` on the baseline config) in DIR/<variant>/; the table goes to
DIR/ablation.md and DIR/ablation.json. A variant whose loss diverges is reported as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnstack.cli import parse_config, require
from cnnstack.contract import atomic_write_text, json_text
from trainer.config import TrainConfig


@dataclass(frozen=True)
class Variant:
    name: str
    factor: str  # what differs from the baseline, in words
    changes: dict[str, Any]


# The baseline is the first row; every other row changes exactly one factor.
VARIANTS = (
    Variant("baseline", "max-pool, SGD, ReLU, no BN, batch 128", {}),
    Variant("avg-pool", "pooling: average instead of max", {"pool": "avg"}),
    Variant("sgd-nesterov", "optimizer: SGD + Nesterov momentum 0.9", {"momentum": 0.9, "nesterov": True}),
    Variant("sigmoid", "activation: sigmoid instead of ReLU", {"activation": "sigmoid"}),
    Variant("batchnorm", "normalization: BatchNorm after each layer", {"batchnorm": True}),
    Variant("batch-64", "batch size: 64 instead of 128", {"batch_size": 64}),
)
DEFAULT_LR = {"lenet5": 0.1, "alexnet": 0.05}


@dataclass(frozen=True)
class AblateConfig:
    """The grid's settings (``python -m trainer.ablate --help``); the baseline is built from them."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    arch: str = "lenet5"
    epochs: int = 5
    max_train: int | None = None
    lr: float | None = None  # None: DEFAULT_LR of the arch
    seed: int = 0
    threads: int | None = None
    out: str = "runs/ablation"
    overwrite: bool = False

    def __post_init__(self) -> None:
        require(
            []
            if self.arch in DEFAULT_LR
            else [f"--arch '{self.arch}' is not one of: {', '.join(DEFAULT_LR)}"]
        )
        self.baseline()  # a TrainConfig checks itself: one ConfigError naming every flag to change

    def baseline(self) -> TrainConfig:
        """d2l-style plain SGD at a constant lr, Xavier init, no augmentation, fp32."""
        return TrainConfig(
            arch=self.arch,
            dataset=self.dataset,
            data_dir=self.data_dir,
            max_train=self.max_train,
            activation="relu",
            pool="max",
            batchnorm=False,
            init="xavier",
            epochs=self.epochs,
            batch_size=128,
            optimizer="sgd",
            lr=self.lr if self.lr is not None else DEFAULT_LR[self.arch],
            momentum=0.0,
            schedule="constant",
            precision="fp32",
            seed=self.seed,
            threads=self.threads,
            quiet=True,
            overwrite=True,  # the variant folders belong to this grid; the grid itself is checked in main()
        )


def run_variant(base: TrainConfig, variant: Variant, out: Path) -> dict[str, Any]:
    from trainer.engine import NonFiniteLossError
    from trainer.train import main as train_main

    cfg = dataclasses.replace(base, out=str(out / variant.name), **variant.changes)
    row: dict[str, Any] = {"variant": variant.name, "factor": variant.factor, "changes": variant.changes}
    try:
        summary = train_main(cfg)
    except NonFiniteLossError as e:
        return {
            **row,
            "diverged": str(e),
            "test_acc": None,
            "train_loss": None,
            "s_per_epoch": None,
            "params": None,
        }
    history = [json.loads(line) for line in (out / variant.name / "metrics.jsonl").read_text().splitlines()]
    return {
        **row,
        "test_acc": summary["test_acc"],
        "train_loss": history[-1]["train_loss"],
        "s_per_epoch": summary["train_time_s"] / len(history),
        "params": summary["params"],
        "diverged": None,
    }


def to_markdown(rows: list[dict[str, Any]], base: TrainConfig) -> str:
    lines = [
        f"# Ablation: {base.arch} on {base.dataset}",
        "",
        f"{base.epochs} epochs, plain SGD lr {base.lr:g} (constant), Xavier init, no augmentation, fp32, seed "
        f"{base.seed}" + (f", {base.max_train} training images" if base.max_train else "") + ".",
        "Each row changes one factor of the baseline.",
        "",
        "| variant | factor | test acc | train loss | s/epoch | params |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["diverged"]:
            lines.append(f"| {r['variant']} | {r['factor']} | diverged | - | - | - |")
            continue
        lines.append(
            f"| {r['variant']} | {r['factor']} | {r['test_acc']:.4f} | {r['train_loss']:.4f} | "
            f"{r['s_per_epoch']:.2f} | {r['params']:,} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--arch", default="lenet5", choices=tuple(DEFAULT_LR))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-train", type=int, default=None, help="train each variant on this many images")
    p.add_argument("--lr", type=float, default=None, help="baseline lr (default: lenet5 0.1, alexnet 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--overwrite", action="store_true", help="replace a previous grid in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(AblateConfig, build_parser(), argv)
    from trainer.train import INPUT_ERRORS

    out = Path(cfg.out)
    if (out / "ablation.json").exists() and not cfg.overwrite:
        print(
            f"ablate: error: {out} already holds an ablation grid; pass --overwrite or another --out",
            file=sys.stderr,
        )
        return 2
    base = cfg.baseline()
    try:
        rows = []
        for variant in VARIANTS:
            row = run_variant(base, variant, out)
            rows.append(row)
            acc = "diverged" if row["diverged"] else f"test_acc {row['test_acc']:.4f}"
            print(f"[ablate] {variant.name:<13} {acc}", flush=True)
    except INPUT_ERRORS as e:
        print(f"ablate: error: {e}", file=sys.stderr)
        return 2
    table = to_markdown(rows, base)
    atomic_write_text(out / "ablation.md", table)
    report = {"config": dataclasses.asdict(base), "variants": rows}
    atomic_write_text(out / "ablation.json", json_text(report, sort_keys=False))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
