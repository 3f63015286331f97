"""The HTTP listener's front door: each connection's time limits, the size limit on a request body,
and a cap on open connections, enforced below aiohttp.

aiohttp reads a request's headers and body without a deadline: a client that sends half its
headers, or announces a body and sends one byte of it, holds its connection (and the handler's
memory) forever, and a few thousand of them starve real clients (slowloris). A ``Guarded``
connection sits between the transport and aiohttp's protocol, forwarding every byte unchanged,
and follows each request's framing just enough to know where it stands:

* ``IDLE``    connected, or between requests: nothing received yet. A new connection must start
              its first request within ``header_timeout_s``; after a response, aiohttp's keep-alive
              timeout closes an idle connection (``--http-keepalive-timeout-s``).
* ``HEADERS`` the first byte of a request arrived: the headers must be complete within
              ``header_timeout_s`` of it (else 408, closed), and within ``max_header_bytes``
              (else 431, closed).
* ``BODY``    the headers announced a body (``Content-Length``, or chunked): it must be complete
              within ``body_timeout_s`` of the headers (else 408, closed). A ``Content-Length``
              over ``max_body_bytes`` is answered 413 and the connection closed before a byte of
              the body is read; a chunked body is cut off (413) once it passes the limit.
* ``WAITING`` the request is complete and admitted: no limit of this module applies to it, so a
              limit never drops an admitted request. Bytes arriving now start the next request.

Over ``max_connections`` open connections, a new one is answered 503 and closed at once; the
connections already admitted keep being served. Deadlines are checked by one sweep every
``SWEEP_S`` rather than a timer per request: the request path only stores a float.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from server.metrics import ServerMetrics

IDLE, HEADERS, BODY, WAITING = range(4)
SWEEP_S = 0.25  # how late a deadline may be enforced
HEADER_END = b"\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*([^\r]*)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r]*chunked", re.IGNORECASE)
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]+")


@dataclass(frozen=True)
class HttpLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_body_bytes: int = 64 * 1024 * 1024
    max_connections: int = 4096
    max_header_bytes: int = 64 * 1024


def _response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionGuard:
    """The protocol factory of the guarded listener: one ``Guarded`` per connection, around
    ``inner()`` (aiohttp's request handler); counts the open ones and sweeps their deadlines."""

    def __init__(
        self, inner: Callable[[], asyncio.Protocol], limits: HttpLimits, metrics: ServerMetrics | None = None
    ) -> None:
        self.inner = inner
        self.limits = limits
        self.metrics = metrics
        self.connections: set[Guarded] = set()
        self._sweeper: asyncio.Task | None = None

    def __call__(self) -> Guarded:
        return Guarded(self)

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="http-guard")

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_S)
            now = loop.time()
            for conn in [c for c in self.connections if c.deadline < now]:
                conn.expire()

    def closed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_closed.labels("http", reason).inc()


class Guarded(asyncio.Protocol):
    """One connection: forwards to aiohttp's protocol, enforcing the limits (see module doc)."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.limits = guard.limits
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.state = IDLE
        self.deadline = float("inf")
        self._head = b""  # the headers received so far (HEADERS)
        self._remaining = 0  # body bytes still to come (BODY, Content-Length)
        self._chunked: _Chunks | None = None  # the body's chunk framing (BODY, chunked)

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        guard = self.guard
        if len(guard.connections) >= self.limits.max_connections:
            message = f"server at its limit of {self.limits.max_connections} open connections; retry later"
            self._refuse(503, "Service Unavailable", message, "over_connection_limit")
            return
        guard.connections.add(self)
        self.deadline = asyncio.get_running_loop().time() + self.limits.header_timeout_s
        self.inner = guard.inner()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None or self._follow(data) is None:
            return  # refused: the connection is closing, aiohttp never sees the request
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.connections.discard(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)
            self.inner = None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # ---- the request framing ----

    def _follow(self, data: bytes) -> bytes | None:
        """Advance the state over ``data`` (which may hold the end of one request and the start of
        the next); None when a request was refused."""
        view: bytes | None = data
        while view:
            if self.state in (IDLE, WAITING):
                self.state = HEADERS
                self._head = b""
                self.deadline = asyncio.get_running_loop().time() + self.limits.header_timeout_s
            view = self._headers(view) if self.state == HEADERS else self._body(view)
            if view is None:
                return None
        return data

    def _headers(self, data: bytes) -> bytes | None:
        start = max(0, len(self._head) - 3)  # the end marker may straddle two reads
        self._head += data
        end = self._head.find(HEADER_END, start)
        # (the headers so far, or the whole of them once their end is here)
        if (end + 2 if end >= 0 else len(self._head)) > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            self._refuse(
                431,
                "Request Header Fields Too Large",
                f"request headers over {limit} bytes",
                "headers_too_large",
            )
            return None
        if end < 0:
            return b""
        head, rest = self._head[: end + 2], self._head[end + 4 :]
        self._head = b""
        if _CHUNKED.search(head):
            self._chunked = _Chunks()
            return self._start_body(rest)
        match = _CONTENT_LENGTH.search(head)
        length = int(match.group(1)) if match and match.group(1).strip().isdigit() else 0
        if length > self.limits.max_body_bytes:
            message = (
                f"request body of {length} bytes is over the {self.limits.max_body_bytes}-byte limit "
                "(--max-body-bytes)"
            )
            self._refuse(413, "Payload Too Large", message, "body_too_large")
            return None
        self._remaining = length
        if length == 0:
            self._complete()
            return rest
        return self._start_body(rest)

    def _start_body(self, rest: bytes) -> bytes | None:
        self.state = BODY
        self.deadline = asyncio.get_running_loop().time() + self.limits.body_timeout_s
        return self._body(rest) if rest else b""

    def _body(self, data: bytes) -> bytes | None:
        if self._chunked is not None:
            used = self._chunked.feed(data)
            if self._chunked.size > self.limits.max_body_bytes:
                message = f"chunked request body over the {self.limits.max_body_bytes}-byte limit (--max-body-bytes)"
                self._refuse(413, "Payload Too Large", message, "body_too_large")
                return None
            if not self._chunked.done:
                return b""
            self._chunked = None
            self._complete()
            return data[used:]
        if len(data) < self._remaining:
            self._remaining -= len(data)
            return b""
        rest = data[self._remaining :]
        self._remaining = 0
        self._complete()
        return rest

    def _complete(self) -> None:
        self.state = WAITING
        self.deadline = float("inf")

    # ---- closing ----

    def expire(self) -> None:
        """Called by the sweep once ``deadline`` has passed."""
        if self.state == HEADERS:
            secs = self.limits.header_timeout_s
            self._refuse(
                408, "Request Timeout", f"request headers not received within {secs:g}s", "header_timeout"
            )
        elif self.state == BODY:
            secs = self.limits.body_timeout_s
            self._refuse(
                408, "Request Timeout", f"request body not received within {secs:g}s", "body_timeout"
            )
        elif self.state == IDLE:
            self.guard.closed("idle")
            self._close()

    def _refuse(self, status: int, reason: str, message: str, why: str) -> None:
        self.guard.closed(why)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_response(status, reason, message))
        self._close()

    def _close(self) -> None:
        self.deadline = float("inf")
        self.state = IDLE
        self.guard.connections.discard(self)
        if self.transport is not None:
            self.transport.close()


class _Chunks:
    """Where a chunked body stands: sizes, data, the CRLFs between, the trailer and its end."""

    SIZE, DATA, TRAILER = range(3)

    def __init__(self) -> None:
        self.state = self.SIZE
        self.line = b""
        self.left = 0  # bytes of the current chunk (+ its CRLF) still to come
        self.size = 0  # body bytes so far
        self.done = False

    def feed(self, data: bytes) -> int:
        """Consume ``data`` up to the end of the body; returns how many bytes were the body's."""
        i = 0
        n = len(data)
        while i < n and not self.done:
            if self.state in (self.SIZE, self.TRAILER):
                end = data.find(b"\n", i)
                if end < 0:
                    self.line += data[i:]
                    return n
                line, self.line, i = (self.line + data[i:end]).rstrip(b"\r"), b"", end + 1
                if self.state == self.TRAILER:
                    self.done = line == b""
                    continue
                match = _CHUNK_SIZE.match(line)
                chunk = int(match.group(0), 16) if match else 0
                self.size += chunk
                if chunk == 0:
                    self.state = self.TRAILER
                else:
                    self.state, self.left = self.DATA, chunk + 2  # the data, then its CRLF
            else:
                take = min(self.left, n - i)
                self.left -= take
                i += take
                if self.left == 0:
                    self.state = self.SIZE
        return i


class GuardedSite(web.BaseSite):
    """An aiohttp site on a bound socket whose connections go through a ``ConnectionGuard``; the
    runner's cleanup stops it (then drains aiohttp's connections) as it would a SockSite."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        limits: HttpLimits,
        metrics: ServerMetrics | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._sock = sock
        self._limits = limits
        self._metrics = metrics
        self.guard: ConnectionGuard | None = None

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{'https' if self._ssl_context else 'http'}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self._limits, self._metrics)
        loop = asyncio.get_running_loop()
        # The TLS handshake counts as the start of the first request's headers.
        handshake = self._limits.header_timeout_s if self._ssl_context is not None else None
        self._server = await loop.create_server(
            self.guard, sock=self._sock, ssl=self._ssl_context, ssl_handshake_timeout=handshake
        )
        self.guard.start()

    async def stop(self) -> None:
        if self.guard is not None:
            self.guard.stop()
        await super().stop()
