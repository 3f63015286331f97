"""``python -m server`` with HTTP as a real process: the listening line names the HTTP port;
``--http-port -1`` turns HTTP off; a taken HTTP port is exit 2. (SIGTERM under HTTP load is
tests/server/test_process.py, beside gRPC's.)"""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests.server.helpers import publish, tiny_model
from tests.server.http_helpers import request

pytestmark = pytest.mark.integration


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
