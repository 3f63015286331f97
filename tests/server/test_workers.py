"""``cnn-serve --workers 2`` as real processes: one port and both workers serving it, one /metrics
summing both, a killed worker failing only its in-flight calls and coming back, SIGTERM under
load with no admitted call failed, SIGHUP reaching every worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cnnstack.serverproc import ServerProcess
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from server.runtime.share import machine_cpus
from tests.server.helpers import publish, tiny_model
from tests.server.worker_helpers import (
    X,
    channels_per_worker,
    close_all,
    metric_sums,
    metrics_url,
    request,
    wait_event,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BASE = ("--workers", "2", "--metrics-port", "0", "--device", "cpu", "--poll-interval-s", "0")


def start(root: Path, *args: str) -> ServerProcess:
    server = ServerProcess(*BASE, *args, repository=root, cwd=ROOT)
    server.start()
    return server


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, object]]:
    """One supervisor with 2 workers, shared by the tests that only send requests."""
    root = tmp_path_factory.mktemp("workers") / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    server = start(root)
    yield server, tm
    assert server.stop() == 0


def multiproc_dir(pid: int) -> Path:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (value,) = [e.split(b"=", 1)[1] for e in env if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(value.decode())


def test_two_workers_share_one_port_and_both_serve(two_workers) -> None:
    server, tm = two_workers
    listening = server.listening
    pids = listening["workers"]
    assert len(set(pids)) == 2 and server.pid not in pids
    assert listening["models"][0]["name"] == "tiny"
    channels = channels_per_worker(server.target, pids, each=2)
    try:
        expected = int(tm.probabilities(X[None]).argmax())
        for chans in channels.values():
            for ch in chans:
                reply = pb_grpc.ClassifierStub(ch).Classify(request(), timeout=30)
                assert reply.results[0].predictions[0].class_index == expected
        # Each worker counts only what reached it: both served.
        for chans in channels.values():
            stats = ks_grpc.GRPCInferenceServiceStub(chans[0]).ModelStatistics(
                ks.ModelStatisticsRequest(name="tiny"), timeout=30
            )
            assert stats.model_stats[0].inference_count >= 2
    finally:
        close_all(channels)
    # Each worker has half the cores for its onnxruntime threads (and says so).
    share = f"{max(1, machine_cpus() // 2)} usable CPU core(s)"
    assert sum(share in line for line in server.stderr) == 2, server.log_tail()


def test_metrics_totals_equal_the_requests_sent_across_both_workers(two_workers) -> None:
    server, _ = two_workers
    url = metrics_url(server)
    ok = {"model": "tiny", "code": "OK", "rpc": "Classify"}
    before = metric_sums(url, **ok)
    before_images = metric_sums(url, model="tiny")
    channels = channels_per_worker(server.target, server.listening["workers"], each=2)
    sent = 0
    try:
        for chans in channels.values():
            for i, ch in enumerate(chans):
                for _ in range(5 + i):
                    pb_grpc.ClassifierStub(ch).Classify(request(), timeout=30)
                    sent += 1
    finally:
        close_all(channels)
    after = metric_sums(url, **ok)
    after_images = metric_sums(url, model="tiny")
    assert after["cnn_requests_total"] - before["cnn_requests_total"] == sent
    lat = "cnn_request_latency_seconds_count"
    assert metric_sums(url, model="tiny", rpc="Classify")[lat] - before_images.get(lat, 0) >= sent
    assert after_images["cnn_images_total"] - before_images["cnn_images_total"] == sent
    assert after_images["cnn_model_info"] == 1  # a gauge: the max over live workers, not a sum
    assert after_images["cnn_queue_depth"] == 0
    whole = metric_sums(url)
    assert whole["cnn_workers"] == 2 and whole["cnn_worker_restarts_total"] == 0


def load(
    channels: dict[int, list[grpc.Channel]],
    stop: threading.Event,
    seconds: float = 60.0,
    wait_for_ready: bool = False,
):
    """One thread per channel, one call in flight each; returns (threads, results by (pid, code),
    failures as (pid, time.monotonic() when the failed call was sent))."""
    results: Counter = Counter()
    failures: list[tuple[int, float]] = []
    lock = threading.Lock()

    def client(pid: int, ch: grpc.Channel) -> None:
        stub = pb_grpc.ClassifierStub(ch)
        end = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < end:
            sent = time.monotonic()
            try:
                stub.Classify(request(), timeout=30, wait_for_ready=wait_for_ready)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                results[(pid, code)] += 1
                if code != "OK":
                    failures.append((pid, sent))

    threads = [
        threading.Thread(target=client, args=(pid, ch)) for pid, chans in channels.items() for ch in chans
    ]
    for t in threads:
        t.start()
    return threads, results, failures


def test_a_killed_worker_fails_only_its_in_flight_calls_and_comes_back(tmp_path) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model(hidden=20, width=512)  # a little compute: calls are in flight at the kill
    publish(root, "tiny", 1, data, tm.meta)
    server = start(root)
    try:
        victim, survivor = server.listening["workers"]
        folder = multiproc_dir(victim)
        channels = channels_per_worker(server.target, [victim, survivor], each=3)
        stop = threading.Event()
        # wait_for_ready: a reconnect can race the dying worker (the kernel may queue it on the
        # listener being closed, which resets it); without it grpc fails the channel's next calls
        # fast for a back-off second. Those are the client's, not calls the worker had in flight.
        threads, results, failures = load(channels, stop, wait_for_ready=True)
        try:
            time.sleep(1.0)
            mark = len(server.events)
            os.kill(victim, signal.SIGKILL)
            exited = wait_event(server, "worker_exited", after=mark)
            back = wait_event(server, "worker_started", after=mark)
            back_seen = time.monotonic()
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
            close_all(channels)
        assert exited["pid"] == victim and exited["returncode"] == -signal.SIGKILL
        assert back["index"] == exited["index"] and back["pid"] not in (victim, survivor)
        failed = {k: n for k, n in results.items() if k[1] != "OK"}
        # Only calls on the victim's connections failed, UNAVAILABLE: the ones in flight at the kill,
        # and any sent on a reconnection the kernel had queued on its listener before that closed
        # (how many depends on scheduling). The survivor's connections lost nothing, and no call
        # sent once the replacement was listening failed: the victim was gone by then.
        assert set(pid for pid, _ in failed) <= {victim}, failed
        assert set(code for _, code in failed) <= {"UNAVAILABLE"}, failed
        assert all(sent < back_seen for _, sent in failures), failures
        assert results[(survivor, "OK")] > 0 and results[(victim, "OK")] > 0
        # The new worker takes connections, and the dead one's live gauges left the shared folder.
        fresh = channels_per_worker(server.target, [survivor, back["pid"]])
        close_all(fresh)
        assert not list(folder.glob(f"gauge_live*_{victim}.db"))
        whole = metric_sums(metrics_url(server))
        assert whole["cnn_worker_restarts_total"] == 1 and whole["cnn_workers"] == 2
    finally:
        assert server.stop() == 0
    assert not folder.exists()  # the supervisor removed its metrics folder at exit


def test_sigterm_under_load_every_worker_drains_and_no_admitted_call_fails(tmp_path) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model(hidden=100, width=1024)  # a few ms per batch: work is queued at SIGTERM
    publish(root, "tiny", 1, data, tm.meta)
    server = start(root, "--max-batch-size", "4", "--grace-s", "20")
    pids = server.listening["workers"]
    channels = channels_per_worker(server.target, pids, each=4)
    stop = threading.Event()
    threads, results, _ = load(channels, stop, seconds=40.0)
    try:
        time.sleep(1.5)
        assert all(results[(pid, "OK")] > 0 for pid in pids), results
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert server.proc.wait(60) == 0  # type: ignore[union-attr]
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        close_all(channels)
    server.stop()
    stopped = server.stopped
    ok = sum(n for (_, code), n in results.items() if code == "OK")
    assert stopped["admitted_failed"] == 0
    assert stopped["admitted"] == stopped["admitted_ok"] == ok  # every admitted call reached its client
    assert {w["pid"] for w in stopped["workers"]} == set(pids)
    assert all(w["returncode"] == 0 and w["admitted_ok"] > 0 for w in stopped["workers"])
    assert set(code for _, code in results) <= {"OK", "UNAVAILABLE", "CANCELLED"}


def test_sighup_reaches_every_worker(tmp_path) -> None:
    root = tmp_path / "repo"
    v1, tm1 = tiny_model(seed=1)
    publish(root, "tiny", 1, v1, tm1.meta)
    server = start(root)
    try:
        pids = server.listening["workers"]
        v2, tm2 = tiny_model(seed=2)
        publish(root, "tiny", 2, v2, tm2.meta)
        server.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        channels = channels_per_worker(server.target, pids)
        try:
            for pid, (ch,) in channels.items():
                stub = pb_grpc.ClassifierStub(ch)
                end = time.monotonic() + 30
                while stub.Classify(request(), timeout=10).version != 2:
                    assert time.monotonic() < end, f"worker {pid} did not load version 2"
                    time.sleep(0.05)
        finally:
            close_all(channels)
    finally:
        assert server.stop() == 0


def test_a_taken_port_or_a_missing_repository_exits_2(tmp_path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        root = tmp_path / "repo"
        data, tm = tiny_model()
        publish(root, "tiny", 1, data, tm.meta)
        cmd = ServerProcess(*BASE, repository=root, cwd=ROOT)
        cmd.cmd[cmd.cmd.index("--port") + 1] = str(port)
        assert cmd.launch().proc.wait(60) == 2  # type: ignore[union-attr]
        cmd.stop()
        assert "cannot bind gRPC" in "".join(cmd.stderr)
    missing = ServerProcess(*BASE, repository=tmp_path / "nope", cwd=ROOT).launch()
    assert missing.proc.wait(60) == 2  # type: ignore[union-attr]
    missing.stop()
    assert "is not a directory" in "".join(missing.stderr)


def test_loadtest_connections_reach_both_workers(two_workers, tmp_path: Path) -> None:
    from loadtest.__main__ import main as loadtest

    server, _ = two_workers
    channels = channels_per_worker(server.target, server.listening["workers"])
    stats_of = {pid: ks_grpc.GRPCInferenceServiceStub(ch).ModelStatistics for pid, (ch,) in channels.items()}

    def count() -> dict[int, int]:
        request = ks.ModelStatisticsRequest(name="tiny")
        return {pid: f(request, timeout=30).model_stats[0].inference_count for pid, f in stats_of.items()}

    try:
        before = count()
        # 16 connections: the kernel puts all of them on one worker with probability 2 ** -15.
        argv = [
            "--target",
            server.target,
            "--model",
            "tiny",
            "--concurrency",
            "16",
            "--connections",
            "16",
            "--max-requests",
            "320",
            "--duration",
            "30",
            "--window",
            "1",
            "--warmup",
            "0",
            "--quiet",
            "--out",
            str(tmp_path / "r.json"),
        ]
        assert loadtest(argv) == 0
        after = count()
    finally:
        close_all(channels)
    served = {pid: after[pid] - before[pid] for pid in after}
    assert all(n > 0 for n in served.values()), served
    assert sum(served.values()) == 320 + 1  # and the pre-flight request


def test_the_workers_share_one_http_port_the_listening_line_names(two_workers) -> None:
    """--http-port 0: the supervisor picks the port once and every worker serves it."""
    from tests.server.http_helpers import request

    server, _ = two_workers
    port = server.listening["http_port"]
    assert isinstance(port, int) and port not in (0, server.listening["port"])
    for _ in range(20):  # new connections: the kernel hands them to either worker, both serve it
        assert request(f"http://127.0.0.1:{port}/v2/health/ready").status == 200
    assert request(f"http://127.0.0.1:{port}/v2/models/tiny").json()["name"] == "tiny"
