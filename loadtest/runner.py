"""The load generators, run inside one client process on one asyncio (uvloop) event loop.

Closed loop: ``concurrency`` workers, each sends its next request when the previous one answers;
latency is measured from the actual send.

Open loop: a schedule of send times (``loadtest.schedule``: Poisson, constant or replayed gaps)
is drawn before the step starts; each request is sent at its scheduled time whatever the server
is doing, and its latency is measured from the *scheduled* time, so queueing caused by a slow
server (or by this client falling behind) shows in the numbers instead of silently lowering the
offered rate ("coordinated omission"). Its service time, from the actual send, is kept beside it.

Both report measurement windows to a ``sink`` as they close and stop when ``should_stop()`` turns
true, at the hard time bound, or after ``max_requests``; in-flight requests then finish (each has
a deadline) so that, at the end, sent == ok + errors.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from loadtest.schedule import build_schedule

TICK_S = 0.02  # how often the monitor looks at the stop flag between window boundaries
CLIENT_OVERLOAD = "CLIENT_OVERLOAD"  # open loop: a due request not sent because max_inflight were pending


class CallFailed(Exception):
    """A request that got no good answer over a transport other than gRPC; ``code`` is what the
    report counts it as (gRPC failures count by their status code name)."""

    def __init__(self, code: str, details: str = "") -> None:
        super().__init__(f"{code}: {details}" if details else code)
        self.code, self.details = code, details


@dataclass(frozen=True)
class StepSpec:
    """One step of the sweep, for one client process (``load`` already divided among processes)."""

    mode: str  # "closed" | "open"
    load: float  # closed: requests in flight; open: requests/s
    warmup_s: float
    window_s: float
    duration_s: float
    max_requests: int
    timeout_s: float
    max_inflight: int = 10_000
    seed: int = 0
    distribution: str = "poisson"  # open loop: "poisson", "constant" or "replay" (of intervals_s)
    intervals_s: tuple[float, ...] = ()  # replay: the recorded gaps, cycled
    percentile: float = 99.0  # an SLO's percentile: reported beside p50..p99 when not one of them
    part: int = 0  # this process's index among ``parts`` sharing the step
    parts: int = 1

    def share(self, index: int, processes: int) -> StepSpec:
        """This spec's part for client process ``index`` of ``processes``."""
        if self.mode == "closed":
            base, extra = divmod(int(self.load), processes)
            load: float = base + (1 if index < extra else 0)
        else:
            load = self.load / processes
        seed = self.seed * 1000 + index
        return StepSpec(**{**self.__dict__, "load": load, "seed": seed, "part": index, "parts": processes})


@dataclass
class WindowData:
    """What one process saw in one window: successful latencies (s), images, errors by code;
    open loop: also the service times (s, from the actual send; latencies count from the schedule)."""

    index: int
    latencies: list[float]
    images: int
    errors: dict[str, int]
    length_s: float
    partial: bool = False  # the run ended before the window closed
    service: list[float] = field(default_factory=list)


@dataclass
class ProcessTotals:
    """Whole-step counts for one process, warm-up included: sent == ok + sum(errors)."""

    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    send_lag_s: list[float] = field(default_factory=list)  # open loop: actual send - scheduled send


class _Recorder:
    """Completions in the order they happen (so ``ends`` never decreases within a process)."""

    def __init__(self, images_per_request: int, open_loop: bool = False) -> None:
        self.k = images_per_request
        self.ends: list[float] = []
        self.lats: list[float] = []
        self.service: list[float] | None = [] if open_loop else None  # closed loop: the latency itself
        self.err_ends: list[float] = []
        self.err_codes: list[str] = []
        self.totals = ProcessTotals()
        self._i = 0  # first success not yet assigned to a window
        self._j = 0  # same for errors

    def ok(self, due: float, sent: float, end: float) -> None:
        self.ends.append(end)
        self.lats.append(end - due)
        if self.service is not None:
            self.service.append(end - sent)

    def error(self, code: str, end: float) -> None:
        self.err_ends.append(end)
        self.err_codes.append(code)

    def take_window(self, index: int, lo: float, hi: float, partial: bool = False) -> WindowData:
        """Records that completed in [lo, hi); earlier ones (warm-up) are skipped."""
        i, n = self._i, len(self.ends)
        while i < n and self.ends[i] < lo:
            i += 1
        first = i
        while i < n and self.ends[i] < hi:
            i += 1
        lats = self.lats[first:i]
        service = self.service[first:i] if self.service is not None else []
        self._i = i
        j, m = self._j, len(self.err_ends)
        while j < m and self.err_ends[j] < lo:
            j += 1
        first_err = j
        while j < m and self.err_ends[j] < hi:
            j += 1
        errors = dict(Counter(self.err_codes[first_err:j]))
        self._j = j
        return WindowData(index, lats, len(lats) * self.k, errors, hi - lo, partial, service)


async def _one(call: Any, payload: bytes, due: float | None, timeout: float, rec: _Recorder) -> None:
    """One request; its latency counts from ``due`` (open loop: the scheduled send), else from now."""
    sent = time.perf_counter()
    try:
        await call(payload, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        rec.error(e.code().name, time.perf_counter())
    except CallFailed as e:
        rec.error(e.code, time.perf_counter())
    else:
        rec.ok(sent if due is None else due, sent, time.perf_counter())


class _State:
    def __init__(self, limit: int) -> None:
        self.stop = False
        self.sent = 0
        self.limit = limit


async def _closed_loop(
    call: Any, payloads: Sequence[bytes], spec: StepSpec, rec: _Recorder, st: _State
) -> None:
    n = len(payloads)

    async def worker(w: int) -> None:
        i = w
        while not st.stop and st.sent < st.limit:
            st.sent += 1
            await _one(call, payloads[i % n], None, spec.timeout_s, rec)
            i += int(spec.load)

    await asyncio.gather(*(worker(w) for w in range(int(spec.load))))


async def _open_loop(
    call: Any,
    payloads: Sequence[bytes],
    schedule: Sequence[float],
    t0: float,
    spec: StepSpec,
    rec: _Recorder,
    st: _State,
) -> None:
    n = len(payloads)
    pending: set[asyncio.Task[None]] = set()
    lag = rec.totals.send_lag_s
    for i, offset in enumerate(schedule):
        due = t0 + offset
        # Never early: an event loop's timer may fire up to its resolution (uvloop: 1 ms) before
        # ``due``, and a request sent early would show a service time above its latency.
        while (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        if st.stop or st.sent >= st.limit:
            break
        st.sent += 1
        if len(pending) >= spec.max_inflight:
            rec.error(CLIENT_OVERLOAD, time.perf_counter())
            continue
        lag.append(time.perf_counter() - due)
        # Latency counts from ``due``: time this request spent waiting to be sent is the server's fault.
        task = asyncio.ensure_future(_one(call, payloads[i % n], due, spec.timeout_s, rec))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=spec.timeout_s + 1.0)


async def run_process_step(
    call: Any,
    payloads: Sequence[bytes],
    spec: StepSpec,
    images_per_request: int,
    t0: float,
    sink: Callable[[WindowData], None],
    should_stop: Callable[[], bool],
) -> ProcessTotals:
    """Run one step from ``t0`` (a ``time.perf_counter()`` instant; CLOCK_MONOTONIC on Linux, so
    shared by all client processes). Windows start after the warm-up and go to ``sink``."""
    rec = _Recorder(images_per_request, open_loop=spec.mode == "open")
    st = _State(spec.max_requests)
    measure_start = t0 + spec.warmup_s
    # Hard bound: the controller normally stops after ``duration_s``; one window of slack for it.
    hard_end = measure_start + spec.duration_s + spec.window_s
    if (wait := t0 - time.perf_counter()) > 0:
        await asyncio.sleep(wait)
    if spec.mode == "closed":
        gen = asyncio.ensure_future(_closed_loop(call, payloads, spec, rec, st))
    else:
        horizon = hard_end - t0
        sched = build_schedule(
            spec.distribution,
            spec.load,
            spec.intervals_s,
            horizon,
            spec.seed,
            spec.max_requests,
            spec.part,
            spec.parts,
        )
        gen = asyncio.ensure_future(_open_loop(call, payloads, sched, t0, spec, rec, st))
    k = 0
    while True:
        now = time.perf_counter()
        boundary = measure_start + (k + 1) * spec.window_s
        if now >= boundary:
            sink(rec.take_window(k, boundary - spec.window_s, boundary))
            k += 1
            continue
        if should_stop() or now >= hard_end or gen.done():
            break
        await asyncio.sleep(min(boundary - now, TICK_S))
    st.stop = True
    await gen
    # Whatever completed after the last full window (used only when no window closed at all).
    end = max(time.perf_counter(), measure_start)
    lo = measure_start + k * spec.window_s
    sink(rec.take_window(k, lo, end + 1e-9, partial=True))
    totals = rec.totals
    totals.sent = st.sent
    totals.ok = len(rec.ends)
    totals.errors = dict(Counter(rec.err_codes))
    return totals


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (grpc.aio and aiohttp spend less per request on it), else asyncio's default."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()
