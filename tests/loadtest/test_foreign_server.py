"""cnn-loadtest --api kserve against a KServe v2 server that is not ours: metadata listing no
inputs (legal in KServe v2), its own input name and no ``probabilities`` output. The flags complete
what the metadata leaves out; without a shape the CLI says which flag to give, exit 2."""

from __future__ import annotations

import asyncio
import json
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
    argv = [
        "--target",
        target,
        "--model",
        MODEL,
        "--api",
        "kserve",
        "--shape",
        "1,8,8",
        "--input-name",
        "x",
        "--datatype",
        "FP16",
        *FAST,
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert len(servicer.requests) > 2  # the pre-flight request, then the step's
    # No 'probabilities' output in a foreign model: the client asks for all outputs.
    assert all(not r.outputs for r in servicer.requests)


class ForeignRest:
    """The same kind of server over KServe v2 REST (aiohttp): metadata without inputs, input 'x',
    output 'scores', and every third inference refused with 503 as an overloaded server would."""

    def __init__(self) -> None:
        self.headers: list[dict] = []

    async def metadata(self, request):
        from aiohttp import web

        return web.json_response({"name": MODEL, "platform": "onnxruntime_onnx", "versions": ["1"]})

    async def infer(self, request):
        from aiohttp import web

        body = await request.read()
        n = int(request.headers.get("Inference-Header-Content-Length", len(body)))
        header = json.loads(body[:n])
        self.headers.append(header)
        if len(self.headers) % 3 == 0:
            return web.json_response({"error": "busy"}, status=503)
        tensor = header["inputs"][0]
        batch = tensor["shape"][0]
        return web.json_response(
            {
                "model_name": MODEL,
                "outputs": [
                    {"name": "scores", "datatype": "FP32", "shape": [batch, 3], "data": [0.0] * (3 * batch)}
                ],
            }
        )


@pytest.fixture
def foreign_rest() -> Iterator[tuple[str, ForeignRest]]:
    from aiohttp import web

    servicer, loop = ForeignRest(), asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get(f"/v2/models/{MODEL}", servicer.metadata)
    app.router.add_post(f"/v2/models/{MODEL}/infer", servicer.infer)
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield f"127.0.0.1:{port}", servicer
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_over_http_metadata_without_inputs_needs_the_shape_flag(foreign_rest, capsys) -> None:
    target, servicer = foreign_rest
    assert main(["--target", target, "--model", MODEL, "--api", "kserve", "--protocol", "http", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shape C,H,W" in err[0]
    assert servicer.headers == []


@pytest.mark.parametrize("encoding", [[], ["--json"]], ids=["binary", "json"])
def test_over_http_the_flags_complete_the_metadata_and_503s_are_counted(
    foreign_rest, tmp_path, encoding
) -> None:
    target, servicer = foreign_rest
    out = tmp_path / "report.json"
    argv = [
        "--target",
        target,
        "--model",
        MODEL,
        "--api",
        "kserve",
        "--protocol",
        "http",
        *encoding,
        "--shape",
        "1,8,8",
        "--input-name",
        "x",
        "--datatype",
        "FP16",
        "--out",
        str(out),
        *FAST,
    ]
    assert main(argv) == 0
    tensor = servicer.headers[0]["inputs"][0]
    assert tensor["name"] == "x" and tensor["datatype"] == "FP16" and tensor["shape"] == [1, 1, 8, 8]
    assert ("data" in tensor) == bool(encoding)  # JSON tensors, or the binary extension's size
    assert all("outputs" not in h for h in servicer.headers)  # no 'probabilities': all outputs
    (step,) = json.loads(out.read_text())["steps"]
    # The server refused every third request: counted by status, none lost.
    assert step["errors_total"].get("HTTP_503", 0) > 0
    assert step["sent"] == step["ok"] + sum(step["errors_total"].values()) == len(servicer.headers) - 1
