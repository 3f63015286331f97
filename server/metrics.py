"""Every Prometheus metric of the server, defined here and nowhere else.

Labels are small and bounded: ``model`` and ``version`` come from the repository (a request naming
an unknown model is counted under ``model=""``), ``rpc``, ``protocol`` and ``code`` from fixed
lists. Both protocols count into the same series: an HTTP v2 infer is ``rpc="ModelInfer",
protocol="http"``, an HTTP classify ``rpc="Classify", protocol="http"``. All label
combinations of a model version are created when it loads, so a dashboard sees zeros rather than
missing series. The hot path talks to pre-resolved children (``VersionMetrics``), never to
``.labels()``.

Under ``cnn-serve --workers N`` every worker writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, chosen by that variable at
import) and the supervisor serves one ``/metrics`` over all of them (server.scaleout.supervisor):
counters and histograms are summed over the workers, dead ones included, so totals never go back;
each gauge says how it combines (``multiprocess_mode``) and counts live workers only. The two
gauges read through callables are written to the files by ``refresh_live_gauges``, which the
worker runs every ``LIVE_GAUGE_PERIOD_S``: a function gauge has no file to be read from.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from urllib.parse import urlparse

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

from server.net import bind, bound_port

# 100 us .. 10 s: from a small model's batch of 1 to a large model's batch behind a full queue.
LATENCY_BUCKETS = (
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RPCS = ("Classify", "ClassifyStream", "ModelInfer", "ModelStreamInfer")
GRPC, HTTP = "grpc", "http"
# (rpc, protocol) pairs that exist: the streams are gRPC only.
ROUTES = tuple((rpc, GRPC) for rpc in RPCS) + (("Classify", HTTP), ("ModelInfer", HTTP))
CODES = (
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "UNAVAILABLE",
    "INTERNAL",
)
UNKNOWN_MODEL = ""
LIVE_GAUGE_PERIOD_S = 0.5  # multiprocess mode: how stale queue depth and in-flight may be in a scrape


def multiprocess_mode() -> bool:
    """prometheus_client's own test (its values module reads the same variables at import)."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


@dataclass(frozen=True)
class VersionMetrics:
    """Pre-resolved children for one (model, version); ``observe_*`` are the hot-path calls."""

    model: str
    version: str
    latency: dict[tuple[str, str], object]  # (rpc, protocol) -> histogram child
    requests: dict[tuple[str, str, str], object]  # (rpc, protocol, code) -> counter child
    queue_wait: object
    compute: object
    batch_size: object
    images: object
    inflight: object

    def observe_request(self, rpc: str, code: str, seconds: float, protocol: str = GRPC) -> None:
        self.latency[(rpc, protocol)].observe(seconds)  # type: ignore[attr-defined]
        self.requests[(rpc, protocol, code)].inc()  # type: ignore[attr-defined]

    def observe_batch(self, images: int, compute_s: float, queue_waits: list[float]) -> None:
        self.batch_size.observe(images)  # type: ignore[attr-defined]
        self.compute.observe(compute_s)  # type: ignore[attr-defined]
        self.images.inc(images)  # type: ignore[attr-defined]
        observe = self.queue_wait.observe  # type: ignore[attr-defined]
        for w in queue_waits:
            observe(w)


@dataclass(frozen=True)
class CacheMetrics:
    """Pre-resolved response-cache counters of one (model, version) that uses the cache."""

    hits: object
    misses: object
    evictions: object


class ServerMetrics:
    """Owns the registry; ``registry`` may be passed by a test to read values directly."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        mv = ["model", "version"]
        self.request_latency = Histogram(
            "cnn_request_latency_seconds",
            "Server-side latency of inference calls (per request, "
            "or per stream message), from arrival to response.",
            ["rpc", "protocol", *mv],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "cnn_queue_wait_seconds",
            "Time a request waited in its model's queue before its batch started.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "cnn_compute_seconds",
            "onnxruntime time per executed batch.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "cnn_batch_size", "Images per executed batch.", mv, buckets=BATCH_BUCKETS, registry=r
        )
        self.requests = Counter(
            "cnn_requests",
            "Inference requests by RPC, protocol, model, version and gRPC status code.",
            ["rpc", "protocol", *mv, "code"],
            registry=r,
        )
        self.images = Counter("cnn_images", "Images inferred.", mv, registry=r)
        # Workers: queue depth and in-flight add up; an info gauge is 1 while any live worker says so.
        self.queue_depth = Gauge(
            "cnn_queue_depth",
            "Requests waiting in the model's queue.",
            mv,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight = Gauge(
            "cnn_inflight_requests",
            "Inference requests admitted and not yet answered.",
            mv,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "cnn_model_info",
            "1 for every loaded model version; its execution provider and architecture.",
            [*mv, "provider", "arch", "dataset"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.load_failures = Counter(
            "cnn_model_load_failures",
            "Model versions rejected at load (corrupt file, failed export report, ...).",
            ["model"],
            registry=r,
        )
        self.server_info = Gauge(
            "cnn_server_info",
            "1; the device asked for and the execution provider in use.",
            ["device", "provider"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.connections_closed = Counter(
            "cnn_connections_closed",
            "Connections the server closed on a client: a time limit passed (header_timeout, body_timeout, "
            "idle), a size limit (headers_too_large, body_too_large), or the open-connection cap "
            "(over_connection_limit: refused at connect).",
            ["protocol", "reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "cnn_auth_failures",
            "Calls refused by token authentication: no token (missing), an unknown one (invalid), or a "
            "non-admin token on an administrative API (forbidden).",
            ["protocol", "reason"],
            registry=r,
        )
        self.cache_hits = Counter(
            "cnn_cache_hits",
            "Requests answered from the response cache (they skip the queue and the model).",
            mv,
            registry=r,
        )
        self.cache_misses = Counter(
            "cnn_cache_misses",
            "Requests of a model that uses the response cache not found there (run by the model).",
            mv,
            registry=r,
        )
        self.cache_evictions = Counter(
            "cnn_cache_evictions",
            "Response-cache entries removed, least recently used first, to make room for new ones.",
            mv,
            registry=r,
        )
        # Workers: each has its own cache, so the bytes add up.
        self.cache_bytes = Gauge(
            "cnn_cache_bytes",
            "Bytes the response cache holds: cached outputs plus a fixed overhead per entry.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.multiprocess = multiprocess_mode()
        self._live: dict[tuple[str, str], tuple[Callable[[], int], Callable[[], int] | None]] = {}
        self._info_labels: dict[tuple[str, str], tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self.unknown = self.for_version(UNKNOWN_MODEL, "")

    def for_version(self, model: str, version: str) -> VersionMetrics:
        """Create (pre-initialise) every series of one model version and return its children."""
        with self._lock:
            return VersionMetrics(
                model=model,
                version=version,
                latency={(rpc, p): self.request_latency.labels(rpc, p, model, version) for rpc, p in ROUTES},
                requests={
                    (rpc, p, c): self.requests.labels(rpc, p, model, version, c)
                    for rpc, p in ROUTES
                    for c in CODES
                },
                queue_wait=self.queue_wait.labels(model, version),
                compute=self.compute.labels(model, version),
                batch_size=self.batch_size.labels(model, version),
                images=self.images.labels(model, version),
                inflight=self.inflight.labels(model, version),
            )

    def cache_version(self, model: str, version: str) -> CacheMetrics:
        """Create (at zero) the cache series of a version that uses the response cache."""
        with self._lock:
            return CacheMetrics(
                hits=self.cache_hits.labels(model, version),
                misses=self.cache_misses.labels(model, version),
                evictions=self.cache_evictions.labels(model, version),
            )

    def version_loaded(
        self,
        model: str,
        version: str,
        provider: str,
        arch: str,
        dataset: str,
        queue_size: Callable[[], int],
        inflight: Callable[[], int] | None = None,
    ) -> VersionMetrics:
        """Pre-initialise a loaded version's series. The two gauges are read at scrape time from
        the callables (plain ints on the event loop), so the hot path takes no metric lock for them."""
        children = self.for_version(model, version)
        with self._lock:
            self.model_info.labels(model, version, provider, arch, dataset).set(1)
            self._info_labels[(model, version)] = (model, version, provider, arch, dataset)
            if self.multiprocess:
                self._live[(model, version)] = (queue_size, inflight)
            else:
                self.queue_depth.labels(model, version).set_function(queue_size)
                if inflight is not None:
                    self.inflight.labels(model, version).set_function(inflight)
            self.load_failures.labels(model)
        if self.multiprocess:
            self.refresh_live_gauges()
        return children

    def refresh_live_gauges(self) -> None:
        """Multiprocess mode: write the callables' current values where the supervisor reads them."""
        with self._lock:
            live = list(self._live.items())
        for (model, version), (queue_size, inflight) in live:
            self.queue_depth.labels(model, version).set(queue_size())
            if inflight is not None:
                self.inflight.labels(model, version).set(inflight())

    def version_unloaded(self, model: str, version: str) -> None:
        """Drop the gauges of a retired version (counters and histograms keep their totals)."""
        with self._lock:
            info = self._info_labels.pop((model, version), None)
            self._live.pop((model, version), None)
            for gauge, labels in (
                (self.model_info, info),
                (self.queue_depth, (model, version)),
                (self.inflight, (model, version)),
            ):
                if labels is None:
                    continue
                if self.multiprocess:
                    # A series cannot leave a worker's file (prometheus_client cannot remove it
                    # there): it reads 0 until the worker exits.
                    gauge.labels(*labels).set(0)
                    continue
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)

    def set_server_info(self, device: str, provider: str) -> None:
        self.server_info.labels(device, provider).set(1)


class MetricsEndpoint:
    """``/metrics`` (and nothing else: 404) for ``registry``, served from a daemon thread.

    A thread, not the event loop: a scrape is answered even while the loop is saturated, which is
    when the numbers matter. Only one path, so an HTTP probe pointed at the wrong port fails instead
    of passing on the metrics page. The single server and the supervisor (its registry reads the
    workers' files) both serve through this.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        handler = type("MetricsOnlyHandler", (_MetricsOnly,), {"registry": registry})
        sock = bind(host, port)
        self._httpd = ThreadingHTTPServer(sock.getsockname()[:2], handler, bind_and_activate=False)
        self._httpd.socket.close()
        self._httpd.socket = sock  # bound and listening already, as every port of the server
        self._httpd.daemon_threads = True
        self.port = bound_port(sock)
        threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _MetricsOnly(MetricsHandler):
    def do_GET(self) -> None:
        if urlparse(self.path).path != "/metrics":
            body = b"404 not found: metrics are at /metrics\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()
