"""On the real Fashion-MNIST (skipped when not installed): a LeNet trained for a few hundred SGD
steps exports with parity on the whole 10,000-image test set, and its FP16/INT8 variants stay
within the accuracy gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cnnstack.contract import REPORT_FILE, ModelMeta, list_model_names
from tests.exporter.helpers import run_export, train_briefly, write_checkpoint
from trainer.models import get_model

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.numerics]


def test_trained_lenet_on_real_fashion_mnist(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    from trainer.data import load_dataset

    info, _, _ = load_dataset("fashion-mnist", data_dir=fashion_mnist_dir)
    meta = ModelMeta("lenet5", "fashion-mnist", info.input_shape, info.mean, info.std, info.class_names)
    args = {"in_channels": 1, "num_classes": 10, "image_size": 28, "activation": "relu", "pool": "max"}
    torch.manual_seed(0)
    model = get_model("lenet5", **args)
    train_briefly(model, "fashion-mnist", steps=300, data_dir=fashion_mnist_dir, lr=0.05)
    ckpt = write_checkpoint(tmp_path / "lenet.pt", model, meta, model_args=args)

    repo = tmp_path / "repo"
    code = run_export(
        ckpt,
        "-r",
        repo,
        "--fp16",
        "--int8",
        "--data-dir",
        fashion_mnist_dir,
        "--bench-seconds",
        "0.2",
        "--no-progress",
    )
    assert code == 0
    assert list_model_names(repo) == [
        "lenet5-fashion-mnist",
        "lenet5-fashion-mnist-fp16",
        "lenet5-fashion-mnist-int8",
    ]
    report = json.loads((repo / "lenet5-fashion-mnist" / "1" / REPORT_FILE).read_text())
    assert report["data"]["real_test_set"] is True
    parity = next(c for c in report["checks"] if c["name"] == "parity")["numbers"]
    assert parity["by_batch"]["batch_256"]["images"] == 10_000
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    precisions = report["precisions"]
    assert precisions["fp32"]["accuracy"] > 0.7
    for p in ("fp16", "int8"):
        assert precisions[p]["published"] and precisions[p]["accuracy_delta_pp"] >= -1.0
