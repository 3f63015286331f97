"""Checkpoint schema (version 1): a plain dict, written atomically, validated on load.

``Checkpoint`` is the one place that builds that dict (``to_dict``, ``save``) and reads it back
(``load``), RNG state included (``capture_rng`` / ``restore_rng``). Tools that only read a model
(the exporter, ``trainer.visualize``) use ``load_checkpoint`` (the validated dict) and
``build_model``.

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

import dataclasses
import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cnnstack.contract import ModelMeta, atomic_write

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "arch", "model_args", "meta", "state_dict")
# Written only when the run has them (readers must not require them).
OPTIONAL_KEYS = ("history", "train_state_dict", "ema_updates", "scaler", "precision", "world_size")


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


@dataclass
class Checkpoint:
    """One checkpoint, its keys as fields (see the schema above)."""

    arch: str
    model_args: dict[str, Any]
    meta: ModelMeta
    state_dict: dict[str, Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    torch_version: str = field(default_factory=lambda: str(torch.__version__))
    git_commit: str | None = None
    rng: dict[str, Any] | None = None
    history: list[dict[str, Any]] | None = None
    train_state_dict: dict[str, Tensor] | None = None
    ema_updates: int | None = None
    scaler: dict[str, Any] | None = None
    precision: str | None = None
    world_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The file's dict: ``schema_version`` first, the optional keys only when set."""
        # Not dataclasses.asdict: it would deep-copy every tensor.
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["meta"] = self.meta.to_dict()
        d = {k: v for k, v in d.items() if v is not None or k not in OPTIONAL_KEYS}
        return {"schema_version": SCHEMA_VERSION, **d}

    def save(self, path: str | os.PathLike[str]) -> None:
        save_checkpoint(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """``load_checkpoint`` (validated; a CheckpointError naming the file), as a Checkpoint."""
        d = load_checkpoint(path)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}  # keys a later version adds are dropped
        return cls(**{**values, "meta": ModelMeta.from_dict(d["meta"])})

    @staticmethod
    def capture_rng(device: torch.device) -> dict[str, Any]:
        """The global random streams (torch, Python's, the device's) for an exact resume."""
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(device)
        return state

    def restore_rng(self, device: torch.device) -> None:
        """Put back the streams ``capture_rng`` saw (nothing when the checkpoint has none)."""
        if not self.rng:
            return
        torch.set_rng_state(self.rng["torch"])
        if "python" in self.rng:
            version, internal, gauss = self.rng["python"]
            random.setstate((version, tuple(internal), gauss))  # setstate takes a tuple, not a list
        if device.type == "cuda" and "cuda" in self.rng:
            torch.cuda.set_rng_state(self.rng["cuda"], device)


def cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Weights on CPU in plain contiguous layout (channels_last is a training-time choice)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


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
