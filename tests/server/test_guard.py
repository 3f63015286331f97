"""The HTTP connection guard without a server: a fake transport below it, a recording protocol
above it. Every byte reaches aiohttp unchanged however the stream is split; a request's headers
and body get their deadlines, an admitted request none; limits answer 408/413/431/503 and close."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from server.api.guard import BODY, HEADERS, IDLE, WAITING, ConnectionGuard, HttpLimits
from server.metrics import ServerMetrics

LIMITS = HttpLimits(
    header_timeout_s=5, body_timeout_s=7, max_body_bytes=100, max_connections=2, max_header_bytes=200
)


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.made = self.lost = False

    def connection_made(self, transport) -> None:
        self.made = True

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc) -> None:
        self.lost = True


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def request(body: bytes = b"", path: str = "/v2/models/m/infer", extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def chunked(*chunks: bytes) -> bytes:
    head = b"POST /v1/models/m:classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def connect(guard: ConnectionGuard):
    conn, transport = guard(), Transport()
    conn.connection_made(transport)
    return conn, transport


def run(fn):
    """The guard reads the running loop's clock: run each case inside a loop."""

    async def main():
        return fn()

    return asyncio.run(main())


def make_guard(limits: HttpLimits = LIMITS) -> tuple[ConnectionGuard, list[Recorder], ServerMetrics]:
    made: list[Recorder] = []
    metrics = ServerMetrics(CollectorRegistry())

    def inner() -> Recorder:
        made.append(Recorder())
        return made[-1]

    return ConnectionGuard(inner, limits, metrics), made, metrics


def closed(metrics: ServerMetrics, reason: str) -> float:
    return (
        metrics.registry.get_sample_value(
            "cnn_connections_closed_total", {"protocol": "http", "reason": reason}
        )
        or 0
    )


def test_a_complete_request_is_forwarded_and_has_no_deadline_while_it_is_served() -> None:
    def case():
        guard, made, _ = make_guard()
        conn, transport = connect(guard)
        assert conn.state == IDLE and conn.deadline < float("inf")  # a new connection must start
        conn.data_received(request(b"x" * 10))
        assert made[0].data == request(b"x" * 10) and conn.state == WAITING
        assert conn.deadline == float("inf") and not transport.closed  # admitted: no limit applies

    run(case)


def test_stalled_headers_and_bodies_are_408_idle_connections_just_closed() -> None:
    def case():
        guard, made, metrics = make_guard()
        conn, transport = connect(guard)
        conn.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nHost")
        assert conn.state == HEADERS
        conn.expire()
        assert (
            transport.closed
            and b"408 Request Timeout" in transport.written
            and b"headers" in transport.written
        )
        conn, transport = connect(guard)
        conn.data_received(request(b"x" * 50)[:-30])
        assert conn.state == BODY
        conn.expire()
        assert (
            transport.closed
            and b"408" in transport.written
            and b"body not received within 7s" in transport.written
        )
        conn, transport = connect(guard)
        conn.expire()
        assert transport.closed and transport.written == b""
        assert [closed(metrics, r) for r in ("header_timeout", "body_timeout", "idle")] == [1, 1, 1]

    run(case)


def test_a_body_over_the_limit_is_413_before_aiohttp_sees_the_request() -> None:
    def case():
        guard, made, metrics = make_guard()
        conn, transport = connect(guard)
        conn.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n")
        assert b"413 Payload Too Large" in transport.written and transport.closed
        assert made[0].data == b"" and closed(metrics, "body_too_large") == 1
        conn, transport = connect(guard)
        conn.data_received(chunked(b"a" * 60, b"b" * 60))
        assert b"413" in transport.written and b"chunked" in transport.written and transport.closed

    run(case)


def test_headers_over_the_limit_are_431() -> None:
    def case():
        guard, _, metrics = make_guard()
        conn, transport = connect(guard)
        conn.data_received(b"GET / HTTP/1.1\r\nX: " + b"a" * 300)
        assert b"431" in transport.written and transport.closed and closed(metrics, "headers_too_large") == 1

    run(case)


def test_over_the_connection_cap_a_new_connection_is_503_and_the_admitted_go_on() -> None:
    def case():
        guard, made, metrics = make_guard()
        first, _ = connect(guard)
        connect(guard)
        third, transport = connect(guard)
        assert b"503 Service Unavailable" in transport.written and transport.closed and third.inner is None
        assert len(made) == 2 and closed(metrics, "over_connection_limit") == 1
        first.data_received(request(b"ok"))
        assert made[0].data == request(b"ok")
        first.connection_lost(None)
        assert made[0].lost and connect(guard)[0].inner is not None  # room again

    run(case)


# A stream of whole requests (fixed-length and chunked bodies, some empty), cut anywhere.
bodies = st.binary(max_size=60)
one_request = st.one_of(
    bodies.map(request),
    st.lists(st.binary(min_size=1, max_size=20), max_size=3).map(lambda cs: chunked(*cs)),
    st.just(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(one_request, min_size=1, max_size=4), st.lists(st.integers(1, 40), max_size=30))
def test_any_split_of_whole_requests_reaches_aiohttp_unchanged_and_ends_admitted(requests, cuts) -> None:
    stream = b"".join(requests)

    def case():
        guard, made, _ = make_guard(HttpLimits(max_body_bytes=10_000, max_header_bytes=10_000))
        conn, transport = connect(guard)
        i = 0
        for n in [*cuts, len(stream)]:
            conn.data_received(stream[i : i + n])
            i += n
            if i >= len(stream):
                break
        return made[0].data, conn.state, transport

    data, state, transport = run(case)
    assert data == stream and state == WAITING and not transport.closed and transport.written == b""


@pytest.mark.parametrize("split", [1, 2, 3, 5, 17])
def test_a_body_split_across_reads_completes_exactly_at_its_end(split: int) -> None:
    def case():
        guard, made, _ = make_guard()
        conn, _ = connect(guard)
        stream = request(b"y" * 40) + b"GET / HTTP/1.1\r\nHost"  # the next request starts at once
        for i in range(0, len(stream), split):
            conn.data_received(stream[i : i + split])
        return conn.state, made[0].data == stream

    assert run(case) == (HEADERS, True)  # the second request's headers are under way
