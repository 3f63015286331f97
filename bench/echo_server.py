"""A bare grpc.aio server on the Classify method: the RPC layer's ceiling for the serving benchmark.

It never parses the request and answers every call with the same pre-serialized ClassifyResponse
(one top-1 result per image, the size our server sends back), so all it measures is gRPC: HTTP/2
framing, the request's bytes, Python's per-RPC cost on the event loop. ListModels answers with one
model of the given input shape, so ``cnn-loadtest`` can target it like the real server.

    python -m bench.echo_server --port 0 --input-shape 1,28,28     # prints "listening on 127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb

SERVICE = "cnnstack.classifier.v1.Classifier"


def canned_classify_response(model: str, images: int) -> bytes:
    results = [
        pb.Classification(predictions=[pb.Prediction(class_index=3, class_name="Dress", probability=0.5)])
    ]
    return pb.ClassifyResponse(model=model, version=1, results=results * images).SerializeToString()


async def serve(host: str, port: int, model: str, shape: list[int], images: int) -> None:
    response = canned_classify_response(model, images)
    listing = pb.ListModelsResponse(
        models=[
            pb.ModelDescription(name=model, version=1, versions=[1], input_shape=shape, max_batch_size=64)
        ]
    ).SerializeToString()

    async def classify(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    async def list_models(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return listing

    # No (de)serializers: handlers see and return raw bytes.
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Classify": grpc.unary_unary_rpc_method_handler(classify),
            "ListModels": grpc.unary_unary_rpc_method_handler(list_models),
        },
    )
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", default="echo")
    p.add_argument("--input-shape", default="1,28,28", help="C,H,W reported by ListModels")
    p.add_argument("--images", type=int, default=1, help="results per canned response")
    p.add_argument("--no-uvloop", action="store_true")
    a = p.parse_args(argv)
    shape = [int(v) for v in a.input_shape.split(",")]
    coro = serve(a.host, a.port, a.model, shape, a.images)
    if a.no_uvloop:
        asyncio.run(coro)
    else:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            r.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
