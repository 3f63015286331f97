"""docker-compose.yml as a user runs it, on a machine without a GPU: ``up`` from nothing (no
volume, no run, no repository) chains trainer -> exporter -> server, Prometheus scrapes the server,
the documented ``--no-deps`` load test runs against it without retraining, and ``down -v`` cleans
up. With podman, through its Docker-compatible socket (``podman system service``), which is how
docker-compose 1.29 drives it. tests/deploy/compose.test.yml says what differs from a real first
``up`` and why (a short training run, the dataset from Debian's package, a Prometheus stand-in)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.containers import get, grpc_health, v2_infer, wait_healthy, wait_listening
from tests.deploy.engine import ROOT, base_image, build, engine, run

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.integration]

DATASET = Path("/usr/share/datasets/fashion-mnist")
PROMETHEUS_IMAGE = "cnnstack-test-prometheus:2.42.0"  # compose.test.yml names it
COMPOSE_FILES = ["-f", "docker-compose.yml", "-f", "tests/deploy/compose.test.yml"]


@pytest.fixture(scope="module")
def docker_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """DOCKER_HOST for docker-compose: podman's Docker-compatible API on a socket of our own, for
    this module only; None with docker (its own daemon)."""
    eng = engine()
    if Path(eng).name != "podman":
        yield None
        return
    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen(
        [eng, "system", "service", "--time=0", f"unix://{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert service.poll() is None and time.monotonic() < deadline, (
                "podman system service did not start"
            )
            time.sleep(0.2)
        yield f"unix://{sock}"
    finally:
        service.terminate()
        service.wait(30)


class Clock:
    """Seconds per phase, printed (pytest -s, or the captured output of a failure)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def lap(self, what: str) -> None:
        now = time.monotonic()
        print(f"[compose] {now - self.last:6.1f} s  {what}", flush=True)
        self.last = now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_image(eng: str, tmp: Path) -> None:
    """Debian's prometheus wrapped as the official image is laid out (tests/deploy/prometheus.Dockerfile)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian's package stands in for prom/prometheus here)")
    shutil.copy2(binary, tmp / "prometheus")
    dockerfile = Path(__file__).with_name("prometheus.Dockerfile")
    run(
        eng,
        "build",
        "-q",
        "--build-arg",
        f"BASE={base_image(eng)}",
        "-f",
        str(dockerfile),
        "-t",
        PROMETHEUS_IMAGE,
        str(tmp),
    )


def container_state(eng: str, compose: list[str], env: dict[str, str], service: str) -> dict:
    (cid,) = run(*compose, "ps", "-a", "-q", service, env=env, cwd=ROOT).stdout.split()
    return json.loads(run(eng, "inspect", cid, "--format", "{{json .State}}").stdout)


def prometheus_target_up(port: int, job: str, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            targets = json.loads(get(f"http://127.0.0.1:{port}/api/v1/targets")[1])["data"]["activeTargets"]
        except OSError:
            targets = []
        ours = [t for t in targets if t["labels"].get("job") == job]
        if ours and ours[0]["health"] == "up":
            return ours[0]
        assert time.monotonic() < deadline, f"Prometheus target of {job} not up: {ours}"
        time.sleep(2)


def test_compose_up_trains_exports_serves_and_is_scraped_then_a_no_deps_load_test(
    docker_host: str | None, tmp_path: Path
) -> None:
    eng = engine()
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed")
    if not DATASET.is_dir():
        pytest.skip(f"{DATASET} is missing (Debian's dataset-fashion-mnist stands in for the download here)")
    clock = Clock()
    seconds = build(eng, "server", "trainer")
    prometheus_image(eng, tmp_path)
    clock.lap(f"images built (cached layers reused; deploy/build.sh: {seconds})")
    ports = {name: free_port() for name in ("HTTP", "GRPC", "METRICS", "PROMETHEUS")}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CNN_")},
        "COMPOSE_PROJECT_NAME": f"cnnstacktest{uuid.uuid4().hex[:8]}",
        **{f"CNN_{name}_PORT": f"127.0.0.1:{port}" for name, port in ports.items()},
    }
    if docker_host:
        env["DOCKER_HOST"] = docker_host
    compose = ["docker-compose", *COMPOSE_FILES]
    (ROOT / "artifacts" / "reports").mkdir(parents=True, exist_ok=True)  # the load test's bind mount
    try:
        run(*compose, "up", "-d", "--no-build", "server", "prometheus", env=env, cwd=ROOT, timeout=1200)
        clock.lap("up -d: trainer and exporter done, server and prometheus started")
        trained = container_state(eng, compose, env, "trainer")
        assert trained["ExitCode"] == 0 and container_state(eng, compose, env, "exporter")["ExitCode"] == 0
        (server,) = run(*compose, "ps", "-q", "server", env=env, cwd=ROOT).stdout.split()
        listening = wait_listening(eng, server)
        assert listening["models"] == [
            {"name": "fmnist", "versions": [1], "provider": "CPUExecutionProvider"}
        ]
        wait_healthy(eng, server)
        clock.lap("server listening and healthy")
        reply = v2_infer(ports["HTTP"], "fmnist")  # from the host, through the published port
        assert reply["model_name"] == "fmnist" and reply["outputs"]
        assert grpc_health(ports["GRPC"], sys.executable).stdout.strip() == "SERVING"
        target = prometheus_target_up(ports["PROMETHEUS"], "cnnstack-server")
        assert target["labels"]["instance"] == "server:8002"
        clock.lap("HTTP infer, gRPC health, Prometheus target up")

        loadtest = run(
            *compose,
            "--profile",
            "loadtest",
            "run",
            "--rm",
            "--no-deps",
            "loadtest",
            "--target",
            "server:8001",
            "--model",
            "fmnist",
            "--concurrency",
            "1,4",
            "--duration",
            "3",
            "--metrics-url",
            "http://server:8002/metrics",
            "--out",
            f"/reports/{env['COMPOSE_PROJECT_NAME']}.json",
            env=env,
            cwd=ROOT,
            timeout=300,
        )
        report = json.loads(
            (ROOT / "artifacts" / "reports" / f"{env['COMPOSE_PROJECT_NAME']}.json").read_text()
        )
        assert report, loadtest.stdout[-2000:]
        clock.lap("load test (--no-deps)")
        # --no-deps: the trainer was not started again, so no new version was trained and published.
        assert container_state(eng, compose, env, "trainer")["StartedAt"] == trained["StartedAt"]
    except BaseException:
        print(run(*compose, "logs", "--no-color", "--tail", "60", env=env, cwd=ROOT, check=False).stdout)
        raise
    finally:
        down = run(*compose, "down", "-v", "--remove-orphans", env=env, cwd=ROOT, timeout=300, check=False)
        report_file = ROOT / "artifacts" / "reports" / f"{env['COMPOSE_PROJECT_NAME']}.json"
        report_file.unlink(missing_ok=True)
    assert down.returncode == 0, down.stdout + down.stderr
    clock.lap("down -v")
