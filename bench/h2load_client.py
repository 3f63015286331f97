"""Drive a gRPC unary method (HTTP/2) or an HTTP/1.1 endpoint with h2load (nghttp2's C load
generator) instead of Python.

Why: loadtest's client is Python; even with its own GIL it spends far more CPU per request than
a C client, it shares the machine's cores with the server, and at concurrency 1 its own event-loop
hops are part of every measured latency. h2load's cost per request is small, so its numbers show
the server's side with the client mostly out of the way. It knows nothing of gRPC, which is plain
HTTP/2 underneath: a POST to /package.Service/Method with ``content-type: application/grpc`` and
``te: trailers``, and a body of 5-byte frames (flag 0 = uncompressed, big-endian length) each
holding one serialized message. The gRPC status travels in trailers h2load does not read, so the
caller checks success another way (cnn-serve's own request counter; the echo server always says OK).

    run_h2load("127.0.0.1:50051", "/pkg.Svc/Method", payload_bytes, concurrency=64, duration_s=5)
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.stats import latency_summary


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message: 1 byte compressed flag (0), 4 bytes big-endian length."""
    return struct.pack(">BI", 0, len(message)) + message


@dataclass(frozen=True)
class H2loadResult:
    requests: int  # measured responses with HTTP status 200
    failed: int  # h2load's failed + errored + timed-out requests
    requests_per_s: float
    latency_ms: dict[str, float]  # loadtest.stats.latency_summary of the measured requests (nearest rank)


def available() -> bool:
    return shutil.which("h2load") is not None


def parse_log(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """h2load --log-file lines "start_us<TAB>status<TAB>latency_us" -> three int64 arrays."""
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    arr = np.array([[int(c) for c in r[:3]] for r in rows], dtype=np.int64).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def run_h2load(
    target: str,
    method: str,
    message: bytes,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    connections: int = 1,
    timeout_s: float = 120.0,
) -> H2loadResult:
    """Closed loop: ``concurrency`` streams in flight over ``connections`` HTTP/2 connections.

    Requests/s is measured responses over the measured span (first start to last end); latencies are
    per request, send to last byte of the response, for requests started after the warm-up.
    """
    if concurrency % connections:
        raise ValueError(f"concurrency {concurrency} must divide by connections {connections}")
    headers = {"content-type": "application/grpc", "te": "trailers"}
    flags = ["-c", str(connections), "-m", str(concurrency // connections)]
    return _h2load(
        f"http://{target}{method}", grpc_frame(message), headers, flags, duration_s, warmup_s, timeout_s
    )


def run_h2load_http1(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    timeout_s: float = 120.0,
    blank_reason_is_ok: bool = False,
) -> H2loadResult:
    """Closed loop over HTTP/1.1 (``h2load --h1``): ``concurrency`` keep-alive connections, one
    request in flight on each, POSTing ``body``. HTTP statuses are read, so failures count.

    ``blank_reason_is_ok``: h2load reads the status code with the reason phrase, and logs 0 for a
    status line without one; TorchServe answers ``HTTP/1.1 200 `` (blank) to a success and
    ``404 Not Found`` to an error, so against it status 0 is a 200.
    """
    flags = ["--h1", "-c", str(concurrency), "-m", "1"]
    return _h2load(url, body, headers, flags, duration_s, warmup_s, timeout_s, blank_reason_is_ok)


def _h2load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    flags: list[str],
    duration_s: float,
    warmup_s: float,
    timeout_s: float,
    blank_reason_is_ok: bool = False,
) -> H2loadResult:
    exe = shutil.which("h2load")
    if exe is None:
        raise FileNotFoundError("h2load not found: apt-get install -y nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        body_file, log = Path(tmp) / "body.bin", Path(tmp) / "log.tsv"
        body_file.write_bytes(body)
        cmd = [
            exe,
            url,
            "-d",
            str(body_file),
            *(a for k, v in headers.items() for a in ("-H", f"{k}: {v}")),
            *flags,
            "-D",
            f"{round(duration_s * 1000)}ms",
            "--warm-up-time",
            f"{round(warmup_s * 1000)}ms",
            "--log-file",
            str(log),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"h2load exited {proc.returncode}: {proc.stderr.strip() or proc.stdout[-500:]}"
            )
        start_us, status, latency_us = parse_log(log.read_text())
    m = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", proc.stdout)
    failed = sum(int(g) for g in m.groups()) if m else 0
    ok = status == 200
    if blank_reason_is_ok:
        ok |= status == 0
        failed = sum(int(g) for g in m.groups()[1:]) if m else 0  # h2load's "failed": every non-2xx
    if not ok.any():
        raise RuntimeError(f"h2load got no HTTP 200 responses from {url}:\n{proc.stdout[-800:]}")
    span_s = (int((start_us + latency_us)[ok].max()) - int(start_us[ok].min())) / 1e6
    # The same percentile method as cnn-loadtest's rows it is printed next to.
    pct = latency_summary((latency_us[ok] / 1e6).tolist())
    return H2loadResult(int(ok.sum()), failed + int((~ok).sum()), float(ok.sum() / max(span_s, 1e-9)), pct)
