"""A local OTLP/HTTP trace receiver: what an OpenTelemetry Collector's ``otlphttp`` receiver does
for ``POST /v1/traces`` (protobuf ``ExportTraceServiceRequest``), on 127.0.0.1 with a free port,
on its own threads. The tracing tests decode every span as it arrives; the benchmark keeps the
bodies and decodes them only when asked (``decode=False``), so the sink costs the machine little
while it measures.

    with OtlpSink() as sink:            # sink.url -> http://127.0.0.1:PORT/v1/traces
        ...                             # a server started with --trace-config opentelemetry,url=<sink.url>
        spans = sink.wait_for(4)        # [FlatSpan, ...]
    print(render_tree(spans))           # one trace per request, as an indented tree
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class FlatSpan:
    """One exported span, its ids in hex (parent "" for a root)."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    kind: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0  # 0 unset, 1 ok, 2 error (opentelemetry.proto.trace.v1.Status)
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind is not None else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode(body: bytes) -> list[FlatSpan]:
    """An ``ExportTraceServiceRequest`` body -> its spans."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(body)
    out = []
    for rs in request.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    FlatSpan(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        kind=s.kind,
                        attributes=_attrs(s.attributes),
                        status_code=s.status.code,
                        resource=resource,
                    )
                )
    return out


class OtlpSink:
    """``start()`` / ``stop()`` (or a context manager); ``posts`` and ``bytes`` count what came."""

    def __init__(self, decode: bool = True) -> None:
        self.decode = decode
        self.posts = 0
        self.bytes = 0
        self._spans: list[FlatSpan] = []
        self._bodies: list[bytes] = []  # decode=False: decoded by spans()
        self._lock = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the sink first"
        return f"http://127.0.0.1:{self._server.server_address[1]}{TRACES_PATH}"

    def start(self) -> OtlpSink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ok = self.path == TRACES_PATH
                if ok:
                    sink._received(body)
                self.send_response(200 if ok else 404)
                # An empty ExportTraceServiceResponse: zero bytes of protobuf.
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True)
        self._thread.start()
        return self

    def _received(self, body: bytes) -> None:
        spans = decode(body) if self.decode else []
        with self._lock:
            self.posts += 1
            self.bytes += len(body)
            self._spans += spans
            if not self.decode:
                self._bodies.append(body)
            self._lock.notify_all()

    def spans(self) -> list[FlatSpan]:
        with self._lock:
            bodies, self._bodies = self._bodies, []
            self._spans += [s for body in bodies for s in decode(body)]
            return list(self._spans)

    def wait_for(self, count: int, timeout_s: float = 30.0) -> list[FlatSpan]:
        """At least ``count`` spans (all received so far), or TimeoutError."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while len(self._spans) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._spans)} spans received, waited for {count}")
                self._lock.wait(left)
            return list(self._spans)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OtlpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def render_tree(spans: list[FlatSpan], trace_id: str | None = None) -> str:
    """Each trace (or only ``trace_id``) as a tree: name, duration, offset from its root's start,
    and the attributes that say what ran where."""
    by_parent: dict[str, list[FlatSpan]] = {}
    ids = {s.span_id for s in spans}
    for s in sorted(spans, key=lambda s: s.start_ns):
        by_parent.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    lines: list[str] = []

    def walk(span: FlatSpan, depth: int, t0: int) -> None:
        attrs = " ".join(f"{k}={v}" for k, v in span.attributes.items())
        offset = (span.start_ns - t0) / 1e6
        lines.append(
            f"{'  ' * depth}{span.name:<{24 - 2 * depth}} {span.duration_ms:8.3f} ms  +{offset:.3f}  {attrs}".rstrip()
        )
        for child in by_parent.get(span.span_id, []):
            walk(child, depth + 1, t0)

    for root in by_parent.get("", []):
        if trace_id is None or root.trace_id == trace_id:
            parent = f" (caller's span {root.parent_id})" if root.parent_id else ""
            lines.append(f"trace {root.trace_id}{parent}")
            walk(root, 1, root.start_ns)
    return "\n".join(lines)
