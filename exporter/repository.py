"""The model repository, in the layout Triton Inference Server reads::

    REPO/NAME/config.pbtxt
    REPO/NAME/<version>/model.onnx
    REPO/NAME/<version>/export_report.json

Torch-free and onnx-free on purpose: the server may import ``list_versions``/``list_model_names``
(it must never import torch), and the exporter's publishing step needs nothing heavier than ``os``.

Publishing is atomic: a version is built in ``REPO/.tmp-*`` (same filesystem) and renamed to
``REPO/NAME/<version>`` in one ``os.rename``; a reader never sees a half-written version. Two
exporters racing for the same version number are serialized by the rename itself: renaming onto
an existing, non-empty directory fails, and the loser retries with the next number.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL_FILE = "model.onnx"
REPORT_FILE = "export_report.json"
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"  # one class name per line, in class-index order (Triton's label_filename)
SUMMARY_JSON = "export_summary.json"
SUMMARY_MD = "export_summary.md"
FAILED_DIR = ".failed"
TMP_PREFIX = ".tmp-"

_NAME_RE = re.compile(r"[^a-z0-9_-]+")


class RepositoryError(ValueError):
    """The repository cannot take this export (unwritable, name clash, ...); nothing was written."""


def sanitize_name(raw: str) -> str:
    """Lower-case, keep ``[a-z0-9_-]``, squeeze the rest to ``-`` ("LeNet5 FMNIST" -> "lenet5-fmnist")."""
    name = _NAME_RE.sub("-", raw.lower()).strip("-_")
    if not name:
        raise RepositoryError(f"cannot make a model name out of {raw!r}; pass --name")
    return name


def _is_version_dir_name(name: str) -> bool:
    # Triton ignores version directories that are not numeric or that start with "0".
    return name.isdigit() and not name.startswith("0")


def list_versions(repo: str | os.PathLike[str], name: str) -> list[int]:
    """Published versions of ``name``, ascending. Only complete ones (model + report) are listed."""
    model_dir = Path(repo) / name
    try:
        entries = list(os.scandir(model_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    versions = []
    for entry in entries:
        if entry.is_dir() and _is_version_dir_name(entry.name):
            vdir = Path(entry.path)
            if (vdir / MODEL_FILE).is_file() and (vdir / REPORT_FILE).is_file():
                versions.append(int(entry.name))
    return sorted(versions)


def latest_version(repo: str | os.PathLike[str], name: str) -> int | None:
    versions = list_versions(repo, name)
    return versions[-1] if versions else None


def list_model_names(repo: str | os.PathLike[str]) -> list[str]:
    """Model directories (with a config.pbtxt) of the repository; hidden entries are never models."""
    try:
        entries = list(os.scandir(repo))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        e.name
        for e in entries
        if e.is_dir() and not e.name.startswith(".") and (Path(e.path) / CONFIG_FILE).is_file()
    )


def read_report(repo: str | os.PathLike[str], name: str, version: int) -> dict[str, Any]:
    return json.loads((Path(repo) / name / str(version) / REPORT_FILE).read_text())


def render_config_pbtxt(
    name: str,
    input_shape: tuple[int, int, int] | list[int],
    num_classes: int,
    max_batch_size: int,
    max_queue_delay_us: int,
    num_versions: int = 1,
    label_filename: str | None = LABELS_FILE,
) -> str:
    """Triton ``ModelConfig`` in protobuf text format; dims exclude the batch dimension.

    With ``label_filename`` (written by ``publish(labels=...)`` beside config.pbtxt), Triton's
    classification extension (``class_count``) answers ``score:index:label`` as our server does.
    """
    c, h, w = (int(v) for v in input_shape)
    labels = f' label_filename: "{label_filename}"' if label_filename else ""
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {int(max_batch_size)}\n"
        "input [\n"
        f'  {{ name: "input" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }}\n'
        "]\n"
        "output [\n"
        f'  {{ name: "logits" data_type: TYPE_FP32 dims: [ {int(num_classes)} ]{labels} }},\n'
        f'  {{ name: "probabilities" data_type: TYPE_FP32 dims: [ {int(num_classes)} ]{labels} }}\n'
        "]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n"
        "}\n"
        f"version_policy: {{ latest {{ num_versions: {int(num_versions)} }} }}\n"
    )


def ensure_writable(repo: str | os.PathLike[str]) -> Path:
    """Prove we can create (and remove) a directory in ``repo``, or in its nearest existing parent
    when it does not exist yet (it is created on the first publish, so bad input leaves no trace).
    """
    repo = Path(repo)
    probe_in = repo
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    try:
        if not probe_in.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(probe_in))
        os.rmdir(tempfile.mkdtemp(prefix=TMP_PREFIX + "probe-", dir=probe_in))
    except OSError as e:
        raise RepositoryError(
            f"model repository {repo} is not writable: {e.strerror or e} ({probe_in})"
        ) from e
    return repo


def check_name_clash(repo: str | os.PathLike[str], name: str, signature: dict[str, Any]) -> None:
    """Refuse to add a version whose model differs from the published ones in arch or I/O shape.

    ``signature`` holds ``arch``, ``input_shape`` and ``num_classes``; versions of one Triton model
    share one config.pbtxt, so they must share the interface.
    """
    latest = latest_version(repo, name)
    if latest is None:
        return
    try:
        published = read_report(repo, name, latest).get("model", {})
    except (OSError, ValueError) as e:
        raise RepositoryError(
            f"{Path(repo) / name / str(latest)} has an unreadable {REPORT_FILE}: {e}"
        ) from e
    for key in ("arch", "input_shape", "num_classes"):
        if published.get(key) != signature.get(key):
            raise RepositoryError(
                f"model name '{name}' is taken by a different model in {repo} "
                f"(version {latest} has {key}={published.get(key)!r}, this export has {signature.get(key)!r}); "
                "pass another --name"
            )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        _write_file(tmp, text.encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _next_free_version(model_dir: Path) -> int:
    # Count every numeric entry, complete or not, so a version number is never reused.
    try:
        taken = [int(e.name) for e in os.scandir(model_dir) if e.name.isdigit()]
    except FileNotFoundError:
        taken = []
    return max(taken, default=0) + 1


def publish(
    repo: str | os.PathLike[str],
    name: str,
    model_bytes: bytes,
    report_for_version: Callable[[int], dict[str, Any]],
    config_text: str,
    max_attempts: int = 50,
    labels: tuple[str, ...] | list[str] | None = None,
) -> int:
    """Publish ``model_bytes`` as the next version of ``name``; returns the version number.

    ``report_for_version(v)`` builds the report JSON once the version is known (it is rebuilt on a
    lost race). config.pbtxt (and ``labels``, as labels.txt) are replaced atomically before the
    version appears.
    """
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    model_dir = repo / name
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=repo))
    # mkdtemp makes the folder 0700; once renamed into place it must be as readable as any other
    # folder (the server image runs as another uid than the exporter): the usual mode under the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        _write_file(tmp / MODEL_FILE, model_bytes)
        model_dir.mkdir(exist_ok=True)
        if labels is not None:  # before the config that names it
            atomic_write_text(model_dir / LABELS_FILE, "".join(f"{label}\n" for label in labels))
        atomic_write_text(model_dir / CONFIG_FILE, config_text)
        for _ in range(max_attempts):
            version = _next_free_version(model_dir)
            report = report_for_version(version)
            _write_file(tmp / REPORT_FILE, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
            _fsync_dir(tmp)
            try:
                os.rename(tmp, model_dir / str(version))
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue  # another exporter took this number first
                raise
            _fsync_dir(model_dir)
            return version
        raise RepositoryError(
            f"could not allocate a version of '{name}' in {repo} after {max_attempts} attempts"
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_failed_report(report_dir: str | os.PathLike[str], name: str, report: dict[str, Any]) -> Path:
    """Keep the report of a failed export outside the published tree; returns its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(tempfile.mkdtemp(prefix=f"{name}-{stamp}-", dir=_mkdir(Path(report_dir))))
    path = out / REPORT_FILE
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_summary(repo: str | os.PathLike[str], summary: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    repo = Path(repo)
    json_path, md_path = repo / SUMMARY_JSON, repo / SUMMARY_MD
    atomic_write_text(json_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    atomic_write_text(md_path, markdown)
    return json_path, md_path
