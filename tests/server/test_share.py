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

from server.app import grpc_options
from server.config import ServerConfig
from server.runtime import share
from server.scaleout.supervisor import reserve_port
from server.scaleout.worker import WorkerSpec

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
    assert share.worker_gpus((0, 1, 2, 3)) == (0, 1, 2, 3)
    share.take_share(1, 2)
    assert share.usable_cpus() == max(1, whole // 2)
    # Worker 1 of 2: its instances are placed over --gpus from the second GPU on; one GPU: that one.
    assert share.worker_gpus((0, 1, 2, 3)) == (1, 2, 3, 0)
    assert share.worker_gpus((5,)) == (5,)
    share.take_share(3, 4)
    assert share.worker_gpus((0, 1)) == (1, 0)
    with pytest.raises(ValueError):
        share.take_share(4, 4)


def test_worker_gpus_place_each_workers_first_instance_on_its_own_gpu(restore_share) -> None:
    from server.runtime.devices import instance_devices

    firsts = []
    for i in range(2):
        share.take_share(i, 2)
        firsts.append(instance_devices([], True, share.worker_gpus((0, 1)), 1)[0])
    assert firsts == [0, 1]


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


def test_the_cuda_probe_model_is_what_onnx_helper_builds() -> None:
    # The server carries the probe as bytes ([serve] has no onnx); onnx (in [dev]) rebuilds it here.
    from onnx import TensorProto, helper, numpy_helper

    from server.runtime.cuda import CONV_PROBE_MODEL, probe_arrays

    _, w, b, _ = probe_arrays()
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="probe_conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"], name="probe_relu"),
        ],
        "cuda_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    assert model.SerializeToString() == CONV_PROBE_MODEL


def test_the_server_imports_no_onnx(tmp_path: Path) -> None:
    code = "import sys, server.__main__, server.app, server.scaleout.supervisor, server.scaleout.worker, loadtest.__main__; print('onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
