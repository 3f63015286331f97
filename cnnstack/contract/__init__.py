"""The contract between trainer, exporter, server and load tester, defined once, torch-free.

- ``model``: the served graph's tensor names, ``ModelMeta`` (checkpoint ``meta`` and ONNX
  ``metadata_props``) and ``Provenance`` (the exporter's own ``metadata_props``).
- ``config``: ``config.pbtxt`` as Triton's ``ModelConfig`` protobuf, written and read with
  ``google.protobuf.text_format``; ``RepositoryError``.
- ``repository``: the Triton layout (names, version rule), scanning, atomic publishing.
- ``report``: the export report's schema (``ExportReport``, ``CheckResult``, ``ModelSignature``).
- ``files``: atomic file writes.

Everything public is importable from ``cnnstack.contract`` itself.
"""

from cnnstack.contract.config import (
    CONFIG_FILE,
    LABELS_FILE,
    PLATFORM,
    TENSOR_TYPE,
    RepositoryError,
    add_tensors,
    model_config,
    parse_config,
    parse_config_json,
    render_config,
)
from cnnstack.contract.files import atomic_write, atomic_write_bytes, atomic_write_text, json_text
from cnnstack.contract.model import (
    INPUT_NAME,
    LOGITS_NAME,
    META_KEYS,
    OUTPUT_NAMES,
    PROBABILITIES_NAME,
    TENSOR_DATATYPE,
    ModelMeta,
    Provenance,
)
from cnnstack.contract.report import (
    CheckResult,
    DataInfo,
    ExportInfo,
    ExportReport,
    ModelSection,
    ModelSignature,
    SourceRef,
    verdict,
)
from cnnstack.contract.repository import (
    FAILED_DIR,
    MODEL_FILE,
    REPORT_FILE,
    SUMMARY_JSON,
    SUMMARY_MD,
    TMP_PREFIX,
    RepoModel,
    VersionFiles,
    check_name_clash,
    check_report,
    ensure_writable,
    is_version_dir,
    latest_version,
    list_model_names,
    list_versions,
    meta_from_props,
    publish,
    read_report,
    sanitize_name,
    scan_model,
    scan_repository,
    select_versions,
    write_failed_report,
    write_summary,
)

__all__ = [
    "CONFIG_FILE",
    "FAILED_DIR",
    "INPUT_NAME",
    "LABELS_FILE",
    "LOGITS_NAME",
    "META_KEYS",
    "MODEL_FILE",
    "OUTPUT_NAMES",
    "PLATFORM",
    "PROBABILITIES_NAME",
    "REPORT_FILE",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "TENSOR_DATATYPE",
    "TENSOR_TYPE",
    "TMP_PREFIX",
    "CheckResult",
    "DataInfo",
    "ExportInfo",
    "ExportReport",
    "ModelMeta",
    "ModelSection",
    "ModelSignature",
    "Provenance",
    "RepoModel",
    "RepositoryError",
    "SourceRef",
    "VersionFiles",
    "add_tensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_name_clash",
    "check_report",
    "ensure_writable",
    "is_version_dir",
    "json_text",
    "latest_version",
    "list_model_names",
    "list_versions",
    "meta_from_props",
    "model_config",
    "parse_config",
    "parse_config_json",
    "publish",
    "read_report",
    "render_config",
    "sanitize_name",
    "scan_model",
    "scan_repository",
    "select_versions",
    "verdict",
    "write_failed_report",
    "write_summary",
]
