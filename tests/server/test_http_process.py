"""``python -m server`` with HTTP as a real process: SIGTERM under HTTP load (0 failed admitted
requests, every admitted one answered 200, then 503, exit 0); the listening line names the HTTP
port; ``--http-port -1`` turns HTTP off; a taken HTTP port is exit 2."""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
from collections import Counter

import numpy as np
import pytest

from tests.server.helpers import publish, tiny_model
from tests.server.http_helpers import binary_body, infer_path, request

pytestmark = pytest.mark.integration

CLIENTS = 8


def infer_request() -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    header = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 1, 28, 28],
                "parameters": {"binary_data_size": x.nbytes},
            }
        ]
    }
    return binary_body(header, [x.tobytes()])


def http_client(port: int, results: Counter, lock: threading.Lock, loaded: threading.Barrier) -> None:
    """Requests back to back on one keep-alive connection until the first non-200 answer."""
    body, headers = infer_request()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    waited = False
    try:
        end = time.monotonic() + 40
        while time.monotonic() < end:
            try:
                conn.request("POST", infer_path("tiny"), body, headers)
                reply = conn.getresponse()
                reply.read()
                code = str(reply.status) if reply.status != 200 else "OK"
            except (ConnectionError, http.client.HTTPException, OSError):
                code = "CONNECTION"  # the port closed under a request that was never admitted
            with lock:
                results[code] += 1
            if code != "OK":
                return
            if not waited:
                waited = True
                loaded.wait(30)
    finally:
        conn.close()


def test_sigterm_under_http_load_finishes_every_admitted_request_and_exits_0(tmp_path, spawn) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model(hidden=100, width=1024)  # a few ms per batch: work is queued at SIGTERM
    publish(root, "tiny", 1, data, tm.meta)
    server = spawn(
        "--metrics-port",
        "-1",
        "--device",
        "cpu",
        "--max-batch-size",
        "4",
        "--poll-interval-s",
        "0",
        "--grace-s",
        "20",
        repository=root,
    )
    port = server.wait_listening()["http_port"]
    results: Counter = Counter()
    lock = threading.Lock()
    loaded = threading.Barrier(CLIENTS + 1)
    threads = [
        threading.Thread(target=http_client, args=(port, results, lock, loaded)) for _ in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    loaded.wait(30)
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert server.proc.wait(60) == 0
    time.sleep(0.2)  # the stdout reader thread catches the last line
    stopped = server.stopped
    assert stopped["admitted_failed"] == 0
    assert (
        stopped["admitted"] == stopped["admitted_ok"] == results["OK"]
    )  # each admitted one reached its client
    assert results["OK"] > CLIENTS
    assert set(results) <= {"OK", "503", "CONNECTION"}
    assert results["503"] >= 1


def test_listening_line_names_the_http_port_and_minus_1_turns_it_off(tmp_path, spawn) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    on = spawn("--metrics-port", "-1", "--device", "cpu", "--poll-interval-s", "0", repository=root)
    listening = on.wait_listening()
    assert isinstance(listening["http_port"], int) and listening["http_port"] != listening["port"]
    assert listening["tls"] is False and on.http_url == f"http://127.0.0.1:{listening['http_port']}"
    assert request(on.http_url + "/v2/health/ready").status == 200
    off = spawn("--metrics-port", "-1", "--device", "cpu", "--http-port", "-1", repository=root)
    assert off.wait_listening()["http_port"] is None and off.http_url is None
    for p in (on, off):
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(30) == 0


def test_a_taken_http_port_is_exit_2(tmp_path, spawn) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = spawn("--metrics-port", "-1", "--device", "cpu", "--http-port", str(port), repository=root)
        assert server.proc.wait(60) == 2
    time.sleep(0.2)
    assert f"cannot bind HTTP to 127.0.0.1:{port}" in "".join(server.stderr)
