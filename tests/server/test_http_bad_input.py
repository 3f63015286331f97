"""The gRPC bad-input matrix over REST: every case gets the HTTP status of its gRPC verdict and the
same message, as JSON ``{"error": ...}``, with binary and with JSON tensors; REST's own format
errors are 400; the server keeps serving and counts the rejections under protocol="http"."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from server.errors import http_status
from tests.server.bad_inputs import CLASSIFY_CASES, KSERVE_CASES, MAX_BATCH, MAX_MESSAGE, classify, kserve
from tests.server.helpers import RunningServer, publish, server_config, tiny_model
from tests.server.http_helpers import (
    HEADER_LENGTH,
    Reply,
    binary_body,
    classify_as_rest,
    classify_path,
    infer_path,
    kserve_as_rest,
    request,
)

pytestmark = pytest.mark.integration

# Where REST carries the same request differently, its message says so in REST's terms.
REST_MESSAGES = {
    ("classify", "wrong byte count"): "750 values, expected 784",
    ("json", "wrong byte count"): "25 data values, expected 784",
    ("classify", "over the size limit"): "byte limit",
}
# A body over --max-message-bytes is 413 over HTTP (gRPC: RESOURCE_EXHAUSTED from grpc-core).
REST_STATUS = {("classify", "over the size limit"): 413}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-http") / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    s = RunningServer(server_config(root, max_batch_size=MAX_BATCH, max_message_bytes=MAX_MESSAGE))
    yield s
    s.stop(1.0)


def assert_error(reply: Reply, status: int, message: str) -> None:
    assert reply.status == status, reply.body[:500]
    assert reply.headers["Content-Type"].startswith("application/json")
    assert message in reply.json()["error"]


def still_serving(server: RunningServer) -> None:
    path, body, headers = kserve_as_rest(kserve(), binary=True)
    reply = request(server.http_url + path, body, headers)
    # Binary inputs, no output asked for in binary: every output comes back as JSON data.
    assert reply.status == 200 and HEADER_LENGTH not in reply.headers
    assert [o["name"] for o in reply.json()["outputs"]] == ["logits", "probabilities"]


@pytest.mark.parametrize("encoding", ["binary", "json"])
@pytest.mark.parametrize("case", list(KSERVE_CASES))
def test_v2_infer_rejects_like_grpc(server, case: str, encoding: str) -> None:
    req, code, message = KSERVE_CASES[case]
    path, body, headers = kserve_as_rest(req, binary=encoding == "binary")
    reply = request(server.http_url + path, body, headers)
    assert_error(reply, http_status(code), REST_MESSAGES.get((encoding, case), message))
    still_serving(server)


@pytest.mark.parametrize("case", list(CLASSIFY_CASES))
def test_classify_rejects_like_grpc(server, case: str) -> None:
    req, code, message = CLASSIFY_CASES[case]
    path, body, headers = classify_as_rest(req)
    reply = request(server.http_url + path, body, headers)
    status = REST_STATUS.get(("classify", case), http_status(code))
    assert_error(reply, status, REST_MESSAGES.get(("classify", case), message))
    ok = request(server.http_url + classify_path("tiny"), *classify_as_rest(classify())[1:])
    assert ok.status == 200 and len(ok.json()["results"]) == 1


def _good_input() -> dict:
    return {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28]}


RAW = np.full((1, 1, 28, 28), 0.5, "<f4").tobytes()
FORMAT_CASES = {
    "not JSON": (b"{nope", {"Content-Type": "application/json"}, "does not parse"),
    "no inputs list": (b'{"outputs": []}', {}, "needs an `inputs` list"),
    "input without data": (json.dumps({"inputs": [_good_input()]}).encode(), {}, "neither data nor"),
    "shape not integers": (
        json.dumps({"inputs": [{**_good_input(), "shape": [1, "a", 28, 28], "data": []}]}).encode(),
        {},
        "shape must be an integer >= 0",
    ),
    "binary size past the body": (
        *binary_body({"inputs": [{**_good_input(), "parameters": {"binary_data_size": 9999}}]}, [RAW]),
        "runs past the body",
    ),
    "binary bytes of no input": (
        *binary_body(
            {"inputs": [{**_good_input(), "parameters": {"binary_data_size": len(RAW)}}]}, [RAW, b"xx"]
        ),
        "belong to no input",
    ),
    "header length past the body": (b"{}", {HEADER_LENGTH: "100"}, HEADER_LENGTH),
    "classification not an integer": (
        json.dumps(
            {
                "inputs": [{**_good_input(), "data": [0.5] * 784}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": "3"}}],
            }
        ).encode(),
        {},
        "classification must be an integer",
    ),
    "classification too large": (
        json.dumps(
            {
                "inputs": [{**_good_input(), "data": [0.5] * 784}],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 11}}],
            }
        ).encode(),
        {},
        "classification must be between 1 and 10",
    ),
    "nested data of the wrong size": (
        json.dumps({"inputs": [{**_good_input(), "data": [[0.5] * 28] * 27}]}).encode(),
        {},
        "756 data values, expected 784",
    ),
}


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_v2_infer_format_errors_are_400(server, case: str) -> None:
    body, headers, message = FORMAT_CASES[case]
    assert_error(request(server.http_url + infer_path("tiny"), body, headers), 400, message)
    still_serving(server)


def test_a_bad_body_for_an_unknown_model_is_404_as_over_grpc(server) -> None:
    assert_error(request(server.http_url + infer_path("nope"), b"{nope"), 404, "'nope' is not loaded")


def test_classify_body_that_is_no_image(server) -> None:
    headers = {"Content-Type": "image/png"}
    reply = request(server.http_url + classify_path("tiny"), b"GIF89a not really", headers)
    assert_error(reply, 400, "cannot decode as PNG or JPEG")
    reply = request(server.http_url + classify_path("tiny") + "?top_k=x", b"...", headers)
    assert_error(reply, 400, "top_k must be an integer")


def test_unknown_routes_and_methods_are_json_errors(server) -> None:
    assert_error(request(server.http_url + "/v2/nothing/here"), 404, "Not Found")
    assert_error(request(server.http_url + "/v2/models/tiny/infer"), 405, "Method Not Allowed")
    assert_error(request(server.http_url + "/v2/models/tiny/versions/x/ready"), 400, "positive integer")


def test_rest_rejections_are_counted_under_http(server) -> None:
    registry = server.handle.metrics.registry

    def count(model: str, code: grpc.StatusCode) -> float:
        labels = {
            "rpc": "ModelInfer",
            "protocol": "http",
            "model": model,
            "version": "1" if model else "",
            "code": code.name,
        }
        return registry.get_sample_value("cnn_requests_total", labels) or 0.0

    codes = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK)
    before = [count("", codes[0]), count("tiny", codes[1]), count("tiny", codes[2])]
    for body, model in ((b"{}", "nope"), (b"{nope", "tiny"), (b"[]", "tiny")):
        request(server.http_url + infer_path(model), body)
    still_serving(server)
    after = [count("", codes[0]), count("tiny", codes[1]), count("tiny", codes[2])]
    # A format error for a known model counts under that model, as its tensor errors do.
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 2, 1]
