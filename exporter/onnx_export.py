"""PyTorch -> ONNX: the served graph takes [0, 1] pixels and folds the dataset normalization in;
its tensors are the contract's (``cnnstack.contract.model``), the batch dimension dynamic.

One self-contained file (no external data). ``metadata_props`` carry what consumers need
(``ModelMeta`` and ``Provenance``, both ``cnnstack.contract``); the server reads them from there.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import onnx
import torch
from torch import Tensor, nn

import cnnstack
from cnnstack.contract import INPUT_NAME, OUTPUT_NAMES, ModelMeta, Provenance

TRACE_BATCH = 2  # a batch of 1 would let the tracer specialize the batch dim to a constant


class NormalizedClassifier(nn.Module):
    """``model((x - mean) / std)`` and its softmax: what the served graph computes."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        )  # (1, C, 1, 1)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # (N, C, H, W) in [0, 1]
        logits = self.model((x - self.mean) / self.std)  # (N, num_classes)
        return logits, torch.softmax(logits, dim=1)


def wrap(model: nn.Module, meta: ModelMeta) -> NormalizedClassifier:
    return NormalizedClassifier(model, meta.mean, meta.std).eval()


def _export_dynamo(wrapper: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
    program = torch.onnx.export(
        wrapper,
        (example,),
        dynamo=True,
        dynamic_shapes=({0: "batch"},),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        external_data=False,
        verbose=False,
    )
    if program is None:  # only when exporting to a file, which we never do here
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto


def _export_torchscript(wrapper: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; we know
        torch.onnx.export(
            wrapper,
            (example,),
            buf,  # type: ignore[arg-type]  # file-like objects work (and are documented)
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def export_onnx(
    wrapper: NormalizedClassifier, meta: ModelMeta, opset: int
) -> tuple[onnx.ModelProto, str, str]:
    """Export with the dynamo exporter, falling back to TorchScript; returns (model, exporter, note).

    ``note`` is empty, or says why dynamo was not used.
    """
    example = torch.rand(TRACE_BATCH, *meta.input_shape, generator=torch.Generator().manual_seed(0))
    wrapper = wrapper.eval()
    note = ""
    # The dynamo exporter warns about torchvision ops it cannot register (we never use them).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            proto, exporter = _export_dynamo(wrapper, example, opset), "dynamo"
        except Exception as e:  # an op the dynamo path cannot handle for this arch
            note = f"dynamo export failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
            proto, exporter = _export_torchscript(wrapper, example, opset), "torchscript"
    _check_interface(proto, meta)
    return proto, exporter, note


def _check_interface(proto: onnx.ModelProto, meta: ModelMeta) -> None:
    inputs = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
        raise RuntimeError(
            f"exported graph has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] and {list(OUTPUT_NAMES)}"
        )
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims[0].dim_param or [d.dim_value for d in dims[1:]] != list(meta.input_shape):
        raise RuntimeError(
            f"exported input shape {[d.dim_param or d.dim_value for d in dims]} is not (batch, C, H, W)"
        )


def provenance(
    precision: str, test_accuracy: float | None, accuracy_source: str, source_sha256: str, exporter: str
) -> Provenance:
    """This exporter's provenance record for a graph (versions of the tools filled in)."""
    return Provenance(
        precision=precision,
        test_accuracy=test_accuracy,
        test_accuracy_source=accuracy_source,
        source_sha256=source_sha256,
        exporter_version=cnnstack.version(),
        torch_exporter=exporter,
        torch_version=str(torch.__version__),
        onnx_version=onnx.__version__,
    )


def metadata_props(meta: ModelMeta, made: Provenance, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """String key/values for ``metadata_props`` (the server reads these)."""
    props = {**meta.to_onnx_props(), **made.to_onnx_props()}
    props.update({k: str(v) for k, v in (extra or {}).items()})
    return props


def set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> onnx.ModelProto:
    """Replace ``metadata_props`` in place (no effect on the computation) and return the model."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = "cnnstack-exporter"
    return proto


def read_metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}
