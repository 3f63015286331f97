"""A tiny Classifier server with controllable delay, stall and error injection, on 127.0.0.1:0.

It runs on its own event loop in a background thread, so the load-test code under test can run
its own (uv)loop in the test thread exactly as the CLI does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

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
    # Every request whose arrival number n (1-based) has n % every == 0 fails with code.
    fail_every: int = 0
    fail_code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED
    received: int = 0
    answered: Counter = field(default_factory=Counter)  # status code name -> count
    arrivals: list[float] = field(default_factory=list)
    last_request: pb.ClassifyRequest | None = None
    inflight: int = 0
    max_inflight: int = 0


class FakeClassifier(pb_grpc.ClassifierServicer):
    def __init__(self, b: Behaviour) -> None:
        self.b = b

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
        if request.model != FAKE_MODEL:
            b.answered["NOT_FOUND"] += 1
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        if (wait := b.stall_until - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        if b.delay_s:
            await asyncio.sleep(b.delay_s)
        if b.fail_every and n % b.fail_every == 0:
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


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    behaviour = Behaviour()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    async def start() -> None:
        server = grpc.aio.server()
        pb_grpc.add_ClassifierServicer_to_server(FakeClassifier(behaviour), server)
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        box["server"] = server
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
