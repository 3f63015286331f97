"""The training pipeline on the generated ``synthetic`` dataset: learning, outputs, checkpoints, resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from cnnstack.cli import ConfigError
from trainer import precision, train
from trainer.checkpoint import build_model, checkpoint_meta, load_checkpoint
from trainer.config import TrainConfig
from trainer.data import load_dataset, to_float
from trainer.hostmem import user_chose_allocator
from trainer.optim import lr_factor
from trainer.resume import ResumeError

pytestmark = pytest.mark.numerics  # CPU-kernel-dependent results: .ci/run reruns these under AVX2 dispatch

CKPT_KEYS = [
    "schema_version",
    "arch",
    "model_args",
    "meta",
    "state_dict",
    "optimizer",
    "scheduler",
    "epoch",
    "metrics",
    "config",
    "torch_version",
    "git_commit",
    "rng",
]
CPU = torch.device("cpu")


def lenet_bn() -> torch.nn.Module:
    from trainer.models import get_model

    return get_model("lenet5", in_channels=1, num_classes=10, image_size=28, batchnorm=True)


METRIC_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s", "seconds")


def tiny(tmp_path: Path, **changes: object) -> TrainConfig:
    """A LeNet-BN on 1024 synthetic images: 16 steps per epoch, about a second per epoch."""
    base = TrainConfig(
        arch="lenet5",
        dataset="synthetic",
        activation="relu",
        pool="max",
        batchnorm=True,
        max_train=1024,
        epochs=2,
        batch_size=64,
        eval_batch_size=256,
        lr=0.05,
        momentum=0.9,
        schedule="cosine",
        precision="fp32",
        quiet=True,
        threads=2,
        out=str(tmp_path / "run"),
    )
    return dataclasses.replace(base, **changes)


@torch.no_grad()
def accuracy_of(model: torch.nn.Module, dataset: str = "synthetic", data_dir: str | None = None) -> float:
    info, _, test = load_dataset(dataset, data_dir=data_dir, seed=0)
    pred = model(to_float(test.x, info)).argmax(1)
    return float((pred == test.y).double().mean())


def test_short_run_learns(tmp_path: Path) -> None:
    summary = train.main(tiny(tmp_path, epochs=3))
    history = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    # 10 classes: chance is 0.1; the synthetic cues are easy for a LeNet-BN.
    assert summary["test_acc"] > 0.8


@pytest.mark.parametrize(
    "changes",
    [{}, {"pool": "avg"}, {"precision": "bf16"}, {"channels_last": True}],
    ids=["lenet-bn-max-relu-fp32", "avg-pool", "bf16", "channels-last"],
)
def test_every_execution_mode_learns(tmp_path: Path, changes: dict[str, object]) -> None:
    summary = train.main(tiny(tmp_path, epochs=1, **changes))
    assert summary["precision"] == changes.get("precision", "fp32")
    assert summary["test_acc"] > 0.5  # one epoch on the synthetic cues; chance is 0.1


def test_outputs_and_checkpoint_round_trip(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, ema_decay=0.9)
    summary = train.main(cfg)
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "best.pt", "metrics.jsonl", "summary.json", "confusion_matrix.csv"):
        assert (run / name).stat().st_size > 0, name
    for name in ("confusion_matrix.png", "curves.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(set(METRIC_KEYS) <= set(r) for r in history)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["test_acc"] == pytest.approx(summary["test_acc"])
    # glibc's allocator thresholds were fixed for the run (trainer/hostmem.py), and the summary says so.
    assert on_disk["malloc_tuned"] is (sys.platform.startswith("linux") and not user_chose_allocator())
    for key in (
        "per_class_acc",
        "params",
        "wall_time_s",
        "arch",
        "dataset",
        "preset",
        "epochs",
        "test_acc_tta",
    ):
        assert key in on_disk, key
    assert set(on_disk["per_class_acc"]) == {f"pattern{k}" for k in range(10)}
    assert (on_disk["arch"], on_disk["dataset"], on_disk["epochs"]) == ("lenet5", "synthetic", 2)

    with open(run / "confusion_matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    counts = [[int(v) for v in r[1:]] for r in rows[1:]]
    assert rows[0][1:] == [f"pattern{k}" for k in range(10)]
    assert sum(map(sum, counts)) == 512  # the synthetic test split
    assert sum(counts[i][i] for i in range(10)) / 512 == pytest.approx(summary["test_acc"])

    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert set(CKPT_KEYS) <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["config"] == dataclasses.asdict(cfg)
    assert 0.0 <= ckpt["metrics"]["test_acc"] <= 1.0
    meta = checkpoint_meta(ckpt)
    assert (meta.arch, meta.dataset, meta.input_shape, meta.num_classes) == (
        "lenet5",
        "synthetic",
        (1, 28, 28),
        10,
    )
    # The saved weights are the (EMA) weights that were evaluated: a rebuilt model scores the same.
    model = build_model(ckpt)
    assert accuracy_of(model) == pytest.approx(ckpt["metrics"]["test_acc"], abs=1e-9)
    # ... and not the raw optimized weights, which are kept separately for --resume.
    raw = ckpt["train_state_dict"]
    assert any(not torch.equal(raw[k], v) for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    best = load_checkpoint(run)  # a run dir resolves to best.pt
    assert best["metrics"]["test_acc"] == pytest.approx(max(r["test_acc"] for r in history))


def test_resume_matches_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Dropout (global RNG), crop augmentation (per-epoch generator) and EMA all have to survive the restart.
    changes = {"epochs": 3, "dropout": 0.2, "augment": "crop", "ema_decay": 0.9, "max_train": 512}
    straight = tiny(tmp_path, out=str(tmp_path / "straight"), **changes)
    train.main(straight)

    interrupted = dataclasses.replace(straight, out=str(tmp_path / "resumed"))
    real_epoch = train.train_one_epoch

    def crash_in_epoch_2(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C, or a preempted job
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.main(interrupted)
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    assert load_checkpoint(tmp_path / "resumed/checkpoint.pt")["epoch"] == 1
    train.main(dataclasses.replace(interrupted, resume=interrupted.out))

    a = load_checkpoint(tmp_path / "straight/checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed/checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key in ("state_dict", "train_state_dict"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    mom_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b, strict=True))
    lines = (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_on_epoch_start_runs_before_each_epoch_after_the_previous_outputs(tmp_path: Path) -> None:
    # A driver (bench/train_bench.py) pauses the trainer between epochs: at each call the previous
    # epoch must be fully written and the next one not yet begun; resuming calls it for the rest only.
    cfg = tiny(tmp_path, epochs=3, max_train=256)
    seen: list[tuple[int, int]] = []

    def record(epoch: int) -> None:
        metrics = Path(cfg.out) / "metrics.jsonl"
        seen.append((epoch, len(metrics.read_text().splitlines()) if metrics.exists() else 0))

    train.main(dataclasses.replace(cfg, epochs=2), on_epoch_start=record)
    assert seen == [(1, 0), (2, 1)]
    seen.clear()
    train.main(dataclasses.replace(cfg, resume=cfg.out), on_epoch_start=record)
    assert seen == [(3, 2)]


def test_resume_with_another_arch_is_refused(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, epochs=1, max_train=256)
    train.main(cfg)
    other = TrainConfig(arch="alexnet", dataset="synthetic", out=cfg.out, resume=cfg.out, quiet=True)
    with pytest.raises(ResumeError, match="holds a 'lenet5' model.*arch is 'alexnet'"):
        train.main(other)


def test_flip_tta_is_reported_beside_plain_accuracy(tmp_path: Path, mnist_writer) -> None:  # type: ignore[no-untyped-def]
    # A tiny Fashion-MNIST-format folder: that dataset allows flips (synthetic does not).
    mnist_writer(tmp_path / "fm", n_train=256, n_test=64)
    cfg = tiny(tmp_path, dataset="fashion-mnist", data_dir=str(tmp_path / "fm"), epochs=1, tta_flip=True)
    summary = train.main(cfg)
    assert summary["tta_flip"] is True and 0.0 <= summary["test_acc_tta"] <= 1.0
    last = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_acc"] == pytest.approx(summary["test_acc"])
    assert last["test_acc_tta"] == pytest.approx(summary["test_acc_tta"])
    # metrics.test_acc (what the exporter's parity check compares with) is the plain forward pass.
    ckpt = load_checkpoint(tmp_path / "run/checkpoint.pt")
    assert accuracy_of(build_model(ckpt), "fashion-mnist", str(tmp_path / "fm")) == pytest.approx(
        ckpt["metrics"]["test_acc"], abs=1e-9
    )


def test_lr_schedules() -> None:
    cfg = TrainConfig(epochs=10, lr=1.0, schedule="onecycle")
    f = [lr_factor(s, cfg, 10) for s in range(101)]
    assert f[0] == pytest.approx(1 / 25) and max(f) == pytest.approx(1.0) and f[-1] < 1e-4
    assert f.index(max(f)) == 25  # ramp over the first quarter
    cos = dataclasses.replace(cfg, schedule="cosine", warmup_epochs=1)
    g = [lr_factor(s, cos, 10) for s in range(101)]
    assert g[0] == pytest.approx(0.1) and g[9] == pytest.approx(1.0) and g[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(g[10:], g[11:], strict=False))
    step = dataclasses.replace(cfg, schedule="step", lr_step_epochs=4, lr_gamma=0.1)
    assert [lr_factor(s * 10, step, 10) for s in (0, 3, 4, 8)] == pytest.approx([1, 1, 0.1, 0.01])


def test_config_rejects_knobs_for_archs_without_them() -> None:
    with pytest.raises(ConfigError, match="--activation cannot be set for arch 'resnet18'.*lenet5"):
        TrainConfig(arch="resnet18", activation="relu")
    with pytest.raises(ConfigError, match="--optimizer 'lion' is not one of: sgd, adam, adamw"):
        TrainConfig(optimizer="lion")


def test_auto_precision_on_cpu_is_fp32_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(
        precision, "probe_cpu_speed", lambda *a, **k: pytest.fail("no probe without native bf16")
    )
    choice = precision.resolve_precision("auto", CPU, lenet_bn(), input_shape=(1, 28, 28))
    assert choice.precision == "fp32" and "no native bf16" in choice.reason


@pytest.mark.parametrize(
    ("fp32_s", "bf16_s", "expected"),
    [(0.030, 0.020, "bf16"), (0.020, 0.030, "fp32"), (0.021, 0.020, "fp32")],
    ids=["bf16-faster", "bf16-slower", "near-tie-keeps-fp32"],
)
def test_auto_precision_on_cpu_keeps_bf16_only_where_measured_faster(
    monkeypatch: pytest.MonkeyPatch, fp32_s: float, bf16_s: float, expected: str
) -> None:
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(precision, "probe_cpu_speed", lambda *a, **k: {"fp32": fp32_s, "bf16": bf16_s})
    choice = precision.resolve_precision("auto", CPU, lenet_bn(), input_shape=(1, 28, 28))
    assert choice.precision == expected
    assert "ms/step fp32" in choice.reason and choice.describe("auto").startswith(
        f"precision {expected} (auto: "
    )


def test_explicit_precision_is_kept_and_fp16_needs_cuda() -> None:
    assert precision.resolve_precision("bf16", CPU, lenet_bn()).precision == "bf16"
    assert precision.resolve_precision("fp32", CPU).reason == "as asked"
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        precision.resolve_precision("fp16", CPU)


def test_speed_probe_times_both_and_leaves_the_model_and_random_stream_alone() -> None:
    model = lenet_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = precision.probe_cpu_speed(
        model, (1, 28, 28), 10, batch_size=8, channels_last=False, rounds=1, steps=1
    )
    assert set(seconds) == {"fp32", "bf16"} and all(s > 0 for s in seconds.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
