"""Talking to a running container from the host: its logs' listening line, its health (the image's
HEALTHCHECK, driven where the engine does not run it by itself), KServe v2 over HTTP."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.deploy.engine import run


def logs(eng: str, container: str) -> str:
    proc = run(eng, "logs", container, check=False, timeout=60)
    return proc.stdout + proc.stderr


def wait_listening(eng: str, container: str, timeout_s: float = 180) -> dict[str, Any]:
    """The server's JSON 'listening' event from the container's output."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = logs(eng, container)
        for line in text.splitlines():
            if line.startswith('{"event": "listening"'):
                return json.loads(line)
        state = run(eng, "inspect", container, "--format", "{{.State.Status}}", check=False).stdout.strip()
        if state in ("exited", "stopped", "dead"):
            raise AssertionError(f"{container} exited before listening:\n{text[-4000:]}")
        time.sleep(1)
    raise AssertionError(f"{container}: no listening line in {timeout_s} s:\n{logs(eng, container)[-4000:]}")


def healthy(eng: str, container: str) -> bool:
    """The image's HEALTHCHECK. podman without systemd never runs it by itself: run it here (which
    also records the status compose's service_healthy reads); docker runs it on its own."""
    if Path(eng).name == "podman":
        return run(eng, "healthcheck", "run", container, check=False, timeout=60).returncode == 0
    out = run(eng, "inspect", container, "--format", "{{.State.Health.Status}}", check=False).stdout
    return out.strip() == "healthy"


def wait_healthy(eng: str, container: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not healthy(eng, container):
        assert time.monotonic() < deadline, f"{container} not healthy in {timeout_s} s"
        time.sleep(2)


def host_port(eng: str, container: str, port: int) -> int:
    """The 127.0.0.1 port the engine published the container's ``port`` on."""
    out = run(eng, "port", container, f"{port}/tcp").stdout.split()[0]
    return int(out.rsplit(":", 1)[1])


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.status, reply.read()


def v2_infer(http: int, model: str) -> dict[str, Any]:
    """One KServe v2 inference over HTTP with a zero image of the model's own input shape."""
    _, body = get(f"http://127.0.0.1:{http}/v2/models/{model}")
    (spec,) = json.loads(body)["inputs"]
    shape = [1 if d < 0 else d for d in spec["shape"]]
    count = 1
    for d in shape:
        count *= d
    payload = {
        "inputs": [{"name": spec["name"], "shape": shape, "datatype": spec["datatype"], "data": [0] * count}]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{http}/v2/models/{model}/infer",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200
        return json.loads(reply.read())


def grpc_health(port: int, python: str) -> subprocess.CompletedProcess[str]:
    """The project's health CLI from the host, against the published gRPC port."""
    return run(python, "-m", "server.healthcheck", "--port", str(port), check=False, timeout=60)
