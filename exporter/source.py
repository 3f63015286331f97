"""The checkpoint an export starts from: a run directory or file resolved, loaded and validated,
hashed for the report's provenance, and rebuilt as the model to export."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnstack.contract import ModelMeta, sanitize_name
from exporter import onnx_export
from trainer.checkpoint import CheckpointError, build_model, checkpoint_meta, load_checkpoint


class BadInput(ValueError):
    """The source cannot be exported (not a checkpoint, clashing name...); nothing was written."""


@dataclass
class Source:
    path: Path  # the checkpoint file actually read (run dirs resolved to best.pt / checkpoint.pt)
    given: Path  # what the user passed
    ckpt: dict[str, Any]
    meta: ModelMeta
    sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_checkpoint(path: Path) -> Path:
    if path.is_dir():
        # The last epoch first: best.pt is picked by test accuracy, and reporting the test accuracy of a
        # model selected on the test set would flatter it. An explicit file path exports best.pt.
        for name in ("checkpoint.pt", "best.pt"):
            if (path / name).is_file():
                return path / name
    return path  # load_checkpoint names the problem


def load_source(path: Path) -> Source:
    file = resolve_checkpoint(path)
    try:
        ckpt = load_checkpoint(file)
        meta = checkpoint_meta(ckpt)
    except CheckpointError as e:
        raise BadInput(str(e)) from e
    return Source(file, path, ckpt, meta, sha256_file(file))


def build_wrapper(src: Source) -> onnx_export.NormalizedClassifier:
    try:
        model = build_model(src.ckpt)
    except (ValueError, RuntimeError, TypeError, KeyError) as e:  # unknown arch, state_dict mismatch
        raise BadInput(f"{src.path}: cannot rebuild '{src.ckpt.get('arch')}' from its metadata: {e}") from e
    return onnx_export.wrap(model, src.meta)


def default_name(src: Source) -> str:
    if src.given.is_dir():
        return sanitize_name(src.given.resolve().name)
    return sanitize_name(f"{src.meta.arch}-{src.meta.dataset}")
