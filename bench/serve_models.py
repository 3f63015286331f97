"""bench/serve_bench.py's models: a repository exported by cnn-export from trained checkpoints, or
from untrained ones written here (serving speed does not depend on the weights)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.serve_report import MODELS
from cnnstack.contract import MODEL_FILE

ROOT = Path(__file__).resolve().parents[1]


def write_untrained_checkpoint(name: str, path: Path) -> None:
    """A checkpoint of serve_report.MODELS' ``name`` with initial weights (speed does not depend on them)."""
    from cnnstack.contract import ModelMeta
    from trainer.checkpoint import Checkpoint
    from trainer.data import FASHION_MNIST_CLASSES, STATS
    from trainer.models import get_model

    arch, dataset, shape = MODELS[name]
    classes = FASHION_MNIST_CLASSES if dataset == "fashion-mnist" else tuple(f"class{i}" for i in range(10))
    args = {"in_channels": shape[0], "num_classes": len(classes), "image_size": shape[1]}
    model = get_model(arch, **args).eval()
    meta = ModelMeta(arch, dataset, shape, *STATS[dataset], class_names=classes)
    note = {"note": "untrained, for serve_bench"}
    Checkpoint(arch, args, meta, model.state_dict(), config=note).save(path)


def prepare_repository(
    out_dir: Path, models: Sequence[str], checkpoints: Mapping[str, Path], max_batch: int
) -> Path:
    """``OUT_DIR/models``: each model exported by cnn-export (max batch ``max_batch``), from its
    ``checkpoints`` entry or else an untrained checkpoint; models already exported are kept."""
    repo = out_dir / "models"
    for name in models:
        if (repo / name / "1" / MODEL_FILE).is_file():
            continue
        ckpt = checkpoints.get(name) or out_dir / "checkpoints" / f"{name}.pt"
        if name not in checkpoints and not ckpt.is_file():
            write_untrained_checkpoint(name, ckpt)
        cmd = [
            sys.executable,
            "-m",
            "exporter",
            str(ckpt),
            "-r",
            str(repo),
            "--name",
            name,
            "--no-progress",
            "--parity-samples",
            "512",
            "--batch1-samples",
            "8",
            "--bench-seconds",
            "0.2",
            "--max-batch-size",
            str(max_batch),
        ]
        print(f"[bench] exporting {name}: {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=900)
    return repo
