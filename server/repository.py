"""Reading the model repository (Triton layout), torch-free and onnxruntime-free::

    REPO/NAME/config.pbtxt                    # ModelConfig, protobuf text format (optional)
    REPO/NAME/<version>/model.onnx            # version: digits, not starting with 0
    REPO/NAME/<version>/export_report.json    # written by cnn-export; must say "passed": true

Hidden entries (``.tmp-*`` being published, ``.failed``) are never models. Scanning only stats
files; loading (sessions, metadata, warm-up) is ``server.models``' job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from protos.inference import model_config_pb2 as mc
from trainer.meta import ModelMeta

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
REPORT_FILE = "export_report.json"
DEFAULT_MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"


class RepositoryError(ValueError):
    """A model or version in the repository cannot be served; the message names the file."""


@dataclass(frozen=True)
class VersionFiles:
    version: int
    model_path: Path
    report_path: Path
    fingerprint: tuple  # changes whenever the files or the model's config change


@dataclass(frozen=True)
class RepoModel:
    name: str
    config: mc.ModelConfig
    config_error: str | None  # config.pbtxt present but unparseable: keep serving what is loaded
    versions: dict[int, VersionFiles] = field(default_factory=dict)


def is_version_dir(name: str) -> bool:
    # Triton ignores version directories that are not numeric or that start with "0".
    return name.isdigit() and not name.startswith("0")


def parse_config(text: str, source: str = CONFIG_FILE) -> mc.ModelConfig:
    """config.pbtxt -> ModelConfig; fields this server does not know are skipped (Triton has many)."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config, allow_unknown_field=True)
    except text_format.ParseError as e:
        raise RepositoryError(f"{source}: not a valid ModelConfig in protobuf text format: {e}") from e
    if config.platform and config.platform != PLATFORM:
        raise RepositoryError(
            f"{source}: platform {config.platform!r} is not served here (only {PLATFORM!r})"
        )
    if config.max_batch_size < 0:
        raise RepositoryError(f"{source}: max_batch_size must be >= 0, got {config.max_batch_size}")
    return config


def scan_repository(root: Path) -> dict[str, RepoModel]:
    """Every model directory of ``root`` with its config and complete-looking versions."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        raise RepositoryError(f"model repository {root} does not exist") from None
    except NotADirectoryError:
        raise RepositoryError(f"model repository {root} is not a directory") from None
    models = {}
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        models[entry.name] = scan_model(Path(entry.path))
    return models


def scan_model(model_dir: Path) -> RepoModel:
    name = model_dir.name
    config_path = model_dir / CONFIG_FILE
    config, error, config_hash = mc.ModelConfig(), None, ""
    try:
        text = config_path.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as e:
        text, error = "", f"{config_path}: {e}"
    if text:
        config_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
        try:
            config = parse_config(text, str(config_path))
        except RepositoryError as e:
            error = str(e)
    if config.name and config.name != name:
        log.warning(
            "%s: name %r differs from the directory name; serving it as %r", config_path, config.name, name
        )
    model_file = config.default_model_filename or DEFAULT_MODEL_FILE
    versions = {}
    try:
        entries = list(os.scandir(model_dir))
    except OSError:
        entries = []
    for entry in entries:
        if not (is_version_dir(entry.name) and entry.is_dir()):
            continue
        model_path = Path(entry.path) / model_file
        report_path = Path(entry.path) / REPORT_FILE
        try:
            st = model_path.stat()
        except OSError:
            continue  # not a complete version (yet)
        try:
            rst = report_path.stat()
            report_sig: tuple = (rst.st_mtime_ns, rst.st_size)
        except OSError:
            report_sig = ()
        fingerprint = (st.st_ino, st.st_mtime_ns, st.st_size, report_sig, config_hash)
        versions[int(entry.name)] = VersionFiles(int(entry.name), model_path, report_path, fingerprint)
    return RepoModel(name=name, config=config, config_error=error, versions=versions)


def select_versions(config: mc.ModelConfig, available: list[int]) -> list[int]:
    """The versions the model's version_policy asks for (default: the latest one), ascending."""
    available = sorted(available)
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return available
    if which == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in available if v in wanted]
    n = max(1, policy.latest.num_versions) if which == "latest" else 1
    return available[-n:]


def check_report(files: VersionFiles) -> dict[str, Any] | None:
    """The export report, which must say the export passed its parity gate.

    A version without a report (a hand-made repository) is served with a warning; one whose report
    is unreadable or says it failed is rejected.
    """
    try:
        text = files.report_path.read_text()
    except FileNotFoundError:
        log.warning(
            "%s: no %s; serving it without the exporter's parity check", files.model_path, REPORT_FILE
        )
        return None
    except OSError as e:
        raise RepositoryError(f"{files.report_path}: unreadable: {e}") from e
    try:
        report = json.loads(text)
    except ValueError as e:
        raise RepositoryError(f"{files.report_path}: not valid JSON: {e}") from e
    if not isinstance(report, dict) or report.get("passed") is not True:
        reason = report.get("failure") or report.get("reason") if isinstance(report, dict) else None
        raise RepositoryError(
            f"{files.report_path}: the export did not pass its checks (passed={report.get('passed') if isinstance(report, dict) else None!r}"
            + (f", {reason}" if reason else "")
            + "); re-export the model"
        )
    return report


def meta_from_props(props: dict[str, str], source: str) -> ModelMeta:
    """ModelMeta from ONNX metadata_props (what cnn-export writes)."""
    try:
        meta = ModelMeta.from_onnx_props(props)
    except (ValueError, TypeError) as e:
        raise RepositoryError(f"{source}: bad model metadata: {e}") from e
    extra = {
        k: v
        for k, v in props.items()
        if k not in ("arch", "dataset", "input_shape", "mean", "std", "class_names")
    }
    return ModelMeta(meta.arch, meta.dataset, meta.input_shape, meta.mean, meta.std, meta.class_names, extra)


def effective_limit(server_value: float, model_value: float) -> float:
    """A model's config may lower a server ceiling (0 in the config means "not set")."""
    return min(server_value, model_value) if model_value > 0 else server_value
