"""The export driver called directly (no CLI): its result, its two failures, variants that fail
alone, and the config that drives it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cnnstack.cli import ConfigError
from exporter import quantize
from exporter.config import ExportConfig
from exporter.driver import ExportFailed, export_one
from exporter.source import BadInput, default_name, load_source, resolve_checkpoint


def fast(repo: Path, **changes: Any) -> ExportConfig:
    """The helpers' FAST flags as a config: a parity batch of 64, four batch-1 images, short timing."""
    values: dict[str, Any] = dict(
        parity_samples=64, parity_batch=64, batch1_samples=4, bench_seconds=0.05, progress=False
    )
    return ExportConfig(command="export", sources=(), repository=repo, **{**values, **changes})


def test_export_one_publishes_version_1_with_its_report(make_checkpoint, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    result = export_one(make_checkpoint("lenet5"), fast(repo, name="m"))
    assert result.name == "m" and result.published == {"m": 1} and result.problems == []
    report = result.report
    assert report.passed and report.published == {"m": 1} and report.model.signature.arch == "lenet5"
    assert [c.name for c in report.checks] == ["onnx_checker", "parity", "ort_optimizations"]
    assert all(c.passed for c in report.checks)
    assert report.precisions is not None and report.precisions["fp32"]["published"] is True
    assert (repo / "m" / "1" / "model.onnx").is_file()


def test_a_file_that_is_not_a_checkpoint_is_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(BadInput, match="not a readable checkpoint"):
        export_one(junk, fast(tmp_path / "repo"))
    assert not (tmp_path / "repo").exists()


def test_a_failed_check_raises_with_its_report_and_publishes_nothing(
    make_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exporter import checks

    real = checks.check_onnx

    def failing(*args: Any, **kwargs: Any) -> checks.CheckResult:
        result = real(*args, **kwargs)
        return checks.CheckResult(result.name, False, result.numbers, "rejected by the test")

    monkeypatch.setattr(checks, "check_onnx", failing)
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(ExportFailed, match="rejected by the test") as e:
        export_one(make_checkpoint("lenet5"), fast(repo, name="m"))
    assert e.value.check == "onnx_checker" and not e.value.report.passed
    assert [c.name for c in e.value.report.checks] == ["onnx_checker"]
    assert list(repo.iterdir()) == []


def test_a_variant_whose_converter_fails_costs_only_that_variant(
    make_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("converter broke")

    monkeypatch.setattr(quantize, "to_fp16", broken)
    result = export_one(make_checkpoint("lenet5"), fast(tmp_path / "repo", name="m", fp16=True))
    assert result.published == {"m": 1}
    assert result.problems == ["m-fp16 not published: RuntimeError: converter broke"]
    precisions = result.report.precisions
    assert precisions is not None and precisions["fp16"]["published"] is False


def test_a_run_directory_resolves_to_its_last_epoch_and_names_the_model(
    make_checkpoint, tmp_path: Path
) -> None:
    run = tmp_path / "My Run"
    run.mkdir()
    for name in ("best.pt", "checkpoint.pt"):
        make_checkpoint("lenet5", name=name).rename(run / name)
    assert resolve_checkpoint(run) == run / "checkpoint.pt"  # best.pt was chosen on the test set
    src = load_source(run)
    assert src.path == run / "checkpoint.pt" and src.given == run and len(src.sha256) == 64
    assert default_name(src) == "my-run"
    assert default_name(load_source(run / "best.pt")) == "lenet5-synthetic"  # a file: ARCH-DATASET


def test_export_config_names_every_bad_setting_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        ExportConfig(command="export", sources=(Path("a"),), parity_batch=3, opset=5, atol=0)
    message = str(e.value)
    assert len(e.value.problems) == 3
    assert "--parity-batch must be >= 64, got 3" in message and "--opset must be within 7..23" in message
    from_argparse = [Path("a")]  # argparse's nargs gives a list; the config holds a tuple
    assert ExportConfig(command="export", sources=from_argparse).sources == (Path("a"),)  # type: ignore[arg-type]
