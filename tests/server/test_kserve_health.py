"""KServe v2 through tritonclient (a real KServe v2 client), grpc.health.v1 and reflection."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration


def infer_input(x: np.ndarray, name: str = "input", raw: bool = True) -> tc.InferInput:
    inp = tc.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    if not raw:  # move the data into typed contents (fp32_contents) like non-binary clients do
        data = inp._get_content()
        inp._input.contents.fp32_contents.extend(np.frombuffer(data, dtype="<f4").tolist())
        inp._raw_content = None
    return inp


def test_tritonclient_readiness_and_metadata(tiny_server) -> None:
    server, tm = tiny_server
    client = tc.InferenceServerClient(server.target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "7") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta.name == "cnnstack" and "model_configuration" in meta.extensions
    mm = client.get_model_metadata("tiny")
    assert mm.name == "tiny" and list(mm.versions) == ["1"] and mm.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in mm.inputs] == [("input", "FP32", [-1, 1, 28, 28])]
    assert [(t.name, list(t.shape)) for t in mm.outputs] == [
        ("logits", [-1, 10]),
        ("probabilities", [-1, 10]),
    ]
    config = client.get_model_config("tiny").config  # parsed with tritonclient's own model_config.proto
    assert config.name == "tiny" and config.max_batch_size == 64 and config.platform == "onnxruntime_onnx"
    assert (
        list(config.input[0].dims) == [1, 28, 28]
        and config.dynamic_batching.max_queue_delay_microseconds == 2000
    )
    assert config.version_policy.latest.num_versions == 1 and config.instance_group[0].count == 1
    with pytest.raises(InferenceServerException, match="nope"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "fp32_contents"])
def test_tritonclient_model_infer_all_outputs(tiny_server, raw: bool) -> None:
    server, tm = tiny_server
    client = tc.InferenceServerClient(server.target)
    x = np.random.default_rng(7).random((5, 1, 28, 28), dtype=np.float32)
    result = client.infer("tiny", [infer_input(x, raw=raw)], request_id="abc")
    assert result.get_response().model_version == "1" and result.get_response().id == "abc"
    np.testing.assert_allclose(result.as_numpy("logits"), tm.logits(x), atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), tm.probabilities(x), atol=1e-6)


def test_tritonclient_requested_output_and_classification(tiny_server) -> None:
    server, tm = tiny_server
    client = tc.InferenceServerClient(server.target)
    x = np.random.default_rng(8).random((2, 1, 28, 28), dtype=np.float32)
    only = client.infer("tiny", [infer_input(x)], outputs=[tc.InferRequestedOutput("logits")])
    assert only.as_numpy("probabilities") is None
    np.testing.assert_allclose(only.as_numpy("logits"), tm.logits(x), atol=1e-5)
    top = client.infer(
        "tiny", [infer_input(x)], outputs=[tc.InferRequestedOutput("probabilities", class_count=3)]
    )
    entries = top.as_numpy("probabilities")
    assert entries.shape == (2, 3)
    p = tm.probabilities(x)
    for row, probs in zip(entries, p, strict=True):
        value, index, label = row[0].decode().split(":")
        assert int(index) == probs.argmax() and label == tm.meta.class_names[int(index)]
        assert float(value) == pytest.approx(probs.max(), abs=1e-5)


def test_model_statistics_count_images_and_batches(tiny_server) -> None:
    server, tm = tiny_server
    client = tc.InferenceServerClient(server.target)
    x = np.zeros((3, 1, 28, 28), dtype=np.float32)
    for _ in range(4):
        client.infer("tiny", [infer_input(x)])
    stats = client.get_inference_statistics("tiny").model_stats[0]
    assert (stats.name, stats.version) == ("tiny", "1")
    assert stats.inference_count == 12 and stats.execution_count == 4
    assert stats.inference_stats.success.count == 4 and stats.inference_stats.fail.count == 0
    assert stats.inference_stats.compute_infer.ns > 0 and stats.last_inference > 0
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(3, 4)]


def test_health_overall_per_service_and_per_model(tiny_server) -> None:
    server, _ = tiny_server
    with grpc.insecure_channel(server.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "tiny", "cnnstack.classifier.v1.Classifier", "inference.GRPCInferenceService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_every_service_and_describes_kserve_messages(tiny_server) -> None:
    server, _ = tiny_server
    with grpc.insecure_channel(server.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        infer = pool.FindServiceByName("inference.GRPCInferenceService").FindMethodByName("ModelInfer")
        classify = pool.FindServiceByName("cnnstack.classifier.v1.Classifier").FindMethodByName("Classify")
        raw_field = infer.input_type.fields_by_name["raw_input_contents"]
        assert raw_field.number == 7
        assert classify.input_type.full_name == "cnnstack.classifier.v1.ClassifyRequest"
    assert {
        "cnnstack.classifier.v1.Classifier",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


def test_tritonclient_stream_infer_answers_every_request_and_reports_errors_in_band(tiny_server) -> None:
    import queue

    server, tm = tiny_server
    client = tc.InferenceServerClient(server.target)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    xs = np.random.default_rng(9).random((6, 2, 1, 28, 28), dtype=np.float32)
    try:
        for i, x in enumerate(xs):
            client.async_stream_infer("tiny", [infer_input(x)], request_id=str(i))
        client.async_stream_infer("nope", [infer_input(xs[0])], request_id="bad")
        got = [results.get(timeout=30) for _ in range(len(xs) + 1)]
    finally:
        client.stop_stream()
    answers = {r.get_response().id: r for r, e in got if e is None}
    errors = [e for _, e in got if e is not None]
    assert sorted(answers) == [str(i) for i in range(len(xs))]
    for i, x in enumerate(xs):
        np.testing.assert_allclose(answers[str(i)].as_numpy("probabilities"), tm.probabilities(x), atol=1e-6)
    assert len(errors) == 1 and "NOT_FOUND" in str(errors[0]) and "nope" in str(errors[0])
