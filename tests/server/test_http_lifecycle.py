"""HTTP at shutdown: HTTP readiness turns 503 together with grpc.health.v1 NOT_SERVING, new
requests get 503 (Connection: close) and the request in flight still gets its answer. (Overload
over HTTP is tests/server/test_overload.py, beside gRPC's.)"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.helpers import publish, server_config, tiny_model
from tests.server.http_helpers import binary_infer_body, infer_path, request

pytestmark = pytest.mark.integration


def infer_body(n: int = 1) -> tuple[bytes, dict[str, str]]:
    return binary_infer_body(
        np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32), binary_outputs=True
    )


def grpc_health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return -1  # port closed


def test_http_readiness_follows_grpc_health_on_shutdown(tmp_path, start_server) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model(hidden=100, width=1024)
    publish(root, "slow", 1, data, tm.meta)
    server = start_server(server_config(root, max_batch_size=64))
    url = server.http_url
    assert (
        request(url + "/v2/health/ready").status == 200
        and request(url + "/v2/models/slow/ready").status == 200
    )
    assert grpc_health(server.target) == health_pb2.HealthCheckResponse.SERVING
    body, headers = infer_body(64)  # one full batch: in flight while the shutdown begins
    in_flight: Future = Future()
    threading.Thread(
        target=lambda: in_flight.set_result(request(url + infer_path("slow"), body, headers, timeout=60)),
        daemon=True,
    ).start()
    end = time.monotonic() + 10
    while server.handle.state.active == 0 and time.monotonic() < end:
        time.sleep(0.001)
    stopping = asyncio.run_coroutine_threadsafe(server.handle.stop(20.0), server.loop)
    while not server.handle.state.stopping:
        time.sleep(0.001)
    ready, model_ready = request(url + "/v2/health/ready"), request(url + "/v2/models/slow/ready")
    health = grpc_health(server.target)
    refused = request(url + infer_path("slow"), *infer_body())
    assert (ready.status, model_ready.status) == (503, 503) and "shutting down" in ready.json()["error"]
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING
    assert refused.status == 503 and refused.headers.get("Connection") == "close"
    assert "shutting down" in refused.json()["error"]
    assert in_flight.result(timeout=60).status == 200  # admitted before: answered
    summary = stopping.result(timeout=60)
    assert summary["admitted_failed"] == 0 and summary["admitted"] == summary["admitted_ok"] >= 1
