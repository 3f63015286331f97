"""For the tests that need cuDNN: a small convolutional classifier built with onnx.helper (no torch),
and why CUDA cannot run here (the skip reason, which CNN_REQUIRE_GPU=1 turns into a failure).

``input (N, 1, 28, 28) -> Conv 3x3 (8) -> Relu -> MaxPool 2 -> Conv 3x3 (16) -> Relu ->
GlobalAveragePool -> Flatten -> Gemm -> logits -> Softmax -> probabilities``, seeded weights,
carrying the metadata cnn-export writes. ``reference`` answers with onnxruntime on the CPU.
"""

from __future__ import annotations

import functools

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from cnnstack.contract import ModelMeta
from tests.server.helpers import FMNIST_CLASSES


def conv_model(seed: int = 0) -> tuple[bytes, ModelMeta]:
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.3) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    k = len(FMNIST_CLASSES)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    inits = [init("w1", 8, 1, 3, 3), init("b1", 8), init("w2", 16, 8, 3, 3, scale=0.2), init("b2", 16)]
    inits += [init("wf", 16, k, scale=1.0), init("bf", k, scale=0.1)]
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", k]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    meta = ModelMeta("convnet", "fashion-mnist", (1, 28, 28), (0.5,), (0.5,), FMNIST_CLASSES)
    helper.set_model_props(
        model,
        {
            **meta.to_onnx_props(),
            "test_accuracy": "0.9",
            "source_sha256": "0" * 64,
            "exporter_version": "test",
            "torch_version": "none",
            "onnx_version": "test",
            "precision": "fp32",
        },
    )
    return model.SerializeToString(), meta


def reference(model: bytes, x: np.ndarray) -> np.ndarray:
    """probabilities (N, K) of ``x`` (N, 1, 28, 28) from onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": x})[0]


@functools.cache
def why_no_cuda_provider() -> str | None:
    """None when a convolution runs on GPU 0 through onnxruntime's CUDA provider; else what is missing."""
    from server.runtime.cuda import preload_libraries, probe_gpu

    preload_libraries()
    reason = probe_gpu(0)
    return f"no working CUDA execution provider: {reason}" if reason else None
