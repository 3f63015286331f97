"""Everything a run writes into ``--out``, each file replaced atomically (temp file + rename).

checkpoint.pt          the latest epoch (schema v1, see trainer.checkpoint), what --resume reads
best.pt                the epoch with the best plain test accuracy so far
metrics.jsonl          one JSON object per epoch
summary.json           final accuracy (plain and flip-TTA), per-class accuracy, params, wall time
confusion_matrix.csv   counts, rows = true class, columns = predicted
confusion_matrix.png, curves.png
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnnstack.contract import atomic_write_text, json_text
from trainer.models import count_parameters

if TYPE_CHECKING:
    from trainer.engine import EvalResult
    from trainer.train import Run

RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.jsonl", "summary.json")


class OutputDirError(RuntimeError):
    """--out cannot be used: not writable, or it holds a run that would be overwritten."""


def check_output_dir(out: Path, *, resuming: bool, overwrite: bool) -> None:
    """Fail before any training if ``out`` cannot take the outputs or would lose a previous run."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise OutputDirError(f"cannot write to --out {out}: {e.strerror or e}") from e
    if not resuming and not overwrite and (out / "checkpoint.pt").exists():
        raise OutputDirError(
            f"--out {out} already holds a run (checkpoint.pt); pass --resume {out} to continue it, "
            "--overwrite to replace it, or choose another --out"
        )


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights on CPU in plain contiguous layout (channels_last is a training-time choice)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj, sort_keys=False))


def write_metrics_jsonl(path: Path, history: list[dict[str, Any]]) -> None:
    """The whole history each epoch: a crash mid-write leaves the previous complete file."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_confusion_csv(path: Path, confusion: list[list[int]], class_names: tuple[str, ...]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["true\\predicted", *class_names])
    for name, row in zip(class_names, confusion, strict=True):
        w.writerow([name, *row])
    atomic_write_text(path, buf.getvalue())


def read_confusion_csv(path: str | os.PathLike[str]) -> tuple[list[str], list[list[int]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0][1:], [[int(v) for v in r[1:]] for r in rows[1:]]


def run_summary(run: Run, result: EvalResult, t0: float) -> dict[str, Any]:
    """The run's summary: final and best accuracy, per-class accuracy, speed, settings."""
    cfg, history = run.cfg, run.history
    return {
        "test_acc": result.acc,
        "test_acc_tta": result.acc_tta,
        "tta_flip": run.tta_flip,
        "test_loss": result.loss,
        "best_test_acc": run.best_acc,
        "best_epoch": max(history, key=lambda r: r["test_acc"])["epoch"],
        "per_class_acc": dict(zip(run.info.class_names, result.per_class_acc(), strict=True)),
        "params": count_parameters(run.model),
        "wall_time_s": time.perf_counter() - t0,
        "train_time_s": sum(r["seconds"] for r in history),
        "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
        "arch": cfg.arch,
        "dataset": run.info.name,
        "preset": cfg.preset,
        "epochs": cfg.epochs,
        "precision": run.precision,
        "device": str(run.device),
        "world_size": run.dist_info.world_size,
        "ema_decay": cfg.ema_decay,
        "malloc_tuned": run.malloc_tuned,
        "compile_s": run.compile_s,
        "config": dataclasses.asdict(cfg),
    }
