"""The load-test tool's one config: ``LoadTestConfig``, a frozen dataclass that checks itself,
built in ``main()`` with ``cnnstack.cli.parse_config`` (every flag's ``dest`` is a field name)."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cnnstack.cli import parse_config, require
from loadtest.payload import route_for
from loadtest.schedule import DISTRIBUTIONS, read_intervals
from loadtest.search import SearchSpace, Slo
from loadtest.transport import PROTOCOLS, Transport

APIS = ("classify", "kserve")
DATATYPES = ("FP32", "FP16")  # what the KServe input tensor is sent as (images are float)
PLOT_HINT = "pip install 'cnnstack[plot]' (or matplotlib), or leave out --plot"
ENCODINGS = ("tensor", "png")
DEFAULT_CONCURRENCY = (1, 4, 16, 64)
SEARCH_MAX_CONCURRENCY = 256  # the closed-loop search's upper bound unless --concurrency LO,HI


@dataclass(frozen=True)
class LoadTestConfig:
    target: str  # "host:port"; the only address the tool ever sends to
    model: str
    version: int = 0  # 0: the server's latest
    api: str = "classify"
    # Closed-loop steps (requests kept in flight) and open-loop steps (arrivals per second); with
    # --latency-threshold, the bounds (low, high) of the search, one of the two.
    concurrency: tuple[int, ...] = ()
    request_rates: tuple[float, ...] = ()
    images_per_request: int = 1
    duration_s: float = 30.0  # upper bound on the measured part of a step
    warmup_s: float = 2.0
    window_s: float = 2.0  # measurement window for the stability rule
    stability_percent: float = 10.0
    stability_windows: int = 3
    max_requests: int = 1_000_000  # per step and process: a second bound besides time
    timeout_s: float = 10.0  # per-request deadline
    max_inflight: int = 10_000  # open loop: beyond this a due request is counted CLIENT_OVERLOAD
    distribution: str = "poisson"  # open loop: the gaps between sends at a --request-rate
    request_intervals: Path | None = None  # open loop: replay these recorded gaps (one step)
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
    auth_token_file: Path | None = None  # its first non-empty line is sent as a bearer token
    traceparent: float = 0.0  # the fraction of requests sent with a fresh sampled W3C traceparent
    latency_threshold_ms: float | None = None  # set: search the capacity within this latency
    percentile: float = 99.0  # the latency percentile the threshold applies to
    max_probes: int = 16
    search_budget_s: float = 600.0
    seed: int = 0
    out: Path | None = None
    csv: Path | None = None
    plot: Path | None = None
    metrics_url: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        search = self.latency_threshold_ms is not None
        if not (self.concurrency or self.request_rates or self.request_intervals):
            # Frozen: the default steps are set once, here, as the dataclass itself would.
            high = max(SEARCH_MAX_CONCURRENCY, 2 * self.processes)
            object.__setattr__(self, "concurrency", (self.processes, high) if search else DEFAULT_CONCURRENCY)
        problems = [message for ok, message in self._checks() if not ok]
        problems += self._file_problems()
        if search:
            problems += self._search_problems()
        require(problems)

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (self.images_per_request >= 1, "--images-per-request must be >= 1"),
            (self.duration_s > 0, "--duration must be > 0"),
            (self.warmup_s >= 0, "--warmup must be >= 0"),
            (0 < self.window_s <= self.duration_s, "--window must be > 0 and <= --duration"),
            (self.stability_percent > 0, "--stability-percent must be > 0"),
            (self.stability_windows >= 1, "--stability-windows must be >= 1"),
            (self.max_requests >= 1, "--max-requests must be >= 1"),
            (self.timeout_s > 0, "--timeout must be > 0"),
            (self.max_inflight >= 1, "--max-inflight must be >= 1"),
            (self.top_k >= 1, "--top-k must be >= 1"),
            (self.processes >= 1, "--processes must be >= 1"),
            (self.connections >= 1, "--connections must be >= 1"),
            (0 <= self.traceparent <= 1, "--traceparent is a fraction of requests, from 0 to 1"),
            (0 < self.percentile <= 100, "--percentile must be in (0, 100]"),
            (not (self.api == "kserve" and self.encoding == "png"), "--encoding png needs --api classify"),
            (
                self.protocol == "grpc" or self.api == "kserve",
                "--protocol http needs --api kserve (cnn-serve's classify over HTTP takes image files: see docs/serving.md)",
            ),
            (not self.json or self.protocol == "http", "--json needs --protocol http"),
            (
                self.protocol == "grpc" or self.connections == 1,
                "--connections is for gRPC; over HTTP/1.1 each request in flight has its own keep-alive connection",
            ),
            ((self.tls_cert is None) == (self.tls_key is None), "--tls-cert and --tls-key go together"),
            (
                self.metrics_url is None or self.metrics_url.startswith(("http://", "https://")),
                "--metrics-url must be http(s)",
            ),
            (
                all(c >= self.processes for c in self.concurrency),
                f"every --concurrency value must be >= --processes ({self.processes}): each process keeps >= 1 in flight",
            ),
            (
                self.request_intervals is None or not self.request_rates,
                "--request-intervals replays the rate its gaps give: leave out --request-rate",
            ),
            # Before the sweep, not after it: the plot is the last thing written.
            (
                self.plot is None or importlib.util.find_spec("matplotlib") is not None,
                f"--plot needs matplotlib, which is not installed: {PLOT_HINT}",
            ),
        ]

    def _file_problems(self) -> list[str]:
        problems = []
        files = [("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)]
        files += [
            ("--auth-token-file", self.auth_token_file),
            ("--request-intervals", self.request_intervals),
        ]
        for flag, path in files:
            if path is not None and not path.is_file():
                problems.append(f"{flag} {path}: no such file")
        if self.input != "synthetic" and not Path(self.input).exists():
            problems.append(f"--input {self.input!r} is neither 'synthetic' nor an existing file or folder")
        if problems:
            return problems
        for flag, path, read in (
            ("--auth-token-file", self.auth_token_file, read_token),
            ("--request-intervals", self.request_intervals, read_intervals),
        ):
            try:
                if path is not None:
                    read(path)
            except (ValueError, OSError) as e:
                problems.append(f"{flag} {path}: {e}")
        return problems

    def _search_problems(self) -> list[str]:
        assert self.latency_threshold_ms is not None
        bounds = self.request_rates or self.concurrency
        flag = "--request-rate" if self.request_rates else "--concurrency"
        checks = [
            (self.latency_threshold_ms > 0, "--latency-threshold must be > 0 (ms)"),
            (self.max_probes >= 1, "--max-probes must be >= 1"),
            (self.search_budget_s > 0, "--search-budget must be > 0 (s)"),
            (
                not (self.concurrency and self.request_rates),
                "--latency-threshold searches one kind of load: give --concurrency LO,HI (closed loop) "
                "or --request-rate LO,HI (open loop), not both",
            ),
            (
                self.request_intervals is None,
                "--latency-threshold searches over --concurrency or --request-rate; "
                "--request-intervals replays one fixed schedule",
            ),
            (
                len(bounds) == 2 and bounds[0] < bounds[1],
                f"with --latency-threshold, {flag} gives the search's bounds LO,HI (two values, LO < HI)",
            ),
        ]
        return [message for ok, message in checks if not ok]

    @property
    def host(self) -> str:
        return self.target.rsplit(":", 1)[0]

    @cached_property
    def transport(self) -> Transport:
        """The wire, with the token read once (a ``cached_property``: it is no field, so it is in
        no repr, no comparison and no report)."""
        token = read_token(self.auth_token_file) if self.auth_token_file is not None else None
        tls = (self.tls, self.tls_ca, self.tls_cert, self.tls_key)
        return Transport(self.protocol, *tls, auth_token=token, traceparent=self.traceparent)

    @cached_property
    def intervals_s(self) -> tuple[float, ...]:
        """The gaps of --request-intervals, in seconds; () without it."""
        return read_intervals(self.request_intervals) if self.request_intervals is not None else ()

    @property
    def searching(self) -> bool:
        return self.latency_threshold_ms is not None

    def search(self) -> tuple[Slo, SearchSpace]:
        """What --latency-threshold asks: the SLO, and the loads to search."""
        assert self.latency_threshold_ms is not None
        mode = "open" if self.request_rates else "closed"
        low, high = self.request_rates or self.concurrency
        slo = Slo(self.latency_threshold_ms, self.percentile)
        return slo, SearchSpace(mode, float(low), float(high), self.max_probes, self.search_budget_s)

    @property
    def route(self) -> str:
        """Where requests go: the gRPC method, or (HTTP) the model's infer path."""
        return route_for(self.api, self.protocol, self.model, self.version)

    @property
    def wire(self) -> str:
        """How requests travel, for the report: "grpc", "http binary" or "http json", "+ TLS"."""
        wire = self.protocol if self.protocol == "grpc" else f"http {'json' if self.json else 'binary'}"
        return wire + (" + TLS" if self.transport.secure else "")


def read_token(path: Path) -> str:
    """A bearer token file's first token: its first line that is neither blank nor a ``#``
    comment, stripped. The format of cnn-serve's token files, so one file serves both."""
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise ValueError("no token in it (one per line; blank lines and # comments are skipped)")


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
        "(gRPC or HTTP/REST), plain text or TLS; with --latency-threshold, the highest throughput "
        "within a latency budget.",
    )
    p.add_argument(
        "--target", type=_target, required=True, help="HOST:PORT of the server (gRPC or HTTP port)"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--version", type=int, default=0, help="model version (0: latest)")
    p.add_argument("--api", choices=APIS, default="classify")
    p.add_argument(
        "--concurrency",
        type=int_list,
        default=(),
        help="closed-loop steps, e.g. 1,4,16,64 (with --latency-threshold: the search's LO,HI)",
    )
    p.add_argument(
        "--request-rate",
        dest="request_rates",
        type=_float_list,
        default=(),
        help="open-loop steps in requests/s (with --latency-threshold: the search's LO,HI)",
    )
    p.add_argument(
        "--distribution",
        choices=DISTRIBUTIONS,
        default="poisson",
        help="open loop: gaps between sends at a --request-rate (exponential, or exactly 1/rate)",
    )
    p.add_argument(
        "--request-intervals",
        type=Path,
        default=None,
        help="open loop: replay recorded gaps, one in ms per line, cycled (one step; no --request-rate)",
    )
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument(
        "--duration", dest="duration_s", type=float, default=30.0, help="max measured seconds per step"
    )
    p.add_argument(
        "--warmup", dest="warmup_s", type=float, default=2.0, help="unmeasured seconds before each step"
    )
    p.add_argument(
        "--window",
        dest="window_s",
        type=float,
        default=2.0,
        help="measurement window (s) for the stability rule",
    )
    p.add_argument("--stability-percent", type=float, default=10.0)
    p.add_argument("--stability-windows", type=int, default=3)
    p.add_argument("--max-requests", type=int, default=1_000_000, help="per step and client process")
    p.add_argument("--timeout", dest="timeout_s", type=float, default=10.0, help="per-request deadline (s)")
    p.add_argument("--max-inflight", type=int, default=10_000, help="open-loop cap on requests in flight")
    search = p.add_argument_group("capacity within a latency budget")
    search.add_argument(
        "--latency-threshold",
        dest="latency_threshold_ms",
        type=float,
        default=None,
        metavar="MS",
        help="search the highest throughput whose --percentile latency stays <= MS",
    )
    search.add_argument(
        "--percentile", type=float, default=99.0, help="the latency percentile the threshold is on (99)"
    )
    search.add_argument("--max-probes", type=int, default=16, help="at most this many probes (16)")
    search.add_argument(
        "--search-budget",
        dest="search_budget_s",
        type=float,
        default=600.0,
        metavar="S",
        help="no probe starts that would end the search after S seconds (600)",
    )
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
        "--auth-token-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="send the file's first token (its first line that is not blank or a # comment) as "
        "'authorization: Bearer <token>' on every request (never printed)",
    )
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
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG: latency percentiles against throughput (a search: the percentile, with the threshold)",
    )
    p.add_argument("--metrics-url", default=None, help="server /metrics URL scraped around each step")
    p.add_argument("--quiet", action="store_true")
    return p


def parse_args(argv: list[str] | None) -> LoadTestConfig:
    """The config from the command line; a bad one is a usage error (exit 2) naming every problem."""
    return parse_config(LoadTestConfig, build_parser(), argv)
