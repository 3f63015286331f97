"""OpenTelemetry behind ``--trace-config`` (server.tracing): imported only when tracing is on.

A traced request is one SERVER span named for its RPC (``ModelInfer``, ``Classify``, ...) with
three children:

* ``queue``: from entering its model's queue to the start of the batch that ran it;
* ``compute``: that batch (every traced request of a batch gets its own ``compute`` span with
  the batch's start and end; attributes: images and requests in the batch, the instance, the
  device and the onnxruntime provider);
* ``postprocess``: from the batch's outputs to the response built (the protocol's encoding).

Child spans are recorded after the fact, with explicit start and end times: the batcher only
notes two clock readings for a batch holding a traced request. Spans go to a batch span processor,
which exports them over OTLP/HTTP from its own thread.

Sampling is parent-based: a caller's W3C ``traceparent`` decides (sampled or not); without one
(or with an invalid one) the server starts a trace for every ``rate``-th request, ``count`` times
at most. The requests it does not trace get no span object at all.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Mapping
from time import time_ns

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.tracing import SERVICE_NAME, TraceSettings

log = logging.getLogger(__name__)

SCOPE = "cnnstack.server"


class OtelTracer:
    """The server's TracerProvider, OTLP/HTTP exporter and sampling (server.tracing.Tracer)."""

    def __init__(self, settings: TraceSettings) -> None:
        self.settings = settings
        # Roots are chosen here (every rate-th request), so the SDK samples every root it is
        # given; a remote parent's sampled flag decides for the caller's traces.
        self.provider = TracerProvider(
            sampler=ParentBased(root=ALWAYS_ON),
            resource=resource(settings),
            shutdown_on_exit=False,  # stop() flushes with a bounded wait, never an exit hook
        )
        self.provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=settings.url),
                max_queue_size=settings.bsp_max_queue_size,
                schedule_delay_millis=settings.bsp_schedule_delay,
                max_export_batch_size=settings.bsp_max_export_batch_size,
            )
        )
        self.tracer = self.provider.get_tracer(SCOPE)
        self._propagator = TraceContextTextMapPropagator()
        self._requests = itertools.count(1)
        self._remaining = settings.count
        log.info(
            "tracing: OpenTelemetry to %s; the server starts a trace every %d request(s) (rate, 0: never), "
            "and follows every caller's sampled traceparent",
            settings.url,
            settings.rate,
        )

    def start(self, rpc: str, protocol: str, headers: Mapping[str, str] | None) -> RequestSpan | None:
        parent = self._remote_parent(headers)
        if parent is None and not self._root_sampled():
            return None
        span = self.tracer.start_span(
            rpc,
            context=parent if parent is not None else Context(),
            kind=SpanKind.SERVER,
            attributes={"rpc.method": rpc, "protocol": protocol},
        )
        if not span.is_recording():  # the caller's traceparent said: not sampled
            return None
        return RequestSpan(self.tracer, span)

    def _remote_parent(self, headers: Mapping[str, str] | None) -> Context | None:
        if not headers or headers.get("traceparent") is None:
            return None
        ctx = self._propagator.extract(headers)
        if not trace.get_current_span(ctx).get_span_context().is_valid:
            return None  # malformed: the server decides as for a request without one
        return ctx

    def _root_sampled(self) -> bool:
        rate = self.settings.rate
        if rate == 0 or self._remaining == 0 or next(self._requests) % rate:
            return False
        if self._remaining > 0:
            self._remaining -= 1
        return True

    def shutdown(self, timeout_s: float) -> bool:
        """Flush and stop the exporter on a daemon thread: an unreachable collector delays a
        graceful stop by ``timeout_s`` at most (the SDK's own wait is 30 s)."""
        done = threading.Event()

        def flush() -> None:
            self.provider.shutdown()
            done.set()

        threading.Thread(target=flush, name="trace-flush", daemon=True).start()
        if not done.wait(timeout_s):
            log.warning("tracing: spans not exported within %.1fs of shutdown were dropped", timeout_s)
            return False
        return True


def resource(settings: TraceSettings) -> Resource:
    """The settings' attributes over the environment's (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME)
    over ``service.name=cnn-serve`` (the SDK's own default is "unknown_service")."""
    named = not str(Resource.create().attributes.get("service.name", "")).startswith("unknown_service")
    return Resource.create({**({} if named else {"service.name": SERVICE_NAME}), **dict(settings.resource)})


class RequestSpan:
    """One traced request: its span, and its children recorded once their times are known."""

    __slots__ = ("_tracer", "span", "_context", "trace_id", "span_id", "_enqueued", "_outputs")

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self._tracer = tracer
        self.span = span
        self._context = trace.set_span_in_context(span, Context())
        ids = span.get_span_context()
        self.trace_id = format(ids.trace_id, "032x")
        self.span_id = format(ids.span_id, "016x")
        self._enqueued = 0
        self._outputs = 0

    def enqueued(self) -> None:
        self._enqueued = time_ns()

    def batch(self, start_ns: int, end_ns: int, attributes: Mapping[str, str | int]) -> None:
        if self._enqueued:
            self._child("queue", self._enqueued, start_ns)
        self._child("compute", start_ns, end_ns, attributes)

    def outputs_ready(self) -> None:
        self._outputs = time_ns()

    def finish(self, status: str, model: str | None, version: int | None) -> None:
        end = time_ns()
        if self._outputs:
            self._child("postprocess", self._outputs, end)
        span = self.span
        if model is not None:
            span.set_attribute("model.name", model)
            span.set_attribute("model.version", str(version))
        span.set_attribute("status", status)
        if status != "OK":
            span.set_status(Status(StatusCode.ERROR, status))
        span.end(end)

    def _child(
        self, name: str, start: int, end: int, attributes: Mapping[str, str | int] | None = None
    ) -> None:
        child = self._tracer.start_span(name, self._context, start_time=start, attributes=attributes)
        child.end(end)
