"""Request tracing, configured as Triton configures it: ``--trace-config`` (repeatable).

Triton's settings, the ones a Triton user already writes (docs/serving.md "Tracing"):

* ``mode=opentelemetry``: the only mode here (Triton's own JSON-file mode, ``mode=triton`` and
  ``triton,file=...``, is refused with a message).
* ``level=TIMESTAMPS`` turns tracing on; ``level=OFF`` (the default) leaves it off.
* ``rate=N``: the server itself starts a trace for every N-th request (default 1000, as Triton;
  1: every request; 0: none). A request whose caller sent a W3C ``traceparent`` follows the
  caller's decision instead (parent-based: its sampled flag), whatever the rate.
* ``count=N``: stop after N traces the server started itself (-1, the default: never).
* ``opentelemetry,url=URL``: the OTLP/HTTP endpoint (default ``http://localhost:4318/v1/traces``).
* ``opentelemetry,resource=KEY=VALUE``: a resource attribute (repeatable); the environment's
  ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` come next, then ``service.name=cnn-serve``.
* ``opentelemetry,bsp_max_queue_size=N``, ``bsp_schedule_delay=MS``, ``bsp_max_export_batch_size=N``:
  the batch span processor (spans are exported from its own thread, in batches).

This module never imports opentelemetry: ``start_tracer`` does (server.otel) and only when the
settings turn tracing on, so a server without tracing loads none of it and pays nothing per request.
What the runtime sees of a traced request is ``RequestTrace``: ``None`` for every untraced one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

DEFAULT_URL = "http://localhost:4318/v1/traces"  # an OpenTelemetry Collector's OTLP/HTTP receiver
SERVICE_NAME = "cnn-serve"  # the resource's service.name unless the settings or OTEL_* name one
LEVELS = ("OFF", "TIMESTAMPS")
BSP_SETTINGS = ("bsp_max_queue_size", "bsp_schedule_delay", "bsp_max_export_batch_size")


@dataclass(frozen=True)
class TraceSettings:
    level: str = "OFF"
    rate: int = 1000  # every rate-th request starts a trace; 0: only callers' sampled traceparents
    count: int = -1  # traces the server may still start; -1: no limit
    url: str = DEFAULT_URL
    resource: tuple[tuple[str, str], ...] = ()  # attributes given with opentelemetry,resource=K=V
    bsp_max_queue_size: int = 2048  # the batch span processor's defaults, as Triton's
    bsp_schedule_delay: int = 5000  # ms between exports
    bsp_max_export_batch_size: int = 512

    @property
    def enabled(self) -> bool:
        return self.level == "TIMESTAMPS"


def parse_trace_config(items: Sequence[str]) -> tuple[TraceSettings, list[str]]:
    """``--trace-config`` items -> (settings, problems: one message per item that cannot work)."""
    fields: dict[str, Any] = {}
    resource: dict[str, str] = {}
    problems: list[str] = []
    for item in items:
        mode, _, setting = item.partition(",") if "," in item.split("=", 1)[0] else ("", "", item)
        key, eq, value = setting.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            problems.append(f"--trace-config {item!r}: expected KEY=VALUE or opentelemetry,KEY=VALUE")
        elif mode == "triton" or (not mode and key == "mode" and value != "opentelemetry"):
            problems.append(
                f"--trace-config {item!r}: only mode=opentelemetry is supported (Triton's JSON trace "
                "files are not written; export to an OpenTelemetry collector instead)"
            )
        elif mode not in ("", "opentelemetry"):
            problems.append(f"--trace-config {item!r}: unknown mode {mode!r} (opentelemetry)")
        elif mode == "opentelemetry":
            problems += _otel_setting(item, key, value, fields, resource)
        else:
            problems += _global_setting(item, key, value, fields)
    settings = TraceSettings(**fields, resource=tuple(resource.items()))
    if settings.bsp_max_export_batch_size > settings.bsp_max_queue_size:
        problems.append("--trace-config: bsp_max_export_batch_size must be <= bsp_max_queue_size")
    return settings, problems


def _global_setting(item: str, key: str, value: str, fields: dict[str, Any]) -> list[str]:
    if key == "mode":
        return []  # opentelemetry (anything else was refused above)
    if key == "level":
        level = value.upper()
        if level == "TENSORS":
            return [f"--trace-config {item!r}: TENSORS is not traced in opentelemetry mode (as in Triton)"]
        if level not in LEVELS:
            return [f"--trace-config {item!r}: level must be one of {LEVELS}"]
        fields["level"] = level
        return []
    if key in ("rate", "count"):
        lowest = 0 if key == "rate" else -1
        number = _int(value)
        if number is None or number < lowest:
            return [f"--trace-config {item!r}: {key} must be an integer >= {lowest}"]
        fields[key] = number
        return []
    return [f"--trace-config {item!r}: unknown setting {key!r} (mode, level, rate, count)"]


def _otel_setting(
    item: str, key: str, value: str, fields: dict[str, Any], resource: dict[str, str]
) -> list[str]:
    if key == "url":
        if not value.startswith(("http://", "https://")):
            return [f"--trace-config {item!r}: url must be an http:// or https:// OTLP/HTTP endpoint"]
        fields["url"] = value
        return []
    if key == "resource":
        name, eq, attr = value.partition("=")
        if not eq or not name:
            return [f"--trace-config {item!r}: resource takes KEY=VALUE"]
        resource[name] = attr
        return []
    if key in BSP_SETTINGS:
        number = _int(value)
        if number is None or number < 1:
            return [f"--trace-config {item!r}: {key} must be an integer >= 1"]
        fields[key] = number
        return []
    return [
        f"--trace-config {item!r}: unknown opentelemetry setting {key!r} (url, resource, {', '.join(BSP_SETTINGS)})"
    ]


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


class RequestTrace(Protocol):
    """One traced request, as the data plane and the batcher record it (server.otel.RequestSpan).
    Times are ``time.time_ns()``, the clock spans carry."""

    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits: the request's span

    def enqueued(self) -> None:
        """The request entered its model's queue (now)."""

    def batch(self, start_ns: int, end_ns: int, attributes: Mapping[str, str | int]) -> None:
        """Its batch ran from ``start_ns`` to ``end_ns``: the queue wait ends, compute spans these."""

    def outputs_ready(self) -> None:
        """Its outputs came back from the batch (now): building the response starts."""

    def finish(self, status: str, model: str | None, version: int | None) -> None:
        """The request ended with gRPC status name ``status``: close its spans."""


class Tracer(Protocol):
    def start(self, rpc: str, protocol: str, headers: Mapping[str, str] | None) -> RequestTrace | None:
        """A request's trace, or None when it is not sampled. ``headers``: its W3C trace context."""

    def shutdown(self, timeout_s: float) -> bool:
        """Export what is buffered (at most ``timeout_s``); True when everything went out."""


def start_tracer(settings: TraceSettings) -> Tracer | None:
    """The server's tracer, or None when tracing is off (then opentelemetry is never imported)."""
    if not settings.enabled:
        return None
    from server.otel import OtelTracer

    return OtelTracer(settings)
