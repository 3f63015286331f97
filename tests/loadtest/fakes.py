"""A tiny Classifier server with controllable delay, stall and error injection, on 127.0.0.1:0.

``fake_server`` runs it on its own event loop in a background thread, so the load-test code under
test can run its own (uv)loop in the test thread exactly as the CLI does. ``fake_server_process``
runs it in a child process (``python -m tests.loadtest.fakes``, driven by JSON lines on stdin/stdout), for
timing tests: a server in the test's process shares its GIL, and its work after a stall would delay
the client being timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc

FAKE_MODEL = "fake"
FAKE_SHAPE = (1, 8, 8)


@dataclass
class Behaviour:
    delay_s: float = 0.0
    stall_until: float = 0.0  # perf_counter instant: requests wait until then
    # Every request whose arrival number n (1-based) has n % every == 0 fails with code, and so
    # does every request with fail_from <= n < fail_until.
    fail_every: int = 0
    fail_from: int = 0
    fail_until: int = 0
    fail_code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED
    capacity: int = 0  # > 0: at most this many requests served at once (each delay_s), the rest wait
    received: int = 0
    answered: Counter = field(default_factory=Counter)  # status code name -> count
    arrivals: list[float] = field(default_factory=list)
    last_request: pb.ClassifyRequest | None = None
    inflight: int = 0
    max_inflight: int = 0
    peers: Counter = field(default_factory=Counter)  # client connection ("ipv4:IP:PORT") -> requests
    metadata: list[dict[str, str]] = field(default_factory=list)  # per Classify: what the call carried
    listing_metadata: list[dict[str, str]] = field(default_factory=list)  # per ListModels


def carried(metadata: object) -> dict[str, str]:
    """The headers the load tester may add (authorization, traceparent), as they arrived."""
    pairs: Iterable[tuple[str, str]] = metadata or ()  # type: ignore[assignment]
    return {k: v for k, v in pairs if k in ("authorization", "traceparent")}


class FakeClassifier(pb_grpc.ClassifierServicer):
    def __init__(self, b: Behaviour) -> None:
        self.b = b
        self._slots: asyncio.Semaphore | None = None

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        b = self.b
        b.inflight += 1
        b.max_inflight = max(b.max_inflight, b.inflight)
        try:
            return await self._classify(request, context)
        finally:
            b.inflight -= 1

    async def _classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        b = self.b
        b.received += 1
        n = b.received
        b.arrivals.append(time.perf_counter())
        b.last_request = request
        b.peers[context.peer()] += 1
        b.metadata.append(carried(context.invocation_metadata()))
        if request.model != FAKE_MODEL:
            b.answered["NOT_FOUND"] += 1
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        if (wait := b.stall_until - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        if b.capacity:
            self._slots = self._slots or asyncio.Semaphore(b.capacity)
            async with self._slots:
                await asyncio.sleep(b.delay_s)
        elif b.delay_s:
            await asyncio.sleep(b.delay_s)
        if (b.fail_every and n % b.fail_every == 0) or b.fail_from <= n < b.fail_until:
            b.answered[b.fail_code.name] += 1
            await context.abort(b.fail_code, "injected")
        b.answered["OK"] += 1
        results = [
            pb.Classification(predictions=[pb.Prediction(class_index=0, probability=1.0)])
            for _ in request.images
        ]
        return pb.ClassifyResponse(model=request.model, results=results, request_id=request.request_id)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        self.b.listing_metadata.append(carried(context.invocation_metadata()))
        d = pb.ModelDescription(
            name=FAKE_MODEL, version=1, versions=[1], input_shape=list(FAKE_SHAPE), max_batch_size=8
        )
        return pb.ListModelsResponse(models=[d])


@dataclass
class FakeServer:
    port: int
    behaviour: Behaviour

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


async def _start(behaviour: Behaviour) -> tuple[grpc.aio.Server, int]:
    """The fake Classifier on 127.0.0.1, a free port; started on the running loop."""
    server = grpc.aio.server()
    pb_grpc.add_ClassifierServicer_to_server(FakeClassifier(behaviour), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    behaviour = Behaviour()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    async def start() -> None:
        box["server"], box["port"] = await _start(behaviour)
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    assert started.wait(10)
    try:
        yield FakeServer(box["port"], behaviour)
    finally:
        asyncio.run_coroutine_threadsafe(box["server"].stop(0), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@dataclass
class FakeHttpServer:
    """A KServe v2 REST server for model ``fake`` (JSON replies), recording what each request carried."""

    port: int
    infer_headers: list[dict[str, str]] = field(default_factory=list)
    metadata_headers: list[dict[str, str]] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def _http_app(rec: FakeHttpServer) -> Any:
    from aiohttp import web

    def heard(request: web.Request) -> dict[str, str]:
        return carried((k.lower(), v) for k, v in request.headers.items())

    async def metadata(request: web.Request) -> web.Response:
        rec.metadata_headers.append(heard(request))
        inputs = [{"name": "input", "datatype": "FP32", "shape": [-1, *FAKE_SHAPE]}]
        return web.json_response(
            {"name": FAKE_MODEL, "inputs": inputs, "outputs": [{"name": "probabilities"}]}
        )

    async def infer(request: web.Request) -> web.Response:
        rec.infer_headers.append(heard(request))
        body = await request.read()
        doc = json.loads(body[: int(request.headers.get("Inference-Header-Content-Length", len(body)))])
        n = doc["inputs"][0]["shape"][0]
        out = {"name": "probabilities", "datatype": "FP32", "shape": [n, 3], "data": [0.0] * (3 * n)}
        return web.json_response({"model_name": FAKE_MODEL, "outputs": [out]})

    app = web.Application()
    app.router.add_get(f"/v2/models/{FAKE_MODEL}", metadata)
    app.router.add_post(f"/v2/models/{FAKE_MODEL}/infer", infer)
    return app


@pytest.fixture
def fake_http_server() -> Iterator[FakeHttpServer]:
    from aiohttp import web

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    rec = FakeHttpServer(0)

    async def start() -> web.AppRunner:
        runner = web.AppRunner(_http_app(rec))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        rec.port = runner.addresses[0][1]
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield rec
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


class RemoteFakeServer:
    """The fake server in a child process. Its ``Behaviour`` lives there: ``set`` changes its
    plain fields, ``stop`` ends the process and returns the fields as a dict. ``stall_until`` and
    ``arrivals`` are ``time.perf_counter()`` instants; on Linux that is CLOCK_MONOTONIC, one
    clock for every process, so the test's instants and the child's compare directly."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.loadtest.fakes"],
            cwd=Path(__file__).resolve().parents[2],  # the checkout: where `tests` is a package
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self._reply()["port"])
        self.state: dict | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _reply(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fake server process exited (rc {self.proc.wait(10)})")
        return dict(json.loads(line))

    def _send(self, cmd: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def set(self, **fields: float) -> None:
        self._send({"set": fields})

    def stop(self) -> dict:
        if self.state is None:
            self.state = self._send({"stop": True})
            self.proc.wait(timeout=10)
        return self.state

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def fake_server_process() -> Iterator[RemoteFakeServer]:
    server = RemoteFakeServer()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):  # already gone or wedged: kill() makes sure it is
            server.stop()
        server.kill()


async def _serve_stdio() -> None:
    """The child of ``RemoteFakeServer``: one JSON line out with the port, then one reply per command."""
    behaviour = Behaviour()
    server, port = await _start(behaviour)
    print(json.dumps({"port": port}), flush=True)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):  # "" once the parent is gone
            cmd = json.loads(line)
            if "set" in cmd:
                for name, value in cmd["set"].items():
                    getattr(behaviour, name)  # only existing fields
                    setattr(behaviour, name, value)
                print(json.dumps({"ok": True}), flush=True)
            elif "stop" in cmd:
                b = behaviour
                state = {
                    "received": b.received,
                    "answered": dict(b.answered),
                    "arrivals": b.arrivals,
                    "max_inflight": b.max_inflight,
                    "stall_until": b.stall_until,
                }
                print(json.dumps(state), flush=True)
                break
    finally:
        await server.stop(0)


if __name__ == "__main__":
    asyncio.run(_serve_stdio())
