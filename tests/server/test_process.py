"""``python -m server`` as a real process: SIGTERM under gRPC and under HTTP load (0 failed
admitted calls, every admitted one answered, then refusals, exit 0),
SIGHUP reload, start-up failures with exit code 2, and the process never importing torch, the
trainer or the exporter."""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.server.helpers import publish, tiny_model
from tests.server.http_helpers import binary_infer_body, infer_path

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 8
X = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)


def request(model: str = "tiny") -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        model=model, images=[pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=X.tobytes()))]
    )


def grpc_client(port: int, record, loaded: threading.Barrier) -> None:
    """Classify calls back to back on one channel until the first refusal."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.ClassifierStub(ch)
        stub.Classify(request(), timeout=30)
        record("OK")
        loaded.wait(30)
        end = time.monotonic() + 40
        while time.monotonic() < end:
            try:
                stub.Classify(request(), timeout=30)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            record(code)
            if code != "OK":
                return  # refused: the server is going away


def http_client(port: int, record, loaded: threading.Barrier) -> None:
    """KServe v2 infers back to back on one keep-alive connection until the first non-200 answer."""
    body, headers = binary_infer_body(X[None])
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
            record(code)
            if code != "OK":
                return
            if not waited:
                waited = True
                loaded.wait(30)
    finally:
        conn.close()


# protocol -> (client, the listening line's port key, how a refused call ends, the refusal we
# must see): after SIGTERM new calls are refused, UNAVAILABLE / 503 from our handlers; a call
# racing the port closing ends CANCELLED from grpc-core or with the connection closed (never
# admitted: the server's counts prove it).
PROTOCOLS = {
    "grpc": (grpc_client, "port", {"UNAVAILABLE", "CANCELLED"}, "UNAVAILABLE"),
    "http": (http_client, "http_port", {"503", "CONNECTION"}, "503"),
}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_sigterm_under_load_finishes_every_admitted_call_and_exits_0(tmp_path, spawn, protocol: str) -> None:
    client, port_key, refusals, refusal = PROTOCOLS[protocol]
    root = tmp_path / "repo"
    data, tm = tiny_model(hidden=100, width=1024)  # a few ms per batch: work is queued at SIGTERM
    publish(root, "tiny", 1, data, tm.meta)
    server = spawn(
        *("--metrics-port", "0", "--device", "cpu", "--max-batch-size", "4"),
        *("--poll-interval-s", "0", "--grace-s", "20"),
        repository=root,
    )
    port = server.wait_listening()[port_key]
    results: Counter = Counter()
    lock = threading.Lock()
    loaded = threading.Barrier(CLIENTS + 1)

    def record(code: str) -> None:
        with lock:
            results[code] += 1

    threads = [threading.Thread(target=client, args=(port, record, loaded)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    loaded.wait(30)
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert server.proc.wait(60) == 0
    time.sleep(0.2)  # the stdout reader thread catches the last line
    stopped = server.event("stopped")
    assert stopped["admitted_failed"] == 0
    # Every admitted call reached its client.
    assert stopped["admitted"] == stopped["admitted_ok"] == results["OK"]
    assert results["OK"] > CLIENTS
    assert set(results) <= {"OK", *refusals}
    assert results[refusal] >= 1


def test_sighup_reloads_the_repository(tmp_path, spawn) -> None:
    root = tmp_path / "repo"
    v1, tm1 = tiny_model(seed=1)
    publish(root, "tiny", 1, v1, tm1.meta)
    server = spawn(
        env={
            "CNN_SERVE_REPOSITORY": str(root),
            "CNN_SERVE_PORT": "0",
            "CNN_SERVE_METRICS_PORT": "-1",
            "CNN_SERVE_DEVICE": "cpu",
            "CNN_SERVE_POLL_INTERVAL_S": "0",
        }
    )
    listening = server.wait_listening()
    assert listening["models"] == [{"name": "tiny", "versions": [1], "provider": "CPUExecutionProvider"}]
    assert listening["metrics_port"] is None
    v2, tm2 = tiny_model(seed=2)
    publish(root, "tiny", 2, v2, tm2.meta)
    with grpc.insecure_channel(f"127.0.0.1:{listening['port']}") as ch:
        stub = pb_grpc.ClassifierStub(ch)
        time.sleep(0.3)
        assert stub.Classify(request(), timeout=10).version == 1  # polling is off: no change by itself
        server.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 20
        while stub.Classify(request(), timeout=10).version != 2:
            assert time.monotonic() < end, "SIGHUP did not load version 2"
            time.sleep(0.05)
    health = subprocess.run(
        [sys.executable, "-m", "server.healthcheck", "--port", str(listening["port"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")  # the docker-compose healthcheck
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    after = subprocess.run(
        [sys.executable, "-m", "server.healthcheck", "--port", str(listening["port"]), "--timeout-s", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert after.returncode == 1 and "unhealthy: UNAVAILABLE" in after.stderr


def test_device_cuda_without_a_working_cuda_provider_fails_start_clearly(tmp_path, spawn) -> None:
    import onnxruntime as ort

    from server.runtime.cuda import CUDA, DeviceError, resolve_device

    try:
        if resolve_device("auto") == CUDA:
            pytest.skip("CUDA works here; the failure path needs a machine without it")
    except DeviceError:
        pass
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    server = spawn("--metrics-port", "-1", "--device", "cuda", repository=root)
    assert server.proc.wait(60) == 2
    time.sleep(0.2)
    err = "".join(server.stderr)
    reasons = ("did not load", "no CUDAExecutionProvider", "is the CPU build", "no NVIDIA driver")
    assert "--device cuda" in err and any(r in err for r in reasons), err
    assert "--device auto" in err or "onnxruntime-gpu" in err
    assert ort.get_device() in ("CPU", "GPU")


def test_missing_repository_and_bad_flags_exit_2(tmp_path, spawn) -> None:
    missing = spawn("--metrics-port", "-1", "--device", "cpu", repository=tmp_path / "nope")
    assert missing.proc.wait(60) == 2
    bad = spawn("--max-batch-size", "0", repository=tmp_path)
    assert bad.proc.wait(60) == 2
    time.sleep(0.2)
    assert "is not a directory" in "".join(missing.stderr)
    assert "--max-batch-size must be >= 1" in "".join(bad.stderr)


def test_server_process_never_imports_torch(tmp_path) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        import server, server.__main__, server.app, server.healthcheck
        from server.config import ServerConfig
        import grpc
        from protos.cnnstack.classifier.v1 import classifier_pb2 as pb, classifier_pb2_grpc as pbg

        async def main():
            cfg = ServerConfig.from_args(["--repository", {str(root)!r}, "--port", "0", "--http-port", "0", "--metrics-port", "0"], {{}})
            handle, port = await server.app.create_server(cfg)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{{port}}") as ch:
                img = pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=bytes(4 * 784)))
                reply = await pbg.ClassifierStub(ch).Classify(pb.ClassifyRequest(model="tiny", images=[img]))
                assert reply.results[0].predictions[0].class_name
            await handle.stop(1)

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, loaded
        tools = sorted(m for m in sys.modules if m.split(".")[0] in ("trainer", "exporter"))
        assert not tools, tools  # the server image has neither
        print("torch-free")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("torch-free")
