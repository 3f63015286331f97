"""The front door of a real server: stalled and idle connections on both ports are closed (HTTP:
408 for a stalled request, gRPC: GOAWAY or a closed set-up), an announced body over the limit is
413 before it is sent, connections over the cap are refused while the admitted ones are served,
and the gRPC settings say how many calls one connection may carry."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

from tests.server.helpers import publish, server_config, tiny_model
from tests.server.http_helpers import binary_infer_body, infer_path, request

pytestmark = pytest.mark.integration

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + struct.pack(">I", 0)[1:] + b"\x04\x00" + struct.pack(">I", 0)
LIMITS = dict(
    http_header_timeout_s=0.5,
    http_body_timeout_s=0.5,
    http_keepalive_timeout_s=2.0,  # later than the header timeout: aiohttp closes idle connections silently
    grpc_handshake_timeout_s=0.5,
    grpc_max_connection_idle_s=1.0,
    max_connections=4,
    max_body_bytes=100_000,
    grpc_max_concurrent_streams=77,
)


@pytest.fixture
def door(tmp_path, start_server):
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    return start_server(server_config(root, **LIMITS))


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(30)  # a failure bound only: the limits above are sub-second
    return s


def until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    with s:
        while chunk := s.recv(65536):
            out += chunk
    return out


def good_infer(server) -> int:
    body, headers = binary_infer_body(np.zeros((1, 1, 28, 28), np.float32))
    return request(server.http_url + infer_path("tiny"), body, headers).status


def test_stalled_http_requests_are_408_and_closed_while_good_clients_are_served(door) -> None:
    port = door.handle.http_port
    headers = connect(port)
    headers.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    body = connect(port)
    body.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx")
    idle = connect(port)
    assert good_infer(door) == 200  # a real client, while three connections stall
    got_headers, got_body, got_idle = until_closed(headers), until_closed(body), until_closed(idle)
    assert got_headers.startswith(b"HTTP/1.1 408") and b"request headers not received" in got_headers
    assert got_body.startswith(b"HTTP/1.1 408") and b"request body not received" in got_body
    assert got_idle == b""  # nothing was asked: nothing to answer
    assert good_infer(door) == 200
    closed = door.handle.metrics.registry.get_sample_value
    for reason in ("header_timeout", "body_timeout", "idle"):
        assert closed("cnn_connections_closed_total", {"protocol": "http", "reason": reason}) >= 1


def test_a_body_over_the_limit_is_refused_before_it_is_sent(door) -> None:
    s = connect(door.handle.http_port)
    s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
    reply = until_closed(s)  # answered and closed without a byte of the body
    assert reply.startswith(b"HTTP/1.1 413") and b"--max-body-bytes" in reply


def test_an_idle_keep_alive_connection_is_closed_after_its_response(door) -> None:
    s = connect(door.handle.http_port)
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert until_closed(s).startswith(b"HTTP/1.1 200")


def test_http_connections_over_the_cap_are_refused_and_the_admitted_ones_served(door) -> None:
    port = door.handle.http_port
    held = [connect(port) for _ in range(LIMITS["max_connections"])]
    try:
        refused = until_closed(connect(port))
        assert refused.startswith(b"HTTP/1.1 503") and b"open connections" in refused
        held[0].sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()


def settings_of(frame: bytes) -> dict[int, int]:
    """The server's first HTTP/2 frame, a SETTINGS frame: {identifier: value}."""
    length, kind = int.from_bytes(frame[:3], "big"), frame[3]
    assert kind == 4, frame[:9]
    payload = frame[9 : 9 + length]
    return {
        struct.unpack(">H", payload[i : i + 2])[0]: struct.unpack(">I", payload[i + 2 : i + 6])[0]
        for i in range(0, length, 6)
    }


def test_grpc_set_up_and_idle_connections_are_closed_and_streams_are_capped(door) -> None:
    silent = until_closed(connect(door.port))  # connects, never sends the HTTP/2 preface
    assert b"handshake timeout" in silent
    s = connect(door.port)
    s.sendall(PREFACE)
    idle = until_closed(s)  # set up, then no call: GOAWAY after max_connection_idle
    assert settings_of(idle)[0x3] == LIMITS["grpc_max_concurrent_streams"]  # SETTINGS_MAX_CONCURRENT_STREAMS
    assert b"\x07\x00\x00\x00\x00" in idle and b"idle" in idle  # a GOAWAY frame, "connection idle"


def test_grpc_connections_over_the_cap_are_closed_at_once(door) -> None:
    held = []
    try:
        for _ in range(LIMITS["max_connections"]):
            s = connect(door.port)
            s.sendall(PREFACE)
            assert settings_of(s.recv(65536))  # admitted: the server's SETTINGS
            held.append(s)
        assert until_closed(connect(door.port)) == b""
    finally:
        for s in held:
            s.close()
