"""What ``Inference.handle`` does around a request when the operator asked for it: its trace
(``--trace-config``), its fields in JSON log lines (``--log-format json``), its access line
(``--access-log``). With none of them on, there is no ``Observer`` and a request pays one
``is None`` check at its start and one at its end.

The protocol adapters hand ``Inference.handle`` their carrier untouched (the gRPC servicer
context, the aiohttp request); it is read only here, and only for what is on: its W3C trace
context headers for a trace, its peer for an access line.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from typing import Any

from server.logs import ACCESS_LOGGER, REQUEST
from server.metrics import GRPC
from server.tracing import Tracer

log = logging.getLogger(__name__)
access = logging.getLogger(ACCESS_LOGGER)
TRACE_HEADERS = ("traceparent", "tracestate")


def trace_headers(protocol: str, carrier: Any) -> Mapping[str, str] | None:
    """The W3C trace context a request came with: gRPC metadata keys are lower case already; an
    aiohttp request's headers are case-insensitive."""
    if carrier is None:
        return None
    if protocol == GRPC:
        metadata = carrier.invocation_metadata() or ()
        return {key: value for key, value in metadata if key in TRACE_HEADERS}
    return carrier.headers


def peer_of(protocol: str, carrier: Any) -> str | None:
    if carrier is None:
        return None
    return carrier.peer() if protocol == GRPC else carrier.remote


class Observer:
    """Per-request tracing, log context and access line (each optional; see the module doc)."""

    def __init__(self, tracer: Tracer | None, log_context: bool, access_log: bool) -> None:
        self.tracer = tracer
        self.log_context = log_context
        self.access_log = access_log

    @classmethod
    def create(cls, tracer: Tracer | None, log_context: bool, access_log: bool) -> Observer | None:
        """None when there is nothing to do per request."""
        if tracer is None and not log_context and not access_log:
            return None
        return cls(tracer, log_context, access_log)

    def begin(self, call: Any, rpc: str, protocol: str, carrier: Any) -> contextvars.Token | None:
        """``call``: server.api.dataplane.Call. -> the log context's token, for ``end``."""
        if self.tracer is not None:
            try:
                call.span = self.tracer.start(rpc, protocol, trace_headers(protocol, carrier))
            except Exception:  # tracing never fails a request
                log.warning("tracing: could not start a span for %s", rpc, exc_info=True)
        return REQUEST.set(call) if self.log_context else None

    def end(
        self,
        call: Any,
        rpc: str,
        protocol: str,
        code: str,
        seconds: float,
        carrier: Any,
        token: contextvars.Token | None,
    ) -> None:
        served = call.served
        model, version = (served.name, served.version) if served is not None else (None, None)
        if call.span is not None:
            try:
                call.span.finish(code, model, version)
            except Exception:  # the request's answer stands whatever its trace does
                log.warning("tracing: could not end the span of %s", rpc, exc_info=True)
        if self.access_log:
            self._access(call, rpc, protocol, code, seconds, peer_of(protocol, carrier), model, version)
        if token is not None:
            REQUEST.reset(token)

    @staticmethod
    def _access(
        call: Any,
        rpc: str,
        protocol: str,
        code: str,
        seconds: float,
        peer: str | None,
        model: str | None,
        version: int | None,
    ) -> None:
        trace_id = call.span.trace_id if call.span is not None else None
        fields = {
            "protocol": protocol,
            "rpc": rpc,
            "model": model,
            "version": version,
            "status": code,
            "duration_ms": round(seconds * 1e3, 3),
            "peer": peer,
            "trace_id": trace_id,
        }
        where = f"{model}/{version}" if model is not None else "-"
        access.info(
            "%s %s %s %s %.3f ms peer=%s trace_id=%s",
            protocol,
            rpc,
            where,
            code,
            seconds * 1e3,
            peer or "-",
            trace_id or "-",
            extra={"fields": fields},
        )
