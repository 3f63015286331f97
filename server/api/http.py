"""KServe v2 / Open Inference Protocol over HTTP/REST, and ``/v1/models/{m}:classify``, on aiohttp
in the gRPC server's process and event loop.

Inference goes through the same ``Inference.handle`` as gRPC (admission, status mapping, metrics
with ``protocol="http"``, statistics), so both protocols share models, batchers, queue limits and
counters. Errors are ``{"error": "..."}`` with the HTTP status of the gRPC code (400 bad input,
404 unknown model or version, 503 overloaded or shutting down, 413 a body over
``--max-message-bytes``). Readiness is the server's one ``ServerState``, the same that
grpc.health.v1 and KServe ServerReady report.

``start_http`` is the one place the listener starts (TLS and ``reuse_port`` are its arguments).
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from server.api.classifier import rest as rest_classify
from server.api.dataplane import Call, Inference
from server.api.kserve import protocol as v2
from server.api.kserve import rest as rest_v2
from server.errors import ServeError, http_status
from server.metrics import HTTP
from server.runtime.preprocess import OFFLOAD_BYTES

JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str, close: bool = False) -> web.Response:
    body = json.dumps({"error": message}).encode()
    headers = {"Connection": "close"} if close else None
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(doc).encode(), status=status, content_type=JSON)


class HttpApi:
    """The routes; ``app()`` builds the aiohttp application."""

    def __init__(self, inference: Inference, decode_executor: Executor, max_body_bytes: int) -> None:
        self.inference = inference
        self.manager = inference.manager
        self.state = inference.state
        self._decode_executor = decode_executor
        self.max_body_bytes = max_body_bytes

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._json_errors])
        get, post = app.router.add_get, app.router.add_post
        get("/v2", self.server_metadata)
        get("/v2/health/live", self.live)
        get("/v2/health/ready", self.ready)
        post("/v2/repository/index", self.repository_index)
        get("/v2/models/stats", self.statistics)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            get(base, self.model_metadata)
            get(f"{base}/ready", self.model_ready)
            get(f"{base}/config", self.model_config)
            get(f"{base}/stats", self.statistics)
            post(f"{base}/infer", self.infer)
        post("/v1/models/{model}:classify", self.classify)
        post("/v1/models/{model}/versions/{version}:classify", self.classify)
        return app

    @web.middleware
    async def _json_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own errors (no route, wrong method, body too large) as protocol errors."""
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413, f"request body over the {self.max_body_bytes}-byte limit (--max-message-bytes)"
            )
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, f"{e.reason}: {request.method} {request.path}")

    # ---- health and metadata ----

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        if self.state.serving:
            return web.Response(status=200)
        why = "shutting down" if self.state.stopping else "loading the model repository"
        return error_response(503, f"server not ready: {why}")

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(
            {"name": v2.SERVER_NAME, "version": v2.SERVER_VERSION, "extensions": v2.EXTENSIONS}
        )

    def _resolve(self, request: web.Request):
        info = request.match_info
        return self.manager.resolve(info["model"], v2.parse_version(info.get("version", "")))

    async def _answer(self, build: Callable[[], Any]) -> web.Response:
        try:
            return json_response(build())
        except ServeError as e:
            return error_response(http_status(e.code), e.message)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return await self._answer(
            lambda: rest_v2.message_dict(v2.model_metadata(self.manager, self._resolve(request)))
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            served = self._resolve(request)
        except ServeError as e:
            return error_response(http_status(e.code), e.message)
        if served.accepting and not self.state.stopping:
            return web.Response(status=200)
        return error_response(503, f"model {served.name!r} version {served.version} is not ready")

    async def model_config(self, request: web.Request) -> web.Response:
        return await self._answer(lambda: rest_v2.message_dict(self._resolve(request).config))

    async def statistics(self, request: web.Request) -> web.Response:
        info = request.match_info

        def build() -> dict:
            versions = v2.versions_for_statistics(
                self.manager, info.get("model", ""), info.get("version", "")
            )
            return {"model_stats": [rest_v2.message_dict(v2.statistics(s)) for s in versions]}

        return await self._answer(build)

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            ready = bool(json.loads(body).get("ready", False)) if body.strip() else False
        except (ValueError, AttributeError):
            return error_response(400, 'the body must be empty or a JSON object like {"ready": true}')
        index = v2.repository_index(self.manager, ready)
        return json_response([rest_v2.message_dict(m) for m in index.models])

    # ---- inference ----

    async def _on_error(self, status: grpc.StatusCode, message: str) -> web.Response:
        # While draining, ask the client to reconnect (elsewhere) rather than reuse this connection.
        return error_response(http_status(status), message, close=self.state.stopping)

    async def infer(self, request: web.Request) -> web.Response:
        body = await request.read()
        work = functools.partial(self._infer, request, body)
        return await self.inference.handle("ModelInfer", work, self._on_error, HTTP)

    async def _infer(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        model, version = request.match_info["model"], v2.parse_version(request.match_info.get("version", ""))
        try:
            parsed = rest_v2.parse_request(body, request.headers.get(rest_v2.HEADER_LENGTH))
        except ServeError:
            call.served = self.manager.resolve(model, version)  # an unknown model is 404 first, as over gRPC
            raise
        what = f"input {parsed.inputs[0].name!r}" if parsed.inputs else "input"
        make_input = functools.partial(rest_v2.input_array, parsed)
        outputs = await self.inference.run(call, model, version, make_input, None, what=what)
        payload, header_length = rest_v2.encode_response(parsed, call.served, outputs)  # type: ignore[arg-type]
        if header_length is None:
            return web.Response(body=payload, content_type=JSON)
        headers = {rest_v2.HEADER_LENGTH: str(header_length)}
        return web.Response(body=payload, content_type="application/octet-stream", headers=headers)

    async def classify(self, request: web.Request) -> web.Response:
        body = await request.read()
        work = functools.partial(self._classify, request, body)
        return await self.inference.handle("Classify", work, self._on_error, HTTP)

    async def _classify(self, request: web.Request, body: bytes, call: Call) -> web.Response:
        model, version = request.match_info["model"], v2.parse_version(request.match_info.get("version", ""))
        try:
            parsed = rest_classify.parse_body(body, request.content_type, request.query.get("top_k"))
        except ServeError:
            call.served = self.manager.resolve(model, version)
            raise
        make_input = functools.partial(_classify_input, parsed)
        offload = self._offload if parsed.encoded_bytes > OFFLOAD_BYTES else None
        outputs = await self.inference.run(call, model, version, make_input, None, offload, what="image")
        payload = rest_classify.encode_response(call.served, outputs, parsed.top_k)  # type: ignore[arg-type]
        return web.Response(body=payload, content_type=JSON)

    def _offload(self, fn: Callable[[], np.ndarray]) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._decode_executor, fn)


def _classify_input(parsed: rest_classify.ClassifyBody, served) -> np.ndarray:
    return rest_classify.build_batch(parsed, served)


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    host = host.strip("[]")
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    try:
        return socket.create_server((host, port), family=family, backlog=1024, reuse_port=reuse_port)
    except OSError as e:
        raise OSError(f"cannot bind HTTP to {host}:{port}: {e}") from e


async def start_http(
    api: HttpApi,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
    shutdown_timeout: float = 30.0,
) -> tuple[web.AppRunner, int]:
    """Bind and serve; returns (runner: ``await runner.cleanup()`` stops it, bound port).

    ``reuse_port``: several server processes may then share the port (SO_REUSEPORT); off, a
    second server on the same port fails to start instead.
    """
    sock = _bind(host, port, reuse_port)
    runner = web.AppRunner(
        api.app(), access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    site = web.SockSite(runner, sock, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    return runner, int(sock.getsockname()[1])
