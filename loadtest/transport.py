"""How requests reach the target: gRPC (plain text or TLS) or KServe v2 over HTTP/REST (JSON
tensors or the binary tensor data extension, plain text or TLS), behind one call signature.

``await call(payload, timeout=s)`` sends one pre-built payload and returns the response bytes;
a failure raises ``grpc.aio.AioRpcError`` (gRPC) or ``CallFailed`` (HTTP: ``HTTP_<status>``, or
``UNAVAILABLE`` / ``DEADLINE_EXCEEDED`` when no response came). The runner counts either by code.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from loadtest.runner import CallFailed

PROTOCOLS = ("grpc", "http")
# Large messages: 32 ResNet images of 3x224x224 float32 are ~19 MB.
MAX_MESSAGE_BYTES = 256 << 20


@dataclass(frozen=True)
class Transport:
    """The wire: protocol and TLS (``ca`` trusted, else the system's store; ``cert``/``key``
    presented for mutual TLS). Plain data, so it crosses to client processes. JSON or binary
    tensors over HTTP is the payload's business (``loadtest.payload``), not the connection's."""

    protocol: str = "grpc"
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    traceparent: float = 0.0  # fraction of requests that carry a new sampled W3C traceparent

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not 0 <= self.traceparent <= 1:
            raise ValueError(f"traceparent is a fraction from 0 to 1, got {self.traceparent}")

    @property
    def secure(self) -> bool:
        return self.tls or self.ca is not None or self.cert is not None

    def base_url(self, target: str) -> str:
        return f"{'https' if self.secure else 'http'}://{target}"

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.secure:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.cert is not None and self.key is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def grpc_channel(self, target: str) -> grpc.aio.Channel:
        opts = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Each channel its own TCP connection: by default channels to one target share
            # one through grpc's global subchannel pool, and --connections would open one.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if not self.secure:
            return grpc.aio.insecure_channel(target, options=opts)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )
        return grpc.aio.secure_channel(target, creds, options=opts)


@dataclass(frozen=True)
class HttpPayload:
    """One HTTP request body with its headers, built before the load starts."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.body)


class HttpCall:
    """POST a payload to one URL on a pooled aiohttp session (HTTP/1.1 keep-alive: one connection
    per request in flight, reused), reading the whole response as gRPC's call does."""

    def __init__(self, session: Any, url: str) -> None:
        import aiohttp

        self.session, self.url = session, url
        self._errors = aiohttp.ClientError
        self._timeout = functools.lru_cache(maxsize=4)(lambda s: aiohttp.ClientTimeout(total=s))

    async def __call__(self, payload: HttpPayload, timeout: float | None = None) -> bytes:
        try:
            async with self.session.post(
                self.url, data=payload.body, headers=payload.headers, timeout=self._timeout(timeout)
            ) as r:
                body: bytes = await r.read()
                status = r.status
        except TimeoutError:
            raise CallFailed("DEADLINE_EXCEEDED", f"no response within {timeout}s") from None
        except self._errors as e:
            raise CallFailed("UNAVAILABLE", f"{type(e).__name__}: {e}") from None
        if status != 200:
            raise CallFailed(f"HTTP_{status}", body[:300].decode("utf-8", "replace"))
        return body


def new_session(transport: Transport) -> Any:
    import aiohttp

    # limit=0: as many connections as requests in flight; HTTP/1.1 has one request per connection.
    connector = aiohttp.TCPConnector(limit=0, ssl=transport.ssl_context() or False)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False)


def round_robin(calls: Sequence[Any]) -> Any:
    """One callable over several channels' calls, each request on the next channel in turn. A
    server's kernel balances connections, not requests (cnn-serve --workers): K channels let one
    client reach up to K workers or replicas."""
    if len(calls) == 1:
        return calls[0]
    turn = itertools.cycle(calls)

    def call(payload: bytes, timeout: float | None = None, **kw: Any) -> Any:
        return next(turn)(payload, timeout=timeout, **kw)

    return call


def with_traceparent(call: Any, protocol: str, fraction: float) -> Any:
    """``call`` sending ``fraction`` of its requests with a new sampled W3C ``traceparent`` (a
    fresh trace id and parent span id each: a trace per request) in gRPC metadata or an HTTP header."""
    rng = random.Random()

    def traced(payload: Any, timeout: float | None = None) -> Any:
        if rng.random() >= fraction:
            return call(payload, timeout=timeout)
        header = f"00-{rng.getrandbits(128) or 1:032x}-{rng.getrandbits(64) or 1:016x}-01"
        if protocol == "http":
            return call(
                HttpPayload(payload.body, {**payload.headers, "traceparent": header}), timeout=timeout
            )
        return call(payload, timeout=timeout, metadata=(("traceparent", header),))

    return traced


def raw_call(channel: grpc.aio.Channel, method: str) -> Any:
    """A unary multicallable that sends pre-serialized bytes and returns the raw response bytes."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


class Connection:
    """The load's ``call`` and what it holds open: ``count`` gRPC channels, or one HTTP session."""

    def __init__(self, call: Any, closers: Sequence[Any]) -> None:
        self.call, self._closers = call, closers

    async def close(self) -> None:
        await asyncio.gather(*(c() for c in self._closers), return_exceptions=True)


async def connect(
    target: str, transport: Transport, route: str, count: int, ready_timeout_s: float
) -> Connection:
    """A ready connection for the load: ``route`` is the gRPC method, or the HTTP path (after the
    host). gRPC opens ``count`` channels, each connected (TimeoutError when one is not in time)."""
    if transport.protocol == "http":
        session = new_session(transport)
        http: Any = HttpCall(session, transport.base_url(target) + route)
        if transport.traceparent:
            http = with_traceparent(http, "http", transport.traceparent)
        return Connection(http, [session.close])
    channels = [transport.grpc_channel(target) for _ in range(count)]
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), ready_timeout_s)
    except BaseException:
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)
        raise
    call = round_robin([raw_call(ch, route) for ch in channels])
    if transport.traceparent:
        call = with_traceparent(call, "grpc", transport.traceparent)
    return Connection(call, [ch.close for ch in channels])
