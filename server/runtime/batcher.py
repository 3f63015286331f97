"""Dynamic batching: one small ``Batcher`` per model instance, all instances of a model version
sharing one ``RequestQueue`` of ``WorkItem`` (inputs + future), which hands them out in priority
order and bounds them (server.runtime.queue).

Batch formation, per instance:

1. Wait for a request; then take every request already waiting, up to ``max_batch_size`` images
   (a request that would overflow the batch is carried over to the next one, never split).
2. Idle fast path: if that first request was alone in the queue and the previous batch was a
   lone request too, run it at once: concurrency 1 pays no batching delay.
3. Otherwise (the server is under load), keep collecting until the batch is full, reaches one of
   the model's ``preferred_batch_size``, or the *oldest* request has waited ``max_delay_s``.
4. Drop requests that were cancelled or whose deadline passed; then, in the instance's executor,
   assemble the batch, check every image is finite (a request with NaN/Inf fails alone, with
   INVALID_ARGUMENT naming the first bad pixel) and run it (onnxruntime releases the GIL, so the
   event loop keeps doing I/O); hand each request its slice of every output. Exception: on the
   idle fast path, a request of at most ``inline_max_images`` runs on the event loop itself. That
   limit comes from timing the model at load: it covers only batches that compute faster than a
   thread hand-off costs (``--inline-compute-us``; small models such as LeNet), where the hop, not
   the model, is the latency; such runs use ``run_solo`` (the server's single-threaded session of the
   model). Under load the thread is always used: then compute overlaps the loop's gRPC work on
   another core. On that thread too, batches of at most ``solo_max_images`` run on the
   single-threaded session: the load-time timing found the intra-op pool not clearly faster for
   them, and its threads would take cores from the event loop (server.runtime.solo).

If a batch fails, its requests are re-run one by one so that only the bad one fails.

Tracing (server.tracing): a batch holding a traced request (``WorkItem.trace`` set) takes two
clock readings around its compute and hands them, with the instance's attributes, to each traced
request; a batch without one checks ``trace is None`` per request and nothing else.

Why the array work (concatenate, isfinite) happens on the executor thread: numpy releases the GIL
for arrays of this size (a 28x28 image is already over its threshold), and each release on the
event loop thread lets the executor thread take the GIL in the middle of the loop's gRPC work:
checking finiteness per request on the loop costs a small model a good part of its requests/s.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from time import time_ns
from typing import TYPE_CHECKING, cast

import numpy as np

from server.errors import ServeError, deadline_exceeded, internal, unavailable
from server.runtime.preprocess import nonfinite_error
from server.runtime.queue import STOP, RequestQueue, WorkItem

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

log = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray], Sequence[np.ndarray]]  # (B, C, H, W) -> [(B, ...), ...]
# (images in the batch, compute seconds, queue wait of each request in seconds)
BatchObserver = Callable[[int, float, list[float]], None]


def batch_sizes(max_batch_size: int) -> range:
    """Every batch size a Batcher with this ``max_batch_size`` can produce: requests are whole (never
    split) and of any size, so any total from 1 to the maximum."""
    return range(1, max_batch_size + 1)


class Batcher:
    def __init__(
        self,
        queue: RequestQueue,
        run_batch: RunBatch,
        executor: Executor,
        *,
        max_batch_size: int,
        max_delay_s: float,
        observe: BatchObserver | None = None,
        inline_max_images: int = 0,
        run_solo: RunBatch | None = None,
        solo_max_images: int = 0,
        preferred_batch_sizes: Sequence[int] = (),
        trace_attributes: Mapping[str, str | int] | None = None,
    ) -> None:
        self._queue = queue
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._observe = observe
        self.inline_max_images = inline_max_images
        self.solo_max_images = solo_max_images
        self._run_solo = run_solo or run_batch  # inline runs, and batches up to solo_max_images
        self._preferred = frozenset(preferred_batch_sizes)  # a batch reaching one runs at once
        self._trace_attributes = dict(trace_attributes or {})  # instance, device: on compute spans
        self._carry: WorkItem | None = None
        self._last_batch_requests = 1
        self._idle = False  # the batch being run came through the idle fast path
        self.busy = False
        self.batches = 0

    async def run(self) -> None:
        """Serve batches until a ``STOP`` is taken from the queue; every queued item is answered."""
        batch: list[WorkItem] = []
        try:
            while True:
                batch, stop = await self._collect()
                if batch:
                    self.busy = True
                    try:
                        await self._execute(batch)
                    except Exception:  # a bug here must not take the instance down
                        log.exception("batch execution failed unexpectedly")
                        _fail(batch, internal("internal error while running the batch"))
                    finally:
                        self.busy = False
                    batch = []
                if stop:
                    return
        except asyncio.CancelledError:
            # Hard stop (grace period over): whoever is still waiting learns why.
            err = unavailable("server shutting down; the request was not run")
            _fail(batch, err)
            if self._carry is not None:
                _fail([self._carry], err)
            raise

    async def _collect(self) -> tuple[list[WorkItem], bool]:
        self._idle = False
        q = self._queue
        max_n = self.max_batch_size
        if self._carry is not None:
            first, self._carry = self._carry, None
        else:
            got = await q.get()
            if got is STOP:
                return [], True
            assert isinstance(got, WorkItem)
            first = got
        batch = [first]
        n = first.n
        # 1. Everything already waiting, up to a full batch.
        while n < max_n and (item := q.take()) is not None:
            stop, n = self._add(batch, n, item)
            if stop or self._carry is not None:
                return self._done(batch), stop
        # 2. Idle fast path: a lone request after a lone request runs now; so does a batch of a
        #    preferred size (config.pbtxt preferred_batch_size).
        idle = len(batch) == 1 and self._last_batch_requests == 1
        if n >= max_n or self.max_delay_s <= 0 or idle or n in self._preferred:
            self._idle = idle
            return self._done(batch), False
        # 3. Under load: wait for more until the oldest request has waited max_delay_s.
        loop = asyncio.get_running_loop()
        fill_deadline = first.enqueued + self.max_delay_s
        while n < max_n and loop.time() < fill_deadline:
            try:
                async with asyncio.timeout_at(fill_deadline):
                    got = await q.get()
            except TimeoutError:
                break
            stop, n = self._add(batch, n, got)
            if stop or self._carry is not None or n in self._preferred:
                return self._done(batch), stop
        return self._done(batch), False

    def _add(self, batch: list[WorkItem], n: int, item: WorkItem | object) -> tuple[bool, int]:
        """Append ``item`` to ``batch`` of ``n`` images; carry it to the next batch instead when it
        would overflow this one (requests are never split). -> (it was STOP, images now)."""
        if item is STOP:
            return True, n
        assert isinstance(item, WorkItem)
        if n + item.n > self.max_batch_size:
            self._carry = item
            return False, n
        batch.append(item)
        return False, n + item.n

    def _done(self, batch: list[WorkItem]) -> list[WorkItem]:
        self._last_batch_requests = len(batch)
        return batch

    def _take_idle(self) -> bool:
        idle, self._idle = self._idle, False
        return idle

    async def _execute(self, batch: list[WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        live = []
        traced = False
        for item in batch:
            if item.future.done():  # cancelled by the client while queued
                continue
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(deadline_exceeded("deadline expired while the request was queued"))
                continue
            live.append(item)
            if item.trace is not None:
                traced = True
        if not live:
            return
        waits = [now - item.enqueued for item in live]
        # The loop's clock is as coarse as a millisecond (uvloop): spans take their own readings.
        started_ns = time_ns() if traced else 0
        try:
            outputs, finite = await self._run_checked([item.inputs for item in live], self._take_idle())
        except Exception as e:
            if len(live) == 1:
                _fail(live, _as_serve_error(e))
            else:
                await self._isolate(live)
            return
        if outputs is None:  # some image is NaN/Inf: fail those requests, run the others
            await self._execute(_reject_nonfinite(live, finite))
            return
        ended_ns = time_ns() if traced else 0
        compute = loop.time() - now
        self.batches += 1
        if self._observe is not None:
            self._observe(int(outputs[0].shape[0]), compute, waits)
        start = 0
        for item in live:
            stop = start + item.n
            if not item.future.done():
                item.future.set_result([out[start:stop] for out in outputs])
            start = stop
        if traced:
            self._trace(live, started_ns, ended_ns, int(outputs[0].shape[0]))

    def _trace(self, live: list[WorkItem], started_ns: int, ended_ns: int, images: int) -> None:
        """The traced requests of a batch get its queue-wait end and its compute span (after their
        answers are set: a tracing failure is logged, never a failed batch)."""
        attributes = {**self._trace_attributes, "batch.images": images, "batch.requests": len(live)}
        try:
            for item in live:
                if item.trace is not None:
                    item.trace.batch(started_ns, ended_ns, attributes)
        except Exception:
            log.warning("tracing: could not record a batch's spans", exc_info=True)

    async def _run_checked(self, arrays: list[np.ndarray], idle: bool = False):
        """-> (outputs, None), or (None, finite (B,) bool) when some image is NaN/Inf."""
        n = sum(a.shape[0] for a in arrays)
        if idle and n <= self.inline_max_images:  # cheaper than the thread hand-off (see module doc)
            return self._assemble_and_run(arrays, solo=True)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._assemble_and_run, arrays, n <= self.solo_max_images
        )

    def _assemble_and_run(self, arrays: list[np.ndarray], solo: bool = False):
        # A lone request runs on its own array (no copy); a batch is copied into one new array.
        x = arrays[0] if len(arrays) == 1 else self._concat(arrays)  # (B, C, H, W)
        # One reduction: a float64 sum of float32 pixels cannot overflow, so it is finite exactly
        # when every pixel is. Only when it is not, look image by image.
        if not math.isfinite(float(x.sum(dtype=np.float64))):
            finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)  # (B,)
            if not finite.all():
                return None, finite
        return (self._run_solo if solo else self._run_batch)(x), None

    async def _run(self, x: np.ndarray):
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, x)

    @staticmethod
    def _concat(arrays: list[np.ndarray]) -> np.ndarray:
        """The requests' (n, C, H, W) float32 arrays -> one (B, C, H, W) batch. ``bytes.join`` copies
        them with the GIL held, where ``np.concatenate`` lets go of it and takes it back once per
        array, and each take waits for the event loop's thread (see the module doc)."""
        joined = b"".join([_c_float32(a) for a in arrays])
        return np.frombuffer(joined, dtype=np.float32).reshape(-1, *arrays[0].shape[1:])

    async def _isolate(self, live: list[WorkItem]) -> None:
        """The batch failed: run each request alone so that only the bad ones fail."""
        for item in live:
            if item.future.done():
                continue
            try:
                outputs = await self._run(item.inputs)
            except Exception as e:
                if not item.future.done():
                    item.future.set_exception(_as_serve_error(e))
                continue
            if not item.future.done():
                item.future.set_result(list(outputs))


def _c_float32(a: np.ndarray) -> Buffer:
    """``a`` as C-contiguous float32 bytes (the arrays the protocols build already are)."""
    if not (a.flags.c_contiguous and a.dtype == np.float32):
        a = np.ascontiguousarray(a, dtype=np.float32)
    return cast("Buffer", a)


def _reject_nonfinite(live: list[WorkItem], finite: np.ndarray) -> list[WorkItem]:
    """Fail the requests holding a NaN/Inf image (``finite``: (B,) over the batch); return the rest."""
    rest, start = [], 0
    for item in live:
        stop = start + item.n
        if finite[start:stop].all():
            rest.append(item)
        elif not item.future.done():
            item.future.set_exception(nonfinite_error(item.inputs, item.what))
        start = stop
    return rest


def _as_serve_error(e: BaseException) -> ServeError:
    if isinstance(e, ServeError):
        return e
    return internal(f"inference failed: {type(e).__name__}: {e}")


def _fail(items: list[WorkItem], err: ServeError) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(err)
