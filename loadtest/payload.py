"""Request payloads, serialized once before the load starts.

The hot loop sends ``bytes`` through a multicallable built with no serializer, so no protobuf
work happens while measuring: the client's per-request cost is the gRPC call itself.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnstack.contract import INPUT_NAME, PROBABILITIES_NAME, TENSOR_DATATYPE
from loadtest.transport import HttpPayload

CLASSIFY_METHOD = "/cnnstack.classifier.v1.Classifier/Classify"
KSERVE_METHOD = "/inference.GRPCInferenceService/ModelInfer"
HEADER_LENGTH = "Inference-Header-Content-Length"  # KServe v2 binary tensor data extension
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MAX_PAYLOADS = 64  # distinct requests cycled through; enough to defeat any caching, small in memory


def kserve_pb2() -> Any:
    """The KServe v2 messages (package ``inference``): ours, else tritonclient's (same wire format)."""
    try:
        from protos.inference import grpc_service_pb2

        return grpc_service_pb2
    except ImportError:
        from tritonclient.grpc import service_pb2

        return service_pb2


def read_idx_images(path: Path) -> np.ndarray:
    """An IDX3 ubyte file (optionally gzipped), e.g. Fashion-MNIST, as uint8 (N, H, W)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if magic != 0x00000803 or len(data) < 16:
        found = "too short for a header" if magic is None else f"magic {magic:#x}"
        raise ValueError(f"{path}: not an IDX3 ubyte images file ({found})")
    n, h, w = struct.unpack(">III", data[4:16])
    if len(data) < 16 + n * h * w:
        raise ValueError(
            f"{path}: truncated: {n}x{h}x{w} images need {16 + n * h * w} bytes, found {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16, count=n * h * w).reshape(n, h, w)


def _to_chw(img: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """PIL image -> float32 (C, H, W) in [0, 1], converted to the model's channels and size."""
    from PIL import Image

    c, h, w = shape
    img = img.convert("L" if c == 1 else "RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3)
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


def load_images(source: str, shape: tuple[int, int, int], count: int, seed: int) -> np.ndarray:
    """``count`` images as float32 (N, C, H, W) in [0, 1]: uniform noise for "synthetic", else the
    first images of an IDX file or an image folder (cycled when the dataset is smaller)."""
    if source == "synthetic":
        return np.random.default_rng(seed).random((count, *shape), dtype=np.float32)
    from PIL import Image

    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
        if not files:
            raise ValueError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} files")
        chw = [_to_chw(Image.open(p), shape) for p in files]
    else:
        raw = read_idx_images(path)[:count]  # (N, H, W) uint8
        chw = [_to_chw(Image.fromarray(a), shape) for a in raw]
    return np.stack([chw[i % len(chw)] for i in range(count)])


def encode_png(chw: np.ndarray) -> bytes:
    """float32 (C, H, W) in [0, 1] -> PNG bytes (grayscale or RGB)."""
    from PIL import Image

    arr = np.clip(chw * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def classify_request(
    images: np.ndarray, model: str, version: int, top_k: int, encoding: str, request_id: str = ""
) -> bytes:
    """One serialized ClassifyRequest carrying ``images`` (K, C, H, W)."""
    from protos.cnnstack.classifier.v1 import classifier_pb2 as pb

    req = pb.ClassifyRequest(model=model, version=version, top_k=top_k, request_id=request_id)
    for chw in images:
        if encoding == "png":
            req.images.add(encoded=encode_png(chw))
        else:
            req.images.add(
                tensor=pb.Tensor(shape=list(chw.shape), data=np.ascontiguousarray(chw, "<f4").tobytes())
            )
    return req.SerializeToString()


@dataclass(frozen=True)
class KServeInput:
    """How a KServe v2 server wants the images: its input tensor's name and datatype, and the
    output to ask for (None: all of them, for a server without our ``probabilities``)."""

    name: str = INPUT_NAME
    datatype: str = TENSOR_DATATYPE
    output: str | None = PROBABILITIES_NAME


WIRE_DTYPES = {"FP32": "<f4", "FP16": "<f2"}


def kserve_request(images: np.ndarray, model: str, version: int, spec: KServeInput = KServeInput()) -> bytes:
    """One serialized KServe v2 ModelInferRequest: the input (K, C, H, W) as raw bytes."""
    pb = kserve_pb2()
    req = pb.ModelInferRequest(model_name=model, model_version=str(version) if version else "")
    # The contents travel in raw_input_contents, the fast path.
    req.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(images.shape))
    if spec.output is not None:
        req.outputs.add(name=spec.output)
    req.raw_input_contents.append(np.ascontiguousarray(images, WIRE_DTYPES[spec.datatype]).tobytes())
    return req.SerializeToString()


def kserve_http_request(
    images: np.ndarray, model: str, version: int, spec: KServeInput = KServeInput(), as_json: bool = False
) -> HttpPayload:
    """One KServe v2 REST infer request for ``images`` (K, C, H, W): by default the binary tensor
    data extension (a JSON header, then the raw tensor; outputs asked back as binary, as
    ``tritonclient.http`` does), with ``as_json`` JSON tensors both ways."""
    tensor: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(images.shape)}
    raw = np.ascontiguousarray(images, WIRE_DTYPES[spec.datatype])
    if as_json:
        tensor["data"] = raw.astype(np.float32).ravel().tolist()
    else:
        tensor["parameters"] = {"binary_data_size": raw.nbytes}
    header: dict[str, Any] = {"inputs": [tensor]}
    if spec.output is not None:
        header["outputs"] = [{"name": spec.output, "parameters": {"binary_data": not as_json}}]
    elif not as_json:
        header["parameters"] = {"binary_data_output": True}
    head = json.dumps(header, separators=(",", ":")).encode()
    if as_json:
        return HttpPayload(head, {"Content-Type": "application/json"})
    headers = {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
    return HttpPayload(head + raw.tobytes(), headers)


def build_payloads(
    api: str,
    images: np.ndarray,
    per_request: int,
    model: str,
    version: int,
    top_k: int = 1,
    encoding: str = "tensor",
    kserve: KServeInput = KServeInput(),
    protocol: str = "grpc",
) -> list[Any]:
    """Cut ``images`` (N, C, H, W) into requests of ``per_request`` images, serialized: bytes for
    gRPC, ``HttpPayload`` for HTTP (``encoding`` "json" or "binary" there)."""
    n = max(1, min(MAX_PAYLOADS, len(images) // per_request))
    out: list[Any] = []
    for i in range(n):
        chunk = images[i * per_request : (i + 1) * per_request]
        if protocol == "http":
            out.append(kserve_http_request(chunk, model, version, kserve, as_json=encoding == "json"))
        elif api == "kserve":
            out.append(kserve_request(chunk, model, version, kserve))
        else:
            out.append(classify_request(chunk, model, version, top_k, encoding))
    return out


def model_path(model: str, version: int) -> str:
    """A model's KServe v2 REST path, its metadata (version 0: the server's choice)."""
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")


def infer_path(model: str, version: int) -> str:
    """The KServe v2 REST infer path of a model (version 0: the server's choice)."""
    return model_path(model, version) + "/infer"


def route_for(api: str, protocol: str = "grpc", model: str = "", version: int = 0) -> str:
    """Where requests go: the gRPC method, or (HTTP, KServe only) the infer path."""
    if protocol == "http":
        return infer_path(model, version)
    return method_for(api)


def method_for(api: str) -> str:
    return KSERVE_METHOD if api == "kserve" else CLASSIFY_METHOD
