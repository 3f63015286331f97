"""Token authentication on both protocols, in one place each: a gRPC interceptor and an aiohttp
middleware, both asking ``server.tokens.Tokens`` (which holds the rules: who may call what, how
tokens are read and compared, what a refusal says)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from server.api.http import Handler, error_response
from server.metrics import GRPC, HTTP, ServerMetrics
from server.tokens import FORBIDDEN, OPEN, UNAUTHENTICATED, Tokens


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """gRPC: every call's ``authorization`` metadata, before its handler runs."""

    def __init__(self, tokens: Tokens, metrics: ServerMetrics) -> None:
        self.tokens = tokens
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method  # type: ignore[attr-defined]
        need = self.tokens.grpc_need(method)
        if need == OPEN or handler is None:
            return handler
        value = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)  # type: ignore[attr-defined]
        reason = self.tokens.check(value if isinstance(value, str) else None, need)
        if reason is None:
            return handler
        self.metrics.auth_failures.labels(GRPC, reason).inc()
        return _refusal(handler, reason)


def _refusal(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with the refusal."""
    code = grpc.StatusCode.PERMISSION_DENIED if reason == "forbidden" else grpc.StatusCode.UNAUTHENTICATED
    message = FORBIDDEN if reason == "forbidden" else UNAUTHENTICATED

    async def refuse(request_or_iterator, context):  # noqa: ANN001 - any of the four shapes
        await context.abort(code, message)

    async def refuse_stream(request_or_iterator, context):  # noqa: ANN001
        await context.abort(code, message)
        yield  # makes this an async generator, as a streaming response handler must be

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse_stream if handler.response_streaming else refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def http_middleware(tokens: Tokens, metrics: ServerMetrics) -> Middleware:
    """HTTP: every request's ``Authorization`` header, before its route runs."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        reason = tokens.check(request.headers.get("Authorization"), tokens.http_need(request.path))
        if reason is None:
            return await handler(request)
        metrics.auth_failures.labels(HTTP, reason).inc()
        if reason == "forbidden":
            return error_response(403, FORBIDDEN)
        response = error_response(401, UNAUTHENTICATED)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    return middleware
