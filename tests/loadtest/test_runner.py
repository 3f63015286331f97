"""The load generators against a fake server with injected delay, stalls and errors."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from loadtest.client import LocalClient
from loadtest.payload import build_payloads
from loadtest.runner import StepSpec
from tests.loadtest.fakes import FAKE_MODEL, FAKE_SHAPE, FakeServer, RemoteFakeServer


def _payloads(k: int = 1, model: str = FAKE_MODEL) -> list[bytes]:
    images = np.random.default_rng(0).random((8 * k, *FAKE_SHAPE), dtype=np.float32)
    return build_payloads("classify", images, k, model, 0)


def _client(
    server: FakeServer | RemoteFakeServer, k: int = 1, stability: tuple[int, float] = (3, 10.0)
) -> LocalClient:
    return LocalClient(server.target, "classify", _payloads(k), k, *stability)


def _spec(mode: str, load: float, **kw: float) -> StepSpec:
    base = dict(warmup_s=0.2, window_s=0.5, duration_s=3.0, max_requests=100_000, timeout_s=5.0)
    return StepSpec(mode, load, **{**base, **kw})  # type: ignore[arg-type]


def test_closed_loop_sends_exactly_max_requests(fake_server: FakeServer) -> None:
    client = _client(fake_server, k=3)
    try:
        r = client.run_step(_spec("closed", 4, max_requests=250, duration_s=10.0))
    finally:
        client.close()
    assert r.sent == r.ok == 250
    assert fake_server.behaviour.answered["OK"] == 250
    assert r.errors_total == {}


def test_closed_loop_keeps_concurrency_requests_in_flight(fake_server: FakeServer) -> None:
    # Each request takes >= 20 ms, so C in flight gives at most C / 0.02 requests/s.
    b = fake_server.behaviour
    b.delay_s = 0.02
    client = _client(fake_server)
    try:
        r1 = client.run_step(_spec("closed", 1, duration_s=1.5))
        one_at_a_time = b.max_inflight
        r8 = client.run_step(_spec("closed", 8, duration_s=1.5))
    finally:
        client.close()
    assert one_at_a_time == 1 and b.max_inflight == 8  # exactly C in flight, never more
    assert 0 < r1.requests_per_s <= 52 and 0 < r8.requests_per_s <= 8 * 52
    assert r8.latency_ms["p50_ms"] >= 20.0
    assert r8.sent == r8.ok == b.answered["OK"] - r1.ok


def test_step_stops_early_once_stable(fake_server: FakeServer) -> None:
    fake_server.behaviour.delay_s = 0.005
    client = _client(fake_server, stability=(3, 60.0))  # lenient: CI boxes are noisy; the rule is unit-tested
    start = time.perf_counter()
    try:
        r = client.run_step(_spec("closed", 4, window_s=0.4, duration_s=8.0))
    finally:
        client.close()
    elapsed = time.perf_counter() - start
    assert r.stable
    assert 3 <= r.windows < 20 and elapsed < 6.0  # did not run to the 8 s bound
    assert r.measured_s == pytest.approx(3 * 0.4)
    assert len(r.window_series) == r.windows


def test_unstable_step_is_bounded_by_duration_and_flagged(fake_server: FakeServer) -> None:
    # The server stalls for 0.6 s in every 1.0 s: windows alternate between busy and empty.
    b = fake_server.behaviour
    client = _client(fake_server, stability=(3, 5.0))
    b.stall_until = time.perf_counter() + 0.9
    start = time.perf_counter()
    try:
        r = client.run_step(_spec("closed", 2, window_s=0.3, duration_s=1.5, warmup_s=0.0))
    finally:
        client.close()
    assert not r.stable
    assert r.windows == 5  # duration / window
    assert time.perf_counter() - start < 1.5 + 5.0 + 2.0


def test_open_loop_keeps_its_rate_while_the_server_stalls(fake_server_process: RemoteFakeServer) -> None:
    # The server runs in its own process: one in this process would share the client's GIL, and
    # flushing its ~160-request backlog after the stall would delay the sender under test.
    rate = 200.0
    client = _client(fake_server_process, stability=(100, 1.0))  # never "stable": run the full duration
    stall_until = time.perf_counter() + 0.05 + 0.2 + 0.8  # stalls for the first ~0.8 s after warm-up
    fake_server_process.set(stall_until=stall_until)
    try:
        r = client.run_step(_spec("open", rate, warmup_s=0.2, window_s=0.5, duration_s=2.0))
    finally:
        client.close()
    b = fake_server_process.stop()
    assert r.mode == "open" and r.errors_total == {}
    # Sends did not slip: the client kept sending on schedule through the 0.8 s stall. (A sender
    # that waited for answers would be ~800 ms late; the bounds leave room for a busy CI box.)
    assert r.send_lag_ms is not None
    assert r.send_lag_ms["p50_ms"] < 5.0 and r.send_lag_ms["max_ms"] < 250.0
    arrivals = np.array(b["arrivals"])
    assert len(arrivals) == r.sent == b["answered"]["OK"]
    stall_part = arrivals[arrivals < stall_until]
    assert len(stall_part) / (stall_until - arrivals[0]) == pytest.approx(rate, rel=0.3)
    # Offered load over the whole step matches the rate (Poisson: +-4 sigma at ~550 arrivals).
    horizon = 0.2 + 2.0 + 0.5
    assert r.sent / horizon == pytest.approx(rate, rel=0.2)
    # Latency counts from the schedule: requests sent early in the stall waited ~0.8 s.
    assert r.latency_ms["max_ms"] > 600.0
    # First window is during the stall: nothing completed in it, all queued work completes later.
    assert r.window_series[0]["requests_per_s"] == 0.0


def test_errors_are_counted_by_status_code(fake_server: FakeServer) -> None:
    b = fake_server.behaviour
    b.fail_every, b.fail_code = 4, grpc.StatusCode.RESOURCE_EXHAUSTED
    client = _client(fake_server)
    try:
        r = client.run_step(_spec("closed", 4, max_requests=200, duration_s=10.0))
    finally:
        client.close()
    assert r.errors_total == {"RESOURCE_EXHAUSTED": 50}
    assert r.ok == 150 and r.sent == 200
    assert b.answered == {"OK": 150, "RESOURCE_EXHAUSTED": 50}


def test_unknown_model_errors_are_not_found(fake_server: FakeServer) -> None:
    client = LocalClient(fake_server.target, "classify", _payloads(model="nope"), 1, 3, 10.0)
    try:
        r = client.run_step(_spec("closed", 2, max_requests=20, duration_s=5.0))
    finally:
        client.close()
    assert r.errors_total == {"NOT_FOUND": 20} and r.ok == 0
    assert np.isnan(r.latency_ms["p50_ms"])  # failed requests are not latency samples


def test_deadline_exceeded_is_an_error_code(fake_server: FakeServer) -> None:
    fake_server.behaviour.delay_s = 0.5
    client = _client(fake_server)
    try:
        r = client.run_step(_spec("closed", 2, max_requests=4, duration_s=5.0, timeout_s=0.1))
    finally:
        client.close()
    assert r.errors_total == {"DEADLINE_EXCEEDED": 4}


def test_open_loop_counts_requests_it_could_not_send_as_client_overload(fake_server: FakeServer) -> None:
    # 100/s offered, each answer takes 0.2 s, at most 2 in flight: ~10 answered/s, the rest refused
    # by the client (counted, never silently dropped from the offered load).
    fake_server.behaviour.delay_s = 0.2
    client = _client(fake_server, stability=(100, 1.0))
    try:
        r = client.run_step(_spec("open", 100.0, warmup_s=0.0, duration_s=1.0, max_inflight=2))
    finally:
        client.close()
    assert r.sent == r.ok + r.errors_total["CLIENT_OVERLOAD"]
    assert r.errors_total["CLIENT_OVERLOAD"] > 3 * r.ok
    assert fake_server.behaviour.received == r.ok


def test_open_loop_latency_counts_from_the_schedule_and_service_time_from_the_send() -> None:
    import asyncio

    from loadtest.runner import _one, _Recorder

    async def call(payload: bytes, timeout: float | None = None) -> bytes:
        await asyncio.sleep(0.01)
        return b""

    rec = _Recorder(1, open_loop=True)
    due = time.perf_counter() - 0.3  # this request leaves 300 ms after its scheduled time
    asyncio.run(_one(call, b"", due, 1.0, rec))
    assert rec.service is not None and rec.service[0] >= 0.01
    assert rec.lats[0] - rec.service[0] >= 0.3  # the wait to be sent is latency, not service time
    closed = _Recorder(1)
    asyncio.run(_one(call, b"", None, 1.0, closed))
    assert closed.service is None and closed.lats[0] >= 0.01  # closed loop: from the send (no due)
