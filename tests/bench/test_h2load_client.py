"""bench/h2load_client.py: gRPC framing, h2load's log parsing, and a real run against the echo server."""

from __future__ import annotations

import re
import socketserver
import struct
import subprocess
import sys
import threading
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
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        m = re.search(r"listening on (\S+)", proc.stdout.readline())
        assert m, "echo server did not report its address"
        message = build_payloads("classify", load_images("synthetic", (1, 28, 28), 1, seed=0), 1, "lenet", 0)[
            0
        ]
        r = h2load_client.run_h2load(
            m.group(1), CLASSIFY_METHOD, message, concurrency=4, duration_s=1.0, warmup_s=0.2, timeout_s=30
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert r.failed == 0 and r.requests > 100
    lat = r.latency_ms
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    # Rate = responses over the measured span: 4 in flight can't beat 4 / (median latency) by much.
    assert r.requests_per_s < 4 / (lat["p50_ms"] / 1e3) * 2


@pytest.mark.integration
@pytest.mark.skipif(
    not h2load_client.available(), reason="h2load not installed (apt-get install nghttp2-client)"
)
def test_h2load_http1_posts_kserve_rest_requests_and_reads_their_status(tmp_path: Path) -> None:
    """``--h1`` against cnn-serve's HTTP port with cnn-loadtest's binary-extension payload: every
    request answered 200; a run that gets no 200 at all (an unknown model: 404) is an error."""
    from loadtest.payload import infer_path
    from tests.server.helpers import RunningServer, publish, server_config, tiny_model

    data, tm = tiny_model(
        input_shape=(1, 8, 8), class_names=("a", "b", "c"), arch="tiny", dataset="synthetic"
    )
    publish(tmp_path / "repo", "tiny", 1, data, tm.meta)
    server = RunningServer(server_config(tmp_path / "repo"))
    try:
        images = load_images("synthetic", (1, 8, 8), 1, seed=0)  # (1, C, H, W)
        payload = build_payloads("kserve", images, 1, "tiny", 0, encoding="binary", protocol="http")[0]
        base = f"http://127.0.0.1:{server.handle.http_port}"
        r = h2load_client.run_h2load_http1(
            base + infer_path("tiny", 0),
            payload.body,
            payload.headers,
            concurrency=4,
            duration_s=1.0,
            warmup_s=0.2,
            timeout_s=30,
        )
        with pytest.raises(RuntimeError, match="no HTTP 200"):
            h2load_client.run_h2load_http1(
                base + infer_path("nope", 0),
                payload.body,
                payload.headers,
                concurrency=2,
                duration_s=0.3,
                warmup_s=0.1,
                timeout_s=30,
            )
    finally:
        server.stop(1.0)
    assert r.failed == 0 and r.requests > 50
    assert 0 < r.latency_ms["p50_ms"] <= r.latency_ms["p99_ms"]


class BlankReasonHandler(socketserver.StreamRequestHandler):
    """HTTP/1.1 keep-alive as TorchServe writes it: ``200 `` with a blank reason, ``404 Not Found``."""

    def handle(self) -> None:
        while True:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                chunk = self.rfile.readline()
                if not chunk:
                    return
                head += chunk
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            self.rfile.read(length)
            status = b"200 " if head.startswith(b"POST /ok ") else b"404 Not Found"
            self.wfile.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\n[]"
            )


@pytest.mark.integration
@pytest.mark.skipif(
    not h2load_client.available(), reason="h2load not installed (apt-get install nghttp2-client)"
)
def test_a_blank_reason_phrase_counts_as_200_only_when_asked() -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), BlankReasonHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def run(path: str, blank_ok: bool) -> h2load_client.H2loadResult:
        return h2load_client.run_h2load_http1(
            base + path, b"x" * 10, {}, concurrency=2, duration_s=0.3, warmup_s=0.1, timeout_s=30,
            blank_reason_is_ok=blank_ok,
        )  # fmt: skip

    try:
        r = run("/ok", True)
        with pytest.raises(RuntimeError, match="no HTTP 200"):
            run("/ok", False)  # h2load logs status 0 for a blank reason
        with pytest.raises(RuntimeError, match="no HTTP 200"):
            run("/missing", True)  # a real error stays an error
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert r.failed == 0 and r.requests > 10
