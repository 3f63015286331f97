"""bench/h2load_client.py: gRPC framing, h2load's log parsing, and a real run against the echo server."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bench import h2load_client
from loadtest.payload import CLASSIFY_METHOD, build_payloads, load_images

ROOT = Path(__file__).resolve().parents[2]


def test_grpc_frame_is_flag_length_message() -> None:
    framed = h2load_client.grpc_frame(b"abc")
    assert framed[0] == 0 and struct.unpack(">I", framed[1:5])[0] == 3 and framed[5:] == b"abc"


def test_parse_log_reads_start_status_latency() -> None:
    start, status, latency = h2load_client.parse_log("1000\t200\t350\n2000\t200\t450\n3000\t503\t90\n")
    assert start.tolist() == [1000, 2000, 3000]
    assert status.tolist() == [200, 200, 503] and latency.tolist() == [350, 450, 90]


@pytest.mark.integration
@pytest.mark.skipif(
    not h2load_client.available(), reason="h2load not installed (apt-get install nghttp2-client)"
)
def test_h2load_drives_the_echo_server() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_server", "--port", "0", "--input-shape", "1,28,28"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        m = re.search(r"listening on (\S+)", proc.stdout.readline())
        assert m, "echo server did not report its address"
        message = build_payloads("classify", load_images("synthetic", (1, 28, 28), 1, seed=0), 1, "lenet", 0)[
            0
        ]
        r = h2load_client.run_h2load(m.group(1), CLASSIFY_METHOD, message, concurrency=4, duration_s=1.0,
                                     warmup_s=0.2, timeout_s=30)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert r.failed == 0 and r.requests > 100
    lat = r.latency_ms
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    # Rate = responses over the measured span: 4 in flight can't beat 4 / (median latency) by much.
    assert r.requests_per_s < 4 / (lat["p50_ms"] / 1e3) * 2
