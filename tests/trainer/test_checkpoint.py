"""``trainer.checkpoint.Checkpoint``: the file's dict, written and read back, and the RNG state."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from cnnstack.contract import ModelMeta
from trainer.checkpoint import SCHEMA_VERSION, Checkpoint, load_checkpoint, save_checkpoint
from trainer.models import get_model

CPU = torch.device("cpu")
ARGS = {"in_channels": 1, "num_classes": 10, "image_size": 28}


def lenet_checkpoint(**fields: object) -> Checkpoint:
    meta = ModelMeta("lenet5", "synthetic", (1, 28, 28), (0.5,), (0.25,), tuple("abcdefghij"))
    model = get_model("lenet5", **ARGS)
    return Checkpoint("lenet5", dict(ARGS), meta, model.state_dict(), **fields)  # type: ignore[arg-type]


def test_the_file_holds_the_schema_and_only_the_optional_keys_a_run_has(tmp_path: Path) -> None:
    ckpt = lenet_checkpoint(epoch=3, metrics={"test_acc": 0.9}, precision="bf16")
    ckpt.save(tmp_path / "c.pt")
    d = load_checkpoint(tmp_path / "c.pt")
    assert d["schema_version"] == SCHEMA_VERSION and d["meta"] == ckpt.meta.to_dict()
    assert d["epoch"] == 3 and d["precision"] == "bf16" and d["torch_version"] == str(torch.__version__)
    assert {"optimizer", "scheduler", "git_commit", "rng"} <= set(d)  # schema keys, None when absent
    assert not {"history", "train_state_dict", "ema_updates", "scaler", "world_size"} & set(d)


def test_load_gives_back_what_was_saved(tmp_path: Path) -> None:
    ckpt = lenet_checkpoint(epoch=2, history=[{"epoch": 1}, {"epoch": 2}], world_size=2)
    ckpt.save(tmp_path / "c.pt")
    back = Checkpoint.load(tmp_path / "c.pt")
    assert (back.arch, back.model_args, back.meta, back.epoch) == (ckpt.arch, ckpt.model_args, ckpt.meta, 2)
    assert back.history == ckpt.history and back.world_size == 2 and back.scaler is None
    assert all(torch.equal(back.state_dict[k], v) for k, v in ckpt.state_dict.items())


def test_keys_a_later_version_adds_are_dropped_on_load(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {**lenet_checkpoint().to_dict(), "added_later": 1})
    assert not hasattr(Checkpoint.load(tmp_path / "c.pt"), "added_later")


def test_restore_rng_replays_the_random_streams(tmp_path: Path) -> None:
    ckpt = lenet_checkpoint()  # building the model draws from the stream: capture after it
    ckpt.rng = Checkpoint.capture_rng(CPU)
    ckpt.save(tmp_path / "c.pt")
    first = (torch.rand(3), random.random())
    Checkpoint.load(tmp_path / "c.pt").restore_rng(CPU)
    again = (torch.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    without = lenet_checkpoint()
    before = torch.get_rng_state()
    without.restore_rng(CPU)  # no RNG state saved: nothing changes
    assert torch.equal(torch.get_rng_state(), before)
