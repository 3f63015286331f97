"""The server's one config: ``ServerConfig``, built only in ``main()`` from the command line + env
(its flags: server/flags.py); it checks itself (cnnstack.cli).

Every flag has an environment variable ``CNN_SERVE_<FLAG>`` (``--max-batch-size`` ->
``CNN_SERVE_MAX_BATCH_SIZE``) for docker-compose; a flag on the command line wins over the env.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cnnstack.cli import parse_config, require
from server.logs import LOG_FORMATS
from server.runtime.devices import ALGO_SEARCHES, DEVICES
from server.tracing import TraceSettings, parse_trace_config

ENV_PREFIX = "CNN_SERVE_"
MODEL_CONTROL_MODES = ("poll", "explicit", "none")  # Triton's --model-control-mode


def parse_gpus(text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1): CUDA device ordinals, distinct, >= 0."""
    try:
        ids = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(
            f"--gpus takes CUDA device numbers separated by commas (e.g. 0,1), got {text!r}"
        ) from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise ValueError(f"--gpus needs distinct CUDA device numbers >= 0, got {text!r}")
    return ids


@dataclass(frozen=True)
class ServerConfig:
    repository: Path
    host: str = "127.0.0.1"
    port: int = 8001  # 0: any free port (tests)
    metrics_port: int = 8002  # 0: any free port; -1: no metrics endpoint
    device: str = "auto"
    gpus: str = "0"  # CUDA devices, comma-separated; each gets --instances instances
    cudnn_conv_algo_search: str = "HEURISTIC"
    # Ceilings: a model's config.pbtxt may lower max batch size, queue delay and queue size.
    max_batch_size: int = 64  # images per executed batch
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 256  # waiting requests per model version; beyond: RESOURCE_EXHAUSTED
    instances: int = 1  # sessions (+ batcher + executor thread) per model version
    intra_op_threads: int = 0  # 0: usable cores / instances
    inline_compute_us: float = 100.0  # batches measured faster than this skip the thread hand-off
    poll_interval_s: float = 10.0  # 0: never poll (SIGHUP still reloads)
    grace_s: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    max_concurrent_rpcs: int = 0  # 0: derived from the queue size (bounds memory)
    log_level: str = "INFO"
    # The response cache (server/runtime/cache.py): bytes for the whole process, shared by the models
    # whose config.pbtxt has response_cache { enable: true }; 0: no cache.
    cache_size_bytes: int = 0
    # Scale-out on one host (server.scaleout.supervisor): N processes serving the same ports; "auto": one
    # per usable core. Stays "1" (no supervisor, one process) unless asked for.
    workers: str = "1"
    # HTTP/REST and TLS (server/http_app.py, server/tls.py).
    http_port: int = 8000  # KServe v2 REST + /v1 classify; 0: any free port; -1: no HTTP endpoint
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, both protocols use TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle: clients must present a certificate it signed
    # The front door (docs/serving.md "Limits at the door"): server/api/guard.py for HTTP, gRPC's
    # channel arguments, server/api/auth.py for both.
    max_connections: int = 4096  # open connections per listener (HTTP, gRPC); beyond, new ones are refused
    max_body_bytes: int = 0  # an HTTP request body; 0: --max-message-bytes
    http_header_timeout_s: float = (
        10.0  # a request's headers, from its first byte (and a new connection's first byte)
    )
    http_body_timeout_s: float = 60.0  # a request's body, from the end of its headers
    http_keepalive_timeout_s: float = 15.0  # an idle connection between requests
    grpc_handshake_timeout_s: float = 10.0  # TLS and HTTP/2 set-up of a new connection
    grpc_keepalive_time_s: float = 60.0  # the server pings a connection quiet for this long...
    grpc_keepalive_timeout_s: float = 20.0  # ... and closes it when the ping is not answered within this
    grpc_min_ping_interval_s: float = 10.0  # clients pinging more often get GOAWAY (too_many_pings)
    grpc_max_connection_idle_s: float = 300.0  # a connection without calls this long is closed; 0: never
    grpc_max_connection_age_s: float = 0.0  # any connection is closed (GOAWAY) at this age; 0: never
    grpc_max_connection_age_grace_s: float = 30.0  # calls in flight at that age get this long to finish
    grpc_max_concurrent_streams: int = 0  # calls at once on one connection; 0: --max-concurrent-rpcs's
    auth_token_file: Path | None = None  # tokens that may call the inference and metadata APIs
    admin_token_file: Path | None = None  # tokens that may also call the administrative APIs
    auth_health: bool = False  # health and readiness need a token too
    # Model control (server/runtime/manager.py): poll the repository, load it once, or explicit.
    model_control_mode: str = "poll"
    load_model: tuple[str, ...] = ()  # explicit mode: loaded at start ("*": every model)
    # No flag: the configs that repository loads gave models, which the supervisor of --workers
    # hands a restarted worker so that it serves what the others serve. (name, JSON ModelConfig)
    model_configs: tuple[tuple[str, str], ...] = ()
    # Observability (docs/serving.md "Tracing", "Logs"): server/tracing.py, server/logs.py.
    trace_config: tuple[str, ...] = ()  # Triton's --trace-config items; off without level=TIMESTAMPS
    log_format: str = "text"  # text | json (stderr; the stdout event lines stay JSON)
    access_log: bool = False  # one log line per inference request

    def __post_init__(self) -> None:
        # argparse and a worker's JSON give lists
        object.__setattr__(self, "load_model", tuple(self.load_model or ()))
        object.__setattr__(self, "model_configs", tuple(tuple(pair) for pair in self.model_configs or ()))
        object.__setattr__(self, "trace_config", tuple(self.trace_config))
        require(self.problems())

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerConfig:
        from server.flags import build_parser

        environ = os.environ if environ is None else environ
        return parse_config(cls, build_parser(environ), argv)

    def problems(self) -> list[str]:
        if self.repository is None:
            return [f"--repository is required (or set {ENV_PREFIX}REPOSITORY)"]
        out = []
        if self.device not in DEVICES:
            out.append(f"--device must be one of {DEVICES}, got {self.device!r}")
        try:
            parse_gpus(self.gpus)
        except ValueError as e:
            out.append(str(e))
        if self.cudnn_conv_algo_search not in ALGO_SEARCHES:
            out.append(
                f"--cudnn-conv-algo-search must be one of {ALGO_SEARCHES}, got {self.cudnn_conv_algo_search!r}"
            )
        for name in (
            "max_batch_size",
            "max_queue_size",
            "instances",
            "max_message_bytes",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_queue_delay_ms",
            "poll_interval_s",
            "grace_s",
            "intra_op_threads",
            "max_concurrent_rpcs",
            "max_body_bytes",
            "grpc_max_concurrent_streams",
            "cache_size_bytes",
            "grpc_max_connection_idle_s",
            "grpc_max_connection_age_s",
            "grpc_max_connection_age_grace_s",
        ):
            if getattr(self, name) < 0:
                out.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.port < 65536 or not -1 <= self.metrics_port < 65536:
            out.append(
                f"ports must be in [0, 65535] (metrics: -1 disables), got {self.port}/{self.metrics_port}"
            )
        try:
            parse_workers(self.workers)
        except ValueError as e:
            out.append(str(e))
        out += self.http_tls_problems()
        out += self.front_door_problems()
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            out.append(
                f"--model-control-mode must be one of {MODEL_CONTROL_MODES}, got {self.model_control_mode!r}"
            )
        elif self.load_model and self.model_control_mode != "explicit":
            out.append("--load-model needs --model-control-mode explicit (the other modes load every model)")
        out += parse_trace_config(self.trace_config)[1]
        if self.log_format not in LOG_FORMATS:
            out.append(f"--log-format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        return out

    @property
    def trace_settings(self) -> TraceSettings:
        return parse_trace_config(self.trace_config)[0]

    def front_door_problems(self) -> list[str]:
        out = []
        for name in (
            "http_header_timeout_s",
            "http_body_timeout_s",
            "http_keepalive_timeout_s",
            "grpc_handshake_timeout_s",
            "grpc_keepalive_time_s",
            "grpc_keepalive_timeout_s",
            "grpc_min_ping_interval_s",
        ):
            if not getattr(self, name) > 0:
                out.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for flag, path in (
            ("--auth-token-file", self.auth_token_file),
            ("--admin-token-file", self.admin_token_file),
        ):
            if path is not None and not path.is_file():
                out.append(f"{flag} {path} is not a readable file")
        if self.auth_health and self.auth_token_file is None:
            out.append("--auth-health needs --auth-token-file (the tokens health checks would send)")
        return out

    @property
    def body_limit(self) -> int:
        return self.max_body_bytes or self.max_message_bytes

    def http_tls_problems(self) -> list[str]:
        out = []
        if not -1 <= self.http_port < 65536:
            out.append(f"--http-port must be in [0, 65535] (-1 disables), got {self.http_port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            out.append("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            out.append("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        for flag, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
        ):
            if path is not None and not path.is_file():
                out.append(f"{flag} {path} is not a readable file")
        return out

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def worker_count(self) -> int:
        return parse_workers(self.workers)

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return parse_gpus(self.gpus)

    @property
    def streams_per_connection(self) -> int:
        # One connection may carry as many calls as the whole server admits, no more: beyond, its
        # new streams are refused at the HTTP/2 layer (REFUSED_STREAM, which gRPC clients retry).
        return self.grpc_max_concurrent_streams or self.concurrent_rpc_limit

    @property
    def concurrent_rpc_limit(self) -> int:
        # Every admitted RPC holds at most one decoded message, so this bounds memory even when
        # clients send faster than the queues drain; the queue itself answers RESOURCE_EXHAUSTED
        # long before this in normal overload.
        return self.max_concurrent_rpcs or max(1024, 8 * self.max_queue_size)


def parse_workers(text: str) -> int:
    """``--workers``: "auto" (one per usable core) or an integer >= 1."""
    from server.runtime.share import machine_cpus

    if text.strip().lower() == "auto":
        return machine_cpus()
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--workers takes an integer >= 1 or auto, got {text!r}") from None
    if n < 1:
        raise ValueError(f"--workers must be >= 1 or auto, got {text!r}")
    return n
