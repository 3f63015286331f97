"""Bare servers on our methods: the RPC layer's ceiling for the serving benchmarks.

gRPC (grpc.aio, as cnn-serve): Classify, and KServe v2 ModelInfer; with ``--http-port``, also an
aiohttp listener in the same event loop answering ``POST /v2/models/M/infer``, as cnn-serve's
HTTP side. They never parse a request and answer every call with the same pre-serialized
response of the size our server sends back (one top-1 result, or the two (images, 10) float32
outputs per image), so all they measure is the protocol: framing, the request's bytes, Python's
per-call cost on the event loop. ListModels answers with one model of the given input shape, so
``cnn-loadtest`` can target it like the real server.

    python -m bench.echo_server --port 0 --http-port 0 --input-shape 1,28,28   # prints "listening on ..."
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb

SERVICE = "cnnstack.classifier.v1.Classifier"
KSERVE_SERVICE = "inference.GRPCInferenceService"
CLASSES = 10


def canned_kserve_response(model: str, images: int) -> bytes:
    """ModelInfer's answer: logits and probabilities, (images, 10) float32 each, raw."""
    from protos.inference import grpc_service_pb2 as ks

    response = ks.ModelInferResponse(model_name=model, model_version="1")
    for name in ("logits", "probabilities"):
        response.outputs.add(name=name, datatype="FP32", shape=[images, CLASSES])
        response.raw_output_contents.append(bytes(4 * images * CLASSES))
    return response.SerializeToString()


def canned_rest_response(model: str, images: int) -> tuple[bytes, dict[str, str]]:
    """The HTTP answer to a binary-tensor infer: a JSON header, then the raw outputs."""
    import json

    outputs = [
        {
            "name": n,
            "datatype": "FP32",
            "shape": [images, CLASSES],
            "parameters": {"binary_data_size": 4 * images * CLASSES},
        }
        for n in ("logits", "probabilities")
    ]
    head = json.dumps(
        {"model_name": model, "model_version": "1", "outputs": outputs}, separators=(",", ":")
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    return head + bytes(2 * 4 * images * CLASSES), headers


def canned_classify_response(model: str, images: int) -> bytes:
    results = [
        pb.Classification(predictions=[pb.Prediction(class_index=3, class_name="Dress", probability=0.5)])
    ]
    return pb.ClassifyResponse(model=model, version=1, results=results * images).SerializeToString()


async def serve(host: str, port: int, http_port: int, model: str, shape: list[int], images: int) -> None:
    response = canned_classify_response(model, images)
    kserve = canned_kserve_response(model, images)
    listing = pb.ListModelsResponse(
        models=[
            pb.ModelDescription(name=model, version=1, versions=[1], input_shape=shape, max_batch_size=64)
        ]
    ).SerializeToString()

    async def classify(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    async def list_models(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return listing

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return kserve

    # No (de)serializers: handlers see and return raw bytes.
    handlers = [
        grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Classify": grpc.unary_unary_rpc_method_handler(classify),
                "ListModels": grpc.unary_unary_rpc_method_handler(list_models),
            },
        ),
        grpc.method_handlers_generic_handler(
            KSERVE_SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}
        ),
    ]
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
    server.add_generic_rpc_handlers(handlers)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    runner, http_bound = None, None
    if http_port >= 0:
        runner, http_bound = await serve_http(host, http_port, model, images)
    print(
        f"listening on {host}:{bound}" + (f" http {http_bound}" if http_bound is not None else ""), flush=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if runner is not None:
        await runner.cleanup()
    await server.stop(0)


async def serve_http(host: str, port: int, model: str, images: int):  # noqa: ANN201
    """aiohttp with one route answering the canned binary infer response (the body read, not parsed)."""
    from aiohttp import web

    body, headers = canned_rest_response(model, images)

    async def infer(request: web.Request) -> web.Response:
        try:
            await request.read()
        except ConnectionError:  # the load client stopped mid-request: nothing to answer
            return web.Response(status=408)
        return web.Response(body=body, headers=headers)

    return await serve_infer_route(host, port, infer)


async def serve_infer_route(host: str, port: int, infer):  # noqa: ANN001, ANN201
    """aiohttp serving ``infer`` at ``POST /v2/models/{model}/infer`` -> (runner, bound port)."""
    from aiohttp import web

    app = web.Application(client_max_size=256 << 20)
    app.router.add_post("/v2/models/{model}/infer", infer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--http-port", type=int, default=-1, help="also an aiohttp echo of ModelInfer; -1: none")
    p.add_argument("--model", default="echo")
    p.add_argument("--input-shape", default="1,28,28", help="C,H,W reported by ListModels")
    p.add_argument("--images", type=int, default=1, help="results per canned response")
    p.add_argument("--no-uvloop", action="store_true")
    a = p.parse_args(argv)
    shape = [int(v) for v in a.input_shape.split(",")]
    coro = serve(a.host, a.port, a.http_port, a.model, shape, a.images)
    if a.no_uvloop:
        asyncio.run(coro)
    else:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            r.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
