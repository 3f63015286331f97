"""How requests reach the target: gRPC (plain text or TLS) or KServe v2 over HTTP/REST (JSON
tensors or the binary tensor data extension, plain text or TLS), behind one call signature.

``await call(payload, timeout=s)`` sends one pre-built payload and returns the response bytes;
a failure raises ``grpc.aio.AioRpcError`` (gRPC) or ``CallFailed`` (HTTP: ``HTTP_<status>``, or
``UNAVAILABLE`` / ``DEADLINE_EXCEEDED`` when no response came). The runner counts either by code.

Every request may carry ``authorization: Bearer <token>`` and a fresh W3C ``traceparent``, as gRPC
metadata or HTTP headers (``Transport.request_headers``); without either, the call is the bare
multicallable or POST, with no per-request work added.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
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


def new_traceparent() -> str:
    """A fresh sampled W3C trace context: version 00, a random 16-byte trace id and 8-byte parent
    (span) id in lowercase hex, flags 01 (sampled)."""
    ids = os.urandom(24).hex()
    return f"00-{ids[:32]}-{ids[32:]}-01"


@dataclass(frozen=True)
class Transport:
    """The wire: protocol and TLS (``ca`` trusted, else the system's store; ``cert``/``key``
    presented for mutual TLS), and what every request carries besides its payload (a bearer
    token, a fresh ``traceparent``). Plain data, so it crosses to client processes. JSON or binary
    tensors over HTTP is the payload's business (``loadtest.payload``), not the connection's."""

    protocol: str = "grpc"
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    auth_token: str | None = field(default=None, repr=False)  # a secret: never in a repr or report
    traceparent: float = 0.0  # the fraction of requests that carry a fresh sampled traceparent

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

    @property
    def adds_headers(self) -> bool:
        return self.auth_token is not None or self.traceparent > 0

    def request_headers(self) -> list[tuple[str, str]]:
        """What this request carries besides its payload, names in lowercase (gRPC metadata keys
        must be; HTTP names are case-insensitive): the token, and on ``traceparent`` of the calls
        a new sampled ``traceparent`` (a trace of its own each)."""
        out = []
        if self.auth_token is not None:
            out.append(("authorization", f"Bearer {self.auth_token}"))
        if self.traceparent and (self.traceparent >= 1 or random.random() < self.traceparent):
            out.append(("traceparent", new_traceparent()))
        return out

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
    per request in flight, reused), reading the whole response as gRPC's call does; with
    ``transport``'s headers (token, traceparent) added to the payload's own."""

    def __init__(self, session: Any, url: str, transport: Transport | None = None) -> None:
        import aiohttp

        self.session, self.url = session, url
        self._extra = transport if transport is not None and transport.adds_headers else None
        self._errors = aiohttp.ClientError
        self._timeout = functools.lru_cache(maxsize=4)(lambda s: aiohttp.ClientTimeout(total=s))

    async def __call__(self, payload: HttpPayload, timeout: float | None = None) -> bytes:
        headers = payload.headers
        if self._extra is not None:
            headers = {**headers, **dict(self._extra.request_headers())}
        try:
            async with self.session.post(
                self.url, data=payload.body, headers=headers, timeout=self._timeout(timeout)
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

    def call(payload: bytes, timeout: float | None = None) -> Any:
        return next(turn)(payload, timeout=timeout)

    return call


def raw_call(channel: grpc.aio.Channel, method: str, transport: Transport | None = None) -> Any:
    """A unary multicallable that sends pre-serialized bytes and returns the raw response bytes;
    each call with ``transport``'s metadata (token, fresh traceparent) where it has any."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    if transport is None or not transport.adds_headers:
        return call
    headers = transport.request_headers

    def with_metadata(payload: bytes, timeout: float | None = None) -> Any:
        return call(payload, timeout=timeout, metadata=headers())

    return with_metadata


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
        return Connection(HttpCall(session, transport.base_url(target) + route, transport), [session.close])
    channels = [transport.grpc_channel(target) for _ in range(count)]
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), ready_timeout_s)
    except BaseException:
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)
        raise
    call = round_robin([raw_call(ch, route, transport) for ch in channels])
    return Connection(call, [ch.close for ch in channels])
