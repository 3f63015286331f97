"""The model repository, in the layout Triton Inference Server reads::

    REPO/NAME/config.pbtxt                    # ModelConfig, protobuf text format
    REPO/NAME/labels.txt                      # class names, one a line (the config's label_filename)
    REPO/NAME/<version>/model.onnx            # version: digits, not starting with 0
    REPO/NAME/<version>/export_report.json    # written by cnn-export; must say "passed": true

Hidden entries (``.tmp-*`` being published, ``.failed`` reports) are never models. Scanning only
stats files; loading a version (sessions, warm-up) is the server's job.

Publishing is atomic: a version is built in ``REPO/.tmp-*`` (same filesystem) and renamed to
``REPO/NAME/<version>`` in one ``os.rename``; a reader never sees a half-written version. Two
exporters racing for the same version number are serialized by the rename itself: renaming onto
an existing, non-empty directory fails, and the loser retries with the next number.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnstack.contract.config import CONFIG_FILE, LABELS_FILE, RepositoryError, parse_config
from cnnstack.contract.files import atomic_write_text, fsync_dir, json_text, write_synced
from cnnstack.contract.model import ModelMeta
from cnnstack.contract.report import ExportReport, ModelSignature, verdict
from protos.inference import model_config_pb2 as mc

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
REPORT_FILE = "export_report.json"
SUMMARY_JSON = "export_summary.json"
SUMMARY_MD = "export_summary.md"
FAILED_DIR = ".failed"
TMP_PREFIX = ".tmp-"

_NAME_RE = re.compile(r"[^a-z0-9_-]+")

PathLike = str | os.PathLike[str]


def sanitize_name(raw: str) -> str:
    """Lower-case, keep ``[a-z0-9_-]``, squeeze the rest to ``-`` ("LeNet5 FMNIST" -> "lenet5-fmnist")."""
    name = _NAME_RE.sub("-", raw.lower()).strip("-_")
    if not name:
        raise RepositoryError(f"cannot make a model name out of {raw!r}; pass --name")
    return name


def is_model_dir_name(name: str) -> bool:
    return not name.startswith(".")


def is_version_dir(name: str) -> bool:
    # Triton ignores version directories that are not numeric or that start with "0".
    return name.isdigit() and not name.startswith("0")


# ---------------------------------------------------------------- reading


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


def scan_repository(root: Path) -> dict[str, RepoModel]:
    """Every model directory of ``root`` with its config and complete-looking versions."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        raise RepositoryError(f"model repository {root} does not exist") from None
    except NotADirectoryError:
        raise RepositoryError(f"model repository {root} is not a directory") from None
    return {e.name: scan_model(Path(e.path)) for e in entries if is_model_dir_name(e.name) and e.is_dir()}


def _read_config(model_dir: Path) -> tuple[mc.ModelConfig, str | None, str]:
    """(config, error, hash of its text); a missing config.pbtxt is the empty ModelConfig."""
    config_path = model_dir / CONFIG_FILE
    try:
        text = config_path.read_text()
    except FileNotFoundError:
        return mc.ModelConfig(), None, ""
    except OSError as e:
        return mc.ModelConfig(), f"{config_path}: {e}", ""
    if not text:
        return mc.ModelConfig(), None, ""
    config_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
    try:
        return parse_config(text, str(config_path)), None, config_hash
    except RepositoryError as e:
        return mc.ModelConfig(), str(e), config_hash


def scan_model(model_dir: Path) -> RepoModel:
    """A model directory: its config and the versions whose model file is there."""
    name = model_dir.name
    config, error, config_hash = _read_config(model_dir)
    if config.name and config.name != name:
        log.warning(
            "%s: name %r differs from the directory name; serving it as %r",
            model_dir / CONFIG_FILE,
            config.name,
            name,
        )
    model_file = config.default_model_filename or MODEL_FILE
    try:
        entries = list(os.scandir(model_dir))
    except OSError:
        entries = []
    versions = {}
    for entry in entries:
        if not (is_version_dir(entry.name) and entry.is_dir()):
            continue
        model_path, report_path = Path(entry.path) / model_file, Path(entry.path) / REPORT_FILE
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


def list_versions(repo: PathLike, name: str) -> list[int]:
    """Published versions of ``name``, ascending: complete ones only (model and report)."""
    found = scan_model(Path(repo) / name).versions
    return sorted(v for v, files in found.items() if files.report_path.is_file())


def latest_version(repo: PathLike, name: str) -> int | None:
    versions = list_versions(repo, name)
    return versions[-1] if versions else None


def list_model_names(repo: PathLike) -> list[str]:
    """Model directories (with a config.pbtxt) of the repository."""
    try:
        entries = list(os.scandir(repo))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        e.name
        for e in entries
        if is_model_dir_name(e.name) and e.is_dir() and (Path(e.path) / CONFIG_FILE).is_file()
    )


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


def read_report(repo: PathLike, name: str, version: int) -> dict[str, Any]:
    return json.loads((Path(repo) / name / str(version) / REPORT_FILE).read_text())


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
    passed, reason = verdict(report)
    if passed is not True:
        raise RepositoryError(
            f"{files.report_path}: the export did not pass its checks (passed={passed!r}"
            + (f", {reason}" if reason else "")
            + "); re-export the model"
        )
    return report


def meta_from_props(props: Mapping[str, str], source: str) -> ModelMeta:
    """ModelMeta from a version's ONNX metadata_props (what cnn-export writes)."""
    try:
        return ModelMeta.from_onnx_props(props)
    except (ValueError, TypeError) as e:
        raise RepositoryError(f"{source}: bad model metadata: {e}") from e


# ---------------------------------------------------------------- writing


def ensure_writable(repo: PathLike) -> Path:
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


def check_name_clash(repo: PathLike, name: str, signature: ModelSignature) -> None:
    """Refuse to add a version whose model differs from the published ones in its signature:
    versions of one Triton model share one config.pbtxt, so they must share the interface."""
    latest = latest_version(repo, name)
    if latest is None:
        return
    try:
        published = read_report(repo, name, latest)
    except (OSError, ValueError) as e:
        raise RepositoryError(
            f"{Path(repo) / name / str(latest)} has an unreadable {REPORT_FILE}: {e}"
        ) from e
    differences = signature.differences(published)
    if differences:
        key, theirs, ours = differences[0]
        raise RepositoryError(
            f"model name '{name}' is taken by a different model in {repo} "
            f"(version {latest} has {key}={theirs!r}, this export has {ours!r}); pass another --name"
        )


def _next_free_version(model_dir: Path) -> int:
    # Count every numeric entry, complete or not, so a version number is never reused.
    try:
        taken = [int(e.name) for e in os.scandir(model_dir) if e.name.isdigit()]
    except FileNotFoundError:
        taken = []
    return max(taken, default=0) + 1


ReportFor = Callable[[int], ExportReport | Mapping[str, Any]]


def _report_json(report: ExportReport | Mapping[str, Any]) -> bytes:
    return json_text(report.to_dict() if isinstance(report, ExportReport) else dict(report)).encode()


def _private_dir(repo: Path, name: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=repo))
    # mkdtemp makes the folder 0700; once renamed into place it must be as readable as any other
    # folder (the server image runs as another uid than the exporter): the usual mode under the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def publish(
    repo: PathLike,
    name: str,
    model_bytes: bytes,
    report_for_version: ReportFor,
    config: str,
    max_attempts: int = 50,
    labels: tuple[str, ...] | list[str] | None = None,
) -> int:
    """Publish ``model_bytes`` as the next version of ``name``; returns the version number.

    ``report_for_version(v)`` builds the report once the version is known (it is rebuilt on a lost
    race). ``config`` (config.pbtxt's text, see ``render_config``) and ``labels`` (as labels.txt)
    are replaced atomically before the version appears.
    """
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    model_dir = repo / name
    tmp = _private_dir(repo, name)
    try:
        write_synced(tmp / MODEL_FILE, model_bytes)
        model_dir.mkdir(exist_ok=True)
        if labels is not None:  # before the config that names it
            atomic_write_text(model_dir / LABELS_FILE, "".join(f"{label}\n" for label in labels))
        atomic_write_text(model_dir / CONFIG_FILE, config)
        for _ in range(max_attempts):
            version = _next_free_version(model_dir)
            write_synced(tmp / REPORT_FILE, _report_json(report_for_version(version)))
            fsync_dir(tmp)
            try:
                os.rename(tmp, model_dir / str(version))
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue  # another exporter took this number first
                raise
            fsync_dir(model_dir)
            return version
        raise RepositoryError(
            f"could not allocate a version of '{name}' in {repo} after {max_attempts} attempts"
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_failed_report(report_dir: PathLike, name: str, report: ExportReport | Mapping[str, Any]) -> Path:
    """Keep the report of a failed export outside the published tree; returns its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-{stamp}-", dir=report_dir)) / REPORT_FILE
    path.write_bytes(_report_json(report))
    return path


def write_summary(repo: PathLike, summary: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    repo = Path(repo)
    json_path, md_path = repo / SUMMARY_JSON, repo / SUMMARY_MD
    atomic_write_text(json_path, json_text(summary))
    atomic_write_text(md_path, markdown)
    return json_path, md_path
