"""Training on a real GPU (gpu marker: skipped without CUDA, a failure under CNN_REQUIRE_GPU=1): a
small CNN trains for a few steps in bf16 and in fp16 (GradScaler) with channels_last, the loss
falls and everything stays on CUDA; the trainer sets cudnn.benchmark and TF32; a whole run too."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from trainer import train
from trainer.config import TrainConfig
from trainer.cuda import configure_cuda, why_no_cuda
from trainer.data import load_dataset
from trainer.engine import EpochPlan, TrainState, evaluate, train_one_epoch
from trainer.models import get_model

pytestmark = pytest.mark.gpu


def cuda() -> torch.device:
    reason = why_no_cuda()  # in the test, not a fixture: CNN_REQUIRE_GPU=1 reports a failure
    if reason:
        pytest.skip(reason)
    return torch.device("cuda", 0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_small_cnn_learns_on_cuda_channels_last(precision: str) -> None:
    device = cuda()
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(device)} has no bf16")
    configure_cuda(device)
    info, train_split, test_split = load_dataset("synthetic", synthetic_train=2048, synthetic_test=512)
    train_split = type(train_split)(train_split.x.to(device), train_split.y.to(device))
    test_split = type(test_split)(test_split.x.to(device), test_split.y.to(device))
    torch.manual_seed(0)
    model = get_model(
        "lenet5", in_channels=1, num_classes=10, image_size=28, batchnorm=True, activation="relu"
    )
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0]) if not seen else None)
    state = TrainState(model, nn.CrossEntropyLoss(), optimizer, scheduler, scaler=scaler)
    plan = EpochPlan(info, epochs=3, batch_size=64, seed=0, precision=precision, channels_last=True)
    losses = []
    for e in (1, 2, 3):
        stats = train_one_epoch(state, train_split, plan, epoch=e)
        losses.append(stats.loss)
    handle.remove()
    assert losses[-1] < 0.7 * losses[0], losses
    assert seen[0].device == device and seen[0].is_contiguous(memory_format=torch.channels_last)
    assert all(p.device == device for p in model.parameters()) and all(
        b.device == device for b in model.buffers()
    )
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    if scaler is not None:
        assert scaler.get_scale() > 0 and stats.skipped < 10
    result = evaluate(model, test_split, plan, batch_size=256)
    assert result.acc > 0.5


def test_the_trainer_sets_cudnn_benchmark_and_tf32_and_trains_a_run(tmp_path) -> None:
    device = cuda()
    line = configure_cuda(device)
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"
    assert "cudnn.benchmark on" in line and f"cuDNN {torch.backends.cudnn.version()}" in line
    cfg = TrainConfig(
        arch="lenet5",
        dataset="synthetic",
        activation="relu",
        pool="max",
        batchnorm=True,
        epochs=2,
        batch_size=64,
        device="cuda",
        precision="fp16",
        channels_last=True,
        out=str(tmp_path / "run"),
        quiet=True,
    )
    summary = train.main(cfg)
    assert summary["device"] == "cuda:0" and summary["precision"] == "fp16"
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
