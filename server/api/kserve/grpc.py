"""``inference.GRPCInferenceService``: KServe v2 / Open Inference Protocol (what tritonclient speaks).

ModelInfer takes the model's one FP32 input ``[N, C, H, W]`` through ``raw_input_contents`` or
``contents.fp32_contents`` and returns the requested outputs (all when none is named) as raw
little-endian bytes. A requested output with parameter ``classification`` = k is answered, like
Triton, as a BYTES tensor ``[N, k]`` of ``"probability:index:label"``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import grpc
import numpy as np

from cnnstack.contract import TENSOR_DATATYPE
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from server.api.control import ModelControl
from server.api.dataplane import Call, Inference, parse_version
from server.api.kserve import protocol as v2
from server.api.rpc import deadline_of, serve_stream
from server.errors import ServeError, invalid, not_found
from server.runtime.preprocess import array_from_bytes, array_from_values
from server.runtime.version import ServedVersion

R = TypeVar("R")
PID_METADATA = "cnn-server-pid"  # initial metadata of ServerMetadata: the answering process


def input_array(request: ks.ModelInferRequest, served: ServedVersion) -> np.ndarray:
    """The request's one input -> (N, C, H, W) float32 (a view of the raw bytes when sent raw)."""
    v2.check_input_count(served, len(request.inputs))
    inp = request.inputs[0]
    shape = v2.check_input(served, inp.name, inp.datatype, inp.shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise invalid(f"{len(request.raw_input_contents)} raw_input_contents for 1 input")
        return array_from_bytes(request.raw_input_contents[0], shape, f"input {inp.name!r}")
    return array_from_values(inp.contents.fp32_contents, shape, f"input {inp.name!r}", "fp32_contents")


def _parameter(params, name: str) -> object:
    """An InferParameter's value, whichever of its fields is set; None when absent."""
    if name not in params:
        return None
    param = params[name]
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind is not None else None


def _repository_parameter(params, name: str) -> object:
    """A ModelRepositoryParameter's value, whichever of its fields is set; None when absent."""
    if name not in params:
        return None
    kind = params[name].WhichOneof("parameter_choice")
    return getattr(params[name], kind) if kind is not None else None


def _classification(req_out: ks.ModelInferRequest.InferRequestedOutputTensor) -> int | None:
    if "classification" not in req_out.parameters:
        return None
    return req_out.parameters["classification"].int64_param


def check_requested_outputs(request: ks.ModelInferRequest, served: ServedVersion) -> None:
    for req_out in request.outputs:
        v2.check_output(served, req_out.name, _classification(req_out))


def build_response(
    request: ks.ModelInferRequest, served: ServedVersion, outputs: list[np.ndarray]
) -> ks.ModelInferResponse:
    names = served.output_names
    response = ks.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
    if not request.outputs:  # every output, as raw FP32 (the common request: nothing to look up)
        for name, out in zip(names, outputs, strict=False):
            response.outputs.add(name=name, datatype=TENSOR_DATATYPE, shape=out.shape)
        response.raw_output_contents.extend(v2.fp32_bytes(out) for out in outputs[: len(names)])
        return response
    raw = []
    for req_out in request.outputs:
        out = outputs[names.index(req_out.name)]
        k = _classification(req_out)
        if k:
            response.outputs.add(name=req_out.name, datatype="BYTES", shape=[out.shape[0], k])
            raw.append(v2.bytes_tensor(v2.classification_labels(served, outputs, k)))
        else:
            response.outputs.add(name=req_out.name, datatype=TENSOR_DATATYPE, shape=out.shape)
            raw.append(v2.fp32_bytes(out))
    response.raw_output_contents.extend(raw)
    return response


class KServeService(ks_grpc.GRPCInferenceServiceServicer):
    def __init__(self, inference: Inference, control: ModelControl) -> None:
        self.inference = inference
        self.control = control
        self.manager = inference.manager
        self.state = inference.state

    # ---- health and metadata ----

    async def ServerLive(self, request, context) -> ks.ServerLiveResponse:
        return ks.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> ks.ServerReadyResponse:
        return ks.ServerReadyResponse(ready=self.state.serving)

    async def ModelReady(self, request, context) -> ks.ModelReadyResponse:
        try:
            served = self.manager.resolve(request.name, parse_version(request.version))
        except ServeError:  # an unknown model or version is not ready; anything else is a bug
            return ks.ModelReadyResponse(ready=False)
        return ks.ModelReadyResponse(ready=served.accepting and not self.state.stopping)

    async def ServerMetadata(self, request, context) -> ks.ServerMetadataResponse:
        # Which process answered: under --workers each connection is served by one worker, and
        # tests and operators tell them apart by this (the response itself is KServe's).
        await context.send_initial_metadata(((PID_METADATA, str(os.getpid())),))
        return ks.ServerMetadataResponse(**v2.server_metadata())

    @staticmethod
    async def _answer(context, build: Callable[[], R]) -> R:
        """``build()``, or the call ends with the status its ServeError names."""
        try:
            return build()
        except ServeError as e:
            await context.abort(e.code, e.message)
            raise  # unreachable: abort raises

    def _resolve(self, request) -> ServedVersion:
        return self.manager.resolve(request.name, parse_version(request.version))

    async def ModelMetadata(self, request, context) -> ks.ModelMetadataResponse:
        return await self._answer(context, lambda: v2.model_metadata(self.manager, self._resolve(request)))

    async def ModelConfig(self, request, context) -> ks.ModelConfigResponse:
        return await self._answer(
            context, lambda: ks.ModelConfigResponse(config=self._resolve(request).config)
        )

    async def ModelStatistics(self, request, context) -> ks.ModelStatisticsResponse:
        def build() -> ks.ModelStatisticsResponse:
            versions = v2.versions_for_statistics(self.manager, request.name, request.version)
            return ks.ModelStatisticsResponse(model_stats=[v2.statistics(s) for s in versions])

        return await self._answer(context, build)

    async def RepositoryIndex(self, request, context) -> ks.RepositoryIndexResponse:
        return await v2.repository_index(self.manager, request.ready)

    # ---- model control (the repository extension; an admin token when tokens are on) ----

    async def RepositoryModelLoad(self, request, context) -> ks.RepositoryModelLoadResponse:
        try:
            config = v2.config_parameter(_repository_parameter(request.parameters, "config"))
            await self.control.load(request.model_name, config)
        except ServeError as e:
            await context.abort(e.code, e.message)
        return ks.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context) -> ks.RepositoryModelUnloadResponse:
        try:
            await self.control.unload(request.model_name)
        except ServeError as e:
            await context.abort(e.code, e.message)
        return ks.RepositoryModelUnloadResponse()

    # ---- inference ----

    async def ModelInfer(self, request: ks.ModelInferRequest, context) -> ks.ModelInferResponse:
        work = functools.partial(self._infer, request, deadline_of(context))
        return await self.inference.handle("ModelInfer", work, context.abort, carrier=context)

    async def _infer(
        self, request: ks.ModelInferRequest, deadline: float | None, call: Call
    ) -> ks.ModelInferResponse:
        version = parse_version(request.model_version)
        if not request.model_name:
            raise not_found("model_name is empty")

        def make_input(served: ServedVersion) -> np.ndarray:
            check_requested_outputs(request, served)
            return input_array(request, served)

        what = f"input {request.inputs[0].name!r}" if request.inputs else "input"
        params = request.parameters
        priority, timeout_us = v2.scheduling(_parameter(params, "priority"), _parameter(params, "timeout"))
        served, outputs = await self.inference.run(
            call,
            request.model_name,
            version,
            make_input,
            deadline,
            what=what,
            priority=priority,
            timeout_us=timeout_us,
        )
        return build_response(request, served, outputs)

    async def ModelStreamInfer(self, request_iterator, context):
        handle_one = functools.partial(self._stream_one, carrier=context)
        async for response in serve_stream(request_iterator, handle_one, self.state, context):
            yield response

    async def _stream_one(
        self, request: ks.ModelInferRequest, deadline: float | None, carrier: object = None
    ) -> ks.ModelStreamInferResponse:
        async def work(call: Call) -> ks.ModelStreamInferResponse:
            return ks.ModelStreamInferResponse(infer_response=await self._infer(request, deadline, call))

        async def error(status: grpc.StatusCode, message: str) -> ks.ModelStreamInferResponse:
            return ks.ModelStreamInferResponse(error_message=f"{status.name}: {message}")

        return await self.inference.handle("ModelStreamInfer", work, error, carrier=carrier)
