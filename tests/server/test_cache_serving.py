"""The response cache in a live server, over gRPC and HTTP: identical requests are answered without
the batcher (batch statistics and cnn_images_total stay put), different inputs miss, /metrics
counts the client's repeated requests as hits, a new version (or version re-published with new
files) never answers with the old one's outputs, and ModelConfig shows response_cache only where
the cache serves the model."""

from __future__ import annotations

import shutil
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as tc_http
from prometheus_client.parser import text_string_to_metric_families

from tests.server.helpers import RunningServer, TinyModel, config_pbtxt, publish, server_config, tiny_model

pytestmark = pytest.mark.integration

CACHE_BYTES = 1 << 20
RNG = np.random.default_rng(0)
N_GRPC, N_HTTP = 9, 7  # repeats of one request after its first (miss) answer


def cached_config(name: str, enable: bool = True) -> str:
    text = config_pbtxt(name, (1, 28, 28), 10)
    return text + ("response_cache {\n  enable: true\n}\n" if enable else "")


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when the series does not exist)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.handle.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def grpc_probs(client: tc.InferenceServerClient, model: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp])
    return result.as_numpy("probabilities"), result.get_response().model_version


def http_probs(client: tc_http.InferenceServerClient, model: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    inp = tc_http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer(model, [inp])
    return result.as_numpy("probabilities"), result.get_response()["model_version"]


def batch_counts(server: RunningServer, model: str) -> tuple[int, int]:
    """(images, batches) the model's batcher ran, from ModelStatistics."""
    stats = tc.InferenceServerClient(server.target).get_inference_statistics(model).model_stats[0]
    return stats.inference_count, stats.execution_count


def test_identical_requests_hit_without_the_batcher_over_grpc_and_http(tmp_path, start_server) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta, config=cached_config("tiny"))
    server = start_server(server_config(root, cache_size_bytes=CACHE_BYTES))
    grpc_client = tc.InferenceServerClient(server.target)
    http_client = tc_http.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        x = RNG.random((2, 1, 28, 28), dtype=np.float32)
        first, _ = grpc_probs(grpc_client, "tiny", x)  # a miss: the model runs it
        np.testing.assert_allclose(first, tm.probabilities(x), atol=1e-5)
        images, batches = batch_counts(server, "tiny")
        images_metric = metric(server, "cnn_images_total", model="tiny")
        assert (images, batches) == (2, 1) and images_metric == 2
        answers = [grpc_probs(grpc_client, "tiny", x.copy())[0] for _ in range(N_GRPC)]
        answers += [http_probs(http_client, "tiny", x.copy())[0] for _ in range(N_HTTP)]
        for a in answers:
            np.testing.assert_array_equal(a, first)  # the very outputs the miss stored
        # Answered without the batcher: no image, no batch; but counted as requests.
        assert batch_counts(server, "tiny") == (images, batches)
        assert metric(server, "cnn_images_total", model="tiny") == images_metric
        assert metric(server, "cnn_queue_wait_seconds_count", model="tiny") == 1
        stats = grpc_client.get_inference_statistics("tiny").model_stats[0].inference_stats
        assert stats.success.count == 1 + N_GRPC + N_HTTP
        ok = {"model": "tiny", "version": "1", "code": "OK"}
        assert metric(server, "cnn_requests_total", rpc="ModelInfer", protocol="grpc", **ok) == 1 + N_GRPC
        assert metric(server, "cnn_requests_total", rpc="ModelInfer", protocol="http", **ok) == N_HTTP
        # A different input (one pixel) misses and is run.
        y = x.copy()
        y[1, 0, 0, 0] = 1.0 - y[1, 0, 0, 0]
        got, _ = http_probs(http_client, "tiny", y)
        np.testing.assert_allclose(got, tm.probabilities(y), atol=1e-5)
        assert batch_counts(server, "tiny") == (images + 2, batches + 1)
        # The hit ratio from /metrics is the client's: every repeat hit, the two first sends missed.
        labels = {"model": "tiny", "version": "1"}
        hits, misses = (
            metric(server, "cnn_cache_hits_total", **labels),
            metric(server, "cnn_cache_misses_total", **labels),
        )
        assert (hits, misses) == (N_GRPC + N_HTTP, 2)
        assert hits / (hits + misses) == (N_GRPC + N_HTTP) / (N_GRPC + N_HTTP + 2)
        assert metric(server, "cnn_cache_evictions_total", **labels) == 0
        assert metric(server, "cnn_cache_bytes") == server.handle.manager.cache.bytes > 0
    finally:
        http_client.close()
        grpc_client.close()
    summary = server.stop()
    assert summary["admitted_ok"] == 2 + N_GRPC + N_HTTP and summary["admitted_failed"] == 0


def test_model_config_shows_the_cache_only_where_it_serves(tmp_path, start_server) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "cached", 1, data, tm.meta, config=cached_config("cached"))
    publish(root, "plain", 1, data, tm.meta, config=cached_config("plain", enable=False))
    x = RNG.random((1, 1, 28, 28), dtype=np.float32)
    for size, shown in (
        (CACHE_BYTES, {"cached": True, "plain": False}),
        (0, {"cached": False, "plain": False}),
    ):
        server = start_server(server_config(root, cache_size_bytes=size))
        grpc_client = tc.InferenceServerClient(server.target)
        http_client = tc_http.InferenceServerClient(server.http_url.removeprefix("http://"))
        try:
            for name, on in shown.items():
                config = grpc_client.get_model_config(name).config
                assert config.HasField("response_cache") == on and config.response_cache.enable == on
                assert http_client.get_model_config(name)["response_cache"] == {"enable": on}
                for _ in range(3):
                    grpc_probs(grpc_client, name, x)
                # Where the cache does not serve, every request runs in a batch.
                assert batch_counts(server, name) == ((1, 1) if on else (3, 3))
                assert metric(server, "cnn_cache_hits_total", model=name) == (2 if on else 0)
        finally:
            http_client.close()
            grpc_client.close()
            server.stop()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def republish(root, version: int, seed: int) -> TinyModel:
    data, tm = tiny_model(seed=seed)
    shutil.rmtree(root / "tiny" / str(version), ignore_errors=True)
    publish(root, "tiny", version, data, tm.meta, config=cached_config("tiny"))
    return tm


def test_a_new_or_republished_version_never_answers_with_the_old_outputs(tmp_path, start_server) -> None:
    root = tmp_path / "repo"
    tm1 = republish(root, 1, seed=1)
    server = start_server(server_config(root, cache_size_bytes=CACHE_BYTES))
    manager = server.handle.manager
    grpc_client = tc.InferenceServerClient(server.target)
    http_client = tc_http.InferenceServerClient(server.http_url.removeprefix("http://"))
    x = RNG.random((1, 1, 28, 28), dtype=np.float32)
    try:
        for _ in range(3):  # one miss, then hits
            got, version = grpc_probs(grpc_client, "tiny", x)
            assert version == "1"
            np.testing.assert_allclose(got, tm1.probabilities(x), atol=1e-5)
        assert metric(server, "cnn_cache_hits_total", model="tiny", version="1") == 2
        one_entry = manager.cache.bytes
        steps = [(2, 2), (2, 3)]  # a new version; then version 2 re-published with new files
        for version, seed in steps:
            old = manager.resolve("tiny")
            tm = republish(root, version, seed)
            server.call_soon(server.handle.reload)
            wait_for(
                lambda old=old: manager.resolve("tiny") is not old, what=f"version {version} (seed {seed})"
            )
            for client, probs in ((grpc_client, grpc_probs), (http_client, http_probs)):
                got, answered = probs(client, "tiny", x)
                assert answered == str(version)
                np.testing.assert_allclose(got, tm.probabilities(x), atol=1e-5)
            # The retired version's entries are dropped once it drained: one entry is left.
            wait_for(lambda: manager.cache.bytes == one_entry, what="the retired version's entries to go")
            assert metric(server, "cnn_cache_bytes") == one_entry
    finally:
        http_client.close()
        grpc_client.close()


def test_an_unload_drops_the_models_entries(tmp_path, start_server) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta, config=cached_config("tiny"))
    server = start_server(
        server_config(root, cache_size_bytes=1 << 20, model_control_mode="explicit", load_model=("tiny",))
    )
    client = tc.InferenceServerClient(server.target)
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    grpc_probs(client, "tiny", x)
    grpc_probs(client, "tiny", x)
    assert metric(server, "cnn_cache_hits_total", model="tiny", version="1") == 1
    assert metric(server, "cnn_cache_bytes") > 0
    client.unload_model("tiny")
    assert metric(server, "cnn_cache_bytes") == 0  # the unload answered once its entries were gone
