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
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from cnnstack.contract import atomic_write_text, json_text


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


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj, sort_keys=False))


def write_metrics_jsonl(path: Path, history: list[dict[str, Any]]) -> None:
    """The whole history each epoch: a crash mid-write leaves the previous complete file."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def write_confusion_csv(path: Path, confusion: list[list[int]], class_names: tuple[str, ...]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["true\\predicted", *class_names])
    for name, row in zip(class_names, confusion, strict=True):
        w.writerow([name, *row])
    atomic_write_text(path, buf.getvalue())
