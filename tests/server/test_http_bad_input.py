"""REST's own format errors (the shared matrix over every wire is test_bad_input.py): each is a 400
naming what was wrong, as JSON ``{"error": ...}``; the server keeps serving and counts the
rejections under protocol="http"."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from tests.server.bad_inputs import kserve
from tests.server.helpers import RunningServer
from tests.server.http_helpers import (
    HEADER_LENGTH,
    Reply,
    binary_body,
    classify_path,
    infer_path,
    kserve_as_rest,
    request,
)

pytestmark = pytest.mark.integration


def assert_error(reply: Reply, status: int, message: str) -> None:
    assert reply.status == status, reply.body[:500]
    assert reply.headers["Content-Type"].startswith("application/json")
    assert message in reply.json()["error"]


def still_serving(bad_input_server: RunningServer) -> None:
    path, body, headers = kserve_as_rest(kserve(), binary=True)
    assert request(bad_input_server.http_url + path, body, headers).status == 200


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
    "JSON nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, {}, "nests deeper than 32 levels"),
    "data nested 1000 deep": (
        json.dumps({"inputs": [{**_good_input(), "data": [[[[0.5]]]]}]})
        .encode()
        .replace(b"[[[[0.5]]]]", b"[" * 1000 + b"0.5" + b"]" * 1000),
        {},
        "nests deeper than 32 levels",
    ),
    "nested data of the wrong size": (
        json.dumps({"inputs": [{**_good_input(), "data": [[0.5] * 28] * 27}]}).encode(),
        {},
        "756 data values, expected 784",
    ),
}


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_v2_infer_format_errors_are_400(bad_input_server, case: str) -> None:
    body, headers, message = FORMAT_CASES[case]
    assert_error(request(bad_input_server.http_url + infer_path("tiny"), body, headers), 400, message)
    still_serving(bad_input_server)


def test_a_bad_body_for_an_unknown_model_is_404_as_over_grpc(bad_input_server) -> None:
    assert_error(
        request(bad_input_server.http_url + infer_path("nope"), b"{nope"), 404, "'nope' is not loaded"
    )


def test_classify_body_that_is_no_image(bad_input_server) -> None:
    headers = {"Content-Type": "image/png"}
    reply = request(bad_input_server.http_url + classify_path("tiny"), b"GIF89a not really", headers)
    assert_error(reply, 400, "cannot decode as PNG or JPEG")
    reply = request(bad_input_server.http_url + classify_path("tiny") + "?top_k=x", b"...", headers)
    assert_error(reply, 400, "top_k must be an integer")


def test_unknown_routes_and_methods_are_json_errors(bad_input_server) -> None:
    assert_error(request(bad_input_server.http_url + "/v2/nothing/here"), 404, "Not Found")
    assert_error(request(bad_input_server.http_url + "/v2/models/tiny/infer"), 405, "Method Not Allowed")
    assert_error(
        request(bad_input_server.http_url + "/v2/models/tiny/versions/x/ready"), 400, "positive integer"
    )


def test_rest_rejections_are_counted_under_http(bad_input_server) -> None:
    registry = bad_input_server.handle.metrics.registry

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
        request(bad_input_server.http_url + infer_path(model), body)
    still_serving(bad_input_server)
    after = [count("", codes[0]), count("tiny", codes[1]), count("tiny", codes[2])]
    # A format error for a known model counts under that model, as its tensor errors do.
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 2, 1]
