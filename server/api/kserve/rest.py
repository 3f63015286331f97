"""The KServe v2 REST wire format: an infer request body -> ``RestRequest``, outputs -> a body.

JSON tensors (``data`` flat or nested) and the binary tensor data extension that
``tritonclient.http`` uses by default: the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the inputs' raw bytes, each input saying its
length in ``parameters.binary_data_size``. Outputs come back as binary when the request asks
(``outputs[].parameters.binary_data``, or ``parameters.binary_data_output`` for every output),
else as JSON ``data``. Checks of the tensors themselves are ``server.api.kserve.protocol``'s, as over gRPC.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from cnnstack.contract import TENSOR_DATATYPE
from server.api.control import ModelControl
from server.api.dataplane import Call, Inference, parse_version
from server.api.http import (
    JSON,
    answer,
    error_responder,
    error_response,
    inference_call,
    json_response,
    parse_json,
)
from server.api.kserve import protocol as v2
from server.api.kserve.json_messages import message_dict
from server.errors import ServeError, http_status, invalid
from server.runtime.preprocess import array_from_bytes, array_from_values
from server.runtime.version import ServedVersion

HEADER_LENGTH = "Inference-Header-Content-Length"
CACHED_HEADERS = 256  # distinct JSON headers of binary requests kept parsed
CACHED_HEADER_BYTES = 4096  # longer headers are parsed every time


@dataclass(frozen=True, slots=True)
class RestInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None  # JSON numbers
    size: int | None = None  # ``parameters.binary_data_size``: the input is binary
    raw: memoryview | None = None  # binary tensor data (set once bound to a body)


@dataclass(frozen=True, slots=True)
class RestOutput:
    name: str
    binary: bool
    classification: int | None = None


@dataclass(frozen=True, slots=True)
class RestRequest:
    id: str | None
    inputs: tuple[RestInput, ...]
    outputs: tuple[RestOutput, ...] | None  # None: every output
    binary_output: bool  # the default for outputs (``parameters.binary_data_output``)
    priority: int = 0  # ``parameters.priority`` (0: the model's default level)
    timeout_us: int = 0  # ``parameters.timeout``: how long it may wait in the queue (0: the model's)


def _obj(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object")
    return value


def _params(obj: dict, what: str) -> dict:
    return _obj(obj.get("parameters", {}), f"{what} parameters")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(f"{what} must be an integer >= 0, got {value!r}")
    return value


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(the JSON header's bytes, the binary part) of a request body."""
    view = memoryview(body)
    if header_length is None:
        return body, view[len(body) :]
    if not header_length.isdigit() or int(header_length) > len(body):
        raise invalid(
            f"{HEADER_LENGTH} must be an integer <= the body's {len(body)} bytes, got {header_length!r}"
        )
    n = int(header_length)
    return view[:n].tobytes(), view[n:]


def _input(obj: Any, index: int) -> RestInput:
    obj = _obj(obj, f"inputs[{index}]")
    name, datatype, shape = obj.get("name"), obj.get("datatype"), obj.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        raise invalid(f"inputs[{index}] needs a string name and datatype and a shape list")
    dims = tuple(_int(d, f"input {name!r} shape") for d in shape)
    size = _params(obj, f"input {name!r}").get("binary_data_size")
    if size is None:
        if "data" not in obj:
            raise invalid(f"input {name!r} has neither data nor parameters.binary_data_size")
        return RestInput(name, datatype, dims, data=obj["data"])
    return RestInput(name, datatype, dims, size=_int(size, f"input {name!r} binary_data_size"))


def _output(obj: Any, index: int, default_binary: bool) -> RestOutput:
    obj = _obj(obj, f"outputs[{index}]")
    name = obj.get("name")
    if not isinstance(name, str):
        raise invalid(f"outputs[{index}] needs a string name")
    params = _params(obj, f"output {name!r}")
    k = params.get("classification")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise invalid(f"output {name!r}: classification must be an integer, got {k!r}")
    return RestOutput(name, bool(params.get("binary_data", default_binary)), k)


def parse_request(body: bytes, header_length: str | None) -> RestRequest:
    """Structure only (JSON shape, binary sizes); the tensors are checked against the model later."""
    header, binary = _split(body, header_length)
    # A client sends the same JSON header with every request of one shape (tritonclient does), so
    # a header followed by binary data is parsed once; a JSON-only body carries its tensors.
    cacheable = header_length is not None and len(header) <= CACHED_HEADER_BYTES
    return _bind(_cached_structure(header) if cacheable else _structure(header), binary)


def _structure(header: bytes) -> RestRequest:
    """A request's JSON header -> its structure, binary inputs not yet bound to their bytes."""
    doc = _obj(parse_json(header), "the request")
    params = _params(doc, "the request")
    binary_output = bool(params.get("binary_data_output", False))
    priority, timeout_us = v2.scheduling(params.get("priority"), params.get("timeout"))
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise invalid("the request needs an `inputs` list")
    inputs = tuple(_input(obj, i) for i, obj in enumerate(raw_inputs))
    outputs = doc.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise invalid("`outputs` must be a list")
    wanted = None if not outputs else tuple(_output(o, i, binary_output) for i, o in enumerate(outputs))
    request_id = doc.get("id")
    request_id = str(request_id) if request_id is not None else None
    return RestRequest(request_id, inputs, wanted, binary_output, priority, timeout_us)


# Failures are not cached (lru_cache stores results only): a bad header is parsed, and refused, each time.
_cached_structure = functools.lru_cache(maxsize=CACHED_HEADERS)(_structure)


def _bind(request: RestRequest, binary: memoryview) -> RestRequest:
    """``request`` with each binary input's bytes, in order, from ``binary``; all of it must be used."""
    inputs, offset = [], 0
    for inp in request.inputs:
        if inp.size is None:
            inputs.append(inp)
            continue
        end = offset + inp.size
        if end > len(binary):
            raise invalid(
                f"input {inp.name!r}: binary_data_size runs past the body's {len(binary)} binary bytes"
            )
        inputs.append(RestInput(inp.name, inp.datatype, inp.shape, size=inp.size, raw=binary[offset:end]))
        offset = end
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} binary bytes after the JSON header belong to no input")
    r = request
    return RestRequest(r.id, tuple(inputs), r.outputs, r.binary_output, r.priority, r.timeout_us)


def input_array(request: RestRequest, served: ServedVersion) -> np.ndarray:
    """The one input as (N, C, H, W) float32, checked as over gRPC; requested outputs checked too."""
    v2.check_input_count(served, len(request.inputs))
    inp = request.inputs[0]
    shape = v2.check_input(served, inp.name, inp.datatype, inp.shape)
    for out in request.outputs or ():
        v2.check_output(served, out.name, out.classification)
    if inp.raw is not None:
        return array_from_bytes(inp.raw, shape, f"input {inp.name!r}")
    return array_from_values(inp.data, shape, f"input {inp.name!r}", "data values")


def encode_response(
    request: RestRequest, served: ServedVersion, outputs: list[np.ndarray]
) -> tuple[bytes, int | None]:
    """(body, JSON header length when binary outputs follow it, else None)."""
    names = served.output_names
    wanted = request.outputs or tuple(RestOutput(n, request.binary_output) for n in names)
    picked = [outputs[names.index(want.name)] for want in wanted]
    if all(want.binary and not want.classification for want in wanted):
        # The common binary answer: its JSON header depends only on names and shapes.
        key = (served.name, served.version, tuple(w.name for w in wanted), tuple(o.shape for o in picked))
        header = _binary_header(*key) if request.id is None else _binary_header.__wrapped__(*key, request.id)
        return header + b"".join(v2.fp32_bytes(o) for o in picked), len(header)
    tensors: list[dict[str, Any]] = []
    raws: list[bytes] = []
    for want, out in zip(wanted, picked, strict=True):
        if want.classification:
            labels = v2.classification_labels(served, outputs, want.classification)
            shape = [out.shape[0], want.classification]
            if want.binary:
                raws.append(v2.bytes_tensor(labels))
                tensors.append(_binary_tensor(want.name, "BYTES", shape, len(raws[-1])))
            else:
                tensors.append(
                    {
                        "name": want.name,
                        "datatype": "BYTES",
                        "shape": shape,
                        "data": [s.decode() for s in labels],
                    }
                )
        elif want.binary:
            raws.append(v2.fp32_bytes(out))
            tensors.append(_binary_tensor(want.name, TENSOR_DATATYPE, list(out.shape), len(raws[-1])))
        else:
            tensors.append(
                {
                    "name": want.name,
                    "datatype": TENSOR_DATATYPE,
                    "shape": list(out.shape),
                    "data": out.ravel().tolist(),
                }
            )
    header = _header(served.name, served.version, request.id, tensors)
    return (header + b"".join(raws), len(header)) if raws else (header, None)


def _binary_tensor(name: str, datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


def _header(model: str, version: int, request_id: str | None, tensors: list[dict[str, Any]]) -> bytes:
    doc: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = tensors
    return json.dumps(doc, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=CACHED_HEADERS)
def _binary_header(
    model: str,
    version: int,
    names: tuple[str, ...],
    shapes: tuple[tuple[int, ...], ...],
    request_id: str | None = None,
) -> bytes:
    """The JSON header of FP32 outputs all sent binary (cached without a request id: one per shape)."""
    tensors = [
        _binary_tensor(name, TENSOR_DATATYPE, list(shape), 4 * math.prod(shape))
        for name, shape in zip(names, shapes, strict=True)
    ]
    return _header(model, version, request_id, tensors)


class KServeRest:
    """KServe v2 over HTTP: health, server and model metadata, config, statistics, the repository
    index, infer (JSON tensors or the binary extension)."""

    def __init__(self, inference: Inference, control: ModelControl) -> None:
        self.inference = inference
        self.control = control
        self.manager = inference.manager
        self.state = inference.state
        self._on_error = error_responder(inference.state)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        get, post = router.add_get, router.add_post
        get("/v2", self.server_metadata)
        get("/v2/health/live", self.live)
        get("/v2/health/ready", self.ready)
        post("/v2/repository/index", self.repository_index)
        post("/v2/repository/models/{model}/load", self.load)
        post("/v2/repository/models/{model}/unload", self.unload)
        get("/v2/models/stats", self.statistics)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            get(base, self.model_metadata)
            get(f"{base}/ready", self.model_ready)
            get(f"{base}/config", self.model_config)
            get(f"{base}/stats", self.statistics)
            post(f"{base}/infer", self.infer)

    # ---- health and metadata ----

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        if self.state.serving:
            return web.Response(status=200)
        why = "shutting down" if self.state.stopping else "loading the model repository"
        return error_response(503, f"server not ready: {why}")

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(v2.server_metadata())

    def _resolve(self, request: web.Request) -> ServedVersion:
        info = request.match_info
        return self.manager.resolve(info["model"], parse_version(info.get("version", "")))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return answer(lambda: message_dict(v2.model_metadata(self.manager, self._resolve(request))))

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            served = self._resolve(request)
        except ServeError as e:
            return error_response(http_status(e.code), e.message)
        if served.accepting and not self.state.stopping:
            return web.Response(status=200)
        return error_response(503, f"model {served.name!r} version {served.version} is not ready")

    async def model_config(self, request: web.Request) -> web.Response:
        return answer(lambda: message_dict(self._resolve(request).config))

    async def statistics(self, request: web.Request) -> web.Response:
        info = request.match_info

        def build() -> dict:
            versions = v2.versions_for_statistics(
                self.manager, info.get("model", ""), info.get("version", "")
            )
            return {"model_stats": [message_dict(v2.statistics(s)) for s in versions]}

        return answer(build)

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            doc = parse_json(body) if body.strip() else {}
        except ServeError as e:
            return error_response(400, e.message)
        if not isinstance(doc, dict):
            return error_response(400, 'the body must be empty or a JSON object like {"ready": true}')
        ready = bool(doc.get("ready", False))
        index = await v2.repository_index(self.manager, ready)
        return json_response([message_dict(m) for m in index.models])

    # ---- model control (the repository extension; an admin token when tokens are on) ----

    async def load(self, request: web.Request) -> web.Response:
        async def act(params: dict) -> None:
            await self.control.load(request.match_info["model"], v2.config_parameter(params.get("config")))

        return await self._control(request, act)

    async def unload(self, request: web.Request) -> web.Response:
        async def act(params: dict) -> None:
            await self.control.unload(request.match_info["model"])

        return await self._control(request, act)

    async def _control(self, request: web.Request, act: Callable[[dict], Awaitable[None]]) -> web.Response:
        """Body: empty, or ``{"parameters": {...}}``; 200 with an empty body once done."""
        try:
            body = await request.read()
            doc = parse_json(body) if body.strip() else {}
            await act(_params(_obj(doc, "the request"), "the request"))
        except ServeError as e:
            return error_response(http_status(e.code), e.message)
        return web.Response(status=200)

    # ---- inference ----

    async def infer(self, request: web.Request) -> web.Response:
        return await inference_call(self.inference, "ModelInfer", request, self._infer, self._on_error)

    async def _infer(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        model, version = request.match_info["model"], parse_version(request.match_info.get("version", ""))
        header_length = request.headers.get(HEADER_LENGTH)
        parsed = self.inference.parse(call, model, version, lambda: parse_request(body, header_length))
        what = f"input {parsed.inputs[0].name!r}" if parsed.inputs else "input"
        make_input = functools.partial(input_array, parsed)
        served, outputs = await self.inference.run(
            call,
            model,
            version,
            make_input,
            None,
            what=what,
            priority=parsed.priority,
            timeout_us=parsed.timeout_us,
        )
        payload, json_length = encode_response(parsed, served, outputs)
        if json_length is None:
            return web.Response(body=payload, content_type=JSON)
        headers = {HEADER_LENGTH: str(json_length)}
        return web.Response(body=payload, content_type="application/octet-stream", headers=headers)
