"""The naive baseline for the serving benchmark: one onnxruntime call per RPC, no batching.

What a first version usually looks like (the shape of grpc's Python tutorial): a synchronous
``grpc.server`` on a thread pool, each Classify decodes its images, calls ``session.run`` on just
those images and builds the response. Same session options as cnn-serve (ORT_ENABLE_ALL,
``--threads`` intra-op threads, no spinning), so the difference measured is batching and the
serving path, not onnxruntime settings.

    python -m bench.naive_server --model-file REPO/NAME/1/model.onnx --port 0   # "listening on ..."
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from cnnstack.contract import INPUT_NAME, PROBABILITIES_NAME, ModelMeta
from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class NaiveClassifier(pb_grpc.ClassifierServicer):
    def __init__(self, name: str, model_file: Path, threads: int) -> None:
        self.name = name
        self.session = ort.InferenceSession(
            str(model_file), session_options(threads), providers=["CPUExecutionProvider"]
        )
        meta = ModelMeta.from_onnx_props(self.session.get_modelmeta().custom_metadata_map)
        self.shape = meta.input_shape  # (C, H, W)
        self.class_names = meta.class_names

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        if request.model != self.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        # (K, C, H, W) float32 from the request's raw tensors
        x = np.stack(
            [np.frombuffer(im.tensor.data, dtype="<f4").reshape(self.shape) for im in request.images]
        )
        (probs,) = self.session.run([PROBABILITIES_NAME], {INPUT_NAME: x})  # (K, classes)
        k = max(1, request.top_k)
        top = np.argsort(-probs, axis=1)[:, :k]
        results = [
            pb.Classification(
                predictions=[
                    pb.Prediction(class_index=int(c), class_name=self.class_names[c], probability=float(p[c]))
                    for c in row
                ]
            )
            for p, row in zip(probs, top, strict=True)
        ]
        return pb.ClassifyResponse(model=self.name, version=1, results=results, request_id=request.request_id)

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        d = pb.ModelDescription(
            name=self.name,
            version=1,
            versions=[1],
            input_shape=list(self.shape),
            class_names=self.class_names,
            provider="CPUExecutionProvider",
        )
        return pb.ListModelsResponse(models=[d])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-file", type=Path, required=True)
    p.add_argument("--name", default=None, help="model name (default: the REPO/NAME/1 folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=8, help="RPC threads")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    a = p.parse_args(argv)
    name = a.name or a.model_file.resolve().parent.parent.name
    server = grpc.server(
        ThreadPoolExecutor(max_workers=a.workers), options=[("grpc.max_receive_message_length", 256 << 20)]
    )
    pb_grpc.add_ClassifierServicer_to_server(NaiveClassifier(name, a.model_file, a.threads), server)
    bound = server.add_insecure_port(f"{a.host}:{a.port}")
    server.start()
    print(f"listening on {a.host}:{bound}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
