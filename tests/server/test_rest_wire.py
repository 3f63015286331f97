"""The REST wire formats and the KServe v2 checks without a server: request bodies (JSON tensors and
the binary tensor extension) -> what the data plane gets, outputs -> response bodies, protobuf
messages -> Triton's JSON, the classify body; each bad body a ServeError naming what was wrong."""

from __future__ import annotations

import base64
import json
import re
import struct
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as ks
from server.api.classifier import rest as classify_rest
from server.api.kserve import protocol as v2
from server.api.kserve import rest
from server.api.kserve.json_messages import message_dict
from server.errors import ServeError
from server.runtime.postprocess import ranked

CLASSES = [f"c{i}" for i in range(4)]


def served(**kw) -> SimpleNamespace:
    """What the checks and encoders read of a served version: (1, 2, 2) inputs, 4 classes."""
    base = dict(
        name="m",
        version=3,
        input_shape=(1, 2, 2),
        max_batch_size=8,
        num_classes=4,
        class_names=CLASSES,
        output_names=["logits", "probabilities"],
        instances=[SimpleNamespace(input_name="input")],
    )
    return SimpleNamespace(**{**base, **kw})


def binary(header: dict, *raws: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(raws), str(len(head))


def rejects(fn, *args, match: str) -> None:
    with pytest.raises(ServeError, match=re.escape(match)) as info:
        fn(*args)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


X = np.arange(8, dtype="<f4").reshape(2, 1, 2, 2)  # (N, C, H, W)
INPUT = {"name": "input", "datatype": "FP32", "shape": [2, 1, 2, 2]}


def test_json_tensors_become_the_input_array() -> None:
    body = json.dumps({"id": "r1", "inputs": [{**INPUT, "data": X.tolist()}]}).encode()
    req = rest.parse_request(body, None)
    assert req.id == "r1" and req.outputs is None and not req.binary_output
    np.testing.assert_array_equal(rest.input_array(req, served()), X)


def test_binary_tensors_are_read_in_place() -> None:
    body, length = binary({"inputs": [{**INPUT, "parameters": {"binary_data_size": X.nbytes}}]}, X.tobytes())
    x = rest.input_array(rest.parse_request(body, length), served())
    np.testing.assert_array_equal(x, X)
    assert not x.flags.owndata  # a view of the body, no copy


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"{nope", None, "does not parse"),
        (b"[]", None, "must be a JSON object"),
        (b'{"outputs": []}', None, "needs an `inputs` list"),
        (json.dumps({"inputs": [INPUT]}).encode(), None, "neither data nor parameters.binary_data_size"),
        (json.dumps({"inputs": [{**INPUT, "shape": [2, -1]}], "data": []}).encode(), None, "integer >= 0"),
        (b"{}", "99", "Inference-Header-Content-Length must be an integer <="),
        (b"{}", "x", "Inference-Header-Content-Length must be an integer <="),
        (
            json.dumps({"inputs": [{**INPUT, "data": []}], "outputs": {}}).encode(),
            None,
            "`outputs` must be a list",
        ),
    ],
)
def test_malformed_bodies_are_invalid_argument(body: bytes, length: str | None, message: str) -> None:
    rejects(rest.parse_request, body, length, match=message)


def test_binary_sizes_must_cover_the_body_exactly() -> None:
    past, length = binary({"inputs": [{**INPUT, "parameters": {"binary_data_size": 999}}]}, X.tobytes())
    rejects(rest.parse_request, past, length, match="runs past the body")
    extra, length = binary(
        {"inputs": [{**INPUT, "parameters": {"binary_data_size": X.nbytes}}]}, X.tobytes(), b"xy"
    )
    rejects(
        rest.parse_request, extra, length, match="2 binary bytes after the JSON header belong to no input"
    )


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({**INPUT, "name": "x"}, "unknown input 'x'"),
        ({**INPUT, "datatype": "FP64"}, "must be FP32, got 'FP64'"),
        ({**INPUT, "shape": [2, 1, 2, 3]}, "expected [N, 1, 2, 2]"),
        ({**INPUT, "shape": [9, 1, 2, 2]}, "at most 8"),
        ({**INPUT, "shape": [0, 1, 2, 2]}, "no images"),
    ],
)
def test_the_model_checks_are_the_same_as_over_grpc(tensor: dict, message: str) -> None:
    req = rest.parse_request(json.dumps({"inputs": [{**tensor, "data": [0.0] * 8}]}).encode(), None)
    rejects(rest.input_array, req, served(), match=message)


def test_numbers_must_match_the_shape_and_be_numbers() -> None:
    short = rest.parse_request(json.dumps({"inputs": [{**INPUT, "data": [0.5] * 7}]}).encode(), None)
    rejects(rest.input_array, short, served(), match="7 data values, expected 8")
    words = rest.parse_request(json.dumps({"inputs": [{**INPUT, "data": ["a"] * 8}]}).encode(), None)
    rejects(rest.input_array, words, served(), match="must be numbers")


def test_a_repeated_binary_header_binds_each_request_to_its_own_bytes() -> None:
    """The parsed header is reused between requests (a client sends the same one each time); the
    tensors are each request's own, and a bad body is refused however often its header was seen."""
    header = {"inputs": [{**INPUT, "parameters": {"binary_data_size": X.nbytes}}]}
    first, length = binary(header, X.tobytes())
    second, _ = binary(header, (X + 10).tobytes())
    a = rest.input_array(rest.parse_request(first, length), served())
    b = rest.input_array(rest.parse_request(second, length), served())
    np.testing.assert_array_equal(a, X)
    np.testing.assert_array_equal(b, X + 10)
    short, _ = binary(header, X.tobytes()[:-4])
    rejects(rest.parse_request, short, length, match="runs past the body")
    rejects(rest.parse_request, first + b"xx", length, match="2 binary bytes after the JSON header")


def test_binary_outputs_header_matches_the_tensors_and_echoes_the_id() -> None:
    outs = outputs_for(X)
    for request_id in (None, "r7", "r8"):
        header = {"inputs": [{**INPUT, "parameters": {"binary_data_size": X.nbytes}}]}
        if request_id is not None:
            header["id"] = request_id
        header["parameters"] = {"binary_data_output": True}
        req = rest.parse_request(*binary(header, X.tobytes()))
        body, length = rest.encode_response(req, served(), outs)
        assert length is not None
        doc = json.loads(body[:length])
        assert doc.get("id") == request_id
        sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
        assert [o["shape"] for o in doc["outputs"]] == [[2, 4], [2, 4]] and sizes == [32, 32]
        raw = body[length:]
        np.testing.assert_array_equal(np.frombuffer(raw[:32], "<f4").reshape(2, 4), outs[0])
        np.testing.assert_array_equal(np.frombuffer(raw[32:], "<f4").reshape(2, 4), outs[1])


def outputs_for(x: np.ndarray) -> list[np.ndarray]:
    logits = x.reshape(x.shape[0], -1)  # (N, 4): one logit per pixel
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return ranked([logits, e / e.sum(axis=1, keepdims=True)], ["logits", "probabilities"])


def test_outputs_come_back_as_json_or_binary_as_asked() -> None:
    outs = outputs_for(X)
    req = rest.parse_request(
        json.dumps(
            {
                "inputs": [{**INPUT, "data": X.tolist()}],
                "outputs": [
                    {"name": "logits"},
                    {"name": "probabilities", "parameters": {"binary_data": True}},
                ],
            }
        ).encode(),
        None,
    )
    body, length = rest.encode_response(req, served(), outs)
    assert length is not None
    doc = json.loads(body[:length])
    assert [o["name"] for o in doc["outputs"]] == ["logits", "probabilities"]
    assert doc["outputs"][0]["data"] == outs[0].ravel().tolist()
    probs = np.frombuffer(body[length:], "<f4").reshape(2, 4)
    np.testing.assert_allclose(probs, outs[1])
    assert doc["outputs"][1]["parameters"]["binary_data_size"] == probs.nbytes
    assert doc["model_name"] == "m" and doc["model_version"] == "3"


def test_classification_answers_probability_index_label_like_triton() -> None:
    outs = outputs_for(X)
    header = {
        "inputs": [{**INPUT, "data": X.tolist()}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
    }
    body, length = rest.encode_response(rest.parse_request(json.dumps(header).encode(), None), served(), outs)
    out = json.loads(body)["outputs"][0]
    assert length is None and out["datatype"] == "BYTES" and out["shape"] == [2, 2]
    first = out["data"][0].split(":")
    assert first[1] == "3" and first[2] == "c3" and float(first[0]) == pytest.approx(outs[1][0, 3], abs=1e-6)
    raw = v2.bytes_tensor([b"ab", b"c"])
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"


def test_unknown_outputs_and_bad_classification_counts_are_refused_before_running() -> None:
    rejects(v2.check_output, served(), "features", None, match="unknown output 'features'")
    rejects(v2.check_output, served(), "probabilities", 5, match="classification must be between 1 and 4")
    bad = {
        "inputs": [{**INPUT, "data": [0.0] * 8}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": "3"}}],
    }
    rejects(rest.parse_request, json.dumps(bad).encode(), None, match="classification must be an integer")


def test_messages_become_triton_json_with_zeros_numbers_and_enum_names() -> None:
    stats = ks.ModelStatistics(name="m", version="3", inference_count=2**40)
    doc = message_dict(stats)
    assert doc["inference_count"] == 2**40 and isinstance(doc["inference_count"], int)
    assert doc["inference_stats"]["fail"]["count"] == 0  # zeros are there
    from protos.inference import model_config_pb2 as mc

    config = message_dict(
        mc.ModelConfig(instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU)])
    )
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


def test_a_classify_body_is_an_image_or_json_and_the_query_top_k_wins() -> None:
    png = classify_rest.parse_body(b"\x89PNG...", "image/png", "3")
    assert png.images == [b"\x89PNG..."] and png.top_k == 3 and png.encoded_bytes == 7
    doc = {
        "top_k": 2,
        "images": [{"b64": base64.b64encode(b"xyz").decode()}, {"shape": [1, 2, 2], "data": [0] * 4}],
    }
    parsed = classify_rest.parse_body(json.dumps(doc).encode(), "application/json", None)
    assert parsed.top_k == 2 and parsed.images[0] == b"xyz" and parsed.encoded_bytes == 3
    assert classify_rest.parse_body(json.dumps(doc).encode(), "application/json", "4").top_k == 4
    batch = classify_rest.build_batch(
        classify_rest.ClassifyBody([([1, 2, 2], [[0.5, 0.5], [0.5, 0.5]])], 1), served()
    )
    assert batch.shape == (1, 1, 2, 2) and float(batch.sum()) == 2.0


@pytest.mark.parametrize(
    ("body", "top_k", "message"),
    [
        (b"{", None, "does not parse"),
        (b'{"images": 3}', None, 'needs an "images" list'),
        (b'{"images": [{"b64": "!!"}]}', None, "not valid base64"),
        (b'{"images": [{}]}', None, "set either `b64`"),
        (b'{"images": []}', "x", "top_k must be an integer"),
    ],
)
def test_bad_classify_bodies_are_invalid_argument(body: bytes, top_k: str | None, message: str) -> None:
    rejects(classify_rest.parse_body, body, "application/json", top_k, match=message)


def test_classify_tensors_and_top_k_are_checked_against_the_model() -> None:
    wrong = classify_rest.ClassifyBody([([3, 2, 2], [0] * 12)], 1)
    rejects(classify_rest.build_batch, wrong, served(), match="does not match the model input")
    short = classify_rest.ClassifyBody([([1, 2, 2], [0] * 3)], 1)
    rejects(classify_rest.build_batch, short, served(), match="3 values, expected 4")
    rejects(
        classify_rest.build_batch,
        classify_rest.ClassifyBody([b"x"], 5),
        served(),
        match="top_k must be between 1 and 4",
    )
