"""Checkpoint schema (version 1): a plain dict, written atomically, validated on load.

Keys::

    schema_version  int, == SCHEMA_VERSION
    arch            registry name (trainer.models.list_models())
    model_args      dict of keyword args for get_model(arch, **model_args)
    meta            ModelMeta.to_dict(): input_shape, channels, mean, std, class_names, dataset
    state_dict      model weights (the unwrapped model: no DDP/compile prefixes)
    optimizer       optimizer.state_dict() or None
    scheduler       scheduler.state_dict() or None
    epoch           number of completed epochs
    metrics         dict of the latest metrics (test_acc, test_loss, train_loss, ...)
    config          the training config as a plain dict (never a pickled namespace)
    torch_version   str
    git_commit      str or None
    rng             dict of RNG states for exact resume (may be absent)

Optional keys the trainer adds (readers must not require them)::

    history           list of the per-epoch metrics dicts so far (metrics.jsonl is rebuilt from it)
    train_state_dict  with --ema-decay: the optimized weights (state_dict holds the EMA weights that
                      were evaluated and are exported); --resume continues from these
    ema_updates       with --ema-decay: number of EMA updates so far (the decay warms up)
    scaler            with fp16: GradScaler state
    precision         bf16 | fp16 | fp32 actually used
    world_size        number of data-parallel processes
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnstack.contract import ModelMeta, atomic_write

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "arch", "model_args", "meta", "state_dict")


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names the file and the problem."""


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def save_checkpoint(path: str | os.PathLike[str], ckpt: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"refusing to write checkpoint {path}: missing keys {missing}")
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; every failure is a CheckpointError naming the file."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "checkpoint.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path} is a directory without best.pt or checkpoint.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickle of a foreign object...
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or not a torch file): {e}"
        ) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint: holds a {type(ckpt).__name__}, not a dict")
    version = ckpt.get("schema_version")
    if version is None:
        raise CheckpointError(f"{path} is not a cnnstack checkpoint: no schema_version key")
    if version != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint schema version {version}; this version of cnnstack reads {SCHEMA_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is missing required keys {missing}")
    try:
        ModelMeta.from_dict(ckpt["meta"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path} has invalid model metadata: {e}") from e
    return ckpt


def checkpoint_meta(ckpt: dict[str, Any]) -> ModelMeta:
    return ModelMeta.from_dict(ckpt["meta"])


def build_model(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the model of a loaded checkpoint, weights loaded, in eval mode."""
    from trainer.models import get_model

    model = get_model(ckpt["arch"], **ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
