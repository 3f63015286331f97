"""``inference.GRPCInferenceService``: KServe v2 / Open Inference Protocol (what tritonclient speaks).

ModelInfer takes the model's one FP32 input ``[N, C, H, W]`` through ``raw_input_contents`` or
``contents.fp32_contents`` and returns the requested outputs (all when none is named) as raw
little-endian bytes. A requested output with parameter ``classification`` = k is answered, like
Triton, as a BYTES tensor ``[N, k]`` of ``"probability:index:label"``.
"""

from __future__ import annotations

import functools
import math
import os
import struct

import grpc
import numpy as np

from cnnstack.contract import INPUT_NAME, PLATFORM, TENSOR_DATATYPE
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from server.common import Call, Inference, deadline_of, error_code, serve_stream
from server.errors import invalid, not_found
from server.postprocess import top_k_of
from server.preprocess import check_count
from server.served import ServedVersion

SERVER_NAME = "cnnstack"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["classification", "model_configuration", "statistics"]
PID_METADATA = "cnn-server-pid"  # initial metadata of ServerMetadata: the answering process


def parse_version(text: str) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise invalid(f"model_version must be a positive integer or empty (latest), got {text!r}")
    return int(text)


def input_array(request: ks.ModelInferRequest, served: ServedVersion) -> np.ndarray:
    """The request's one input -> (N, C, H, W) float32 (a view of the raw bytes when sent raw)."""
    if len(request.inputs) != 1:
        raise invalid(
            f"model {served.name!r} takes exactly 1 input ({INPUT_NAME!r}), got {len(request.inputs)}"
        )
    inp = request.inputs[0]
    expected_name = served.instances[0].input_name
    if inp.name != expected_name:
        raise invalid(f"unknown input {inp.name!r}; model {served.name!r} has one input {expected_name!r}")
    if inp.datatype != TENSOR_DATATYPE:
        raise invalid(f"input {inp.name!r} must be {TENSOR_DATATYPE}, got {inp.datatype!r}")
    shape = tuple(inp.shape)
    if len(shape) != 4 or shape[1:] != served.input_shape:
        raise invalid(
            f"input {inp.name!r} has shape {list(shape)}, expected [N, {', '.join(map(str, served.input_shape))}]"
        )
    check_count(shape[0], served.max_batch_size)
    count = math.prod(shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise invalid(f"{len(request.raw_input_contents)} raw_input_contents for 1 input")
        raw = request.raw_input_contents[0]
        if len(raw) != 4 * count:
            raise invalid(
                f"input {inp.name!r}: raw contents have {len(raw)} bytes, expected {4 * count} (FP32 x {list(shape)})"
            )
        x = np.frombuffer(raw, dtype="<f4").reshape(shape)
    else:
        values = inp.contents.fp32_contents
        if len(values) != count:
            raise invalid(
                f"input {inp.name!r}: {len(values)} fp32_contents, expected {count} for shape {list(shape)}"
            )
        x = np.asarray(values, dtype=np.float32).reshape(shape)
    return x  # NaN/Inf are checked in the batcher, off the event loop


def check_requested_outputs(request: ks.ModelInferRequest, served: ServedVersion) -> None:
    """Reject unknown output names and bad classification counts before running the model."""
    for req_out in request.outputs:
        if req_out.name not in served.output_names:
            raise invalid(
                f"unknown output {req_out.name!r}; model {served.name!r} has outputs {served.output_names}"
            )
        if "classification" in req_out.parameters:
            k = req_out.parameters["classification"].int64_param
            if not 1 <= k <= served.num_classes:
                raise invalid(f"classification must be between 1 and {served.num_classes}, got {k}")


def _classification_bytes(served: ServedVersion, outputs: list[np.ndarray], k: int) -> bytes:
    idx, vals = top_k_of(outputs, k)
    names = served.class_names
    parts = []
    for ri, rv in zip(idx, vals, strict=True):
        for i, v in zip(ri, rv, strict=True):
            s = f"{v:f}:{i}:{names[i]}".encode()
            parts.append(struct.pack("<I", len(s)) + s)
    return b"".join(parts)


def build_response(
    request: ks.ModelInferRequest, served: ServedVersion, outputs: list[np.ndarray]
) -> ks.ModelInferResponse:
    names = served.output_names
    response = ks.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
    wanted = request.outputs or [ks.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in names]
    raw = []
    for req_out in wanted:
        out = outputs[names.index(req_out.name)]
        k = req_out.parameters["classification"].int64_param if "classification" in req_out.parameters else 0
        if k:
            response.outputs.add(name=req_out.name, datatype="BYTES", shape=[out.shape[0], k])
            raw.append(_classification_bytes(served, outputs, k))
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
        return ks.ServerReadyResponse(ready=self.state.ready and not self.state.stopping)

    async def ModelReady(self, request, context) -> ks.ModelReadyResponse:
        try:
            served = self.manager.resolve(request.name, parse_version(request.version))
        except Exception:
            return ks.ModelReadyResponse(ready=False)
        return ks.ModelReadyResponse(ready=served.accepting and not self.state.stopping)

    async def ServerMetadata(self, request, context) -> ks.ServerMetadataResponse:
        # Which process answered: under --workers each connection is served by one worker, and
        # tests and operators tell them apart by this (the response itself is KServe's).
        await context.send_initial_metadata(((PID_METADATA, str(os.getpid())),))
        return ks.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def _resolve(self, name: str, version: str, context) -> ServedVersion:
        try:
            return self.manager.resolve(name, parse_version(version))
        except Exception as e:
            status, message = error_code(e)
            await context.abort(status, message)
            raise  # unreachable: abort raises

    async def ModelMetadata(self, request, context) -> ks.ModelMetadataResponse:
        served = await self._resolve(request.name, request.version, context)
        entry = self.manager.get_entry(request.name)
        T = ks.ModelMetadataResponse.TensorMetadata
        return ks.ModelMetadataResponse(
            name=served.name,
            versions=[str(v) for v in sorted(entry.versions)] if entry else [str(served.version)],
            platform=PLATFORM,
            inputs=[
                T(
                    name=served.instances[0].input_name,
                    datatype=TENSOR_DATATYPE,
                    shape=[-1, *served.input_shape],
                )
            ],
            outputs=[
                T(name=n, datatype=TENSOR_DATATYPE, shape=[-1, served.num_classes])
                for n in served.output_names
            ],
        )

    async def ModelConfig(self, request, context) -> ks.ModelConfigResponse:
        served = await self._resolve(request.name, request.version, context)
        return ks.ModelConfigResponse(config=served.config)

    async def ModelStatistics(self, request, context) -> ks.ModelStatisticsResponse:
        if request.name:
            if request.version:
                versions = [await self._resolve(request.name, request.version, context)]
            else:
                entry = self.manager.get_entry(request.name)
                if entry is None:
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} is not loaded")
                versions = list(entry.versions.values())  # type: ignore[union-attr]
        else:
            versions = [s for e in self.manager.entries() for s in e.versions.values()]
        return ks.ModelStatisticsResponse(model_stats=[_statistics(s) for s in versions])

    async def RepositoryIndex(self, request, context) -> ks.RepositoryIndexResponse:
        Index = ks.RepositoryIndexResponse.ModelIndex
        models = []
        for entry in self.manager.entries():
            models += [Index(name=entry.name, version=str(v), state="READY") for v in sorted(entry.versions)]
        if not request.ready:
            for (name, v), reason in sorted(self.manager.errors.items()):
                models.append(Index(name=name, version=str(v), state="UNAVAILABLE", reason=reason))
        return ks.RepositoryIndexResponse(models=models)

    # ---- inference ----

    async def ModelInfer(self, request: ks.ModelInferRequest, context) -> ks.ModelInferResponse:
        work = functools.partial(self._infer, request, deadline_of(context))
        return await self.inference.handle("ModelInfer", work, context.abort)

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


def _statistics(served: ServedVersion) -> ks.ModelStatistics:
    st = served.stats
    D = ks.StatisticDuration
    return ks.ModelStatistics(
        name=served.name,
        version=str(served.version),
        last_inference=st.last_inference_ms,
        inference_count=st.inference_count,
        execution_count=st.execution_count,
        inference_stats=ks.InferStatistics(
            success=D(count=st.success[0], ns=st.success[1]),
            fail=D(count=st.fail[0], ns=st.fail[1]),
            queue=D(count=st.queue[0], ns=st.queue[1]),
            compute_infer=D(count=st.compute[0], ns=st.compute[1]),
        ),
        batch_stats=[
            ks.InferBatchStatistics(batch_size=b, compute_infer=D(count=c, ns=ns))
            for b, (c, ns) in sorted(st.batches.items())
        ],
    )
