"""bench/torchserve_peer.py and its handler without TorchServe: the hand-made gRPC messages read
back by protobuf itself, the handler's answer per request of a batch, the config TorchServe reads,
and bench/front_door_bench.py taking its ratios against a ``--peer`` file."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from onnx import TensorProto, helper, numpy_helper

from bench import front_door_bench
from bench.torchserve_handler import OnnxHandler
from bench.torchserve_peer import LOADS, PeerBench, prediction_of, predictions_request, write_properties

F = descriptor_pb2.FieldDescriptorProto


def torchserve_messages() -> tuple[Any, Any]:
    """PredictionsRequest and PredictionResponse as TorchServe's inference.proto declares them."""
    fdp = descriptor_pb2.FileDescriptorProto(name="ts_inference_test.proto", package="t", syntax="proto3")
    req = fdp.message_type.add(name="PredictionsRequest")
    entry = req.nested_type.add(name="InputEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    req.field.add(name="model_name", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    req.field.add(name="model_version", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    req.field.add(
        name="input",
        number=3,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=".t.PredictionsRequest.InputEntry",
    )
    resp = fdp.message_type.add(name="PredictionResponse")
    resp.field.add(name="prediction", number=1, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = message_factory.GetMessageClass
    return get(pool.FindMessageTypeByName("t.PredictionsRequest")), get(
        pool.FindMessageTypeByName("t.PredictionResponse")
    )


@pytest.mark.parametrize("size", [0, 5, 127, 128, 784 * 4, 32 * 784 * 4])
def test_the_hand_made_request_is_what_protobuf_reads(size: int) -> None:
    request_cls, response_cls = torchserve_messages()
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    msg = request_cls.FromString(predictions_request("fmnist", body))
    assert msg.model_name == "fmnist" and dict(msg.input) == {"data": body}
    answer = json.dumps([[0.5] * 10] * max(1, size // 3136)).encode()
    assert prediction_of(response_cls(prediction=answer).SerializeToString()) == answer


def test_a_reply_that_is_not_a_prediction_is_refused() -> None:
    with pytest.raises(ValueError, match="not a PredictionResponse"):
        prediction_of(b"\x12\x03abc")


def linear_model(path: Path, weights: np.ndarray) -> None:
    """(N, 1, 28, 28) -> Flatten -> MatMul ``weights`` (784, 10) -> "logits"."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime release since 1.10 reads
    onnx.save(model, path)


def test_the_handler_answers_each_request_of_a_batch_with_its_own_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((784, 10)).astype(np.float32)
    linear_model(tmp_path / "model.onnx", weights)
    handler = OnnxHandler()
    handler.initialize(SimpleNamespace(system_properties={"model_dir": str(tmp_path)}))
    images = [rng.standard_normal((n, 1, 28, 28)).astype(np.float32) for n in (1, 3, 2)]
    rows: list[dict[str, Any]] = [
        {"data": images[0].tobytes()},
        {"body": bytearray(images[1].tobytes())},
        {"data": images[2].tobytes()},
    ]
    answers = handler.handle(rows, None)
    assert [len(a) for a in answers] == [1, 3, 2]
    for x, got in zip(images, answers, strict=True):
        np.testing.assert_allclose(np.array(got), x.reshape(len(x), -1) @ weights, rtol=1e-4, atol=1e-4)


def test_torchserve_gets_one_entry_per_model_with_the_batching_asked_for(tmp_path: Path) -> None:
    cfg = PeerBench(Path("/venv"), tmp_path, 1.0, 0.0, 4, (1, 2), 64, 2, "quiet", tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    ports = dict(inference=1, management=2, metrics=3, grpc_inference=4, grpc_management=5)
    props = dict(
        line.split("=", 1) for line in write_properties(cfg, 2, store, ports).read_text().splitlines()
    )
    assert props["inference_address"] == "http://127.0.0.1:1" and props["grpc_inference_port"] == "4"
    models = json.loads(props["models"])
    assert sorted(models) == sorted({load[0] for load in LOADS})
    for m in models.values():
        assert m["1.0"]["minWorkers"] == m["1.0"]["maxWorkers"] == 2
        assert (m["1.0"]["batchSize"], m["1.0"]["maxBatchDelay"]) == (64, 2)


def test_the_front_door_ratios_are_taken_against_torchserve_measured_in_the_same_rounds(
    tmp_path: Path,
) -> None:
    def cell(rate: float, failed: int = 0) -> dict:
        return {p: {"rate": rate, "cpu_us": 100.0, "p99_ms": 1.0, "failed": failed} for p in ("grpc", "http")}

    rates = {
        "torchserve 1w": 1000.0,
        "torchserve 2w": 2000.0,
        "ours 1w": 1500.0,
        "ours 2w": 2400.0,
        "floor": 3000.0,
        "echo": 9e3,
    }
    rounds = [
        {s: {str(load): cell(r * (1 + i / 10), failed=i) for load in LOADS} for s, r in rates.items()}
        for i in range(3)
    ]
    cfg = front_door_bench.parse_args(["--out-dir", str(tmp_path)])
    doc = front_door_bench.summarize(cfg, rounds)
    k = str(LOADS[1])  # medians: the middle round, x1.1
    assert doc["best"][k]["grpc"] == pytest.approx(2400 / 2000)
    assert doc["single"][k]["grpc"] == pytest.approx(1500 / 1000)
    assert doc["peer"]["figures"][k]["http"] == pytest.approx([1100.0, 2200.0])
    md = front_door_bench.markdown(doc)
    assert "TorchServe (measured in this run)" in md and "torchserve 2w" in md
    assert f"torchserve 1w {k} grpc: 3" in md  # the peer's failures over all rounds are reported
    # The floor: ours / floor (what the features cost) and floor / the peer's best, per load.
    assert f"{LOADS[1]}: ours 1 worker / floor: gRPC 0.50x, HTTP 0.50x; floor / peer best: gRPC 1.50x" in md

    alone = front_door_bench.summarize(
        cfg, [{s: v for s, v in rounds[0].items() if not s.startswith("torch")}]
    )
    assert "Xeon" in alone["peer"]["cpu"]  # no TorchServe here: the reference figures, named as such
