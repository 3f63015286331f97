"""A bounded load test against the real cnn-serve (create_server on port 0) with a tiny ONNX model:
the server's own request counter must equal what the client counted, step by step."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from loadtest.__main__ import main
from server.config import ServerConfig
from trainer.meta import ModelMeta

pytestmark = pytest.mark.integration

SHAPE = (1, 8, 8)
CLASSES = tuple(f"c{i}" for i in range(4))


def tiny_onnx() -> bytes:
    """input (N, 1, 8, 8) -> Flatten -> Gemm -> logits -> Softmax -> probabilities, seeded weights."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, len(CLASSES))).astype(np.float32)
    b = np.zeros(len(CLASSES), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *SHAPE])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(CLASSES)]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(CLASSES)]),
        ],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    meta = ModelMeta("tiny", "synthetic", SHAPE, (0.0,), (1.0,), CLASSES)
    helper.set_model_props(model, {**meta.to_onnx_props(), "precision": "fp32"})
    return model.SerializeToString()


@dataclass
class RealServer:
    target: str
    metrics_url: str


@pytest.fixture
def real_server(tmp_path: Path) -> Iterator[RealServer]:
    from server.app import create_server

    version = tmp_path / "repo" / "tiny" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(tiny_onnx())
    (version / "export_report.json").write_text(json.dumps({"passed": True}))
    cfg = ServerConfig(repository=tmp_path / "repo", port=0, metrics_port=0, device="cpu", poll_interval_s=0,
                       intra_op_threads=1, max_batch_size=8, grace_s=2.0)  # fmt: skip
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    handle, port = asyncio.run_coroutine_threadsafe(create_server(cfg), loop).result(timeout=60)
    try:
        yield RealServer(f"127.0.0.1:{port}", f"http://127.0.0.1:{handle.metrics_port}/metrics")
    finally:
        asyncio.run_coroutine_threadsafe(handle.stop(1.0), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_bounded_load_test_counts_match_the_servers_counter(real_server: RealServer, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--target", real_server.target, "--model", "tiny", "--concurrency", "1,8", "--request-rate", "150",
            "--max-requests", "300", "--duration", "3", "--window", "0.5", "--warmup", "0.2",
            "--images-per-request", "2", "--stability-windows", "100", "--metrics-url", real_server.metrics_url, "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["input_shape"] == list(SHAPE)  # discovered through ListModels
    closed1, closed8, open150 = doc["steps"]
    # Closed steps stop at --max-requests (a tiny model answers 300 requests well within 3 s).
    for step in (closed1, closed8):
        assert step["sent"] == step["ok"] == 300 and step["errors_total"] == {}
    # Open loop at 150/s for at most 0.2 + 3 + 0.5 s: bounded in time, not by count here.
    assert 0 < open150["sent"] == open150["ok"] <= 150 * 3.7 * 1.3
    for step in doc["steps"]:
        server = step["server"]
        assert server["requests_ok"] == step["ok"]  # the server saw exactly what the client counted
        assert server["batch_size"] >= 1.0 and server["compute_ms"] > 0
        assert step["images_per_s"] == pytest.approx(2 * step["requests_per_s"])
    # With 8 in flight the server batches (2 images per request, up to 8 images per batch).
    assert closed8["server"]["batch_size"] > closed1["server"]["batch_size"]


def test_kserve_api_against_the_real_server(real_server: RealServer, tmp_path: Path) -> None:
    out = tmp_path / "kserve.json"
    argv = ["--target", real_server.target, "--model", "tiny", "--api", "kserve", "--concurrency", "4",
            "--max-requests", "100", "--duration", "5", "--window", "0.5", "--warmup", "0",
            "--stability-windows", "100", "--metrics-url", real_server.metrics_url, "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    (step,) = json.loads(out.read_text())["steps"]
    assert step["sent"] == step["ok"] == 100 and step["errors_total"] == {}
    assert step["server"]["requests_ok"] == 100
