"""What both inference APIs share: server state (shutdown, admission counts), lookup-and-submit
with the version-swap retry, deadlines, the stream engine, and the per-call bookkeeping.

Every inference call (a unary RPC, one message of a stream, or an HTTP infer/classify request)
goes through ``Inference.handle``:
it counts the call as active, maps an exception to its gRPC status (``error_code``), and records
the call's latency and code in the metrics and the version's statistics, and whether it was
admitted, in one place. The handlers only say what a call does and how it reports an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from server.errors import ServeError, unavailable
from server.metrics import GRPC, ServerMetrics
from server.runtime.manager import ModelManager
from server.runtime.version import Retired, ServedVersion

log = logging.getLogger(__name__)
perf_counter = time.perf_counter
R = TypeVar("R")

STREAM_WINDOW = 128  # requests one stream may have in flight; beyond, we stop reading it


@dataclass
class ServerState:
    """Shared by the services and the shutdown sequence."""

    ready: bool = False  # initial repository load done
    stopping: bool = False
    active: int = 0  # inference calls (unary, or one stream message) being handled right now
    admitted: int = 0  # requests handed to a batcher
    admitted_ok: int = 0
    admitted_failed: int = 0  # admitted, then failed for any reason (must stay 0 on SIGTERM)
    streams: set[asyncio.Queue] = field(default_factory=set)  # pending queues of open streams

    def begin_shutdown(self) -> None:
        self.stopping = True
        for pending in list(self.streams):
            pending.put_nowait(None)  # wakes each stream writer: finish what was read, then end

    @property
    def serving(self) -> bool:
        """Ready for traffic: what KServe ServerReady and HTTP /v2/health/ready answer, and what
        grpc.health.v1 says for the server ("" is SERVING from start-up until shutdown begins)."""
        return self.ready and not self.stopping

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self.streams

    def summary(self) -> dict:
        return {
            "admitted": self.admitted,
            "admitted_ok": self.admitted_ok,
            "admitted_failed": self.admitted_failed,
        }


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return None
    return asyncio.get_running_loop().time() + remaining


class Call:
    """One inference request's bookkeeping: which version served it, and whether it was admitted."""

    __slots__ = ("served", "admitted")

    def __init__(self) -> None:
        self.served: ServedVersion | None = None
        self.admitted = False


class Inference:
    """Resolve -> build input -> submit -> await outputs, retried once across a version swap."""

    def __init__(self, manager: ModelManager, metrics: ServerMetrics, state: ServerState) -> None:
        self.manager = manager
        self.metrics = metrics
        self.state = state

    async def handle(
        self,
        rpc: str,
        work: Callable[[Call], Awaitable[R]],
        on_error: Callable[[grpc.StatusCode, str], Awaitable[R]],
        protocol: str = GRPC,
    ) -> R:
        """Run one inference call, ``work(call)``, with its bookkeeping around it.

        A failure becomes ``on_error(status, message)``: ``context.abort`` for a unary RPC (which
        raises), an error response for a stream message (which keeps the stream open), an HTTP
        error response (status from ``server.errors.http_status``) over HTTP.
        """
        t0 = perf_counter()
        self.state.active += 1
        call = Call()
        code = "OK"
        try:
            return await work(call)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            status, message = error_code(e)
            code = status.name
            return await on_error(status, message)
        finally:
            self._finish(call, rpc, protocol, code, perf_counter() - t0)

    async def run(
        self,
        call: Call,
        name: str,
        version: int,
        make_input: Callable[[ServedVersion], np.ndarray],
        deadline: float | None,
        offload: Callable[[Callable[[], np.ndarray]], asyncio.Future] | None = None,
        what: str = "input",
    ) -> list[np.ndarray]:
        if self.state.stopping:
            raise unavailable("server is shutting down; retry on another replica")
        for attempt in (0, 1):
            served = self.manager.resolve(name, version)
            call.served = served
            if offload is None:
                x = make_input(served)
            else:
                x = await offload(functools.partial(make_input, served))
            try:
                fut = served.submit(x, deadline, what)
            except Retired:
                # A newer version was swapped in while we decoded; a pinned version is gone for good.
                if version or attempt:
                    raise unavailable(
                        f"model {name!r} version {served.version} was just unloaded; retry"
                    ) from None
                continue
            return await self._await(call, served, fut)
        raise AssertionError("unreachable")

    async def _await(self, call: Call, served: ServedVersion, fut: asyncio.Future) -> list[np.ndarray]:
        call.admitted = True
        self.state.admitted += 1
        served.inflight += 1
        try:
            return await fut
        finally:
            served.inflight -= 1

    def _finish(self, call: Call, rpc: str, protocol: str, code: str, seconds: float) -> None:
        self.state.active -= 1
        served = call.served
        if served is None:
            self.metrics.unknown.observe_request(rpc, code, seconds, protocol)
        else:
            served.metrics.observe_request(rpc, code, seconds, protocol)
            served.record_request(code == "OK", seconds)
        if call.admitted:
            if code == "OK":
                self.state.admitted_ok += 1
            else:
                self.state.admitted_failed += 1


def error_code(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception from the inference path to (status code, message) for the caller."""
    if isinstance(e, ServeError):
        return e.code, e.message
    log.exception("unexpected error while serving a request", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"


async def serve_stream(
    request_iterator: AsyncIterator[Any],
    handle_one: Callable[[Any, float | None], Awaitable[Any]],
    state: ServerState,
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[Any]:
    """A bidirectional inference stream: ``pipelined`` responses, then, if the server is shutting
    down, the stream ends UNAVAILABLE so the client reopens it elsewhere."""
    async for response in pipelined(request_iterator, handle_one, state, deadline_of(context)):
        yield response
    if state.stopping:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, "server is shutting down; reopen the stream elsewhere"
        )


async def pipelined(request_iterator, handle_one, state: ServerState, deadline: float | None):
    """Bidirectional-stream engine: read requests as they come, run up to STREAM_WINDOW at once
    (``handle_one(request, deadline)`` returns the response, errors included), yield responses in
    request order. When the window is full we stop reading, so HTTP/2 flow control pushes back on
    the client and memory stays bounded. On shutdown, requests already read are still answered.
    """
    pending: asyncio.Queue = asyncio.Queue()
    window = asyncio.Semaphore(STREAM_WINDOW)
    state.streams.add(pending)

    async def reader() -> None:
        try:
            async for request in request_iterator:
                await window.acquire()
                if state.stopping:
                    break
                pending.put_nowait(asyncio.ensure_future(handle_one(request, deadline)))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client's half of the stream broke
            log.debug("stream reader ended: %r", e)
        finally:
            pending.put_nowait(None)

    reader_task = asyncio.create_task(reader())
    try:
        while True:
            item = await pending.get()
            if item is None:
                if not state.stopping:
                    break
                reader_task.cancel()  # shutdown: stop reading, answer what was read
                with contextlib.suppress(asyncio.CancelledError):
                    await reader_task
                while not pending.empty():
                    item = pending.get_nowait()
                    if item is not None:
                        yield await item
                break
            response = await item
            window.release()
            yield response
    finally:
        state.streams.discard(pending)
        reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader_task
        while not pending.empty():
            item = pending.get_nowait()
            if item is not None:
                item.cancel()
