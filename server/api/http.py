"""The HTTP listener: one aiohttp application, in the gRPC server's process and event loop, whose
routes are the KServe v2 REST API (server.api.kserve.rest) and cnnstack.classifier.v1's
``:classify`` (server.api.classifier.rest).

Inference goes through the same ``Inference.handle`` as gRPC (admission, status mapping, metrics
with ``protocol="http"``, statistics), so both protocols share models, batchers, queue limits and
counters. Errors are ``{"error": "..."}`` with the HTTP status of the gRPC code (400 bad input,
404 unknown model or version, 503 overloaded or shutting down, 413 a body over
``--max-message-bytes``). Readiness is the server's one ``ServerState``, the same that
grpc.health.v1 and KServe ServerReady report.

``start_http`` is the one place the listener starts (TLS and ``reuse_port`` are its arguments).
"""

from __future__ import annotations

import functools
import json
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from server.api.dataplane import Call, Inference, ServerState
from server.api.guard import GuardedSite, HttpLimits
from server.errors import ServeError, http_status, invalid
from server.metrics import HTTP, ServerMetrics
from server.net import bind, bound_port

JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Routes(Protocol):
    """A REST API: adds its routes to the application."""

    def add_routes(self, router: web.UrlDispatcher) -> None: ...


MAX_JSON_DEPTH = 32  # a KServe v2 request with a (N, C, H, W) tensor nests 7 deep
_JSON_NESTING = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # strings (skipped whole) and brackets


def parse_json(data: bytes, what: str = "the request's JSON") -> Any:
    """The one JSON reader of both REST APIs: what does not parse, or nests deeper than
    MAX_JSON_DEPTH, is INVALID_ARGUMENT naming which (never a RecursionError, never a 500)."""
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH:  # else it cannot nest that deep
        depth = 0
        for token in _JSON_NESTING.finditer(data):
            c = token.group()[:1]
            if c in (b"[", b"{"):
                depth += 1
                if depth > MAX_JSON_DEPTH:
                    raise invalid(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
            elif c in (b"]", b"}"):
                depth -= 1
    try:
        return json.loads(data)
    except RecursionError:
        raise invalid(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"{what} does not parse: {e}") from None


def error_response(status: int, message: str, close: bool = False) -> web.Response:
    body = json.dumps({"error": message}).encode()
    headers = {"Connection": "close"} if close else None
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(doc).encode(), status=status, content_type=JSON)


def answer(build: Callable[[], Any]) -> web.Response:
    """``build()`` as a JSON response, or the error response its ServeError names."""
    try:
        return json_response(build())
    except ServeError as e:
        return error_response(http_status(e.code), e.message)


def error_responder(state: ServerState) -> Callable[[grpc.StatusCode, str], Awaitable[web.Response]]:
    """The ``on_error`` of an HTTP inference call (see ``Inference.handle``)."""

    async def on_error(status: grpc.StatusCode, message: str) -> web.Response:
        # While draining, ask the client to reconnect (elsewhere) rather than reuse this connection.
        return error_response(http_status(status), message, close=state.stopping)

    return on_error


async def inference_call(
    inference: Inference,
    rpc: str,
    request: web.Request,
    work: Callable[[web.Request, bytes, Call], Awaitable[web.Response]],
    on_error: Callable[[grpc.StatusCode, str], Awaitable[web.Response]],
) -> web.Response:
    """One HTTP inference request: its body read, then ``work(request, body, call)`` under
    ``Inference.handle`` (counted as ``protocol="http"``)."""
    body = await request.read()  # a client gone while it is read: 408 (the middleware)
    return await inference.handle(rpc, functools.partial(work, request, body), on_error, HTTP, request)


def build_app(
    apis: Sequence[Routes], max_body_bytes: int, middlewares: Sequence[Middleware] = ()
) -> web.Application:
    """The application: ``middlewares`` first (authentication), then aiohttp's own errors as JSON."""
    app = web.Application(
        client_max_size=max_body_bytes, middlewares=[*middlewares, _json_errors(max_body_bytes)]
    )
    for api in apis:
        api.add_routes(app.router)
    return app


def _json_errors(max_body_bytes: int) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own errors (no route, wrong method, body too large) as protocol errors, and a
        body that never arrived (the client went away, or the guard closed it stalled) as 408."""
        try:
            return await handler(request)
        except ConnectionError:
            return error_response(408, "the connection closed before the request body arrived")
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413, f"request body over the {max_body_bytes}-byte limit (--max-body-bytes)"
            )
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, f"{e.reason}: {request.method} {request.path}")

    return middleware


async def start_http(
    app: web.Application,
    host: str,
    port: int,
    limits: HttpLimits,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
    shutdown_timeout: float = 30.0,
    keepalive_timeout_s: float = 15.0,
    metrics: ServerMetrics | None = None,
) -> tuple[web.AppRunner, int]:
    """Bind and serve behind the connection guard (server.api.guard); returns (runner: ``await
    runner.cleanup()`` stops it, bound port).

    ``reuse_port``: several server processes may then share the port (SO_REUSEPORT); off, a
    second server on the same port fails to start instead.
    """
    try:
        sock = bind(host, port, reuse_port=reuse_port)
    except OSError as e:
        raise OSError(f"cannot bind HTTP to {host}:{port}: {e}") from e
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=keepalive_timeout_s,
    )
    await runner.setup()
    site = GuardedSite(runner, sock, limits, metrics, ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    return runner, bound_port(sock)
