"""Server test helpers (imported by tests/server/conftest.py and the tests): tiny ONNX models built
with onnx.helper (no torch) published in the layout cnn-export publishes, at the version a test asks
for, and an in-process server running on its own event-loop thread.

The tiny classifier is ``input (N, 1, 28, 28) -> Flatten -> Gemm(W, b) -> logits -> Softmax ->
probabilities`` with seeded weights, so a test can compute the expected answer with numpy.
``hidden`` adds that many (width x width) MatMul+Relu layers sharing one weight to make the model
as slow as a test needs (overload, drain) without a big file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from cnnstack.contract import (
    CONFIG_FILE,
    INPUT_NAME,
    LOGITS_NAME,
    MODEL_FILE,
    PROBABILITIES_NAME,
    REPORT_FILE,
    TMP_PREFIX,
    ModelMeta,
    ModelSignature,
    Provenance,
    model_config,
    render_config,
)
from server.config import ServerConfig

FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class TinyModel:
    """What the server should compute, for assertions: probabilities(x) for x (N, C, H, W)."""

    meta: ModelMeta
    weight: np.ndarray  # (C*H*W, K)
    bias: np.ndarray  # (K,)
    hidden: int
    hidden_weight: np.ndarray | None

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = x.reshape(x.shape[0], -1).astype(np.float32)
        if self.hidden:
            raise NotImplementedError("reference output only for hidden=0 models")
        return h @ self.weight + self.bias

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def tiny_model(
    *,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    class_names: tuple[str, ...] = FMNIST_CLASSES,
    seed: int = 0,
    hidden: int = 0,
    width: int = 512,
    arch: str = "tinynet",
    dataset: str = "fashion-mnist",
) -> tuple[bytes, TinyModel]:
    rng = np.random.default_rng(seed)
    c, h, w = input_shape
    k = len(class_names)
    features = c * h * w
    inits, nodes = [], [helper.make_node("Flatten", [INPUT_NAME], ["flat"], axis=1)]
    x_name, x_dim, hidden_w = "flat", features, None
    if hidden:
        w_in = (rng.standard_normal((features, width)) / np.sqrt(features)).astype(np.float32)
        hidden_w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w_in, "w_in"), numpy_helper.from_array(hidden_w, "w_hidden")]
        nodes.append(helper.make_node("MatMul", [x_name, "w_in"], ["h0"]))
        for i in range(hidden):
            nodes.append(helper.make_node("MatMul", [f"h{i}", "w_hidden"], [f"m{i}"]))
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i + 1}"]))
        x_name, x_dim = f"h{hidden}", width
    weight = (rng.standard_normal((x_dim, k)) * 0.05).astype(np.float32)
    bias = (rng.standard_normal(k) * 0.1).astype(np.float32)
    inits += [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    nodes += [
        helper.make_node("Gemm", [x_name, "W", "b"], [LOGITS_NAME]),
        helper.make_node("Softmax", [LOGITS_NAME], [PROBABILITIES_NAME], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", c, h, w])],
        [
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info(PROBABILITIES_NAME, TensorProto.FLOAT, ["batch", k]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    meta = ModelMeta(arch, dataset, input_shape, (0.5,) * c, (0.5,) * c, class_names)
    made = Provenance("fp32", 0.9, "", "0" * 64, "test", "", "none", "test")
    helper.set_model_props(model, {**meta.to_onnx_props(), **made.to_onnx_props()})
    return model.SerializeToString(), TinyModel(meta, weight, bias, hidden, hidden_w)


def config_pbtxt(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 2000,
    num_versions: int = 1,
) -> str:
    """The config cnn-export writes, without its labels file."""
    config = model_config(
        name, input_shape, num_classes, max_batch_size, max_queue_delay_us, num_versions, label_filename=None
    )
    return render_config(config)


def publish(
    repo: Path,
    name: str,
    version: int,
    model_bytes: bytes,
    meta: ModelMeta,
    *,
    passed: bool = True,
    config: str | None = None,
) -> Path:
    """Atomic publish like the exporter: build in REPO/.tmp-*, write config, rename into place."""
    repo.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=repo))
    (tmp / MODEL_FILE).write_bytes(model_bytes)
    report = {"passed": passed, "model": ModelSignature.of(meta).to_dict(), "version": version}
    if not passed:
        report["failure"] = "parity gate: max abs diff 0.3 > 1e-4"
    (tmp / REPORT_FILE).write_text(json.dumps(report))
    model_dir = repo / name
    model_dir.mkdir(exist_ok=True)
    cfg_text = config if config is not None else config_pbtxt(name, meta.input_shape, meta.num_classes)
    (model_dir / CONFIG_FILE).write_text(cfg_text)
    target = model_dir / str(version)
    os.rename(tmp, target)
    return target


class RunningServer:
    """create_server(cfg) on a private event loop thread; tests talk to it with sync gRPC clients."""

    def __init__(self, cfg: ServerConfig) -> None:
        from server.app import create_server

        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.handle, self.port = self.run(create_server(cfg), timeout=60)
        self.target = f"127.0.0.1:{self.port}"
        self.http_url = f"{'https' if cfg.tls else 'http'}://127.0.0.1:{self.handle.http_port}"
        self.summary: dict | None = None

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, grace: float = 2.0) -> dict:
        if self.summary is None:
            self.summary = self.run(self.handle.stop(grace), timeout=grace + 30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
        return self.summary


def server_config(repository: Path, **overrides) -> ServerConfig:
    base = ServerConfig(
        repository=repository,
        host="127.0.0.1",
        port=0,
        http_port=0,
        metrics_port=0,
        device="cpu",
        poll_interval_s=0,
        grace_s=5.0,
        intra_op_threads=1,
    )
    return replace(base, **overrides)


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_pki(d: Path) -> dict[str, Path]:
    """Throwaway TLS material (trustme) as PEM files in ``d``: a CA, a server certificate for
    127.0.0.1 and localhost, and a client certificate. Keys: ca, cert, key, client_cert, client_key."""
    import trustme

    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("load-tester@example.test")
    files = {
        "ca": d / "ca.pem",
        "cert": d / "server.pem",
        "key": d / "server.key",
        "client_cert": d / "client.pem",
        "client_key": d / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return files
