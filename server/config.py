"""The server's one config: ``ServerConfig``, built only in ``main()`` from the command line + env.

Every flag has an environment variable ``CNN_SERVE_<FLAG>`` (``--max-batch-size`` ->
``CNN_SERVE_MAX_BATCH_SIZE``) for docker-compose; a flag on the command line wins over the env.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cnnstack.cli import parse_config, require
from server.runtime.devices import ALGO_SEARCHES, DEVICES

ENV_PREFIX = "CNN_SERVE_"


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
    # Scale-out on one host (server.scaleout.supervisor): N processes serving the same ports; "auto": one
    # per usable core. Stays "1" (no supervisor, one process) unless asked for.
    workers: str = "1"
    # HTTP/REST and TLS (server/http_app.py, server/tls.py).
    http_port: int = 8000  # KServe v2 REST + /v1 classify; 0: any free port; -1: no HTTP endpoint
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, both protocols use TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle: clients must present a certificate it signed

    def __post_init__(self) -> None:
        require(self.problems())

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerConfig:
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
        for name in ("max_batch_size", "max_queue_size", "instances", "max_message_bytes"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_queue_delay_ms",
            "poll_interval_s",
            "grace_s",
            "intra_op_threads",
            "max_concurrent_rpcs",
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
        return out

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
    def concurrent_rpc_limit(self) -> int:
        # Every admitted RPC holds at most one decoded message, so this bounds memory even when
        # clients send faster than the queues drain; the queue itself answers RESOURCE_EXHAUSTED
        # long before this in normal overload.
        return self.max_concurrent_rpcs or max(1024, 8 * self.max_queue_size)


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
        "--workers",
        str,
        d.workers,
        "server processes sharing the gRPC port (SO_REUSEPORT: the kernel spreads connections over "
        "them) under one supervisor with one /metrics; auto: one per usable core",
    )
    add_http_tls_flags(add, d)
    return p


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
