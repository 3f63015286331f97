"""``python -m trainer`` / ``cnn-train``: presets, listing, bad input (exit 2) and divergence (exit 3)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.__main__ import main, parse_command
from trainer.checkpoint import load_checkpoint
from trainer.models import get_model, list_models
from trainer.presets import list_presets

TINY = [
    "--dataset",
    "synthetic",
    "--arch",
    "lenet5",
    "--activation",
    "relu",
    "--pool",
    "max",
    "--batchnorm",
    "--max-train",
    "512",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--precision",
    "fp32",
    "--quiet",
    "--threads",
    "2",
]


def config_of(argv: list[str]):  # type: ignore[no-untyped-def]
    return parse_command(argv).config()


def test_preset_fills_defaults_and_explicit_flags_win() -> None:
    cfg = config_of(["--preset", "seed-lenet5", "--lr", "0.5"])
    assert (cfg.arch, cfg.init, cfg.batch_size, cfg.epochs, cfg.momentum) == (
        "lenet5",
        "xavier",
        256,
        10,
        0.0,
    )
    assert cfg.lr == 0.5 and cfg.preset == "seed-lenet5" and cfg.augment == "none"
    # Another arch keeps the recipe but drops the preset's model knobs (they belong to its arch).
    cfg = config_of(["--preset", "fmnist-fast", "--arch", "resnet18"])
    assert cfg.arch == "resnet18" and cfg.width is None and cfg.nesterov and cfg.schedule == "onecycle"
    for name in list_presets():  # every preset is a valid config
        assert config_of(["--preset", name]).preset == name


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--arch", "lenet6"], ["unknown arch 'lenet6'", "lenet5", "resnet18", "densenet121"]),
        (["--dataset", "kmnist"], ["unknown dataset 'kmnist'", "fashion-mnist", "cifar10", "synthetic"]),
        (["--preset", "fastest"], ["unknown preset 'fastest'", "seed-lenet5", "fmnist-fast"]),
        (["--arch", "vgg11", "--pool", "avg"], ["--pool cannot be set for arch 'vgg11'", "alexnet, lenet5"]),
        (["--optimizer", "lion"], ["invalid choice: 'lion'", "sgd", "adamw"]),
        (["--epochs", "0"], ["--epochs must be >= 1"]),
    ],
)
def test_bad_input_exits_2_naming_valid_values(
    argv: list[str], expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        sys.exit(main([*argv, "--out", str(tmp_path / "run")]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_unwritable_out_dir_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main([*TINY, "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to --out {blocker / 'run'}" in err
    assert "training" not in capsys.readouterr().out  # failed up front, nothing trained


def test_existing_run_is_not_overwritten_and_resume_continues_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "run")
    assert main([*TINY, "--epochs", "1", "--out", out]) == 0
    first = (tmp_path / "run/checkpoint.pt").read_bytes()
    assert main([*TINY, "--epochs", "1", "--out", out]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run/checkpoint.pt").read_bytes() == first
    # --resume alone reads the rest of the settings from the checkpoint; --epochs extends the run.
    assert main(["--resume", out, "--epochs", "2"]) == 0
    assert "resumed from" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "run/checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["max_train"] == 512
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_resume_with_another_arch_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "run")
    assert main([*TINY, "--epochs", "1", "--out", out]) == 0
    before = (tmp_path / "run/checkpoint.pt").read_bytes()
    assert main(["--resume", out, "--arch", "alexnet", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds a 'lenet5' model" in err and "arch is 'alexnet'" in err
    assert (tmp_path / "run/checkpoint.pt").read_bytes() == before


def test_nan_loss_stops_keeping_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 512 images / batch 64 = 8 steps per epoch: from the 9th training forward on, the model outputs NaN.
    calls = {"n": 0}

    def poison(module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor | None:
        if type(module).__name__ != "LeNet" or not module.training:
            return None
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 8 else None

    handle = nn.modules.module.register_module_forward_hook(poison)
    try:
        code = main([*TINY, "--epochs", "3", "--out", str(tmp_path / "run")])
    finally:
        handle.remove()
    assert code == 3
    err = capsys.readouterr().err
    assert "NaN/Inf at epoch 2" in err and "lower --lr" in err and "last good checkpoint" in err
    ckpt = load_checkpoint(tmp_path / "run/checkpoint.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "run/summary.json").exists()


def test_diverging_first_epoch_says_no_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY, "--epochs", "2", "--lr", "1e12", "--no-batchnorm", "--out", str(tmp_path / "run")]
    assert main(argv) == 3
    assert "no epoch finished" in capsys.readouterr().err
    assert not (tmp_path / "run/checkpoint.pt").exists()


def test_list_archs_prints_every_arch_with_params(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list-archs"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    assert "61,706" in out  # LeNet-5 on 1x28x28, d2l's count
    assert main(["--list-archs", "--dataset", "cifar100"]) == 0
    out = capsys.readouterr().out
    params = sum(
        p.numel() for p in get_model("lenet5", in_channels=3, num_classes=100, image_size=32).parameters()
    )
    assert "cifar100 (3x32x32, 100 classes)" in out and f"{params:,}" in out


def test_summary_prints_layer_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--summary", "--arch", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "(1, 6, 28, 28)" in out and "(1, 16, 5, 5)" in out and "(1, 10)" in out
    assert "total params: 61,706" in out
    assert main(["--summary", "--preset", "fmnist-fast"]) == 0
    assert "FMNISTNet on input (1, 1, 28, 28)" in capsys.readouterr().out


def test_console_entry_point_exit_code(tmp_path: Path) -> None:
    """The real process: `python -m trainer` exits 2 with the message on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--arch", "nope", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown arch 'nope'" in proc.stderr and "lenet5" in proc.stderr
