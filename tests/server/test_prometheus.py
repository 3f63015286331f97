"""Metrics: the exposition (names, pre-initialised labels, buckets) and a real Prometheus server
(Debian package ``prometheus``) scraping /metrics, answering PromQL with the number of requests sent."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as tc_http
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from server.metrics import CODES, ROUTES, ServerMetrics

pytestmark = pytest.mark.integration

N_CLASSIFY = 37
N_IMAGES_PER_INFER = 3
N_INFER = 5
N_HTTP_INFER = 4  # KServe v2 over HTTP: the same counters, protocol="http"


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def test_metrics_are_pre_initialised_with_bounded_labels() -> None:
    m = ServerMetrics(CollectorRegistry())
    m.version_loaded("lenet", "3", "CPUExecutionProvider", "lenet5", "fashion-mnist", lambda: 7)
    r = m.registry
    for rpc, protocol in ROUTES:  # the streams are gRPC only; both unary calls have an HTTP twin
        for code in CODES:
            labels = {"rpc": rpc, "protocol": protocol, "model": "lenet", "version": "3", "code": code}
            assert r.get_sample_value("cnn_requests_total", labels) == 0.0
    assert r.get_sample_value("cnn_queue_depth", {"model": "lenet", "version": "3"}) == 7.0
    assert r.get_sample_value("cnn_inflight_requests", {"model": "lenet", "version": "3"}) == 0.0
    info = {
        "model": "lenet",
        "version": "3",
        "provider": "CPUExecutionProvider",
        "arch": "lenet5",
        "dataset": "fashion-mnist",
    }
    assert r.get_sample_value("cnn_model_info", info) == 1.0
    # Latency buckets span 100 us .. 10 s.
    bucket = {"rpc": "Classify", "protocol": "http", "model": "lenet", "version": "3"}
    assert r.get_sample_value("cnn_request_latency_seconds_bucket", {**bucket, "le": "0.0001"}) == 0.0
    assert r.get_sample_value("cnn_request_latency_seconds_bucket", {**bucket, "le": "10.0"}) == 0.0
    m.version_unloaded("lenet", "3")
    assert r.get_sample_value("cnn_model_info", info) is None
    assert r.get_sample_value("cnn_queue_depth", {"model": "lenet", "version": "3"}) is None


def test_metrics_endpoint_counts_requests_images_and_batches(tiny_server) -> None:
    server, _ = tiny_server
    x = np.zeros((1, 28, 28), dtype=np.float32)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for _ in range(4):
            stub.Classify(
                pb.ClassifyRequest(
                    model="tiny", images=[pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=x.tobytes()))] * 2
                )
            )
    families = scrape(server.handle.metrics_port)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    mv = (("model", "tiny"), ("version", "1"))
    assert (
        samples[
            (
                "cnn_requests_total",
                (
                    ("code", "OK"),
                    ("model", "tiny"),
                    ("protocol", "grpc"),
                    ("rpc", "Classify"),
                    ("version", "1"),
                ),
            )
        ]
        == 4
    )
    assert samples[("cnn_images_total", mv)] == 8
    assert samples[("cnn_batch_size_count", mv)] == 4 and samples[("cnn_batch_size_sum", mv)] == 8
    assert (
        samples[
            (
                "cnn_request_latency_seconds_count",
                (("model", "tiny"), ("protocol", "grpc"), ("rpc", "Classify"), ("version", "1")),
            )
        ]
        == 4
    )
    assert samples[("cnn_queue_depth", mv)] == 0 and samples[("cnn_inflight_requests", mv)] == 0
    assert samples[("cnn_server_info", (("device", "cpu"), ("provider", "CPUExecutionProvider")))] == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def promql(port: int, query: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
    except OSError:
        return None  # not up yet
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian package `prometheus` not installed")
def test_real_prometheus_scrape_matches_the_requests_sent(tiny_server, tmp_path) -> None:
    server, _ = tiny_server
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: cnn-serve\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.handle.metrics_port}']\n"
    )
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        x = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
        img = pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=x.tobytes()))
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for _ in range(N_CLASSIFY):
                stub.Classify(pb.ClassifyRequest(model="tiny", images=[img]), timeout=10)
        client = tc.InferenceServerClient(server.target)
        inp = tc.InferInput("input", [N_IMAGES_PER_INFER, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(np.zeros((N_IMAGES_PER_INFER, 1, 28, 28), dtype=np.float32))
        for _ in range(N_INFER):
            client.infer("tiny", [inp])
        http = tc_http.InferenceServerClient(server.http_url.removeprefix("http://"))
        hinp = tc_http.InferInput("input", [N_IMAGES_PER_INFER, 1, 28, 28], "FP32")
        hinp.set_data_from_numpy(np.zeros((N_IMAGES_PER_INFER, 1, 28, 28), dtype=np.float32))
        for _ in range(N_HTTP_INFER):
            http.infer("tiny", [hinp])
        http.close()
        # One set of counters for both protocols, told apart by the protocol label.
        queries = {
            'sum(cnn_requests_total{rpc="Classify",model="tiny",code="OK"})': N_CLASSIFY,
            'sum(cnn_requests_total{model="tiny",code="OK"})': N_CLASSIFY + N_INFER + N_HTTP_INFER,
            'sum(cnn_requests_total{model="tiny",code="OK",protocol="http"})': N_HTTP_INFER,
            'sum(cnn_images_total{model="tiny"})': N_CLASSIFY + (N_INFER + N_HTTP_INFER) * N_IMAGES_PER_INFER,
            'sum(cnn_request_latency_seconds_count{rpc="ModelInfer",protocol="grpc"})': N_INFER,
            'sum(cnn_request_latency_seconds_count{rpc="ModelInfer",protocol="http"})': N_HTTP_INFER,
        }
        got: dict[str, float | None] = {}
        end = time.monotonic() + 30
        while time.monotonic() < end:
            got = {q: promql(prom_port, q) for q in queries}
            if got == queries or prom.poll() is not None:
                break
            time.sleep(0.5)
        assert prom.poll() is None, prom.stderr.read().decode()[-2000:] if prom.stderr else ""
        assert got == queries
    finally:
        prom.terminate()
        try:
            prom.wait(15)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(5)
