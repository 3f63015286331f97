"""What travels with a model: the served graph's tensors and the metadata a consumer needs.

The exported ONNX graph takes one float32 tensor ``input`` (N, C, H, W) of pixels in [0, 1] (the
dataset normalization is folded in) and returns ``logits`` and their softmax ``probabilities``,
both float32 (N, num_classes). ``ModelMeta`` rides in the checkpoint and in the ONNX
``metadata_props``; ``Provenance`` adds, in the ONNX file only, where the graph came from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

INPUT_NAME = "input"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
OUTPUT_NAMES = (LOGITS_NAME, PROBABILITIES_NAME)
TENSOR_DATATYPE = "FP32"  # every tensor above, as KServe v2 names the type


@dataclass(frozen=True)
class ModelMeta:
    """What a consumer of a trained model must know about its input and output.

    ``input_shape`` is (C, H, W). ``mean``/``std`` are per-channel, applied to pixels scaled to
    [0, 1]; the exported ONNX graph folds them in, so ONNX consumers feed raw [0, 1] pixels.
    ``extra`` keeps whatever else a reader found beside these fields (never compared).
    """

    arch: str
    dataset: str
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        c = self.input_shape[0]
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape}")
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std need {c} values (one per channel), got {self.mean} / {self.std}")
        if not self.class_names:
            raise ValueError("class_names must not be empty")

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    @property
    def image_size(self) -> int:
        return self.input_shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (the checkpoint's ``meta``), lists for the sequences."""
        d = asdict(self)
        d.update({k: list(d[k]) for k in _SEQUENCES})
        d["channels"] = self.channels
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelMeta:
        missing = [k for k in META_KEYS if k not in d]
        if missing:
            raise ValueError(f"model metadata is missing {missing}")
        return cls(**_typed(d), extra=dict(d.get("extra") or {}))

    def to_onnx_props(self) -> dict[str, str]:
        """String key/values for ONNX ``metadata_props`` (JSON for sequences)."""
        d = self.to_dict()
        return {k: json.dumps(d[k]) if k in _SEQUENCES else str(d[k]) for k in META_KEYS}

    @classmethod
    def from_onnx_props(cls, props: Mapping[str, str]) -> ModelMeta:
        """The inverse of ``to_onnx_props``; every other key lands in ``extra``."""
        missing = [k for k in META_KEYS if k not in props]
        if missing:
            raise ValueError(
                f"ONNX metadata_props is missing {missing}; was the model exported by cnn-export?"
            )
        decoded = {k: json.loads(props[k]) if k in _SEQUENCES else props[k] for k in META_KEYS}
        extra = {k: v for k, v in props.items() if k not in META_KEYS}
        return cls(**_typed(decoded), extra=extra)


# ONNX metadata_props keys of ModelMeta (all required), and those JSON encoded there.
META_KEYS = tuple(f.name for f in fields(ModelMeta) if f.name != "extra")
_SEQUENCES = ("input_shape", "mean", "std", "class_names")


def _typed(d: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "arch": str(d["arch"]),
        "dataset": str(d["dataset"]),
        "input_shape": tuple(int(v) for v in d["input_shape"]),
        "mean": tuple(float(v) for v in d["mean"]),
        "std": tuple(float(v) for v in d["std"]),
        "class_names": tuple(str(v) for v in d["class_names"]),
    }


@dataclass(frozen=True)
class Provenance:
    """What cnn-export writes into ``metadata_props`` beside ModelMeta: how this graph was made."""

    precision: str = "fp32"  # fp32 | fp16 | int8 (inputs and outputs are float32 for all)
    test_accuracy: float | None = None
    test_accuracy_source: str = ""
    source_sha256: str = ""  # of the checkpoint file
    exporter_version: str = ""
    torch_exporter: str = ""  # dynamo | torchscript
    torch_version: str = ""
    onnx_version: str = ""

    def to_onnx_props(self) -> dict[str, str]:
        acc = self.test_accuracy
        props = {k: str(v) for k, v in asdict(self).items()}
        props["test_accuracy"] = "nan" if acc is None else f"{acc:.6f}"
        return props

    @classmethod
    def from_onnx_props(cls, props: Mapping[str, str]) -> Provenance:
        """Lenient: a key that is absent keeps its default (hand-made models have none)."""
        known = {f.name for f in fields(cls)} - {"test_accuracy"}
        values: dict[str, Any] = {k: props[k] for k in known if k in props}
        acc = float(props.get("test_accuracy", "nan"))
        return cls(**values, test_accuracy=None if math.isnan(acc) else acc)
