"""``POST /v1/models/{m}[/versions/{v}]:classify``: cnnstack.classifier.v1 Classify over HTTP.

The body is one encoded image (PNG or JPEG; any ``Content-Type`` but JSON), or JSON::

    {"top_k": 3, "images": [{"b64": "<base64 PNG/JPEG>"}, {"shape": [1, 28, 28], "data": [...]}]}

where a tensor image is float32 pixels in [0, 1] of exactly the model's (C, H, W), flat or nested.
``?top_k=`` in the query wins over the body's. The answer mirrors ClassifyResponse::

    {"model": "fmnist", "version": 1, "results": [{"predictions": [
        {"class_index": 7, "class_name": "Sneaker", "probability": 0.93}, ...]}]}

Decoding and resizing are ``server.runtime.preprocess``'s, with its messages, as over gRPC.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from server.api.dataplane import Call, Inference, parse_version
from server.api.http import JSON, error_responder, inference_call, parse_json
from server.errors import invalid
from server.runtime.postprocess import check_top_k, top_k_of
from server.runtime.preprocess import (
    OFFLOAD_BYTES,
    array_from_values,
    check_count,
    check_image_shape,
    decode_image,
)
from server.runtime.version import ServedVersion

JSON_TYPES = ("application/json",)


@dataclass(frozen=True)
class ClassifyBody:
    images: list[bytes | tuple[list, Any]]  # encoded bytes, or (shape, data) of a tensor
    top_k: int

    @property
    def encoded_bytes(self) -> int:
        return sum(len(img) for img in self.images if isinstance(img, bytes))


def _top_k(value: Any) -> int:
    if isinstance(value, str):
        if not value.lstrip("-").isdigit():
            raise invalid(f"top_k must be an integer, got {value!r}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"top_k must be an integer, got {value!r}")
    return value


def _image(obj: Any, index: int) -> bytes | tuple[list, Any]:
    if not isinstance(obj, dict):
        raise invalid(f"image {index}: must be an object with `b64`, or `shape` and `data`")
    if "b64" in obj:
        try:
            return base64.b64decode(obj["b64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise invalid(f"image {index}: `b64` is not valid base64") from None
    if "shape" in obj and "data" in obj:
        if not isinstance(obj["shape"], list):
            raise invalid(f"image {index}: `shape` must be a list [C, H, W]")
        return obj["shape"], obj["data"]
    raise invalid(f"image {index}: set either `b64` (a base64 PNG/JPEG) or `shape` and `data` (a tensor)")


def parse_body(body: bytes, content_type: str, query_top_k: str | None) -> ClassifyBody:
    if content_type not in JSON_TYPES:
        return ClassifyBody([body], _top_k(query_top_k) if query_top_k is not None else 1)
    doc = parse_json(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise invalid('the JSON body needs an "images" list')
    k = query_top_k if query_top_k is not None else doc.get("top_k", 1)
    return ClassifyBody([_image(obj, i) for i, obj in enumerate(doc["images"])], _top_k(k))


def _tensor(shape: list, data: Any, expected: tuple[int, int, int], index: int) -> np.ndarray:
    check_image_shape(shape, expected, index)
    return array_from_values(data, expected, f"image {index}")


def build_batch(body: ClassifyBody, served: ServedVersion) -> np.ndarray:
    """The images -> (n, C, H, W) float32 for ``served``; top_k checked against its classes."""
    check_top_k(body.top_k, served.num_classes)
    check_count(len(body.images), served.max_batch_size)
    expected = served.input_shape
    out = np.empty((len(body.images), *expected), dtype=np.float32)
    for i, img in enumerate(body.images):
        out[i] = decode_image(img, expected, i) if isinstance(img, bytes) else _tensor(*img, expected, i)
    return out


def encode_response(served: ServedVersion, outputs: list[np.ndarray], k: int) -> bytes:
    idx, probs = top_k_of(outputs, k)
    names = served.class_names
    results = [
        {
            "predictions": [
                {"class_index": i, "class_name": names[i], "probability": p}
                for i, p in zip(ri, rp, strict=True)
            ]
        }
        for ri, rp in zip(idx, probs, strict=True)
    ]
    doc = {"model": served.name, "version": served.version, "results": results}
    return json.dumps(doc, separators=(",", ":")).encode()


class ClassifyRest:
    """``POST /v1/models/{m}[/versions/{v}]:classify``."""

    def __init__(self, inference: Inference) -> None:
        self.inference = inference
        self._on_error = error_responder(inference.state)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/models/{model}:classify", self.classify)
        router.add_post("/v1/models/{model}/versions/{version}:classify", self.classify)

    async def classify(self, request: web.Request) -> web.Response:
        return await inference_call(self.inference, "Classify", request, self._classify, self._on_error)

    async def _classify(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        model, version = request.match_info["model"], parse_version(request.match_info.get("version", ""))
        content_type, top_k = request.content_type, request.query.get("top_k")
        parsed = self.inference.parse(call, model, version, lambda: parse_body(body, content_type, top_k))
        make_input = functools.partial(build_batch, parsed)
        offload = parsed.encoded_bytes > OFFLOAD_BYTES
        served, outputs = await self.inference.run(
            call, model, version, make_input, None, offload, what="image"
        )
        return web.Response(body=encode_response(served, outputs, parsed.top_k), content_type=JSON)
