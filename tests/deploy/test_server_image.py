"""The CPU server image built and run as users run it: uid 65534 with HOME=/nonexistent, a model
repository mounted read-only; the listening line, the HTTP health and a v2 inference, the gRPC
health check, /metrics; then ``stop``: drained, exit 0. No onnxruntime warning or error on the way."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from tests.deploy.containers import get, grpc_health, host_port, logs, v2_infer, wait_healthy, wait_listening
from tests.deploy.engine import build, engine, image_size_mb, run
from tests.server.helpers import publish, tiny_model

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.integration]

IMAGE = "cnnstack-server:0.1.0"
SIZE_TARGET_MB = 600  # the CPU server image: onnxruntime, grpcio, numpy, Pillow, aiohttp on a slim base


@pytest.fixture(scope="module")
def server_image() -> tuple[str, dict[str, float]]:
    eng = engine()
    return eng, build(eng, "server")


def test_the_cpu_server_image_serves_as_uid_65534_and_drains_on_stop(server_image, tmp_path: Path) -> None:
    eng, seconds = server_image
    size = image_size_mb(eng, IMAGE)
    print(f"image {IMAGE}: {size:.0f} MB, built in {seconds.get(IMAGE, 0):.0f} s")
    assert size <= SIZE_TARGET_MB, f"{IMAGE} is {size:.0f} MB"
    repo = tmp_path / "repo"
    data, model = tiny_model()
    publish(repo, "tiny", 1, data, model.meta)
    for path in [repo, *repo.rglob("*")]:  # readable by uid 65534, writable by nobody in there
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    name = f"cnnstack-test-{uuid.uuid4().hex[:8]}"
    run(
        eng,
        "run",
        "-d",
        "--name",
        name,
        "--user",
        "65534:65534",
        "-e",
        "HOME=/nonexistent",
        "-v",
        f"{repo}:/models:ro",
        "-p",
        "127.0.0.1::8000",
        "-p",
        "127.0.0.1::8001",
        "-p",
        "127.0.0.1::8002",
        IMAGE,
        "--grace-s",
        "20",
    )
    try:
        listening = wait_listening(eng, name)
        assert listening["provider"] == "CPUExecutionProvider"
        assert (listening["http_port"], listening["port"], listening["metrics_port"]) == (8000, 8001, 8002)
        assert listening["models"] == [{"name": "tiny", "versions": [1], "provider": "CPUExecutionProvider"}]
        http, grpc_port, metrics = (host_port(eng, name, p) for p in (8000, 8001, 8002))
        assert get(f"http://127.0.0.1:{http}/v2/health/ready")[0] == 200
        reply = v2_infer(http, "tiny")
        assert reply["model_name"] == "tiny" and reply["outputs"]
        health = grpc_health(grpc_port, sys.executable)
        assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stdout + health.stderr
        wait_healthy(eng, name)  # the image's HEALTHCHECK, inside the container
        status, body = get(f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200 and b'cnn_server_info{device="auto",provider="CPUExecutionProvider"} 1.0' in body
        run(eng, "stop", "-t", "40", name, timeout=120)
        state = json.loads(run(eng, "inspect", name, "--format", "{{json .State}}").stdout)
        text = logs(eng, name)
        assert state["ExitCode"] == 0, text[-3000:]
        assert "draining" in text and '{"event": "stopped"' in text, text[-3000:]
        # One plain line says why it serves on CPU; onnxruntime says nothing (no red CUDA error, no
        # telemetry warning: HOME=/nonexistent as uid 65534 is where it used to complain).
        assert "device auto: serving on CPU, because this onnxruntime" in text
        assert "onnxruntime:" not in text and "telemetry" not in text.lower(), text[-3000:]
    finally:
        run(eng, "rm", "-f", name, check=False, timeout=120)
