"""The export report: what cnn-export measured about one model, written beside it as
``export_report.json`` (and, for a failed export, kept outside the published tree).

A report grows stage by stage: the sections below ``checks`` stay ``None`` (absent from the JSON)
until the stage that fills them ran. The server reads ``passed`` (see ``verdict``); a new version
of a model name must keep the ``ModelSignature`` of the published ones (see
``cnnstack.contract.repository.check_name_clash``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cnnstack.contract.model import ModelMeta


@dataclass
class CheckResult:
    """One gate: its name, whether it passed, its numbers (JSON-safe) and a line for people."""

    name: str
    passed: bool
    numbers: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelSignature:
    """The interface every version of one repository model shares (one config.pbtxt for all)."""

    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int

    @classmethod
    def of(cls, meta: ModelMeta) -> ModelSignature:
        return cls(meta.arch, meta.input_shape, meta.num_classes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input_shape": list(self.input_shape)}

    def differences(self, report: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """(key, published value, this value) for each signature key a report's model has otherwise."""
        published = report.get("model") or {}
        return [(k, published.get(k), v) for k, v in self.to_dict().items() if published.get(k) != v]


@dataclass(frozen=True)
class SourceRef:
    path: str  # the checkpoint file read, absolute
    sha256: str
    epoch: int | None


@dataclass(frozen=True)
class ModelSection:
    signature: ModelSignature
    dataset: str
    class_names: tuple[str, ...]
    model_args: dict[str, Any] | None
    params: int

    def to_dict(self) -> dict[str, Any]:
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "signature"}
        return {**self.signature.to_dict(), **rest, "class_names": list(self.class_names)}


@dataclass(frozen=True)
class ExportInfo:
    torch_exporter: str  # dynamo | torchscript
    note: str  # empty, or why dynamo was not used
    opset: int


@dataclass(frozen=True)
class DataInfo:
    eval: str  # what the checks ran on, in words
    real_test_set: bool  # False: seeded noise


@dataclass
class ExportReport:
    passed: bool
    name: str
    source: SourceRef
    model: ModelSection
    versions: dict[str, str]  # exporter, torch, onnx, onnxruntime
    settings: dict[str, Any]  # the gate's settings
    checkpoint_metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    export: ExportInfo | None = None
    data: DataInfo | None = None
    accuracy: dict[str, float | None] | None = None  # precision -> accuracy on the eval data
    precisions: dict[str, dict[str, Any]] | None = None  # precision -> its numbers
    precision: str | None = None  # of a published model: the one it has
    version: int | None = None  # of a published model: the one it got
    published: dict[str, int] | None = None  # model name -> version, once published

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (sections not reached yet are left out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "model":
                value = value.to_dict()
            elif f.name == "checks":
                value = [c.to_dict() for c in value]
            elif f.name in ("source", "export", "data"):
                value = asdict(value)
            out[f.name] = value
        return out

    def check(self, name: str) -> dict[str, Any]:
        """The numbers of the check called ``name`` ({} when it did not run)."""
        return next((c.numbers for c in self.checks if c.name == name), {})


def verdict(report: object) -> tuple[object, str | None]:
    """(its ``passed`` value, why not) of a report read back from JSON: only ``True`` passes. A
    hand-written report may say why it failed in ``failure`` or ``reason``."""
    if not isinstance(report, Mapping):
        return None, None
    return report.get("passed"), report.get("failure") or report.get("reason")
