"""The bad-input matrix (tests/server/bad_inputs.py) over every wire: gRPC, and the same requests
over REST (KServe v2 with binary and with JSON tensors, classify as JSON). Each case gets its
status (over HTTP: the HTTP status of the gRPC code) and a message naming what was wrong, and the
server keeps serving afterwards on that wire. REST's own format errors: test_http_bad_input.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import grpc
import pytest

from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from server.errors import http_status
from tests.server.bad_inputs import CLASSIFY_CASES, KSERVE_CASES, classify, kserve
from tests.server.helpers import RunningServer
from tests.server.http_helpers import HEADER_LENGTH, classify_as_rest, kserve_as_rest, request

pytestmark = pytest.mark.integration

# Where REST carries the same request differently, its message says so in REST's terms.
REST_MESSAGES = {
    ("http", "wrong byte count"): "750 values, expected 784",
    ("http-json", "wrong byte count"): "25 data values, expected 784",
    ("http", "over the size limit"): "byte limit",
}
# A body over --max-message-bytes is 413 over HTTP (gRPC: RESOURCE_EXHAUSTED from grpc-core).
REST_STATUS = {("http", "over the size limit"): 413}

# A wire sends one request: (status, message), status a grpc.StatusCode or an HTTP status.
Send = Callable[[RunningServer, object], tuple[object, str]]


def grpc_call(stub_class, method: str) -> Send:
    def send(server: RunningServer, req) -> tuple[object, str]:
        with grpc.insecure_channel(server.target) as ch:
            try:
                getattr(stub_class(ch), method)(req, timeout=10)
            except grpc.RpcError as e:
                return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""

    return send


def rest_call(as_rest: Callable[..., tuple[str, bytes, dict[str, str]]], **kw) -> Send:
    def send(server: RunningServer, req) -> tuple[object, str]:
        path, body, headers = as_rest(req, **kw)
        reply = request(server.http_url + path, body, headers)
        if reply.status == 200:
            return 200, ""
        assert reply.headers["Content-Type"].startswith("application/json")
        return reply.status, reply.json()["error"]

    return send


KSERVE_WIRES = {
    "grpc": grpc_call(ks_grpc.GRPCInferenceServiceStub, "ModelInfer"),
    "http-binary": rest_call(kserve_as_rest, binary=True),
    "http-json": rest_call(kserve_as_rest, binary=False),
}
CLASSIFY_WIRES = {"grpc": grpc_call(pb_grpc.ClassifierStub, "Classify"), "http": rest_call(classify_as_rest)}


def expected(wire: str, case: str, code: grpc.StatusCode, message: str) -> tuple[object, str]:
    if wire == "grpc":
        return code, message
    return REST_STATUS.get((wire, case), http_status(code)), REST_MESSAGES.get((wire, case), message)


def ok_status(wire: str) -> object:
    return grpc.StatusCode.OK if wire == "grpc" else 200


# (api, case, wire): every case of both matrices over every wire that carries its API.
MATRIX = {
    "classify": (CLASSIFY_CASES, CLASSIFY_WIRES, classify),
    "kserve": (KSERVE_CASES, KSERVE_WIRES, kserve),
}
RUNS = [(api, case, wire) for api, (cases, wires, _) in MATRIX.items() for case in cases for wire in wires]


@pytest.mark.parametrize(("api", "case", "wire"), RUNS)
def test_bad_input_is_rejected_with_what_was_wrong(bad_input_server, api: str, case: str, wire: str) -> None:
    cases, wires, good = MATRIX[api]
    req, code, message = cases[case]
    send = wires[wire]
    status, got = send(bad_input_server, req)
    want_status, want_message = expected(wire, case, code, message)
    assert status == want_status, got
    assert want_message in got
    assert send(bad_input_server, good())[0] == ok_status(wire)  # ... and still serving


def test_a_good_rest_infer_with_binary_inputs_answers_json_outputs(bad_input_server) -> None:
    path, body, headers = kserve_as_rest(kserve(), binary=True)
    reply = request(bad_input_server.http_url + path, body, headers)
    # Binary inputs, no output asked for in binary: every output comes back as JSON data.
    assert reply.status == 200 and HEADER_LENGTH not in reply.headers
    assert [o["name"] for o in reply.json()["outputs"]] == ["logits", "probabilities"]


def test_rejections_are_counted_by_code(bad_input_server) -> None:
    registry = bad_input_server.handle.metrics.registry

    def count(model: str, version: str, code: str) -> float:
        labels = {"rpc": "Classify", "protocol": "grpc", "model": model, "version": version, "code": code}
        return registry.get_sample_value("cnn_requests_total", labels) or 0.0

    before = (count("", "", "NOT_FOUND"), count("tiny", "1", "INVALID_ARGUMENT"), count("tiny", "1", "OK"))
    with grpc.insecure_channel(bad_input_server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for req in (classify(model="nope"), classify(top_k=99), classify(top_k=99), classify()):
            with contextlib.suppress(grpc.RpcError):
                stub.Classify(req, timeout=10)
    after = (count("", "", "NOT_FOUND"), count("tiny", "1", "INVALID_ARGUMENT"), count("tiny", "1", "OK"))
    # Unknown models are counted under model="" (bounded labels); known ones under their version.
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 2, 1]
