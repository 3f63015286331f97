"""The floor of a batching inference server on our stack: the least a KServe v2 ModelInfer server
on grpc.aio and aiohttp can do and still answer with the model's real outputs.

Each request's tensor is read (``ModelInferRequest`` parsed; over HTTP the binary-extension body
split at ``Inference-Header-Content-Length``), batched as cnn-serve batches under load (a lone
request after a lone request runs at once; else up to ``--max-batch`` images or ``--max-delay-us``
after the first), run by onnxruntime on one thread beside the event loop (one hand-off per batch,
single-threaded session), and answered with its slice of every output as raw FP32. Nothing else:
no checks of the input, no metrics, statistics, limits, queue policy, deadlines, NaN check,
version lookup or error isolation. bench/front_door_bench.py measures it beside cnn-serve: the
difference is what cnn-serve's features cost per request; the floor's own distance to the echo
ceiling (bench/echo_server.py) is what batching and the compute hand-off cost on this stack.

    python -m bench.floor_server --model artifacts/repository/lenet/1/model.onnx --port 0 --http-port 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable

import grpc
import numpy as np
import onnxruntime as ort

from bench.echo_server import KSERVE_SERVICE, serve_infer_route
from protos.inference import grpc_service_pb2 as ks

Outputs = list[np.ndarray]  # one (B, ...) array per model output


class Floor:
    """A batch queue in front of one single-threaded onnxruntime session on its own thread."""

    def __init__(self, model: str, max_batch: int, max_delay_s: float) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_batch, self.max_delay_s = max_batch, max_delay_s
        self.pending: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self.images = 0
        self.first_at = 0.0  # loop.time() the oldest pending request came
        self.wake = asyncio.Event()
        self.work: queue.SimpleQueue = queue.SimpleQueue()
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self._compute, daemon=True, name="floor-compute").start()
        self.task = asyncio.create_task(self._batches())

    async def infer(self, x: np.ndarray) -> Outputs:
        """x: (n, C, H, W) float32 -> this request's slice of every output."""
        fut = self.loop.create_future()
        if not self.pending:
            self.first_at = self.loop.time()
        self.pending.append((x, fut))
        self.images += x.shape[0]
        self.wake.set()
        return await fut

    async def _batches(self) -> None:
        last_lone = True
        while True:
            await self.wake.wait()
            self.wake.clear()
            if not self.pending:
                continue
            lone = len(self.pending) == 1
            if not (lone and last_lone) and self.images < self.max_batch:
                # Under load: let the batch fill until the oldest request has waited max_delay_s.
                await asyncio.sleep(max(0.0, self.first_at + self.max_delay_s - self.loop.time()))
            last_lone = lone
            while self.pending:
                batch: list[tuple[np.ndarray, asyncio.Future]] = []
                n = 0
                # Whole requests up to max_batch images (one larger request runs alone).
                while self.pending and (not batch or n + self.pending[0][0].shape[0] <= self.max_batch):
                    item = self.pending.popleft()
                    batch.append(item)
                    n += item[0].shape[0]
                self.images -= n
                done = self.loop.create_future()
                self.work.put((batch, done))
                await done

    def _compute(self) -> None:
        while True:
            batch, done = self.work.get()
            try:
                x = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])  # (B, C, H, W)
                outputs = self.session.run(self.output_names, {self.input_name: x})
            except Exception as e:  # no error isolation: the whole batch fails with it
                self.loop.call_soon_threadsafe(_fail, batch, e, done)
                continue
            self.loop.call_soon_threadsafe(_answer, batch, outputs, done)


def _answer(batch: list[tuple[np.ndarray, asyncio.Future]], outputs: Outputs, done: asyncio.Future) -> None:
    start = 0
    for x, fut in batch:
        stop = start + x.shape[0]
        if not fut.done():
            fut.set_result([out[start:stop] for out in outputs])
        start = stop
    done.set_result(None)


def _fail(batch: list[tuple[np.ndarray, asyncio.Future]], error: Exception, done: asyncio.Future) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(error)
    done.set_result(None)


def grpc_handler(floor: Floor, model: str) -> Callable:
    async def model_infer(
        request: ks.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> ks.ModelInferResponse:
        inp = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(tuple(inp.shape))
        outputs = await floor.infer(x)
        response = ks.ModelInferResponse(model_name=model, model_version="1", id=request.id)
        for name, out in zip(floor.output_names, outputs, strict=True):
            response.outputs.add(name=name, datatype="FP32", shape=out.shape)
            response.raw_output_contents.append(out.tobytes())
        return response

    return model_infer


async def serve_http(floor: Floor, host: str, port: int):  # noqa: ANN201
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except ConnectionError:  # the load client stopped mid-request
            return web.Response(status=408)
        split = int(request.headers["Inference-Header-Content-Length"])
        shape = json.loads(body[:split])["inputs"][0]["shape"]
        x = np.frombuffer(body, dtype=np.float32, offset=split).reshape(shape)
        outputs = await floor.infer(x)
        head = {
            "model_name": request.match_info["model"],
            "model_version": "1",
            "outputs": [
                {
                    "name": n,
                    "datatype": "FP32",
                    "shape": list(o.shape),
                    "parameters": {"binary_data_size": o.nbytes},
                }
                for n, o in zip(floor.output_names, outputs, strict=True)
            ],
        }
        head_bytes = json.dumps(head, separators=(",", ":")).encode()
        headers = {
            "Inference-Header-Content-Length": str(len(head_bytes)),
            "Content-Type": "application/octet-stream",
        }
        return web.Response(body=b"".join([head_bytes, *(o.tobytes() for o in outputs)]), headers=headers)

    return await serve_infer_route(host, port, infer)


async def serve(args: argparse.Namespace) -> None:
    floor = Floor(args.model, args.max_batch, args.max_delay_us / 1e6)
    handler = grpc.unary_unary_rpc_method_handler(
        grpc_handler(floor, args.name),
        request_deserializer=ks.ModelInferRequest.FromString,
        response_serializer=ks.ModelInferResponse.SerializeToString,
    )
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(KSERVE_SERVICE, {"ModelInfer": handler})]
    )
    bound = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    runner, http_bound = await serve_http(floor, args.host, args.http_port)
    print(f"listening on {args.host}:{bound} http {http_bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await server.stop(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an ONNX file with one (N, C, H, W) float32 input")
    p.add_argument("--name", default="model", help="the model name the answers carry")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--http-port", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-delay-us", type=float, default=500.0)
    args = p.parse_args(argv)
    import uvloop  # as cnn-serve

    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
