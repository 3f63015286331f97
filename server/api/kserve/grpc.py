"""``inference.GRPCInferenceService``: KServe v2 / Open Inference Protocol (what tritonclient speaks).

ModelInfer takes the model's one FP32 input ``[N, C, H, W]`` through ``raw_input_contents`` or
``contents.fp32_contents`` and returns the requested outputs (all when none is named) as raw
little-endian bytes. A requested output with parameter ``classification`` = k is answered, like
Triton, as a BYTES tensor ``[N, k]`` of ``"probability:index:label"``.
"""

from __future__ import annotations

import functools
import os

import grpc
import numpy as np

from cnnstack.contract import TENSOR_DATATYPE
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from server.api.dataplane import Call, Inference, deadline_of, error_code, serve_stream
from server.api.kserve import protocol as v2
from server.errors import invalid, not_found
from server.runtime.version import ServedVersion

PID_METADATA = "cnn-server-pid"  # initial metadata of ServerMetadata: the answering process


def input_array(request: ks.ModelInferRequest, served: ServedVersion) -> np.ndarray:
    """The request's one input -> (N, C, H, W) float32 (a view of the raw bytes when sent raw)."""
    v2.check_input_count(served, len(request.inputs))
    inp = request.inputs[0]
    shape = v2.check_input(served, inp.name, inp.datatype, inp.shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise invalid(f"{len(request.raw_input_contents)} raw_input_contents for 1 input")
        return v2.array_from_raw(inp.name, request.raw_input_contents[0], shape)
    return v2.array_from_values(inp.name, inp.contents.fp32_contents, shape, "fp32_contents")


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
    wanted = request.outputs or [ks.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in names]
    raw = []
    for req_out in wanted:
        out = outputs[names.index(req_out.name)]
        k = _classification(req_out)
        if k:
            response.outputs.add(name=req_out.name, datatype="BYTES", shape=[out.shape[0], k])
            raw.append(v2.bytes_tensor(v2.classification_labels(served, outputs, k)))
        else:
            response.outputs.add(name=req_out.name, datatype=TENSOR_DATATYPE, shape=list(out.shape))
            raw.append(np.ascontiguousarray(out, dtype="<f4").tobytes())
    response.raw_output_contents.extend(raw)
    return response


class KServeService(ks_grpc.GRPCInferenceServiceServicer):
    def __init__(self, inference: Inference) -> None:
        self.inference = inference
        self.manager = inference.manager
        self.state = inference.state

    # ---- health and metadata ----

    async def ServerLive(self, request, context) -> ks.ServerLiveResponse:
        return ks.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> ks.ServerReadyResponse:
        return ks.ServerReadyResponse(ready=self.state.serving)

    async def ModelReady(self, request, context) -> ks.ModelReadyResponse:
        try:
            served = self.manager.resolve(request.name, v2.parse_version(request.version))
        except Exception:
            return ks.ModelReadyResponse(ready=False)
        return ks.ModelReadyResponse(ready=served.accepting and not self.state.stopping)

    async def ServerMetadata(self, request, context) -> ks.ServerMetadataResponse:
        # Which process answered: under --workers each connection is served by one worker, and
        # tests and operators tell them apart by this (the response itself is KServe's).
        await context.send_initial_metadata(((PID_METADATA, str(os.getpid())),))
        return ks.ServerMetadataResponse(
            name=v2.SERVER_NAME, version=v2.SERVER_VERSION, extensions=v2.EXTENSIONS
        )

    async def _resolve(self, name: str, version: str, context) -> ServedVersion:
        try:
            return self.manager.resolve(name, v2.parse_version(version))
        except Exception as e:
            status, message = error_code(e)
            await context.abort(status, message)
            raise  # unreachable: abort raises

    async def ModelMetadata(self, request, context) -> ks.ModelMetadataResponse:
        served = await self._resolve(request.name, request.version, context)
        return v2.model_metadata(self.manager, served)

    async def ModelConfig(self, request, context) -> ks.ModelConfigResponse:
        served = await self._resolve(request.name, request.version, context)
        return ks.ModelConfigResponse(config=served.config)

    async def ModelStatistics(self, request, context) -> ks.ModelStatisticsResponse:
        try:
            versions = v2.versions_for_statistics(self.manager, request.name, request.version)
        except Exception as e:
            await context.abort(*error_code(e))
        return ks.ModelStatisticsResponse(model_stats=[v2.statistics(s) for s in versions])

    async def RepositoryIndex(self, request, context) -> ks.RepositoryIndexResponse:
        return v2.repository_index(self.manager, request.ready)

    # ---- inference ----

    async def ModelInfer(self, request: ks.ModelInferRequest, context) -> ks.ModelInferResponse:
        work = functools.partial(self._infer, request, deadline_of(context))
        return await self.inference.handle("ModelInfer", work, context.abort)

    async def _infer(
        self, request: ks.ModelInferRequest, deadline: float | None, call: Call
    ) -> ks.ModelInferResponse:
        version = v2.parse_version(request.model_version)
        if not request.model_name:
            raise not_found("model_name is empty")

        def make_input(served: ServedVersion) -> np.ndarray:
            check_requested_outputs(request, served)
            return input_array(request, served)

        what = f"input {request.inputs[0].name!r}" if request.inputs else "input"
        outputs = await self.inference.run(call, request.model_name, version, make_input, deadline, what=what)
        return build_response(request, call.served, outputs)  # type: ignore[arg-type]

    async def ModelStreamInfer(self, request_iterator, context):
        async for response in serve_stream(request_iterator, self._stream_one, self.state, context):
            yield response

    async def _stream_one(
        self, request: ks.ModelInferRequest, deadline: float | None
    ) -> ks.ModelStreamInferResponse:
        async def work(call: Call) -> ks.ModelStreamInferResponse:
            return ks.ModelStreamInferResponse(infer_response=await self._infer(request, deadline, call))

        async def error(status: grpc.StatusCode, message: str) -> ks.ModelStreamInferResponse:
            return ks.ModelStreamInferResponse(error_message=f"{status.name}: {message}")

        return await self.inference.handle("ModelStreamInfer", work, error)
