"""Model metadata that travels with a model: in the checkpoint and in the ONNX metadata_props.

Torch-free on purpose: the server imports this module to read ONNX metadata, and the server must
never import torch. Everything a consumer needs to feed the model (input shape, normalization,
class names) is declared once, here, by the trainer, and read back everywhere else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

# Keys of ONNX ``metadata_props`` (all values are strings; lists/tuples are JSON encoded).
ONNX_KEYS = ("arch", "dataset", "input_shape", "mean", "std", "class_names")


@dataclass(frozen=True)
class ModelMeta:
    """What a consumer of a trained model must know about its input and output.

    ``input_shape`` is (C, H, W). ``mean``/``std`` are per-channel, applied to pixels scaled to
    [0, 1]; the exported ONNX graph folds them in, so ONNX consumers feed raw [0, 1] pixels.
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
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["class_names"] = list(self.class_names)
        d["channels"] = self.channels
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        missing = [k for k in ("arch", "dataset", "input_shape", "mean", "std", "class_names") if k not in d]
        if missing:
            raise ValueError(f"model metadata is missing {missing}")
        return cls(
            arch=str(d["arch"]),
            dataset=str(d["dataset"]),
            input_shape=tuple(int(v) for v in d["input_shape"]),  # type: ignore[arg-type]
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            class_names=tuple(str(v) for v in d["class_names"]),
            extra=dict(d.get("extra") or {}),
        )

    def to_onnx_props(self) -> dict[str, str]:
        """String key/values for ONNX ``metadata_props`` (JSON for sequences)."""
        return {
            "arch": self.arch,
            "dataset": self.dataset,
            "input_shape": json.dumps(list(self.input_shape)),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "class_names": json.dumps(list(self.class_names)),
        }

    @classmethod
    def from_onnx_props(cls, props: dict[str, str]) -> ModelMeta:
        missing = [k for k in ONNX_KEYS if k not in props]
        if missing:
            raise ValueError(
                f"ONNX metadata_props is missing {missing}; was the model exported by cnn-export?"
            )
        return cls(
            arch=props["arch"],
            dataset=props["dataset"],
            input_shape=tuple(json.loads(props["input_shape"])),
            mean=tuple(json.loads(props["mean"])),
            std=tuple(json.loads(props["std"])),
            class_names=tuple(json.loads(props["class_names"])),
        )
