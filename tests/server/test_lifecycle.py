"""Model lifecycle while serving: a new version swaps in under load with 0 failed calls; broken
versions (corrupt ONNX, failed export report) are rejected while the old one keeps serving; a
model removed from the repository is unloaded."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.server.helpers import publish, server_config, tiny_model

pytestmark = pytest.mark.integration

X = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
REQUEST = pb.ClassifyRequest(
    model="tiny", top_k=10, images=[pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=X.tobytes()))]
)


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def served_versions(target: str) -> list[int]:
    with grpc.insecure_channel(target) as ch:
        models = pb_grpc.ClassifierStub(ch).ListModels(pb.ListModelsRequest(), timeout=5).models
    return [v for m in models if m.name == "tiny" for v in m.versions]


def test_new_version_swaps_in_under_load_with_zero_failed_calls(tmp_path, start_server) -> None:
    root = tmp_path / "repo"
    v1, tm1 = tiny_model(seed=1)
    v2, tm2 = tiny_model(seed=2)
    publish(root, "tiny", 1, v1, tm1.meta)
    server = start_server(server_config(root, poll_interval_s=0.2))
    stop = threading.Event()
    expected = {1: tm1.probabilities(X[None])[0], 2: tm2.probabilities(X[None])[0]}

    def client(_: int) -> tuple[list[int], list[str]]:
        versions, errors = [], []
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            end = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < end:
                try:
                    reply = stub.Classify(REQUEST, timeout=10)
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                    continue
                got = {p.class_index: p.probability for p in reply.results[0].predictions}
                # The answer comes from the version the reply names, never a mix.
                assert np.allclose([got[i] for i in range(10)], expected[reply.version], atol=1e-5)
                versions.append(reply.version)
        return versions, errors

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        time.sleep(0.5)
        publish(root, "tiny", 2, v2, tm2.meta)
        wait_for(lambda: served_versions(server.target) == [2], what="version 2 to replace version 1")
        time.sleep(0.5)  # keep the load on after the swap
        stop.set()
        results = [f.result(timeout=60) for f in futures]
    all_versions = [v for versions, _ in results for v in versions]
    assert [e for _, errors in results for e in errors] == []
    assert all_versions.count(1) > 0 and all_versions.count(2) > 0
    for versions, _ in results:  # per client: once on version 2, never back to 1
        assert versions == sorted(versions)
    assert server.handle.state.admitted_failed == 0
    # Version 1 was drained and dropped from the model-info gauge.
    registry = server.handle.metrics.registry
    assert (
        registry.get_sample_value(
            "cnn_model_info",
            {
                "model": "tiny",
                "version": "1",
                "provider": "CPUExecutionProvider",
                "arch": "tinynet",
                "dataset": "fashion-mnist",
            },
        )
        is None
    )
    assert (
        registry.get_sample_value(
            "cnn_model_info",
            {
                "model": "tiny",
                "version": "2",
                "provider": "CPUExecutionProvider",
                "arch": "tinynet",
                "dataset": "fashion-mnist",
            },
        )
        == 1.0
    )


def test_broken_versions_are_rejected_and_the_old_one_keeps_serving(tmp_path, start_server, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="server.runtime.manager")
    root = tmp_path / "repo"
    good, tm = tiny_model(seed=1)
    publish(root, "tiny", 1, good, tm.meta)
    server = start_server(server_config(root, poll_interval_s=0.2))

    def failures():
        return server.handle.metrics.registry.get_sample_value(
            "cnn_model_load_failures_total", {"model": "tiny"}
        )

    assert failures() == 0

    publish(root, "tiny", 2, good[: len(good) // 2], tm.meta)  # truncated ONNX file
    wait_for(lambda: failures() == 1, what="the corrupt version to be rejected")
    publish(root, "tiny", 3, good, tm.meta, passed=False)  # export report says the parity gate failed
    wait_for(lambda: failures() == 2, what="the failed-report version to be rejected")

    with grpc.insecure_channel(server.target) as ch:
        reply = pb_grpc.ClassifierStub(ch).Classify(REQUEST, timeout=10)
    assert reply.version == 1 and served_versions(server.target) == [1]
    log = caplog.text
    assert (
        "model tiny version 2 rejected (still serving versions [1])" in log
        and "onnxruntime cannot load it" in log
    )
    assert (
        "model tiny version 3 rejected" in log and "did not pass its checks" in log and "parity gate" in log
    )
    index = tc.InferenceServerClient(server.target).get_model_repository_index()
    states = {(m.version, m.state) for m in index.models}
    assert states == {("1", "READY"), ("2", "UNAVAILABLE"), ("3", "UNAVAILABLE")}
    time.sleep(0.6)  # several more polls: a rejected version is not retried (or re-logged) every poll
    assert failures() == 2

    better, tm4 = tiny_model(seed=4)
    publish(root, "tiny", 4, better, tm4.meta)
    wait_for(lambda: served_versions(server.target) == [4], what="the next good version")
    with grpc.insecure_channel(server.target) as ch:
        assert pb_grpc.ClassifierStub(ch).Classify(REQUEST, timeout=10).version == 4


def test_removed_model_is_unloaded_and_reported_not_serving(tmp_path, start_server) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    publish(root, "other", 1, data, tm.meta)
    server = start_server(server_config(root, poll_interval_s=0.2))
    import shutil

    shutil.rmtree(root / "other")
    with grpc.insecure_channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        status = lambda: health.Check(health_pb2.HealthCheckRequest(service="other"), timeout=5).status  # noqa: E731
        wait_for(
            lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, what="'other' to be unloaded"
        )
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ClassifierStub(ch).Classify(
                pb.ClassifyRequest(model="other", images=REQUEST.images), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert pb_grpc.ClassifierStub(ch).Classify(REQUEST, timeout=5).version == 1
