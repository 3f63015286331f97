"""Talking to the target before the load (model discovery, a checked pre-flight request) and the
single-process client that runs steps on one persistent uvloop event loop and connection, over
gRPC or (KServe v2) HTTP/REST, plain text or TLS (``loadtest.transport``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from cnnstack.contract import INPUT_NAME, PROBABILITIES_NAME, TENSOR_DATATYPE
from loadtest.controller import StepController, StepResult
from loadtest.payload import WIRE_DTYPES, KServeInput, kserve_pb2, method_for, model_path
from loadtest.runner import CallFailed, StepSpec, new_event_loop, run_process_step
from loadtest.transport import Connection, Transport, connect, new_session

START_DELAY_S = 0.05  # between arming a step and its first request


class TargetError(RuntimeError):
    """The target cannot serve the requested model (unreachable, unknown model, bad input)."""


class MissingShape(TargetError):
    """Neither the server's metadata nor the flags give the input's shape (exit 2: a usage error)."""


@dataclass(frozen=True)
class Described:
    """What the server's metadata says of the model: the image shape (C, H, W) where it says it,
    and (KServe) how the input tensor is named and typed."""

    shape: tuple[int, int, int] | None
    kserve: KServeInput = KServeInput()


def _from_kserve_metadata(inputs: Sequence[Any], outputs: Sequence[str]) -> Described:
    """KServe v2 metadata (``inputs``: dicts with name, datatype, shape) may list no inputs, or
    dims that are not (-1, C, H, W): legal, so the flags (--shape, --input-name, --datatype) fill
    in what it leaves out."""
    output = PROBABILITIES_NAME if PROBABILITIES_NAME in outputs else None  # else: every output
    if not inputs:
        return Described(None, KServeInput(output=output))
    first = inputs[0]
    dims = [int(d) for d in first.get("shape") or ()]
    shape = tuple(dims[-3:]) if len(dims) >= 3 and all(d > 0 for d in dims[-3:]) else None
    datatype = first.get("datatype") if first.get("datatype") in WIRE_DTYPES else TENSOR_DATATYPE
    return Described(shape, KServeInput(first.get("name") or INPUT_NAME, datatype, output))  # type: ignore[arg-type]


async def _describe_grpc(
    target: str, transport: Transport, api: str, model: str, version: int, timeout: float
) -> Described:
    async with transport.grpc_channel(target) as ch:
        try:
            if api == "kserve":
                pb = kserve_pb2()
                call = ch.unary_unary(
                    "/inference.GRPCInferenceService/ModelMetadata",
                    request_serializer=pb.ModelMetadataRequest.SerializeToString,
                    response_deserializer=pb.ModelMetadataResponse.FromString,
                )
                meta = await call(
                    pb.ModelMetadataRequest(name=model, version=str(version or "")),
                    timeout=timeout,
                    metadata=transport.request_headers(),
                )
                inputs = [
                    {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs
                ]
                return _from_kserve_metadata(inputs, [o.name for o in meta.outputs])
            from protos.cnnstack.classifier.v1 import classifier_pb2 as pb1

            call = ch.unary_unary(
                "/cnnstack.classifier.v1.Classifier/ListModels",
                request_serializer=pb1.ListModelsRequest.SerializeToString,
                response_deserializer=pb1.ListModelsResponse.FromString,
            )
            listing = await call(
                pb1.ListModelsRequest(), timeout=timeout, metadata=transport.request_headers()
            )
        except grpc.aio.AioRpcError as e:
            raise TargetError(
                f"{target}: cannot describe model {model!r}: {e.code().name}: {e.details()}"
            ) from None
    for m in listing.models:
        if m.name == model:
            return Described(tuple(int(d) for d in m.input_shape))  # type: ignore[arg-type]
    names = sorted(m.name for m in listing.models)
    raise TargetError(f"{target}: no model {model!r}; the server has {names}")


async def _http_json(transport: Transport, url: str, timeout: float) -> Any:
    """GET ``url``; the JSON document of a 200, else TargetError with the server's error text."""
    import aiohttp

    async with new_session(transport) as session:
        try:
            headers = dict(transport.request_headers())
            async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                body = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TargetError(f"{url}: {type(e).__name__}: {e}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if status != 200:
        why = doc.get("error") if isinstance(doc, dict) else body[:200].decode("utf-8", "replace")
        raise TargetError(f"{url}: HTTP {status}: {why}")
    if not isinstance(doc, dict):
        raise TargetError(f"{url}: HTTP 200 but the body is not a JSON object")
    return doc


async def _describe_http(
    target: str, transport: Transport, model: str, version: int, timeout: float
) -> Described:
    meta = await _http_json(transport, transport.base_url(target) + model_path(model, version), timeout)
    inputs = [t for t in meta.get("inputs") or () if isinstance(t, dict)]
    outputs = [o.get("name", "") for o in meta.get("outputs") or () if isinstance(o, dict)]
    return _from_kserve_metadata(inputs, outputs)


def describe_model(
    target: str, api: str, model: str, version: int, timeout: float = 10.0, transport: Transport = Transport()
) -> Described:
    """What the server reports of the model's input."""
    if transport.protocol == "http":
        coro = _describe_http(target, transport, model, version, timeout)
    else:
        coro = _describe_grpc(target, transport, api, model, version, timeout)
    with asyncio.Runner(loop_factory=new_event_loop) as r:
        return r.run(coro)


def resolve_input(
    described: Described,
    shape: tuple[int, int, int] | None,
    input_name: str | None,
    datatype: str | None,
    target: str,
    model: str,
) -> tuple[tuple[int, int, int], KServeInput]:
    """The flags win over the metadata; a shape neither gives is a MissingShape naming --shape."""
    shape = shape or described.shape
    if shape is None:
        raise MissingShape(
            f"{target}: the metadata of model {model!r} gives no input shape (C,H,W); pass it with --shape C,H,W"
        )
    k = described.kserve
    return shape, KServeInput(input_name or k.name, datatype or k.datatype, k.output)


def _check_kserve_reply(raw: bytes, transport: Transport, images: int) -> list[list[int]]:
    """The output shapes of a KServe v2 infer response (gRPC message or REST body)."""
    if transport.protocol == "http":
        # A binary reply starts with its JSON header, the raw tensors follow; a JSON reply is all
        # header. latin-1 maps every byte to one character, so the header decodes whatever follows.
        try:
            doc, _ = json.JSONDecoder().raw_decode(raw.decode("latin-1"))
        except ValueError:
            raise TargetError(f"the reply does not start with a JSON header: {raw[:80]!r}") from None
        shapes = [list(o.get("shape") or ()) for o in doc.get("outputs") or ()]
    else:
        reply = kserve_pb2().ModelInferResponse.FromString(raw)
        shapes = [list(o.shape) for o in reply.outputs]
    if not shapes or any(not s or s[0] != images for s in shapes):
        raise TargetError(f"sent {images} images, the outputs came back with shapes {shapes}")
    return shapes


async def _preflight(
    target: str, transport: Transport, route: str, api: str, payload: Any, images: int, timeout: float
) -> None:
    try:
        conn = await connect(target, transport, route, 1, timeout)
    except TimeoutError:  # a gRPC channel that did not connect (or whose TLS handshake failed)
        raise TargetError(f"{target}: not reachable within {timeout:g}s") from None
    try:
        raw = await conn.call(payload, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        raise TargetError(f"{target}: pre-flight request failed: {e.code().name}: {e.details()}") from None
    except CallFailed as e:
        raise TargetError(f"{target}: pre-flight request failed: {e}") from None
    finally:
        await conn.close()
    if api == "kserve":
        try:
            _check_kserve_reply(raw, transport, images)
        except TargetError as e:
            raise TargetError(f"{target}: pre-flight request: {e}") from None
        return
    from protos.cnnstack.classifier.v1 import classifier_pb2 as pb

    resp = pb.ClassifyResponse.FromString(raw)
    if len(resp.results) != images:
        raise TargetError(f"{target}: sent {images} images, got {len(resp.results)} results back")


def preflight(
    target: str,
    api: str,
    payload: Any,
    images: int,
    timeout: float = 10.0,
    transport: Transport = Transport(),
    route: str | None = None,
) -> None:
    """One request, response decoded and checked, so a misconfigured run fails before measuring."""
    with asyncio.Runner(loop_factory=new_event_loop) as r:
        r.run(_preflight(target, transport, route or method_for(api), api, payload, images, timeout))


class LocalClient:
    """All load from this process: one event loop and its connection (gRPC: ``connections``
    channels, requests round robin over them; HTTP: one keep-alive pool), kept across steps."""

    def __init__(
        self,
        target: str,
        api: str,
        payloads: Sequence[Any],
        images_per_request: int,
        stability_windows: int,
        stability_percent: float,
        connections: int = 1,
        transport: Transport = Transport(),
        route: str | None = None,
    ) -> None:
        self.payloads = payloads
        self.connections = connections
        self.k = images_per_request
        self.stability = (stability_windows, stability_percent)
        self._runner = asyncio.Runner(loop_factory=new_event_loop)
        self._conn: Connection | None = None
        self._target, self._route, self._transport = target, route or method_for(api), transport
        self.connect_timeout_s = 30.0

    async def _step(self, spec: StepSpec) -> StepResult:
        if self._conn is None:
            try:
                self._conn = await connect(
                    self._target, self._transport, self._route, self.connections, self.connect_timeout_s
                )
            except TimeoutError:
                raise TargetError(
                    f"{self._target}: not reachable within {self.connect_timeout_s:g}s"
                ) from None
        ctl = StepController(spec, 1, *self.stability, images_per_request=self.k)
        t0 = time.perf_counter() + START_DELAY_S
        totals = await run_process_step(
            self._conn.call, self.payloads, spec, self.k, t0, ctl.add, lambda: ctl.done
        )
        return ctl.result(spec.load, 1, [totals])

    def run_step(self, spec: StepSpec) -> StepResult:
        return self._runner.run(self._step(spec))

    def close(self) -> None:
        if self._conn is not None:
            self._runner.run(self._conn.close())
        self._runner.close()
