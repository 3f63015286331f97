"""HTTP test helpers: a plain urllib client (status, headers, body; never raises on 4xx/5xx), curl
when installed, and the KServe v2 / classify requests of the gRPC bad-input tests written out
for REST, so both protocols are checked with the very same cases."""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.inference import grpc_service_pb2 as ks

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def request(
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> Reply:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return Reply(r.status, dict(r.headers), r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, dict(e.headers), e.read())


def curl(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """``curl -sS ARGS``; skips the test where curl is not installed."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=timeout)


def binary_body(header: dict, raws: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """The binary tensor data extension: JSON header, then the raw tensors."""
    head = json.dumps(header).encode()
    return head + b"".join(raws), {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


def binary_infer_body(x: np.ndarray, binary_outputs: bool = False) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 infer of ``x`` (N, C, H, W) as a binary tensor; outputs as JSON, or every one
    ("probabilities" when asked for alone) in binary too."""
    header: dict = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "parameters": {"binary_data_size": x.nbytes},
            }
        ]
    }
    if binary_outputs:
        header["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": True}}]
    return binary_body(header, [np.ascontiguousarray(x, "<f4").tobytes()])


def infer_path(model: str, version: str = "") -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def kserve_as_rest(req: ks.ModelInferRequest, binary: bool) -> tuple[str, bytes, dict[str, str]]:
    """A gRPC ModelInferRequest as the same request over REST: (path, body, headers)."""
    inputs, raws = [], []
    for i, inp in enumerate(req.inputs):
        tensor: dict = {"name": inp.name, "datatype": inp.datatype, "shape": list(inp.shape)}
        raw = req.raw_input_contents[i] if i < len(req.raw_input_contents) else b""
        if binary:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            tensor["data"] = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<f4").tolist()
        inputs.append(tensor)
    header: dict = {"inputs": inputs}
    if req.outputs:
        header["outputs"] = [{"name": o.name} for o in req.outputs]
    path = infer_path(req.model_name, req.model_version)
    if binary:
        return (path, *binary_body(header, raws))
    return path, json.dumps(header).encode(), {"Content-Type": "application/json"}


def classify_path(model: str, version: int = 0) -> str:
    return f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":classify"


def classify_as_rest(req: pb.ClassifyRequest) -> tuple[str, bytes, dict[str, str]]:
    """A gRPC ClassifyRequest as the same request over REST (JSON body): (path, body, headers)."""
    images: list[dict] = []
    for img in req.images:
        kind = img.WhichOneof("payload")
        if kind == "encoded":
            images.append({"b64": base64.b64encode(img.encoded).decode()})
        elif kind == "tensor":
            data = np.frombuffer(img.tensor.data[: len(img.tensor.data) // 4 * 4], dtype="<f4")
            images.append({"shape": list(img.tensor.shape), "data": data.tolist()})
        else:
            images.append({})
    doc: dict = {"images": images}
    if req.top_k:
        doc["top_k"] = req.top_k
    path = classify_path(req.model, req.version)
    return path, json.dumps(doc).encode(), {"Content-Type": "application/json"}
