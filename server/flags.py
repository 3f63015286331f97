"""``cnn-serve``'s flags: one per ``ServerConfig`` field, each with its environment variable
``CNN_SERVE_<FLAG>`` (the command line wins), its default taken from the dataclass."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from server.config import ENV_PREFIX, MODEL_CONTROL_MODES, ServerConfig
from server.logs import LOG_FORMATS
from server.runtime.devices import ALGO_SEARCHES, DEVICES


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnn-serve",
        description="gRPC and HTTP server for a model repository: dynamic batching on onnxruntime, "
        "cnnstack.classifier.v1 + KServe v2 (gRPC and REST) + grpc.health.v1 + reflection, "
        "Prometheus metrics.",
        epilog=f"Every flag can be set by environment variable {ENV_PREFIX}<FLAG> "
        f"(e.g. {ENV_PREFIX}MAX_BATCH_SIZE=32); the command line wins.",
    )
    d = ServerConfig(repository=Path("."))

    def add(flag: str, type_, default, help_: str, **kw) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        env = ENV_PREFIX + dest.upper()
        if env in environ:
            try:
                default = type_(environ[env])
            except ValueError:
                p.error(f"{env}={environ[env]!r} is not a valid {type_.__name__}")
        p.add_argument(flag, type=type_, default=default, dest=dest, help=f"{help_} [env {env}]", **kw)

    add(
        "--repository",
        Path,
        None,
        "model repository (Triton layout: NAME/config.pbtxt, NAME/<version>/model.onnx)",
    )
    add("--host", str, d.host, "address to bind (0.0.0.0 in containers)")
    add("--port", int, d.port, "gRPC port; 0 picks a free one (printed in the 'listening' log line)")
    add("--metrics-port", int, d.metrics_port, "Prometheus /metrics port; 0 picks a free one, -1 disables")
    add(
        "--device",
        str,
        d.device,
        "onnxruntime execution provider: cuda fails start unless a convolution runs on every GPU in "
        "--gpus, and refuses models with a convolution on the CPU; auto falls back to CPU and says why",
        choices=DEVICES,
    )
    add(
        "--gpus",
        str,
        d.gpus,
        "CUDA devices for the instances, e.g. 0,1: each gets --instances instances "
        "(a config.pbtxt instance_group may name its own among them)",
    )
    add(
        "--cudnn-conv-algo-search",
        str,
        d.cudnn_conv_algo_search,
        "how cuDNN picks convolution algorithms: HEURISTIC (no per-shape cost), EXHAUSTIVE (times every "
        "algorithm once per new input shape; warm-up then runs every batch size at load)",
        choices=ALGO_SEARCHES,
    )
    add("--max-batch-size", int, d.max_batch_size, "most images one model execution takes")
    add(
        "--max-queue-delay-ms",
        float,
        d.max_queue_delay_ms,
        "under load, how long the oldest request may wait for a batch to fill",
    )
    add(
        "--max-queue-size",
        int,
        d.max_queue_size,
        "waiting requests per model version before RESOURCE_EXHAUSTED",
    )
    add("--instances", int, d.instances, "model instances (session + batcher + thread) per version")
    add(
        "--intra-op-threads",
        int,
        d.intra_op_threads,
        "onnxruntime threads per instance; 0: cores / instances",
    )
    add(
        "--inline-compute-us",
        float,
        d.inline_compute_us,
        "batches that the load-time measurement says compute faster than this run on the event loop "
        "(a thread hand-off costs about as much); 0: always use the instance's thread",
    )
    add("--poll-interval-s", float, d.poll_interval_s, "repository poll period; 0 disables (SIGHUP reloads)")
    add("--grace-s", float, d.grace_s, "on SIGTERM, how long queued and in-flight calls may take to finish")
    add("--max-message-bytes", int, d.max_message_bytes, "largest request or response message")
    add(
        "--max-concurrent-rpcs",
        int,
        d.max_concurrent_rpcs,
        "RPCs handled at once; 0: max(1024, 8 * queue size)",
    )
    add("--log-level", str, d.log_level, "DEBUG, INFO, WARNING, ERROR")
    add(
        "--cache-size-bytes",
        int,
        d.cache_size_bytes,
        "response cache for the models whose config.pbtxt has response_cache { enable: true }: "
        "bytes for the whole process (per worker under --workers), least recently used out; 0: off",
    )
    add(
        "--workers",
        str,
        d.workers,
        "server processes sharing the gRPC port (SO_REUSEPORT: the kernel spreads connections over "
        "them) under one supervisor with one /metrics; auto: one per usable core",
    )
    add_http_tls_flags(add, d)
    add_front_door_flags(add, d)
    add(
        "--model-control-mode",
        str,
        d.model_control_mode,
        "poll: serve every model of the repository, rescanned every --poll-interval-s and on SIGHUP; "
        "none: every model, loaded once; explicit: the --load-model names, then the repository API's "
        "load and unload (as Triton's)",
        choices=MODEL_CONTROL_MODES,
    )
    env = ENV_PREFIX + "LOAD_MODEL"
    p.add_argument(
        "--load-model",
        action=_Repeated,
        type=_names,
        dest="load_model",
        metavar="NAME",
        default=tuple(_names(environ.get(env, ""))),
        help=f"explicit mode: a model to load at start, repeatable (or comma-separated); * for every model [env {env}]",
    )
    add_observability_flags(p, add, d, environ)
    return p


class _Repeated(argparse.Action):
    """A repeatable flag: its uses on the command line replace its default (the environment's),
    each adding its value (or values, when the flag's type gives a list)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        items = getattr(namespace, self.dest)
        new = values if isinstance(values, list) else [values]
        setattr(namespace, self.dest, (*(() if items is self.default else items), *new))


def add_observability_flags(
    p: argparse.ArgumentParser, add, d: ServerConfig, environ: Mapping[str, str]
) -> None:
    env = ENV_PREFIX + "TRACE_CONFIG"
    p.add_argument(
        "--trace-config",
        action=_Repeated,
        default=tuple(environ.get(env, "").split()),
        dest="trace_config",
        metavar="[opentelemetry,]KEY=VALUE",
        help="tracing as Triton's --trace-config (repeatable): level=TIMESTAMPS turns it on, rate=N traces "
        "every N-th request (callers' sampled W3C traceparents always), count=N, mode=opentelemetry, "
        "opentelemetry,url=http://COLLECTOR:4318/v1/traces, opentelemetry,resource=KEY=VALUE, "
        f"opentelemetry,bsp_schedule_delay=MS [env {env}: items separated by spaces]",
    )
    add(
        "--log-format",
        str,
        d.log_format,
        "stderr log lines: text, or json (one object per line: time, level, logger, message, and the "
        "request's model, version, trace_id, span_id)",
        choices=LOG_FORMATS,
    )
    add(
        "--access-log",
        _bool,
        d.access_log,
        "one log line per inference request: protocol, rpc, model, version, status, duration, peer, trace id",
    )


def add_http_tls_flags(add, d: ServerConfig) -> None:
    add(
        "--http-port",
        int,
        d.http_port,
        "KServe v2 HTTP/REST (+ /v1/models/M:classify) port; 0 picks a free one, -1 disables",
    )
    add("--tls-cert", Path, None, "PEM certificate (chain) for TLS on gRPC and HTTP; needs --tls-key")
    add(
        "--tls-key", Path, None, "PEM private key of --tls-cert (keep it out of the image and the repository)"
    )
    add(
        "--tls-client-ca",
        Path,
        None,
        "PEM CA bundle: mutual TLS, clients without a certificate it signed are refused",
    )


def add_front_door_flags(add, d: ServerConfig) -> None:
    add(
        "--max-connections",
        int,
        d.max_connections,
        "open connections per listener (HTTP and gRPC each); beyond, a new one is refused (HTTP: 503) "
        "and the admitted ones are served on",
    )
    add(
        "--max-body-bytes",
        int,
        d.max_body_bytes,
        "largest HTTP request body: a Content-Length over it is answered 413 before the body is read; "
        "0: --max-message-bytes",
    )
    add(
        "--http-header-timeout-s",
        float,
        d.http_header_timeout_s,
        "a request's headers must arrive within this from its first byte (408, closed); so must a new "
        "connection's first byte",
    )
    add(
        "--http-body-timeout-s",
        float,
        d.http_body_timeout_s,
        "a request's body must arrive within this from the end of its headers (408, closed)",
    )
    add(
        "--http-keepalive-timeout-s",
        float,
        d.http_keepalive_timeout_s,
        "an idle keep-alive connection is closed after this",
    )
    add(
        "--grpc-handshake-timeout-s",
        float,
        d.grpc_handshake_timeout_s,
        "a new gRPC connection must finish TLS and HTTP/2 set-up within this",
    )
    add(
        "--grpc-keepalive-time-s",
        float,
        d.grpc_keepalive_time_s,
        "the server pings a gRPC connection quiet for this long",
    )
    add(
        "--grpc-keepalive-timeout-s",
        float,
        d.grpc_keepalive_timeout_s,
        "and closes it when the ping is not answered within this",
    )
    add(
        "--grpc-min-ping-interval-s",
        float,
        d.grpc_min_ping_interval_s,
        "keepalive enforcement: a client pinging more often than this gets GOAWAY (too_many_pings)",
    )
    add(
        "--grpc-max-connection-idle-s",
        float,
        d.grpc_max_connection_idle_s,
        "a gRPC connection without calls for this long is closed (clients reconnect); 0: never",
    )
    add(
        "--grpc-max-connection-age-s",
        float,
        d.grpc_max_connection_age_s,
        "every gRPC connection is closed at this age, spreading clients over replicas again; 0: never",
    )
    add(
        "--grpc-max-connection-age-grace-s",
        float,
        d.grpc_max_connection_age_grace_s,
        "calls in flight on a connection closed for its age get this long to finish",
    )
    add(
        "--grpc-max-concurrent-streams",
        int,
        d.grpc_max_concurrent_streams,
        "calls at once on one gRPC connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; beyond, new streams "
        "are refused); 0: --max-concurrent-rpcs's limit",
    )
    add(
        "--auth-token-file",
        Path,
        None,
        "bearer tokens (one per line) for the inference and metadata APIs, re-read on SIGHUP; "
        "without it they are open",
    )
    add(
        "--admin-token-file",
        Path,
        None,
        "bearer tokens for the administrative APIs too (model load and unload), re-read on SIGHUP",
    )
    add(
        "--auth-health",
        _bool,
        d.auth_health,
        "health and readiness also need a token (open by default, so that probes need no secret)",
    )


def _names(text: str) -> list[str]:
    """NAME[,NAME...]"""
    return [n for n in text.split(",") if n]


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(f"not a boolean: {text!r}")
    return value in ("1", "true", "yes", "on")
