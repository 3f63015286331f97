"""cnn-loadtest --api kserve against a KServe v2 server that is not ours: metadata listing no
inputs (legal in KServe v2), its own input name and no ``probabilities`` output. The flags complete
what the metadata leaves out; without a shape the CLI says which flag to give, exit 2."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from loadtest.__main__ import main
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc

MODEL = "foreign"
SHAPE = (1, 8, 8)
FAST = ["--warmup", "0.1", "--window", "0.3", "--duration", "0.6", "--concurrency", "2", "--quiet"]


class ForeignKServe(ks_grpc.GRPCInferenceServiceServicer):
    """An MLServer-like v2 server: no inputs in its metadata, input 'x', output 'scores'."""

    def __init__(self) -> None:
        self.requests: list[ks.ModelInferRequest] = []

    async def ModelMetadata(self, request, context):  # noqa: N802 (the protocol's name)
        return ks.ModelMetadataResponse(name=MODEL, platform="onnxruntime_onnx")

    async def ModelInfer(self, request, context):  # noqa: N802
        self.requests.append(request)
        tensor = request.inputs[0]
        if tensor.name != "x" or tensor.datatype != "FP16" or list(tensor.shape[1:]) != list(SHAPE):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected input {tensor}")
        images = np.frombuffer(request.raw_input_contents[0], "<f2").reshape(tensor.shape)
        out = ks.ModelInferResponse(model_name=MODEL)
        out.outputs.add(name="scores", datatype="FP32", shape=[len(images), 3])
        out.raw_output_contents.append(np.zeros((len(images), 3), "<f4").tobytes())
        return out


@pytest.fixture
def foreign() -> Iterator[tuple[str, ForeignKServe]]:
    servicer, ready, port = ForeignKServe(), threading.Event(), []
    loop = asyncio.new_event_loop()

    async def serve() -> grpc.aio.Server:
        server = grpc.aio.server()
        ks_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        return server

    server_box: list[grpc.aio.Server] = []
    thread = threading.Thread(
        target=lambda: (server_box.append(loop.run_until_complete(serve())), loop.run_forever())
    )
    thread.start()
    assert ready.wait(10)
    yield f"127.0.0.1:{port[0]}", servicer
    asyncio.run_coroutine_threadsafe(server_box[0].stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_metadata_without_inputs_and_no_shape_is_one_line_naming_the_flag(foreign, capsys) -> None:
    target, servicer = foreign
    assert main(["--target", target, "--model", MODEL, "--api", "kserve", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shape C,H,W" in err[0] and "Traceback" not in err[0]
    assert servicer.requests == []  # nothing was sent


def test_the_flags_complete_the_metadata_and_the_load_runs(foreign, capsys) -> None:
    target, servicer = foreign
    argv = ["--target", target, "--model", MODEL, "--api", "kserve", "--shape", "1,8,8",
            "--input-name", "x", "--datatype", "FP16", *FAST]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert len(servicer.requests) > 2  # the pre-flight request, then the step's
    # No 'probabilities' output in a foreign model: the client asks for all outputs.
    assert all(not r.outputs for r in servicer.requests)
