"""Reduced-precision variants of an exported FP32 model; inputs and outputs stay float32, so the
config.pbtxt and every client are the same as for FP32.

- fp16: weights and activations in float16, casts at the graph edges (onnxruntime's converter).
- int8: onnxruntime static quantization, QDQ format, per-channel int8 weights and uint8
  activations, MinMax-calibrated on training images.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from cnnstack.contract import INPUT_NAME

CALIBRATION_BATCH = 32


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp16 = convert_float_to_float16(onnx.ModelProto.FromString(proto.SerializeToString()), keep_io_types=True)
    # The converter appends the input/output Casts at the end of the node list; ONNX requires
    # topological order (onnx.checker rejects it, some runtimes too).
    return toposort(fp16)


def toposort(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Reorder ``graph.node`` topologically (stable: keeps the original order where it can)."""
    graph = proto.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(
                f"graph has a cycle or dangling inputs at node {rest[0].name} ({rest[0].op_type})"
            )
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return proto


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over an in-memory (N, C, H, W) array."""

    def __init__(self, x: np.ndarray, batch: int) -> None:
        self._batches = iter([x[i : i + batch] for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        xb = next(self._batches, None)
        return None if xb is None else {INPUT_NAME: np.ascontiguousarray(xb, dtype=np.float32)}


def to_int8(proto: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """Static QDQ quantization; ``calibration`` is (N, C, H, W) float32 in [0, 1]."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="cnn-export-int8-") as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(proto, src)
        # Shape inference + ORT basic optimizations (folds BatchNorm into Conv) before quantizing,
        # as onnxruntime's docs recommend; symbolic shape inference is not needed for CNNs.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            _Calibration(calibration, CALIBRATION_BATCH),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,  # u8 activations x s8 weights: the fast x86 kernels
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # Quantize the conv/linear work; keep Softmax in float so probabilities stay exact-ish.
            op_types_to_quantize=[
                "Conv",
                "Gemm",
                "MatMul",
                "Add",
                "Relu",
                "MaxPool",
                "AveragePool",
                "Concat",
            ],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        return onnx.load_model(out)
