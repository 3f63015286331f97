"""The data plane every protocol adapter calls: server state (shutdown, admission counts),
lookup-and-submit with the version-swap retry, and the per-call bookkeeping.

Every inference call (a unary RPC, one message of a stream, or an HTTP infer/classify request)
goes through ``Inference.handle``: it counts the call as active, maps an exception to its gRPC
status (``error_code``), and records the call's latency and code in the metrics and the version's
statistics, and whether it was admitted, in one place. ``Inference.run`` builds the request's
input for the version it resolved (decoding large encoded images on the decode pool, off the
event loop) and awaits its batch, unless the response cache answers it. The adapters only say
what a call does and how it reports an error, and pass their carrier (servicer context, HTTP
request) for the observer (server.api.observe: traces, JSON log fields, the access log), which
exists only when one is on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import numpy as np

from server.api.observe import Observer
from server.errors import ServeError, invalid, unavailable
from server.metrics import GRPC, ServerMetrics
from server.runtime.cache import Key
from server.runtime.manager import ModelManager
from server.runtime.version import Retired, ServedVersion
from server.tracing import RequestTrace

log = logging.getLogger(__name__)
perf_counter = time.perf_counter
R = TypeVar("R")


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


def parse_version(text: str) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise invalid(f"model_version must be a positive integer or empty (latest), got {text!r}")
    return int(text)


class Call:
    """One inference request's bookkeeping: which version served it, whether it was admitted, and
    its trace (None unless tracing is on and this request is sampled; server.api.observe)."""

    __slots__ = ("served", "admitted", "span")

    def __init__(self) -> None:
        self.served: ServedVersion | None = None
        self.admitted = False
        self.span: RequestTrace | None = None

    def log_fields(self) -> dict[str, object]:
        """What JSON log lines logged while handling it carry (server.logs)."""
        out: dict[str, object] = {}
        if self.served is not None:
            out["model"], out["version"] = self.served.name, self.served.version
        if self.span is not None:
            out["trace_id"], out["span_id"] = self.span.trace_id, self.span.span_id
        return out


class Inference:
    """Resolve -> build input -> submit -> await outputs, retried once across a version swap."""

    def __init__(
        self,
        manager: ModelManager,
        metrics: ServerMetrics,
        state: ServerState,
        decode_executor: Executor | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.state = state
        self._decode_executor = decode_executor  # None: every input is built on the event loop
        self.observer = observer  # None: no tracing, JSON log fields or access log (no cost)

    async def handle(
        self,
        rpc: str,
        work: Callable[[Call], Awaitable[R]],
        on_error: Callable[[grpc.StatusCode, str], Awaitable[R]],
        protocol: str = GRPC,
        carrier: object = None,
    ) -> R:
        """Run one inference call, ``work(call)``, with its bookkeeping around it.

        A failure becomes ``on_error(status, message)``: ``context.abort`` for a unary RPC (which
        raises), an error response for a stream message (which keeps the stream open), an HTTP
        error response (status from ``server.errors.http_status``) over HTTP. ``carrier``: the
        gRPC servicer context or the aiohttp request, read only by the observer (trace context,
        peer) when one is on.
        """
        t0 = perf_counter()
        self.state.active += 1
        call = Call()
        observer = self.observer
        token = observer.begin(call, rpc, protocol, carrier) if observer is not None else None
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
            seconds = perf_counter() - t0
            self._finish(call, rpc, protocol, code, seconds)
            if observer is not None:
                observer.end(call, rpc, protocol, code, seconds, carrier, token)

    async def run(
        self,
        call: Call,
        name: str,
        version: int,
        make_input: Callable[[ServedVersion], np.ndarray],
        deadline: float | None,
        offload: bool = False,
        what: str = "input",
        priority: int = 0,
        timeout_us: int = 0,
    ) -> tuple[ServedVersion, list[np.ndarray]]:
        """``make_input(served)`` -> (n, C, H, W) for the version ``name``/``version`` resolves to,
        run in its batch: (that version, the request's outputs). ``offload``: build the input on
        the decode pool (large encoded images). ``priority`` and ``timeout_us``: the request's
        place in the model's queue policy (0: the model's defaults; server.runtime.queue)."""
        if self.state.stopping:
            raise unavailable("server is shutting down; retry on another replica")
        for attempt in (0, 1):
            served = self.manager.resolve(name, version)
            call.served = served
            if offload and self._decode_executor is not None:
                loop = asyncio.get_running_loop()
                x = await loop.run_in_executor(self._decode_executor, make_input, served)
            else:
                x = make_input(served)
            key, cached = self._cached(call, served, x)
            if cached is not None:
                return served, cached  # a cache hit: never queued, never batched
            try:
                fut = served.submit(x, deadline, what, priority, timeout_us, trace=call.span)
            except Retired:
                # A newer version was swapped in while we decoded; a pinned version is gone for good.
                if version or attempt:
                    raise unavailable(
                        f"model {name!r} version {served.version} was just unloaded; retry"
                    ) from None
                continue
            outputs = await self._await(call, served, fut)
            if key is not None and (cache := self.manager.cache) is not None:
                cache.put(served, key, outputs)
            return served, outputs
        raise AssertionError("unreachable")

    def _cached(
        self, call: Call, served: ServedVersion, x: np.ndarray
    ) -> tuple[Key | None, list[np.ndarray] | None]:
        """The response cache (server/runtime/cache.py): (key to store the outputs under after a miss,
        the cached outputs on a hit). A hit is an admitted request, answered at once."""
        cache = self.manager.cache
        if cache is None:
            return None, None
        key, cached = cache.lookup(served, x)
        if cached is not None:
            call.admitted = True
            self.state.admitted += 1
        return key, cached

    def parse(self, call: Call, name: str, version: int, parse: Callable[[], R]) -> R:
        """``parse()`` a request body; when it fails, an unknown model is still NOT_FOUND first, as
        over gRPC (where the model is resolved before its input is read)."""
        try:
            return parse()
        except ServeError:
            call.served = self.manager.resolve(name, version)
            raise

    async def _await(self, call: Call, served: ServedVersion, fut: asyncio.Future) -> list[np.ndarray]:
        call.admitted = True
        self.state.admitted += 1
        served.inflight += 1
        try:
            outputs = await fut
        finally:
            served.inflight -= 1
        if call.span is not None:
            call.span.outputs_ready()
        return outputs

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
