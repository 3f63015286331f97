"""TorchServe's side of the peer comparison (bench/torchserve_peer.py): a model handler that runs the
same ONNX file as cnn-serve on onnxruntime, one thread, over TorchServe's server-side batches.

Each request's body is raw float32 images, (N, 1, 28, 28) in C order (``application/octet-stream``
over REST, the ``data`` input over gRPC); its answer is the logits, a list of N lists. TorchServe
hands the handler up to ``batchSize`` requests at once; they run as one onnxruntime call. The
module imports neither torch nor this project: TorchServe loads it from the model archive.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort


class OnnxHandler:
    def __init__(self) -> None:
        self.session: ort.InferenceSession | None = None
        self.input = ""

    def initialize(self, context: Any) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one Python worker per core: TorchServe scales by workers
        options.inter_op_num_threads = 1
        path = os.path.join(context.system_properties["model_dir"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[list[list[float]]]:
        assert self.session is not None
        shape = self.session.get_inputs()[0].shape[1:]  # (C, H, W)
        arrays = [
            np.frombuffer(bytes(row.get("data") or row.get("body") or b""), dtype=np.float32).reshape(
                -1, *shape
            )
            for row in data
        ]
        logits = self.session.run(["logits"], {self.input: np.concatenate(arrays)})[0]  # (sum N, classes)
        out, start = [], 0
        for a in arrays:
            out.append(logits[start : start + len(a)].tolist())
            start += len(a)
        return out


_service = OnnxHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[list[list[float]]] | None:
    """TorchServe's module-level entry point: called once with ``data=None`` to initialize."""
    if _service.session is None:
        _service.initialize(context)
    return None if data is None else _service.handle(data, context)
