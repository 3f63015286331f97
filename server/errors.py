"""Errors that end one request with a specific gRPC status (and its HTTP status over REST); the
server itself stays up."""

from __future__ import annotations

import grpc


class ServeError(Exception):
    """A request failed with ``code``; ``message`` tells the caller what to change."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ServeError({self.code.name}, {self.message!r})"


def invalid(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.NOT_FOUND, message)


def overloaded(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def unavailable(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.UNAVAILABLE, message)


def deadline_exceeded(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def internal(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.INTERNAL, message)


# The HTTP status of each gRPC status a request can end with (KServe v2 REST, /v1 classify).
# Overload and shutdown are both 503: the client should back off or go to another replica.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 400,  # a model load that failed, model control that is off
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)
