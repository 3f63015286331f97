"""Assembly: ``create_server(cfg)`` (tests, load tests, embedding) and ``serve(cfg)`` (the CLI:
signals, the "listening" line, graceful shutdown).

One process, one event loop: gRPC and HTTP/REST (server/http_app.py) share the models, batchers,
admission and metrics; with ``--tls-cert``/``--tls-key`` both listeners use TLS (server/tls.py).

Shutdown (SIGTERM/SIGINT, or ``handle.stop()``): health goes NOT_SERVING, new calls are refused
(UNAVAILABLE over gRPC, 503 over HTTP), open streams stop reading, queued and in-flight calls
finish within the grace period, then both ports close, model versions are drained and the
metrics endpoint closes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from cnnstack.contract import RepositoryError
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc
from protos.inference import grpc_service_pb2_grpc
from server.api.auth import AuthInterceptor, http_middleware
from server.api.classifier.grpc import ClassifierService
from server.api.classifier.rest import ClassifyRest
from server.api.control import LocalControl, ModelControl
from server.api.dataplane import Inference, ServerState
from server.api.guard import HttpLimits
from server.api.health import NOT_SERVING, SERVICE_NAMES, SERVING, create_health, enable_reflection
from server.api.http import build_app, start_http
from server.api.kserve.grpc import KServeService
from server.api.kserve.rest import KServeRest
from server.api.observe import Observer
from server.config import ServerConfig
from server.logs import event
from server.metrics import LIVE_GAUGE_PERIOD_S, MetricsEndpoint, ServerMetrics
from server.net import grpc_address
from server.runtime.cache import ResponseCache
from server.runtime.cuda import CUDA, DeviceError, resolve_device
from server.runtime.loader import ServingSettings
from server.runtime.manager import ModelManager
from server.runtime.share import usable_cpus, worker_gpus
from server.tls import TlsFiles, grpc_server_credentials, server_ssl_context
from server.tokens import Tokens
from server.tracing import Tracer, start_tracer

log = logging.getLogger(__name__)

LINGER_S = 0.25  # after the last admitted call finished, keep refusing (UNAVAILABLE) this long
TRACE_FLUSH_S = 5.0  # at shutdown, spans not yet exported get this long to reach the collector


@dataclass
class ServerHandle:
    """A running server. ``await stop(grace)`` shuts it down gracefully (idempotent)."""

    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    manager: ModelManager
    metrics: ServerMetrics
    state: ServerState
    health: health_aio.HealthServicer
    provider: str
    grace_s: float
    http_port: int | None = None
    tls: bool = False
    tokens: Tokens | None = None
    tracer: Tracer | None = None
    _http: web.AppRunner | None = None
    _background: list[asyncio.Task] = field(default_factory=list)
    _decode_executor: ThreadPoolExecutor | None = None
    _metrics_endpoint: MetricsEndpoint | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False

    def reload(self) -> None:
        """SIGHUP: scan the repository now, read the token files again."""
        self.manager.request_reload()
        if self.tokens is not None and self.tokens.enabled:
            self.tokens.reload()

    async def stop(self, grace: float | None = None) -> dict:
        """Returns the admission summary: ``admitted``, ``admitted_ok``, ``admitted_failed``."""
        if self._stopping:
            await self._stopped.wait()
            return self.state.summary()
        self._stopping = True
        grace = self.grace_s if grace is None else grace
        t0 = time.monotonic()
        self.state.begin_shutdown()
        await self.health.enter_graceful_shutdown()
        for task in self._background:
            task.cancel()
        # Phase 1: our handlers answer new calls UNAVAILABLE (clients retry elsewhere) while the
        # calls already admitted, and open streams, finish. Stopping gRPC right away would make
        # grpc-core kill calls that arrived but were not yet dispatched with CANCELLED.
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while not self.state.idle and loop.time() < end:
            await asyncio.sleep(0.005)
        # A client whose call just finished may send its next one now: answer it UNAVAILABLE too,
        # for a moment, rather than racing the port closing (undispatched calls end CANCELLED).
        await asyncio.sleep(max(0.0, min(LINGER_S, end - loop.time())))
        # Phase 2: close the ports; whatever is still running gets the rest of the grace period.
        closing = [self.server.stop(max(0.0, end - loop.time()))]
        if self._http is not None:
            closing.append(self._http.cleanup())
        await asyncio.gather(*closing)
        await self.manager.close()
        if self._decode_executor is not None:
            self._decode_executor.shutdown(wait=False)
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        if self.tracer is not None:  # every request has ended: its spans are all in the processor
            await asyncio.to_thread(self.tracer.shutdown, TRACE_FLUSH_S)
        summary = self.state.summary()
        log.info("stopped in %.2fs: %s", time.monotonic() - t0, summary)
        self._stopped.set()
        return summary


def serving_settings(cfg: ServerConfig, provider: str) -> ServingSettings:
    return ServingSettings(
        provider=provider,
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_s=cfg.max_queue_delay_ms / 1000,
        max_queue_size=cfg.max_queue_size,
        instances=cfg.instances,
        intra_op_threads=cfg.intra_op_threads,
        drain_timeout_s=cfg.grace_s,
        inline_compute_s=cfg.inline_compute_us / 1e6,
        gpus=worker_gpus(cfg.gpu_ids),  # worker i of --workers starts at the i-th GPU
        cudnn_conv_algo_search=cfg.cudnn_conv_algo_search,
        strict_device=cfg.device == "cuda",
        response_cache=cfg.cache_size_bytes > 0,
    )


def grpc_options(cfg: ServerConfig, reuse_port: bool = False) -> list[tuple[str, int]]:
    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # The front door: a connection that never finishes its set-up, never answers a ping, or
        # pings too often is closed; so is one that stays without calls (clients reconnect).
        ("grpc.max_allowed_incoming_connections", cfg.max_connections),
        ("grpc.max_concurrent_streams", cfg.streams_per_connection),
        ("grpc.server_handshake_timeout_ms", ms(cfg.grpc_handshake_timeout_s)),
        ("grpc.keepalive_time_ms", ms(cfg.grpc_keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(cfg.grpc_keepalive_timeout_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(cfg.grpc_min_ping_interval_s)),
        ("grpc.keepalive_permit_without_calls", 1),  # a client's keepalive while idle is fine...
        ("grpc.http2.max_ping_strikes", 2),  # ... more often than the interval twice is not
        # A second server on the same port must fail, not share it; the workers of one supervisor
        # (server.scaleout.supervisor) share it on purpose and the kernel spreads connections over
        # them. Any other listener a worker opens on a fixed port (the HTTP one) needs reuse_port too.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    if cfg.grpc_max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", ms(cfg.grpc_max_connection_idle_s)))
    if cfg.grpc_max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", ms(cfg.grpc_max_connection_age_s)))
        options.append(("grpc.max_connection_age_grace_ms", ms(cfg.grpc_max_connection_age_grace_s)))
    return options


async def refresh_live_gauges(metrics: ServerMetrics) -> None:
    while True:
        metrics.refresh_live_gauges()
        await asyncio.sleep(LIVE_GAUGE_PERIOD_S)


def http_limits(cfg: ServerConfig) -> HttpLimits:
    return HttpLimits(
        header_timeout_s=cfg.http_header_timeout_s,
        body_timeout_s=cfg.http_body_timeout_s,
        max_body_bytes=cfg.body_limit,
        max_connections=cfg.max_connections,
    )


def tls_files(cfg: ServerConfig) -> TlsFiles | None:
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    return TlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)


async def load_models(
    cfg: ServerConfig, metrics: ServerMetrics
) -> tuple[ModelManager, health_aio.HealthServicer]:
    """Resolve the device, load the repository; the health servicer follows each model's state."""
    provider = await asyncio.to_thread(resolve_device, cfg.device, cfg.gpu_ids, cfg.cudnn_conv_algo_search)
    where = f" on GPU(s) {cfg.gpus}" if provider == CUDA else ""
    log.info(
        "device %s -> onnxruntime %s%s; %d usable CPU core(s)", cfg.device, provider, where, usable_cpus()
    )
    metrics.set_server_info(cfg.device, provider)
    health = create_health()

    async def on_health(name: str, serving: bool) -> None:
        await health.set(name, SERVING if serving else NOT_SERVING)

    cache = ResponseCache(cfg.cache_size_bytes, metrics) if cfg.cache_size_bytes > 0 else None
    manager = ModelManager(
        cfg.repository,
        serving_settings(cfg, provider),
        metrics,
        on_health,
        mode=cfg.model_control_mode,
        load_models=cfg.load_model,
        configs=dict(cfg.model_configs),
        cache=cache,
    )
    await manager.sync()
    for name in SERVICE_NAMES:
        await health.set(name, SERVING)
    return manager, health


async def start_grpc(
    cfg: ServerConfig,
    inference: Inference,
    control: ModelControl,
    health: health_aio.HealthServicer,
    tokens: Tokens,
    reuse_port: bool,
) -> tuple[grpc.aio.Server, int]:
    """Every gRPC service on one port (TLS when configured); returns (server, bound port)."""
    # No interceptor at all without tokens: calls pay nothing for authentication that is off.
    interceptors = [AuthInterceptor(tokens, inference.metrics)] if tokens.enabled else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=grpc_options(cfg, reuse_port),
        maximum_concurrent_rpcs=cfg.concurrent_rpc_limit,
    )
    classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierService(inference), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeService(inference, control), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection(server)
    address, files = grpc_address(cfg.host, cfg.port), tls_files(cfg)
    try:
        if files is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, grpc_server_credentials(files))
    except RuntimeError as e:
        raise OSError(f"cannot bind gRPC to {cfg.host}:{cfg.port}: {e}") from e
    await server.start()
    return server, port


async def create_server(
    cfg: ServerConfig,
    metrics: ServerMetrics | None = None,
    reuse_port: bool = False,
    control: Callable[[ModelManager], ModelControl] = LocalControl,
) -> tuple[ServerHandle, int]:
    """Load the repository, start gRPC, HTTP (+ /metrics and polling); returns (handle, bound gRPC port).
    ``control`` makes the model control the repository API uses (a worker's goes through its
    supervisor).

    Raises DeviceError (``--device cuda`` without a working CUDA provider), RepositoryError
    (repository missing) or OSError (TLS files unusable: ``ssl.SSLError``) before binding anything,
    OSError when a port cannot be bound.
    """
    if not cfg.repository.is_dir():
        raise RepositoryError(f"model repository {cfg.repository} is not a directory")
    # TLS files are checked (the key matches the certificate) before anything loads or binds.
    files = tls_files(cfg)
    ssl_context = server_ssl_context(files) if files is not None else None
    tokens = Tokens(cfg.auth_token_file, cfg.admin_token_file, cfg.auth_health)  # TokenFileError: OSError
    metrics = metrics if metrics is not None else ServerMetrics()
    manager, health = await load_models(cfg, metrics)
    state = ServerState()
    decode_executor = ThreadPoolExecutor(max_workers=usable_cpus(), thread_name_prefix="decode")
    tracer = start_tracer(cfg.trace_settings)  # None when off: opentelemetry is not even imported
    observer = Observer.create(tracer, cfg.log_format == "json", cfg.access_log)
    inference = Inference(manager, metrics, state, decode_executor, observer)
    models = control(manager)
    started: list[Callable[[], Awaitable[object]]] = [manager.close]  # closed in reverse if a port fails
    if tracer is not None:
        started.append(functools.partial(asyncio.to_thread, tracer.shutdown, 0.0))
    runner, http_port, endpoint = None, None, None
    try:
        server, port = await start_grpc(cfg, inference, models, health, tokens, reuse_port)
        started.append(functools.partial(server.stop, 0))
        if cfg.http_port >= 0:
            auth = [http_middleware(tokens, metrics)] if tokens.enabled else []
            app = build_app([KServeRest(inference, models), ClassifyRest(inference)], cfg.body_limit, auth)
            runner, http_port = await start_http(
                app,
                cfg.host,
                cfg.http_port,
                http_limits(cfg),
                ssl_context,
                reuse_port,
                cfg.grace_s,
                cfg.http_keepalive_timeout_s,
                metrics,
            )
            started.append(runner.cleanup)
        if cfg.metrics_port >= 0:
            endpoint = MetricsEndpoint(metrics.registry, cfg.host, cfg.metrics_port)
    except BaseException:
        for close in reversed(started):
            await close()
        decode_executor.shutdown(wait=False)
        raise
    background = [asyncio.create_task(manager.poll_forever(cfg.poll_interval_s), name="repository-poll")]
    if metrics.multiprocess:
        background.append(asyncio.create_task(refresh_live_gauges(metrics), name="live-gauges"))
    state.ready = True
    handle = ServerHandle(
        server=server,
        port=port,
        metrics_port=endpoint.port if endpoint is not None else None,
        manager=manager,
        metrics=metrics,
        state=state,
        health=health,
        provider=manager.settings.provider,
        grace_s=cfg.grace_s,
        http_port=http_port,
        tls=cfg.tls,
        tokens=tokens,
        tracer=tracer,
        _http=runner,
        _background=background,
        _decode_executor=decode_executor,
        _metrics_endpoint=endpoint,
    )
    return handle, port


async def serve(
    cfg: ServerConfig,
    reuse_port: bool = False,
    control: Callable[[ModelManager], ModelControl] = LocalControl,
) -> int:
    loop = asyncio.get_running_loop()
    try:
        handle, port = await create_server(cfg, reuse_port=reuse_port, control=control)
    except (DeviceError, RepositoryError, OSError) as e:
        log.error("cannot start: %s", e)
        return 2
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, handle.reload)
    models = [
        {"name": e.name, "versions": sorted(e.versions), "provider": e.latest.provider}
        for e in handle.manager.entries()
    ]
    event(
        "listening",
        host=cfg.host,
        port=port,
        http_port=handle.http_port,
        metrics_port=handle.metrics_port,
        tls=handle.tls,
        provider=handle.provider,
        models=models,
        pid=os.getpid(),
    )
    await stop.wait()
    log.info("signal received: draining (grace %.1fs)", cfg.grace_s)
    summary = await handle.stop(cfg.grace_s)
    event("stopped", **summary)
    return 0


def run(
    cfg: ServerConfig,
    reuse_port: bool = False,
    control: Callable[[ModelManager], ModelControl] = LocalControl,
) -> int:
    """Run ``serve`` on uvloop when it is installed (less event-loop work per RPC), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(cfg, reuse_port, control))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(cfg, reuse_port, control))


__all__ = ["ServerHandle", "create_server", "run", "serve"]
