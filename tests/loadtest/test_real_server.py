"""A bounded load test against the real cnn-serve (create_server on port 0) with a tiny ONNX model:
the server's own request counter must equal what the client counted, step by step."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtest.__main__ import main
from tests.server.helpers import RunningServer, publish, server_config, tiny_model

pytestmark = pytest.mark.integration

SHAPE = (1, 8, 8)
CLASSES = tuple(f"c{i}" for i in range(4))


@dataclass
class RealServer:
    target: str
    metrics_url: str


@pytest.fixture
def real_server(tmp_path: Path) -> Iterator[RealServer]:
    data, tm = tiny_model(input_shape=SHAPE, class_names=CLASSES, arch="tiny", dataset="synthetic")
    publish(tmp_path / "repo", "tiny", 1, data, tm.meta)
    server = RunningServer(server_config(tmp_path / "repo", max_batch_size=8, grace_s=2.0))
    try:
        yield RealServer(server.target, f"http://127.0.0.1:{server.handle.metrics_port}/metrics")
    finally:
        server.stop(1.0)


def test_bounded_load_test_counts_match_the_servers_counter(real_server: RealServer, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = [
        "--target",
        real_server.target,
        "--model",
        "tiny",
        "--concurrency",
        "1,8",
        "--request-rate",
        "150",
        "--max-requests",
        "300",
        "--duration",
        "3",
        "--window",
        "0.5",
        "--warmup",
        "0.2",
        "--images-per-request",
        "2",
        "--stability-windows",
        "100",
        "--metrics-url",
        real_server.metrics_url,
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["input_shape"] == list(SHAPE)  # discovered through ListModels
    closed1, closed8, open150 = doc["steps"]
    # Closed steps stop at --max-requests (a tiny model answers 300 requests well within 3 s).
    for step in (closed1, closed8):
        assert step["sent"] == step["ok"] == 300 and step["errors_total"] == {}
    # Open loop at 150/s for at most 0.2 + 3 + 0.5 s: bounded in time, not by count here.
    assert 0 < open150["sent"] == open150["ok"] <= 150 * 3.7 * 1.3
    for step in doc["steps"]:
        server = step["server"]
        assert server["requests_ok"] == step["ok"]  # the server saw exactly what the client counted
        assert server["batch_size"] >= 1.0 and server["compute_ms"] > 0
        assert step["images_per_s"] == pytest.approx(2 * step["requests_per_s"])
    # With 8 in flight the server batches (2 images per request, up to 8 images per batch).
    assert closed8["server"]["batch_size"] > closed1["server"]["batch_size"]


def test_kserve_api_against_the_real_server(real_server: RealServer, tmp_path: Path) -> None:
    out = tmp_path / "kserve.json"
    argv = [
        "--target",
        real_server.target,
        "--model",
        "tiny",
        "--api",
        "kserve",
        "--concurrency",
        "4",
        "--max-requests",
        "100",
        "--duration",
        "5",
        "--window",
        "0.5",
        "--warmup",
        "0",
        "--stability-windows",
        "100",
        "--metrics-url",
        real_server.metrics_url,
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    (step,) = json.loads(out.read_text())["steps"]
    assert step["sent"] == step["ok"] == 100 and step["errors_total"] == {}
    assert step["server"]["requests_ok"] == 100


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_token_file_shared_with_cnn_serve_opens_its_authenticated_apis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], protocol: str
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# one file for the server and the load tester\nload-tester-token\nanother-client\n")
    data, tm = tiny_model(input_shape=SHAPE, class_names=CLASSES, arch="tiny", dataset="synthetic")
    publish(tmp_path / "repo", "tiny", 1, data, tm.meta)
    server = RunningServer(server_config(tmp_path / "repo", max_batch_size=8, auth_token_file=tokens))
    try:
        port = server.target if protocol == "grpc" else f"127.0.0.1:{server.handle.http_port}"
        argv = ["--target", port, "--model", "tiny", "--api", "kserve", "--protocol", protocol]
        argv += [
            "--concurrency",
            "2",
            "--max-requests",
            "20",
            "--duration",
            "5",
            "--window",
            "0.5",
            "--quiet",
        ]
        out = tmp_path / "r.json"
        assert main([*argv, "--auth-token-file", str(tokens), "--traceparent", "1", "--out", str(out)]) == 0
        (step,) = json.loads(out.read_text())["steps"]
        assert step["sent"] == step["ok"] == 20 and step["errors_total"] == {}
        # Without the token the server refuses the discovery call: one line, exit 1.
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert ("UNAUTHENTICATED" in err or "HTTP 401" in err) and "load-tester-token" not in err
    finally:
        server.stop(1.0)
