"""Errors that end one request with a specific gRPC status; the server itself stays up."""

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
