"""The pieces of ``--workers`` that need no process: the flag, each worker's share of cores and
GPUs, the spec a worker is started with, the reserved port, multiprocess gauges, the probe model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import share
from server.app import grpc_options
from server.config import ServerConfig
from server.supervisor import reserve_port
from server.worker import WorkerSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_share() -> Iterator[None]:
    before = share.current_share()
    yield
    share.take_share(before.index, before.count)


def test_workers_flag_takes_a_count_or_auto_from_the_command_line_or_env() -> None:
    base = ["--repository", "."]
    assert ServerConfig.from_args(base, environ={}).worker_count == 1
    assert ServerConfig.from_args([*base, "--workers", "3"], environ={}).worker_count == 3
    assert ServerConfig.from_args(base, environ={"CNN_SERVE_WORKERS": "2"}).worker_count == 2
    assert (
        ServerConfig.from_args([*base, "--workers", "auto"], environ={}).worker_count == share.machine_cpus()
    )
    for bad in ("0", "-1", "many"):
        with pytest.raises(SystemExit):
            ServerConfig.from_args([*base, "--workers", bad], environ={})


def test_a_worker_gets_its_share_of_the_cores_and_starts_at_its_own_gpu(restore_share) -> None:
    whole = share.machine_cpus()
    assert share.usable_cpus() == whole
    share.take_share(1, 2)
    assert share.usable_cpus() == max(1, whole // 2)
    # Worker 1 of 2 on a 4-GPU host: its instances on GPUs 1, 2, 3, 0, ...; on one GPU, always 0.
    assert [share.instance_device(i, devices=4) for i in range(5)] == [1, 2, 3, 0, 1]
    assert [share.instance_device(i, devices=1) for i in range(3)] == [0, 0, 0]
    with pytest.raises(ValueError):
        share.take_share(2, 2)


def test_visible_gpus_are_counted_without_loading_cuda(tmp_path: Path) -> None:
    assert share.cuda_device_count({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert share.cuda_device_count({"CUDA_VISIBLE_DEVICES": "-1"}) == 1  # none: device 0 is as good as any
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert share.cuda_device_count({}, dev=tmp_path) == 2
    assert share.cuda_device_count({}, dev=tmp_path / "missing") == 1


def test_worker_spec_round_trips_every_config_field(tmp_path: Path) -> None:
    cfg = ServerConfig(repository=tmp_path, port=4321, grace_s=7.5, device="cpu", workers="2")
    spec = WorkerSpec(1, 2, os.getpid(), cfg)
    back = WorkerSpec.from_json(spec.to_json())
    assert back == spec
    assert set(json.loads(spec.to_json())["config"]) == set(ServerConfig.__dataclass_fields__)


def test_workers_share_the_grpc_port_a_single_server_does_not() -> None:
    cfg = ServerConfig(repository=Path("."))
    assert dict(grpc_options(cfg))["grpc.so_reuseport"] == 0
    assert dict(grpc_options(cfg, reuse_port=True))["grpc.so_reuseport"] == 1


def test_the_reserved_port_is_free_then_shared_only_by_reuseport_sockets() -> None:
    sock = reserve_port("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # what a second, non-worker server would do
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            with pytest.raises(OSError):  # a port someone listens on is not ours to reserve
                reserve_port("127.0.0.1", port).close()
    finally:
        sock.close()


def test_multiprocess_gauges_are_written_by_refresh_and_zeroed_on_unload(tmp_path: Path) -> None:
    # A fresh interpreter: prometheus_client picks multiprocess mode at import.
    script = textwrap.dedent(
        f"""
        import json
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector
        from server.metrics import ServerMetrics

        m = ServerMetrics()
        depth = [3]
        m.version_loaded("m", "1", "CPUExecutionProvider", "lenet5", "mnist", lambda: depth[0], lambda: 2)
        reader = CollectorRegistry()
        MultiProcessCollector(reader, path={str(tmp_path)!r})
        read = lambda: {{s.name: s.value for f in reader.collect() for s in f.samples if s.labels.get("model") == "m"}}
        before = read()
        depth[0] = 5
        m.refresh_live_gauges()
        refreshed = read()
        m.version_unloaded("m", "1")
        print(json.dumps([m.multiprocess, before, refreshed, read()]))
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    on, before, refreshed, unloaded = json.loads(out.stdout)
    assert on and before["cnn_queue_depth"] == 3 and before["cnn_inflight_requests"] == 2
    assert before["cnn_model_info"] == 1 and refreshed["cnn_queue_depth"] == 5
    assert unloaded["cnn_model_info"] == unloaded["cnn_queue_depth"] == unloaded["cnn_inflight_requests"] == 0


def test_the_probe_model_is_what_onnx_helper_builds() -> None:
    from onnx import TensorProto, helper

    from server.runtime import PROBE_MODEL

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "device_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    assert model.SerializeToString() == PROBE_MODEL
