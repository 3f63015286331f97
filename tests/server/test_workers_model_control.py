"""Model control under ``cnn-serve --workers 2``: a load or unload sent to one worker is applied by
every worker before it answers, and a worker that is restarted serves what the others serve."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cnnstack.serverproc import ServerProcess
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from tests.server.helpers import publish, tiny_model
from tests.server.worker_helpers import channels_per_worker, close_all, wait_event

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FLAGS = (
    "--workers",
    "2",
    "--metrics-port",
    "0",
    "--device",
    "cpu",
    "--poll-interval-s",
    "0",
    "--model-control-mode",
    "explicit",
    "--load-model",
    "alpha",
)


def ready_on_each_worker(server: ServerProcess, model: str) -> dict[int, bool]:
    pids = server.listening["workers"]
    channels = channels_per_worker(server.target, pids)
    try:
        return {
            pid: ks_grpc.GRPCInferenceServiceStub(chans[0])
            .ModelReady(ks.ModelReadyRequest(name=model), timeout=30)
            .ready
            for pid, chans in channels.items()
        }
    finally:
        close_all(channels)


def config_on_each_worker(server: ServerProcess, model: str) -> set[int]:
    channels = channels_per_worker(server.target, server.listening["workers"])
    try:
        return {
            ks_grpc.GRPCInferenceServiceStub(chans[0])
            .ModelConfig(ks.ModelConfigRequest(name=model), timeout=30)
            .config.max_batch_size
            for chans in channels.values()
        }
    finally:
        close_all(channels)


def test_every_worker_applies_a_load_and_an_unload_before_the_call_answers(tmp_path) -> None:
    import tritonclient.grpc as tg

    root = tmp_path / "repo"
    for name, seed in (("alpha", 1), ("beta", 2)):
        data, tm = tiny_model(seed=seed)
        publish(root, name, 1, data, tm.meta)
    server = ServerProcess(*FLAGS, repository=root, cwd=ROOT)
    server.start()
    try:
        client = tg.InferenceServerClient(server.target)
        assert set(ready_on_each_worker(server, "beta").values()) == {False}
        client.load_model("beta", config=json.dumps({"max_batch_size": 5}))
        assert set(ready_on_each_worker(server, "beta").values()) == {True}
        assert config_on_each_worker(server, "beta") == {5}
        client.unload_model("alpha")
        assert set(ready_on_each_worker(server, "alpha").values()) == {False}
        # A worker killed now comes back serving what the others serve: beta (with its config), no alpha.
        mark = len(server.events)
        os.kill(server.listening["workers"][0], signal.SIGKILL)
        back = wait_event(server, "worker_started", after=mark)
        server.listening["workers"] = [back["pid"], server.listening["workers"][1]]
        assert set(ready_on_each_worker(server, "beta").values()) == {True}
        assert config_on_each_worker(server, "beta") == {5}
        assert set(ready_on_each_worker(server, "alpha").values()) == {False}
    finally:
        assert server.stop() == 0
