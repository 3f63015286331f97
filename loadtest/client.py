"""Talking to the target before the load (model discovery, a checked pre-flight request) and the
single-process client that runs steps on one persistent uvloop event loop and channel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from cnnstack.contract import INPUT_NAME, PROBABILITIES_NAME, TENSOR_DATATYPE
from loadtest.controller import StepController, StepResult
from loadtest.payload import WIRE_DTYPES, KServeInput, kserve_pb2, method_for
from loadtest.runner import (
    StepSpec,
    new_event_loop,
    open_channel,
    open_channels,
    raw_call,
    round_robin,
    run_process_step,
)

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


def _from_kserve_metadata(meta: Any) -> Described:
    """KServe v2 metadata may list no inputs, or dims that are not (-1, C, H, W): legal, so
    the flags (--shape, --input-name, --datatype) fill in what it leaves out."""
    outputs = {o.name for o in meta.outputs}
    output = PROBABILITIES_NAME if PROBABILITIES_NAME in outputs else None  # else: every output
    if not meta.inputs:
        return Described(None, KServeInput(output=output))
    first = meta.inputs[0]
    dims = [int(d) for d in first.shape]
    shape = tuple(dims[-3:]) if len(dims) >= 3 and all(d > 0 for d in dims[-3:]) else None
    datatype = first.datatype if first.datatype in WIRE_DTYPES else TENSOR_DATATYPE
    return Described(shape, KServeInput(first.name or INPUT_NAME, datatype, output))  # type: ignore[arg-type]


async def _describe(target: str, api: str, model: str, version: int, timeout: float) -> Described:
    async with open_channel(target) as ch:
        try:
            if api == "kserve":
                pb = kserve_pb2()
                call = ch.unary_unary(
                    "/inference.GRPCInferenceService/ModelMetadata",
                    request_serializer=pb.ModelMetadataRequest.SerializeToString,
                    response_deserializer=pb.ModelMetadataResponse.FromString,
                )
                meta = await call(
                    pb.ModelMetadataRequest(name=model, version=str(version or "")), timeout=timeout
                )
                return _from_kserve_metadata(meta)
            from protos.cnnstack.classifier.v1 import classifier_pb2 as pb1

            call = ch.unary_unary(
                "/cnnstack.classifier.v1.Classifier/ListModels",
                request_serializer=pb1.ListModelsRequest.SerializeToString,
                response_deserializer=pb1.ListModelsResponse.FromString,
            )
            listing = await call(pb1.ListModelsRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise TargetError(
                f"{target}: cannot describe model {model!r}: {e.code().name}: {e.details()}"
            ) from None
    for m in listing.models:
        if m.name == model:
            return Described(tuple(int(d) for d in m.input_shape))  # type: ignore[arg-type]
    names = sorted(m.name for m in listing.models)
    raise TargetError(f"{target}: no model {model!r}; the server has {names}")


def describe_model(target: str, api: str, model: str, version: int, timeout: float = 10.0) -> Described:
    """What the server reports of the model's input."""
    with asyncio.Runner(loop_factory=new_event_loop) as r:
        return r.run(_describe(target, api, model, version, timeout))


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


async def _preflight(target: str, api: str, payload: bytes, images: int, timeout: float) -> None:
    async with open_channel(target) as ch:
        try:
            raw = await raw_call(ch, method_for(api))(payload, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise TargetError(
                f"{target}: pre-flight request failed: {e.code().name}: {e.details()}"
            ) from None
    if api == "kserve":
        return
    from protos.cnnstack.classifier.v1 import classifier_pb2 as pb

    resp = pb.ClassifyResponse.FromString(raw)
    if len(resp.results) != images:
        raise TargetError(f"{target}: sent {images} images, got {len(resp.results)} results back")


def preflight(target: str, api: str, payload: bytes, images: int, timeout: float = 10.0) -> None:
    """One request, response decoded and checked, so a misconfigured run fails before measuring."""
    with asyncio.Runner(loop_factory=new_event_loop) as r:
        r.run(_preflight(target, api, payload, images, timeout))


class LocalClient:
    """All load from this process: one event loop and ``connections`` channels (requests round
    robin over them), kept across steps."""

    def __init__(
        self,
        target: str,
        api: str,
        payloads: Sequence[bytes],
        images_per_request: int,
        stability_windows: int,
        stability_percent: float,
        connections: int = 1,
    ) -> None:
        self.payloads = payloads
        self.connections = connections
        self.k = images_per_request
        self.stability = (stability_windows, stability_percent)
        self._runner = asyncio.Runner(loop_factory=new_event_loop)
        self._channels: list[grpc.aio.Channel] = []
        self._call: Any = None
        self._target, self._method = target, method_for(api)
        self.connect_timeout_s = 30.0

    async def _step(self, spec: StepSpec) -> StepResult:
        if not self._channels:
            try:
                self._channels = await open_channels(self._target, self.connections, self.connect_timeout_s)
            except TimeoutError:
                raise TargetError(
                    f"{self._target}: not reachable within {self.connect_timeout_s:g}s"
                ) from None
            self._call = round_robin([raw_call(ch, self._method) for ch in self._channels])
        ctl = StepController(spec, 1, *self.stability, images_per_request=self.k)
        t0 = time.perf_counter() + START_DELAY_S
        totals = await run_process_step(
            self._call, self.payloads, spec, self.k, t0, ctl.add, lambda: ctl.done
        )
        return ctl.result(spec.load, 1, [totals])

    def run_step(self, spec: StepSpec) -> StepResult:
        return self._runner.run(self._step(spec))

    def close(self) -> None:
        for ch in self._channels:
            self._runner.run(ch.close())
        self._runner.close()
