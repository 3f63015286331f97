"""Loss scaling without a GPU: with a GradScaler (fp16) a step whose loss is NaN/Inf is skipped and
counted, and only a long run of them stops training; without one (bf16, fp32) a NaN/Inf loss still
stops at once. Also: the CUDA settings and the missing-CUDA reasons on a CPU-only machine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer import engine
from trainer.cuda import c_compiler, configure_cuda, why_no_cuda
from trainer.data import load_dataset
from trainer.engine import EpochPlan, NonFiniteLossError, TrainState, train_one_epoch
from trainer.models import get_model


class PoisonedLoss(nn.Module):
    """Cross-entropy, but Inf at the steps in ``bad`` (every step when ``bad`` is None)."""

    def __init__(self, bad: set[int] | None) -> None:
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, y)
        self.calls += 1
        return loss * torch.inf if self.bad is None or self.calls in self.bad else loss


def epoch(criterion: nn.Module, scaler: torch.amp.GradScaler | None) -> tuple[engine.EpochStats, nn.Module]:
    info, train, _ = load_dataset("synthetic", synthetic_train=256, synthetic_test=32)
    torch.manual_seed(0)
    model = get_model("lenet5", in_channels=1, num_classes=10, image_size=28, batchnorm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = TrainState(model, criterion, optimizer, scheduler, scaler=scaler)
    stats = train_one_epoch(state, train, EpochPlan(info, epochs=1, batch_size=32, seed=0), epoch=1)
    return stats, model


def test_with_a_grad_scaler_an_overflowing_step_is_skipped_not_fatal() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10_000)
    stats, model = epoch(PoisonedLoss({3}), scaler)
    assert stats.skipped == 1 and torch.isfinite(torch.tensor(stats.loss))
    assert scaler.get_scale() == 512.0  # the skipped step halved the scale
    assert all(torch.isfinite(p).all() for p in model.parameters())
    clean, _ = epoch(PoisonedLoss(set()), torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert clean.skipped == 0


def test_a_long_run_of_skipped_steps_still_stops_training(monkeypatch) -> None:
    monkeypatch.setattr(engine, "MAX_SKIPPED_IN_A_ROW", 3)
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, step \d+ .*3\+ fp16 steps in a row skipped"):
        epoch(PoisonedLoss(None), torch.amp.GradScaler("cpu"))


def test_without_a_grad_scaler_a_nonfinite_loss_stops_at_once() -> None:
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, step 3 ") as e:
        epoch(PoisonedLoss({3}), None)
    assert "GradScaler" not in str(e.value)


def test_cuda_settings_leave_a_cpu_run_alone() -> None:
    before = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    assert configure_cuda(torch.device("cpu")) == ""
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before


def test_why_no_cuda_names_what_is_missing(monkeypatch) -> None:
    if torch.cuda.is_available():
        assert why_no_cuda() is None
        return
    reason = why_no_cuda()
    assert reason is not None and reason.startswith(f"torch {torch.__version__}")
    if torch.version.cuda is None:
        assert "CPU-only build" in reason
    monkeypatch.setenv("CC", "/opt/my-cc")
    assert c_compiler() == "/opt/my-cc"


def test_compile_on_cuda_without_a_c_compiler_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(engine, "c_compiler", lambda: None)
    info, data, _ = load_dataset("synthetic", synthetic_train=64, synthetic_test=32)
    fake_cuda = type("FakeX", (), {"device": torch.device("cuda", 0)})()  # never touched past the check
    split = type("FakeSplit", (), {"x": fake_cuda})()
    with pytest.raises(ValueError, match="--compile on CUDA needs a C compiler"):
        engine.compile_model(nn.Linear(1, 1), split, info, 8, "fp32", False)  # type: ignore[arg-type]
