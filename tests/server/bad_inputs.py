"""The bad-input matrix: one request per case with the gRPC status and a part of the message it
must get. tests/server/test_bad_input.py sends them over gRPC, tests/server/test_http_bad_input.py
the same requests over REST (where the same verdicts are expected, as HTTP statuses)."""

from __future__ import annotations

import math

import grpc
import numpy as np

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.inference import grpc_service_pb2 as ks

IA, NF, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
MAX_MESSAGE = 256 * 1024  # the servers' --max-message-bytes: "over the size limit" is just above it
MAX_BATCH = 8


def tensor(shape=(1, 28, 28), value=0.5, nbytes=None) -> pb.Image:
    x = np.full(shape, value, dtype="<f4").tobytes()
    if nbytes is not None:
        x = x[:nbytes] if nbytes <= len(x) else x + b"\0" * (nbytes - len(x))
    return pb.Image(tensor=pb.Tensor(shape=list(shape), data=x))


def classify(**kw) -> pb.ClassifyRequest:
    kw.setdefault("model", "tiny")
    kw.setdefault("images", [tensor()])
    return pb.ClassifyRequest(**kw)


def nan_image() -> pb.Image:
    x = np.full((1, 28, 28), 0.5, dtype="<f4")
    x[0, 3, 4] = np.nan
    return pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=x.tobytes()))


CLASSIFY_CASES = {
    "unknown model": (
        classify(model="resnet-nope"),
        NF,
        "'resnet-nope' is not loaded; loaded models: ['tiny']",
    ),
    "unknown version": (classify(version=9), NF, "no loaded version 9; loaded versions: [1]"),
    "wrong shape": (classify(images=[tensor(shape=(3, 28, 28))]), IA, "does not match the model input"),
    "wrong byte count": (classify(images=[tensor(nbytes=3000)]), IA, "3000 bytes, expected 3136"),
    "NaN in tensor": (classify(images=[nan_image()]), IA, "NaN or Inf (first at index [0, 3, 4])"),
    "Inf in tensor": (classify(images=[tensor(value=math.inf)]), IA, "NaN or Inf"),
    "undecodable image": (
        classify(images=[pb.Image(encoded=b"GIF89a not really")]),
        IA,
        "cannot decode as PNG or JPEG",
    ),
    "empty image": (classify(images=[pb.Image(encoded=b"")]), IA, "empty encoded image"),
    "image without payload": (classify(images=[tensor(), pb.Image()]), IA, "image 1: set either"),
    "zero images": (classify(images=[]), IA, "no images in the request"),
    "too many images": (classify(images=[tensor()] * 9), IA, "at most 8 (max batch size)"),
    "top_k too large": (classify(top_k=11), IA, "top_k must be between 1 and 10"),
    "top_k negative": (classify(top_k=-1), IA, "top_k must be between 1 and 10"),
    "over the size limit": (classify(images=[tensor()] * 100), RE, ""),
}


def kserve(shape=(1, 1, 28, 28), datatype="FP32", raw: bytes | None = None, **kw) -> ks.ModelInferRequest:
    kw.setdefault("model_name", "tiny")
    inp = ks.ModelInferRequest.InferInputTensor(
        name=kw.pop("input_name", "input"), datatype=datatype, shape=list(shape)
    )
    if raw is None:
        raw = np.full(shape, 0.5, dtype="<f4").tobytes()
    return ks.ModelInferRequest(inputs=[inp], raw_input_contents=[raw], **kw)


KSERVE_CASES = {
    "unknown model": (kserve(model_name="nope"), NF, "'nope' is not loaded"),
    "unknown version": (kserve(model_version="3"), NF, "no loaded version 3"),
    "non-numeric version": (kserve(model_version="latest"), IA, "model_version must be a positive integer"),
    "wrong dtype": (kserve(datatype="FP64"), IA, "must be FP32, got 'FP64'"),
    "wrong shape": (kserve(shape=(1, 28, 28)), IA, "expected [N, 1, 28, 28]"),
    "wrong input name": (kserve(input_name="x"), IA, "unknown input 'x'"),
    "wrong byte count": (kserve(raw=b"\0" * 100), IA, "100 bytes, expected 3136"),
    "Inf in tensor": (kserve(raw=np.full((1, 1, 28, 28), -np.inf, "<f4").tobytes()), IA, "NaN or Inf"),
    "zero batch": (kserve(shape=(0, 1, 28, 28), raw=b""), IA, "no images"),
    "unknown output": (
        ks.ModelInferRequest(
            model_name="tiny",
            inputs=kserve().inputs,
            raw_input_contents=kserve().raw_input_contents,
            outputs=[ks.ModelInferRequest.InferRequestedOutputTensor(name="features")],
        ),
        IA,
        "unknown output 'features'",
    ),
}
