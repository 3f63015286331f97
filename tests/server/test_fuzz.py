"""Property-based fuzzing of the client-facing input (hypothesis): KServe v2 REST and classify
bodies (structured and random JSON, random bytes, lying length headers) and gRPC
``ModelInferRequest``/``ClassifyRequest`` messages. Every reply must be a deliberate status: over
HTTP 200, 400, 404 or 413, over gRPC OK, INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED (a
message over the size limit); never a 500 or INTERNAL for client input, and the server answers a
good request afterwards. Runs are derandomized (the same cases every run) and bounded in count;
``CNN_FUZZ_EXAMPLES=5000`` fuzzes longer with fresh cases.

``pytest -s`` prints each API's case count by status."""

from __future__ import annotations

import json
import os
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from tests.server.bad_inputs import classify, kserve
from tests.server.http_helpers import HEADER_LENGTH, classify_as_rest, kserve_as_rest, request

pytestmark = pytest.mark.integration

# CNN_FUZZ_EXAMPLES=N fuzzes longer, with fresh random cases each run (CI: the fixed 500).
EXAMPLES = int(os.environ.get("CNN_FUZZ_EXAMPLES", "500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="CNN_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
HTTP_OK = {200, 400, 404, 413}
GRPC_OK = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
SEEN: dict[str, Counter] = {}

# ---- building blocks ----

json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=40,
)
names = st.sampled_from(["input", "probabilities", "logits", "x", ""]) | st.text(max_size=6)
datatypes = st.sampled_from(["FP32", "FP64", "INT8", "BYTES", "fp32", ""])
shapes = st.lists(st.integers(-3, 2**40) | st.sampled_from([1, 28, 784]), max_size=5)
# Mostly the model that exists, so that most cases reach the tensor checks.
models = st.sampled_from(["tiny"] * 8 + ["nope", "", "../tiny", "tiny%2F..", "t" * 300])
versions = st.sampled_from([""] * 6 + ["1"] * 3 + ["2", "0", "-1", "latest", "99999999999999999999"])


def kserve_tensor(draw) -> dict:
    tensor: dict = {"name": draw(names), "datatype": draw(datatypes), "shape": draw(shapes | json_value)}
    choice = draw(st.integers(0, 3))
    if choice == 0:
        tensor["data"] = draw(st.lists(st.floats(width=32) | st.integers(-5, 5), max_size=800) | json_value)
    elif choice == 1:
        tensor["parameters"] = {"binary_data_size": draw(st.integers(-5, 5000) | json_value)}
    elif choice == 2:
        tensor["data"] = [[[[0.5] * 28] * 28]]
    return tensor


GOOD_TENSOR = {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 784}


@st.composite
def near_valid_rest(draw) -> tuple[str, bytes, dict[str, str]]:
    """A good KServe v2 request with at most one field replaced by anything."""
    tensor = dict(GOOD_TENSOR)
    doc: dict = {
        "inputs": [tensor],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }
    field = draw(st.sampled_from(["none", "name", "datatype", "shape", "data", "outputs", "inputs", "id"]))
    if field in ("name", "datatype", "shape", "data"):
        tensor[field] = draw(json_value)
    elif field == "outputs":
        doc["outputs"] = draw(json_value)
    elif field == "inputs":
        doc["inputs"] = draw(json_value)
    elif field == "id":
        doc["id"] = draw(json_value)
    return "/v2/models/tiny/infer", json.dumps(doc).encode(), {"Content-Type": "application/json"}


@st.composite
def rest_infer(draw) -> tuple[str, bytes, dict[str, str]]:
    """A KServe v2 infer over REST: mostly request-shaped JSON, sometimes anything."""
    model, version = draw(models), draw(versions)
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    kind = draw(st.integers(0, 4))
    headers = {
        "Content-Type": draw(st.sampled_from(["application/json", "application/octet-stream", "text/plain"]))
    }
    if kind == 0:
        deep = st.integers(30, 100_000).map(lambda d: b"[" * d + b"]" * d)
        return path, draw(st.binary(max_size=2000) | deep), headers
    if kind == 1:
        return path, json.dumps(draw(json_value)).encode(), headers
    doc: dict = {"inputs": [kserve_tensor(draw) for _ in range(draw(st.integers(0, 2)))]}
    if draw(st.booleans()):
        doc["outputs"] = [
            {
                "name": draw(names),
                "parameters": draw(
                    st.dictionaries(st.sampled_from(["classification", "binary_data"]), json_scalar)
                ),
            }
            for _ in range(draw(st.integers(0, 3)))
        ]
    if draw(st.booleans()):
        doc["id"] = draw(json_value)
    head = json.dumps(doc).encode()
    tail = draw(st.binary(max_size=4000)) if kind >= 3 else b""
    if kind >= 3 or draw(st.booleans()):
        headers[HEADER_LENGTH] = draw(
            st.sampled_from([str(len(head)), "0", "-1", "abc", str(len(head) + 10)])
        )
    return path, head + tail, headers


@st.composite
def rest_classify(draw) -> tuple[str, bytes, dict[str, str]]:
    model, version = draw(models), draw(st.sampled_from(["", "", "", "1", "7", "x"]))
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":classify"
    top_k = draw(st.sampled_from(["", "?top_k=3", "?top_k=0", "?top_k=-1", "?top_k=x", "?top_k=99"]))
    if draw(st.booleans()):
        return path + top_k, draw(st.binary(max_size=2000)), {"Content-Type": "image/png"}
    image = st.one_of(
        st.fixed_dictionaries(
            {
                "b64": st.text(max_size=40)
                | st.binary(max_size=30).map(lambda b: __import__("base64").b64encode(b).decode())
            }
        ),
        st.fixed_dictionaries(
            {"shape": shapes | json_value, "data": st.lists(st.floats(width=32), max_size=800) | json_value}
        ),
        json_value,
    )
    doc = {"images": draw(st.lists(image, max_size=3) | json_value), "top_k": draw(json_scalar)}
    return path + top_k, json.dumps(doc).encode(), {"Content-Type": "application/json"}


@st.composite
def grpc_infer(draw) -> ks.ModelInferRequest:
    req = ks.ModelInferRequest(
        model_name=draw(models), model_version=draw(versions), id=draw(st.text(max_size=5))
    )
    for _ in range(draw(st.integers(0, 2))):
        inp = req.inputs.add(
            name=draw(names),
            datatype=draw(datatypes),
            shape=draw(st.lists(st.integers(-3, 2**40), max_size=5)),
        )
        if draw(st.booleans()):
            inp.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=800)))
    for raw in draw(st.lists(st.binary(max_size=3200) | st.just(b"\0" * 3136), max_size=2)):
        req.raw_input_contents.append(raw)
    for _ in range(draw(st.integers(0, 2))):
        out = req.outputs.add(name=draw(names))
        if draw(st.booleans()):
            out.parameters["classification"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        if draw(st.booleans()):
            out.parameters["classification"].string_param = draw(st.text(max_size=4))
    return req


@st.composite
def near_valid_grpc(draw) -> ks.ModelInferRequest:
    """A good ModelInferRequest with at most one field replaced by anything."""
    req = kserve()
    field = draw(st.sampled_from(["none", "shape", "raw", "datatype", "output", "classification"]))
    if field == "shape":
        req.inputs[0].shape[:] = draw(st.lists(st.integers(-3, 2**40), max_size=5))
    elif field == "raw":
        req.raw_input_contents[0] = draw(st.binary(max_size=4000))
    elif field == "datatype":
        req.inputs[0].datatype = draw(datatypes)
    elif field in ("output", "classification"):
        out = req.outputs.add(name=draw(names) if field == "output" else "probabilities")
        out.parameters["classification"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    return req


@st.composite
def grpc_classify(draw) -> pb.ClassifyRequest:
    req = pb.ClassifyRequest(
        model=draw(models), version=draw(st.integers(0, 3)), top_k=draw(st.integers(-(2**31), 2**31 - 1))
    )
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            req.images.add(encoded=draw(st.binary(max_size=500)))
        else:
            req.images.add(
                tensor=pb.Tensor(
                    shape=draw(st.lists(st.integers(-3, 2**31), max_size=4)),
                    data=draw(st.binary(max_size=3200)),
                )
            )
    return req


# ---- the properties ----


def record(api: str, status) -> None:
    SEEN.setdefault(api, Counter())[str(status)] += 1


@FUZZ
@given(case=st.one_of(rest_infer(), rest_classify(), near_valid_rest()))
def test_rest_bodies_get_deliberate_statuses(bad_input_server, case) -> None:
    path, body, headers = case
    reply = request(bad_input_server.http_url + path, body, headers)
    record("rest", reply.status)
    assert reply.status in HTTP_OK, (path, body[:300], headers, reply.status, reply.body[:300])
    if reply.status != 200:
        assert reply.json()["error"], reply.body[:300]  # a message naming what was wrong


@FUZZ
@given(case=st.one_of(grpc_infer(), grpc_classify(), near_valid_grpc()))
def test_grpc_requests_get_deliberate_codes(bad_input_server, case) -> None:
    with grpc.insecure_channel(bad_input_server.target) as ch:
        if isinstance(case, ks.ModelInferRequest):
            call = ks_grpc.GRPCInferenceServiceStub(ch).ModelInfer
        else:
            call = pb_grpc.ClassifierStub(ch).Classify
        try:
            call(case, timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert e.details(), case
    record("grpc", code.name)
    assert code in GRPC_OK, (code, str(case)[:500])


def test_after_the_fuzzing_the_server_still_answers_good_requests(bad_input_server) -> None:
    """Runs after the two above (file order): the server survived both and serves normally."""
    with grpc.insecure_channel(bad_input_server.target) as ch:
        assert len(pb_grpc.ClassifierStub(ch).Classify(classify(), timeout=10).results) == 1
        assert (
            len(ks_grpc.GRPCInferenceServiceStub(ch).ModelInfer(kserve(), timeout=10).raw_output_contents)
            == 2
        )
    path, body, headers = kserve_as_rest(kserve(), binary=True)
    assert request(bad_input_server.http_url + path, body, headers).status == 200
    path, body, headers = classify_as_rest(classify())
    assert request(bad_input_server.http_url + path, body, headers).status == 200
    for api, counts in sorted(SEEN.items()):
        print(f"fuzzed {api}: {sum(counts.values())} cases, by status {dict(sorted(counts.items()))}")
    assert not SEEN or all(sum(c.values()) >= EXAMPLES for c in SEEN.values())
