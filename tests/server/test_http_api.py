"""KServe v2 over HTTP/REST against a live server, through tritonclient.http (a real KServe v2 REST
client) and curl: health, metadata, config, statistics, infer with binary and JSON tensors, the
classification extension, /v1 classify with a PNG body, 404s; the metrics port serves /metrics only."""

from __future__ import annotations

import base64
import io
import json

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tcg
import tritonclient.http as tch
from PIL import Image
from tritonclient.utils import InferenceServerException

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.server.http_helpers import classify_path, curl, infer_path, request

pytestmark = pytest.mark.integration


def http_client(server) -> tch.InferenceServerClient:
    return tch.InferenceServerClient(f"127.0.0.1:{server.handle.http_port}")


def infer_input(x: np.ndarray, binary: bool = True) -> tch.InferInput:
    inp = tch.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def test_tritonclient_http_health_metadata_config_and_index(tiny_server) -> None:
    server, _ = tiny_server
    client = http_client(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "7") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "cnnstack" and "binary_tensor_data" in meta["extensions"]
    mm = client.get_model_metadata("tiny")
    assert mm["name"] == "tiny" and mm["versions"] == ["1"] and mm["platform"] == "onnxruntime_onnx"
    assert mm["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [(t["name"], t["shape"]) for t in mm["outputs"]] == [
        ("logits", [-1, 10]),
        ("probabilities", [-1, 10]),
    ]
    assert client.get_model_metadata("tiny", "1") == mm
    config = client.get_model_config("tiny")  # the effective config, as gRPC's ModelConfig has it
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [1, 28, 28]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert client.get_model_repository_index() == [
        {"name": "tiny", "version": "1", "state": "READY", "reason": ""}
    ]
    with pytest.raises(InferenceServerException, match="'nope' is not loaded") as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_infer(tiny_server, binary: bool) -> None:
    server, tm = tiny_server
    client = http_client(server)
    x = np.random.default_rng(3).random((5, 1, 28, 28), dtype=np.float32)
    outputs = [
        tch.InferRequestedOutput("logits", binary_data=binary),
        tch.InferRequestedOutput("probabilities", binary_data=binary, class_count=3),
    ]
    result = client.infer("tiny", [infer_input(x, binary)], outputs=outputs, request_id="r-7")
    response = result.get_response()
    assert response["model_version"] == "1" and response["id"] == "r-7"
    assert ("parameters" in response["outputs"][0]) == binary  # binary_data_size, else JSON data
    np.testing.assert_allclose(result.as_numpy("logits"), tm.logits(x), atol=1e-5)
    top3 = result.as_numpy("probabilities")
    expected = tm.probabilities(x)
    for row, labels in zip(expected, top3, strict=True):
        texts = [b.decode() if binary else b for b in labels]  # JSON BYTES come back as str
        idx = [int(t.split(":")[1]) for t in texts]
        assert idx == np.argsort(-row)[:3].tolist()
        assert texts[0].endswith(tm.meta.class_names[idx[0]])
    # No outputs named: tritonclient asks for every output in binary.
    every = client.infer("tiny", [infer_input(x, binary)], model_version="1")
    np.testing.assert_allclose(every.as_numpy("probabilities"), expected, atol=1e-5)


def test_http_and_grpc_share_the_models_batchers_and_statistics(tiny_server) -> None:
    server, _ = tiny_server
    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    for _ in range(3):
        http_client(server).infer("tiny", [infer_input(x)])
    grpc_client = tcg.InferenceServerClient(server.target)
    inp = tcg.InferInput("input", [2, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(x)
    grpc_client.infer("tiny", [inp])
    over_http = http_client(server).get_inference_statistics("tiny")["model_stats"][0]
    over_grpc = grpc_client.get_inference_statistics("tiny").model_stats[0]
    assert over_http["inference_count"] == over_grpc.inference_count == 8  # images, both protocols
    assert over_http["inference_stats"]["success"]["count"] == over_grpc.inference_stats.success.count == 4
    assert over_http["inference_stats"]["fail"] == {"count": 0, "ns": 0}


def curl_json(*args: str) -> tuple[int, object]:
    """(HTTP status, parsed JSON body or None) of ``curl ARGS``."""
    proc = curl("-w", "\n%{http_code}", *args)
    assert proc.returncode == 0, proc.stderr.decode()
    body, _, status = proc.stdout.decode().rpartition("\n")
    return int(status), (json.loads(body) if body.strip() else None)


def test_curl_health_metadata_and_v2_infer_with_json_tensors(tiny_server) -> None:
    server, tm = tiny_server
    url = server.http_url
    assert curl_json(f"{url}/v2/health/live") == (200, None)
    assert curl_json(f"{url}/v2/health/ready") == (200, None)
    assert curl_json(f"{url}/v2/models/tiny/ready") == (200, None)
    status, meta = curl_json(f"{url}/v2/models/tiny")
    assert status == 200 and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]  # type: ignore[index]
    x = np.random.default_rng(5).random((1, 1, 28, 28), dtype=np.float32)
    doc = {
        "id": "c1",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": x.tolist()}],
        "outputs": [{"name": "probabilities"}],
    }
    status, reply = curl_json(
        "-H", "Content-Type: application/json", "-d", json.dumps(doc), url + infer_path("tiny")
    )
    assert status == 200 and reply["id"] == "c1"  # type: ignore[index]
    (out,) = reply["outputs"]  # type: ignore[index]
    assert out["datatype"] == "FP32" and out["shape"] == [1, 10]
    np.testing.assert_allclose(out["data"], tm.probabilities(x)[0], atol=1e-5)
    status, error = curl_json("-d", json.dumps(doc), url + infer_path("nope"))
    assert status == 404 and "'nope' is not loaded" in error["error"]  # type: ignore[index]
    assert curl_json(url + infer_path("tiny", "9"), "-d", json.dumps(doc))[0] == 404


def png_of(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_curl_classify_a_png_file_like_grpc_classify(tiny_server, tmp_path) -> None:
    server, _ = tiny_server
    png = png_of(np.random.default_rng(2).integers(0, 256, (40, 30), dtype=np.uint8))  # resized by the server
    (tmp_path / "shoe.png").write_bytes(png)
    status, reply = curl_json(
        "--data-binary",
        f"@{tmp_path / 'shoe.png'}",
        "-H",
        "Content-Type: image/png",
        server.http_url + classify_path("tiny") + "?top_k=3",
    )
    assert status == 200 and reply["model"] == "tiny" and reply["version"] == 1  # type: ignore[index]
    with grpc.insecure_channel(server.target) as ch:
        want = pb_grpc.ClassifierStub(ch).Classify(
            pb.ClassifyRequest(model="tiny", top_k=3, images=[pb.Image(encoded=png)]), timeout=10
        )
    (result,) = reply["results"]  # type: ignore[index]
    got = [(p["class_index"], p["class_name"]) for p in result["predictions"]]
    assert got == [(p.class_index, p.class_name) for p in want.results[0].predictions]
    probs = [p["probability"] for p in result["predictions"]]
    assert probs == pytest.approx([p.probability for p in want.results[0].predictions], abs=1e-6)


def test_classify_json_tensors_and_encoded_images(tiny_server) -> None:
    server, tm = tiny_server
    x = np.random.default_rng(4).random((2, 1, 28, 28), dtype=np.float32)
    images = [
        {"shape": [1, 28, 28], "data": x[0].tolist()},
        {"shape": [1, 28, 28], "data": x[1].ravel().tolist()},
        {"b64": base64.b64encode(png_of(np.zeros((28, 28), np.uint8))).decode()},
    ]
    body = json.dumps({"top_k": 2, "images": images}).encode()
    reply = request(server.http_url + classify_path("tiny", 1), body, {"Content-Type": "application/json"})
    assert reply.status == 200
    results = reply.json()["results"]
    assert len(results) == 3
    for row, result in zip(tm.probabilities(x), results[:2], strict=True):
        assert [p["class_index"] for p in result["predictions"]] == np.argsort(-row)[:2].tolist()
    # ?top_k= wins over the body's.
    reply = request(
        server.http_url + classify_path("tiny") + "?top_k=1", body, {"Content-Type": "application/json"}
    )
    assert [len(r["predictions"]) for r in reply.json()["results"]] == [1, 1, 1]


def test_metrics_port_serves_metrics_only(tiny_server) -> None:
    server, _ = tiny_server
    base = f"http://127.0.0.1:{server.handle.metrics_port}"
    ok = request(f"{base}/metrics")
    assert ok.status == 200 and b"cnn_requests_total" in ok.body
    assert request(f"{base}/metrics?name[]=cnn_images_total").status == 200
    for path in ("/", "/v2/health/ready", "/healthz", "/metricsx"):
        assert request(base + path).status == 404, path
