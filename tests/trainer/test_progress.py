"""Nothing long is silent: progress lines where no terminal shows a bar, and ``--compile``'s
warm-up step, timed apart from the epochs, leaving the run exactly as it was."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trainer import progress as progress_module
from trainer import train
from trainer.data import load_dataset
from trainer.progress import Progress, mode_for


def test_lines_mode_prints_where_a_bar_would_not_show(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stopped clock: the line shows the seconds elapsed, which on a busy machine need not round to 0.
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=lambda: 100.0))
    progress = Progress(4, "epoch 1/2", "lines", every_s=0.0)
    for step in range(4):
        progress.advance(1, f"loss {1.0 / (step + 1):.2f}" if progress.due() else "")
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].strip() == "epoch 1/2: batch 1/4 (25%, 0 s)  loss 1.00"
    assert lines[-1].strip().startswith("epoch 1/2: batch 4/4 (100%,")


def test_off_mode_prints_nothing_and_lines_wait_for_their_interval(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for mode, every_s in (("off", 0.0), ("lines", 3600.0)):
        progress = Progress(3, "x", mode, every_s=every_s)
        progress.advance(3, "info")
        progress.close()
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="bar, lines, off"):
        Progress(1, "x", "loud")


def test_mode_follows_quiet_rank_and_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mode_for(quiet=True) == "off" and mode_for(quiet=False, is_main=False) == "off"
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert mode_for(quiet=False) == "lines"  # a pipe: cnn-pipeline relays these lines live


def _lenet_and_data() -> tuple[nn.Module, object, object]:
    from trainer.models import get_model

    info, train_split, _ = load_dataset("synthetic", seed=0)
    torch.manual_seed(0)
    model = get_model("lenet5", in_channels=1, num_classes=10, image_size=28, batchnorm=True, dropout=0.5)
    return model, info, train_split


def test_compile_warm_up_leaves_weights_statistics_grads_and_rng_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch.compile itself is costly to run here; what compile_model adds around it is the warm-up.
    monkeypatch.setattr(torch, "compile", lambda m: m)
    model, info, split = _lenet_and_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    compiled, seconds = train.compile_model(model, split, info, 32, "fp32", channels_last=False)
    assert compiled is model and seconds > 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN running stats too
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # dropout in the warm-up drew from a fork


def test_compile_on_a_cpu_without_a_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    model, info, split = _lenet_and_data()
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        train.compile_model(model, split, info, 32, "fp32", channels_last=False)
