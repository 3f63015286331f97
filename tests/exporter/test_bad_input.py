"""Bad input gets a clear message on stderr, a non-zero exit, and leaves the repository unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnstack.contract import ModelMeta
from tests.exporter.helpers import FAST, run_export, tree, write_checkpoint
from trainer.checkpoint import load_checkpoint
from trainer.models import get_model


@pytest.fixture
def repo_with_a_model(make_checkpoint, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    assert run_export(make_checkpoint("lenet5"), "-r", repo, "--name", "m", "--no-progress", *FAST) == 0
    return repo


def _raw(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _bad_sources(make_checkpoint, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, fragment the message must contain)."""
    good = make_checkpoint("lenet5", name="good.pt")
    truncated = tmp / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    random_bytes = tmp / "random.pt"
    random_bytes.write_bytes(b"\x00not a checkpoint" * 100)
    tensor = tmp / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    future = tmp / "future.pt"
    torch.save({**_raw(good), "schema_version": 99}, future)
    no_meta = tmp / "no_meta.pt"
    torch.save({k: v for k, v in _raw(good).items() if k != "meta"}, no_meta)
    bad_meta = tmp / "bad_meta.pt"
    raw = _raw(good)
    raw["meta"] = {k: v for k, v in raw["meta"].items() if k != "class_names"}
    torch.save(raw, bad_meta)
    unknown_arch = tmp / "unknown_arch.pt"
    torch.save({**_raw(good), "arch": "not-a-net"}, unknown_arch)
    empty_dir = tmp / "empty_run"
    empty_dir.mkdir()
    return {
        "missing": (tmp / "nope.pt", "does not exist"),
        "truncated": (truncated, "truncated"),
        "random bytes": (random_bytes, "not a readable checkpoint"),
        "a tensor": (tensor, "holds a Tensor"),
        "unknown schema": (future, "schema version 99"),
        "missing metadata": (no_meta, "missing required keys ['meta']"),
        "incomplete metadata": (bad_meta, "class_names"),
        "unknown arch": (unknown_arch, "unknown arch 'not-a-net'"),
        "run dir without checkpoint": (empty_dir, "without best.pt or checkpoint.pt"),
    }


def test_each_bad_checkpoint_is_named_and_nothing_changes(
    repo_with_a_model: Path, make_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    repo = repo_with_a_model
    for label, (source, fragment) in _bad_sources(make_checkpoint, tmp_path).items():
        before = tree(repo)
        capsys.readouterr()
        code = run_export(source, "-r", repo, "--name", "m", "--no-progress", *FAST)
        err = capsys.readouterr().err
        assert code == 1, label
        assert str(source) in err and "bad input" in err and fragment in err, (label, err)
        assert tree(repo) == before, label  # not even the summary: nothing was exported
        assert not list(repo.glob(".*")), label  # no temp dirs, no failure reports


def test_name_clash_with_a_different_architecture(repo_with_a_model: Path, make_checkpoint, capsys) -> None:
    repo = repo_with_a_model
    before = tree(repo)
    assert run_export(make_checkpoint("vgg11"), "-r", repo, "--name", "m", "--no-progress", *FAST) == 1
    err = capsys.readouterr().err
    assert "'m' is taken by a different model" in err and "'lenet5'" in err and "'vgg11'" in err
    assert tree(repo) == before


def test_unwritable_repository(make_checkpoint, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert run_export(make_checkpoint("lenet5"), "-r", blocker / "repo", "--no-progress", *FAST) == 1
    assert "not writable" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"


def test_missing_repository_is_not_created_for_bad_input(tmp_path: Path, capsys) -> None:
    repo = tmp_path / "new" / "repo"
    assert run_export(tmp_path / "nope.pt", "-r", repo, "--no-progress") == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--parity-batch", "32"], "--parity-batch must be >= 64"),
        (["--atol", "0"], "--atol must be > 0"),
        (["--opset", "5"], "--opset must be within"),
        (["--max-accuracy-drop", "-1"], "--max-accuracy-drop must be >= 0"),
    ],
)
def test_bad_flags_are_usage_errors(args: list[str], fragment: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        run_export(tmp_path / "x.pt", "-r", tmp_path / "repo", *args)
    assert exc.value.code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_verify_rejects_a_directory_that_is_not_a_version(make_checkpoint, tmp_path: Path, capsys) -> None:
    assert run_export("verify", tmp_path, "--checkpoint", make_checkpoint("lenet5")) == 1
    assert "not a published model version" in capsys.readouterr().err


def test_checkpoint_loads_as_written(make_checkpoint) -> None:
    """The helper's checkpoints are valid schema-v1 files (so the failures above are the bad parts)."""
    ckpt = load_checkpoint(make_checkpoint("lenet5"))
    assert ckpt["arch"] == "lenet5" and ckpt["meta"]["dataset"] == "synthetic"


def test_a_test_set_that_does_not_fit_the_model_is_bad_input(
    repo_with_a_model: Path, tmp_path: Path, fake_mnist_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    # A 5-class model whose metadata names Fashion-MNIST (10 labels): the parity set cannot be scored.
    meta = ModelMeta("lenet5", "fashion-mnist", (1, 28, 28), (0.5,), (0.5,), tuple("abcde"))
    model = get_model("lenet5", in_channels=1, num_classes=5, image_size=28)
    ckpt = write_checkpoint(tmp_path / "five.pt", model, meta)
    before = tree(repo_with_a_model)
    code = run_export(ckpt, "-r", repo_with_a_model, "--data-dir", fake_mnist_dir, "--no-progress", *FAST)
    err = capsys.readouterr().err
    assert code == 1
    assert "bad input" in err and "labels go up to 9, the model has 5 classes" in err
    assert tree(repo_with_a_model) == before
