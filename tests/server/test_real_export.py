"""End to end with the real exporter: a LeNet-5 checkpoint -> cnn-export -> this server, whose
answers must match the PyTorch model (normalization is folded into the ONNX graph)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.server.helpers import server_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.numerics]


def test_serves_a_lenet5_exported_by_cnn_export(tmp_path, start_server) -> None:
    torch = pytest.importorskip("torch")
    export_main = pytest.importorskip("exporter.__main__").main
    from cnnstack.contract import ModelMeta
    from trainer.checkpoint import Checkpoint
    from trainer.data import load_dataset
    from trainer.models import get_model

    info, _, _ = load_dataset("synthetic")
    meta = ModelMeta("lenet5", "synthetic", (1, 28, 28), info.mean, info.std, info.class_names)
    torch.manual_seed(0)
    model = get_model("lenet5", in_channels=1, num_classes=10, image_size=28).eval()
    ckpt = tmp_path / "lenet.pt"
    args = {"in_channels": 1, "num_classes": 10, "image_size": 28}
    Checkpoint("lenet5", args, meta, model.state_dict(), epoch=1, metrics={"test_acc": 0.1}).save(ckpt)
    repo = tmp_path / "repo"
    fast = [
        "--parity-samples",
        "64",
        "--parity-batch",
        "64",
        "--batch1-samples",
        "4",
        "--bench-seconds",
        "0.05",
    ]
    assert export_main([str(ckpt), "--repository", str(repo), "--name", "lenet", "--no-progress", *fast]) == 0

    server = start_server(server_config(repo))
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)  # raw pixels in [0, 1]
    images = [pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=im.tobytes())) for im in x]
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        reply = stub.Classify(pb.ClassifyRequest(model="lenet", top_k=10, images=images), timeout=30)
        (listed,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    with torch.no_grad():
        normalized = (torch.from_numpy(x) - info.mean[0]) / info.std[0]
        expected = torch.softmax(model(normalized), dim=1).numpy()
    got = np.zeros_like(expected)
    for row, result in zip(got, reply.results, strict=True):
        for p in result.predictions:
            row[p.class_index] = p.probability
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert reply.results[0].predictions[0].class_name in info.class_names
    assert (listed.name, listed.arch, listed.version, list(listed.input_shape)) == (
        "lenet",
        "lenet5",
        1,
        [1, 28, 28],
    )
