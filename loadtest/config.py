"""The load-test tool's one config: ``LoadTestConfig``, built only from the command line."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from loadtest.payload import route_for
from loadtest.transport import PROTOCOLS, Transport

APIS = ("classify", "kserve")
DATATYPES = ("FP32", "FP16")  # what the KServe input tensor is sent as (images are float)
PLOT_HINT = "pip install 'cnnstack[plot]' (or matplotlib), or leave out --plot"
ENCODINGS = ("tensor", "png")


@dataclass(frozen=True)
class LoadTestConfig:
    target: str  # "host:port"; the only address the tool ever sends to
    model: str
    version: int = 0  # 0: the server's latest
    api: str = "classify"
    concurrency: tuple[int, ...] = ()  # closed-loop steps: requests kept in flight
    request_rates: tuple[float, ...] = ()  # open-loop steps: Poisson arrivals per second
    images_per_request: int = 1
    duration_s: float = 30.0  # upper bound on the measured part of a step
    warmup_s: float = 2.0
    window_s: float = 2.0  # measurement window for the stability rule
    stability_percent: float = 10.0
    stability_windows: int = 3
    max_requests: int = 1_000_000  # per step and process: a second bound besides time
    timeout_s: float = 10.0  # per-request deadline
    max_inflight: int = 10_000  # open loop: beyond this a due request is counted CLIENT_OVERLOAD
    input: str = "synthetic"  # "synthetic" or a dataset: IDX images file (.gz ok) or image folder
    encoding: str = "tensor"
    input_shape: tuple[int, int, int] | None = None  # (C, H, W); None: ask the server
    input_name: str | None = None  # kserve: the input tensor's name; None: the metadata's, else ours
    datatype: str | None = None  # kserve: FP32 or FP16; None: the metadata's, else FP32
    top_k: int = 1
    processes: int = 1
    connections: int = 1  # gRPC channels (TCP connections) per client process, requests round robin
    protocol: str = "grpc"  # kserve: "grpc" or "http" (KServe v2 REST)
    json: bool = False  # http: JSON tensors instead of the binary tensor data extension
    tls: bool = False  # TLS, trusting tls_ca (else the system's CAs)
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # presented for mutual TLS, with tls_key
    tls_key: Path | None = None
    traceparent: float = 0.0  # fraction of requests sent with a new sampled W3C traceparent
    seed: int = 0
    out: Path | None = None
    csv: Path | None = None
    plot: Path | None = None
    metrics_url: str | None = None
    quiet: bool = False

    @property
    def host(self) -> str:
        return self.target.rsplit(":", 1)[0]

    @property
    def transport(self) -> Transport:
        return Transport(self.protocol, self.tls, self.tls_ca, self.tls_cert, self.tls_key, self.traceparent)

    @property
    def route(self) -> str:
        """Where requests go: the gRPC method, or (HTTP) the model's infer path."""
        return route_for(self.api, self.protocol, self.model, self.version)

    @property
    def wire(self) -> str:
        """How requests travel, for the report: "grpc", "http binary" or "http json", "+ TLS"."""
        wire = self.protocol if self.protocol == "grpc" else f"http {'json' if self.json else 'binary'}"
        return wire + (" + TLS" if self.transport.secure else "")


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers >= 1, "1,16,64" -> (1, 16, 64); an argparse type."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be integers >= 1, got {text!r}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"rates must be > 0 requests/s, got {text!r}")
    return values


def _shape(text: str) -> tuple[int, int, int]:
    values = int_list(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"--shape is C,H,W, got {text!r}")
    return values  # type: ignore[return-value]


def _target(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--target must be HOST:PORT, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnn-loadtest",
        description="Closed- and open-loop load test for cnn-serve (Classify, gRPC) or any KServe v2 server "
        "(gRPC or HTTP/REST), plain text or TLS.",
    )
    p.add_argument(
        "--target", type=_target, required=True, help="HOST:PORT of the server (gRPC or HTTP port)"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--version", type=int, default=0, help="model version (0: latest)")
    p.add_argument("--api", choices=APIS, default="classify")
    p.add_argument("--concurrency", type=int_list, default=None, help="closed-loop steps, e.g. 1,4,16,64")
    p.add_argument("--request-rate", type=_float_list, default=None, help="open-loop steps in requests/s")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--duration", type=float, default=30.0, help="max measured seconds per step")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each step")
    p.add_argument("--window", type=float, default=2.0, help="measurement window (s) for the stability rule")
    p.add_argument("--stability-percent", type=float, default=10.0)
    p.add_argument("--stability-windows", type=int, default=3)
    p.add_argument("--max-requests", type=int, default=1_000_000, help="per step and client process")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request deadline (s)")
    p.add_argument("--max-inflight", type=int, default=10_000, help="open-loop cap on requests in flight")
    p.add_argument("--input", default="synthetic", help="'synthetic', an IDX images file or an image folder")
    p.add_argument("--encoding", choices=ENCODINGS, default="tensor", help="classify: float32 tensor or PNG")
    p.add_argument(
        "--shape",
        "--input-shape",
        dest="input_shape",
        type=_shape,
        default=None,
        help="C,H,W of one image (default: ask the server; needed where its metadata lists no inputs)",
    )
    p.add_argument(
        "--input-name",
        default=None,
        help="kserve: the input tensor's name (default: the metadata's first input, else 'input')",
    )
    p.add_argument(
        "--datatype",
        choices=DATATYPES,
        default=None,
        help="kserve: the input tensor's datatype (default: the metadata's, else FP32)",
    )
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--processes", type=int, default=1, help="client processes sharing the load")
    p.add_argument(
        "--connections",
        type=int,
        default=1,
        help="gRPC channels (TCP connections) per client process, requests round robin over "
        "them: a server's kernel spreads connections, not requests, over its workers",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="grpc",
        help="kserve: gRPC, or HTTP/REST (the binary tensor data extension unless --json)",
    )
    p.add_argument("--json", action="store_true", help="--protocol http: JSON tensors both ways")
    p.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs (or --tls-ca)")
    p.add_argument(
        "--tls-ca", type=Path, default=None, help="PEM CA bundle the server's certificate must chain to"
    )
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_argument(
        "--traceparent",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="send this fraction of requests (0 to 1) with a new sampled W3C traceparent (gRPC metadata, "
        "HTTP header), each a trace of its own: a tracing server follows them whatever its rate",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG: latency percentiles against throughput")
    p.add_argument("--metrics-url", default=None, help="server /metrics URL scraped around each step")
    p.add_argument("--quiet", action="store_true")
    return p


def parse_args(argv: list[str] | None) -> LoadTestConfig:
    parser = build_parser()
    a = parser.parse_args(argv)
    checks = [
        (a.images_per_request >= 1, "--images-per-request must be >= 1"),
        (a.duration > 0, "--duration must be > 0"),
        (a.warmup >= 0, "--warmup must be >= 0"),
        (0 < a.window <= a.duration, "--window must be > 0 and <= --duration"),
        (a.stability_percent > 0, "--stability-percent must be > 0"),
        (a.stability_windows >= 1, "--stability-windows must be >= 1"),
        (a.max_requests >= 1, "--max-requests must be >= 1"),
        (a.timeout > 0, "--timeout must be > 0"),
        (a.max_inflight >= 1, "--max-inflight must be >= 1"),
        (a.top_k >= 1, "--top-k must be >= 1"),
        (a.processes >= 1, "--processes must be >= 1"),
        (a.connections >= 1, "--connections must be >= 1"),
        (0 <= a.traceparent <= 1, "--traceparent is a fraction of requests, from 0 to 1"),
        (not (a.api == "kserve" and a.encoding == "png"), "--encoding png needs --api classify"),
        (
            a.protocol == "grpc" or a.api == "kserve",
            "--protocol http needs --api kserve (cnn-serve's classify over HTTP takes image files: see docs/serving.md)",
        ),
        (not a.json or a.protocol == "http", "--json needs --protocol http"),
        (
            a.protocol == "grpc" or a.connections == 1,
            "--connections is for gRPC; over HTTP/1.1 each request in flight has its own keep-alive connection",
        ),
        ((a.tls_cert is None) == (a.tls_key is None), "--tls-cert and --tls-key go together"),
        (
            a.metrics_url is None or a.metrics_url.startswith(("http://", "https://")),
            "--metrics-url must be http(s)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if a.plot is not None and importlib.util.find_spec("matplotlib") is None:
        # Before the sweep, not after it: the plot is the last thing written.
        parser.error(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}")
    for flag, path in (("--tls-ca", a.tls_ca), ("--tls-cert", a.tls_cert), ("--tls-key", a.tls_key)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    if a.input != "synthetic" and not Path(a.input).exists():
        parser.error(f"--input {a.input!r} is neither 'synthetic' nor an existing file or folder")
    concurrency = a.concurrency or (() if a.request_rate else (1, 4, 16, 64))
    if any(c < a.processes for c in concurrency):
        parser.error(
            f"every --concurrency value must be >= --processes ({a.processes}): each process keeps >= 1 in flight"
        )
    return LoadTestConfig(
        target=a.target,
        model=a.model,
        version=a.version,
        api=a.api,
        concurrency=concurrency,
        request_rates=a.request_rate or (),
        images_per_request=a.images_per_request,
        duration_s=a.duration,
        warmup_s=a.warmup,
        window_s=a.window,
        stability_percent=a.stability_percent,
        stability_windows=a.stability_windows,
        max_requests=a.max_requests,
        timeout_s=a.timeout,
        max_inflight=a.max_inflight,
        input=a.input,
        encoding=a.encoding,
        input_shape=a.input_shape,
        input_name=a.input_name,
        datatype=a.datatype,
        top_k=a.top_k,
        processes=a.processes,
        connections=a.connections,
        protocol=a.protocol,
        json=a.json,
        tls=a.tls,
        tls_ca=a.tls_ca,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        traceparent=a.traceparent,
        seed=a.seed,
        out=a.out,
        csv=a.csv,
        plot=a.plot,
        metrics_url=a.metrics_url,
        quiet=a.quiet,
    )
