"""``python -m trainer.ablate``: the one-factor-at-a-time ablation grid on tiny synthetic settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.ablate import VARIANTS, main


def test_ablation_grid_writes_markdown_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "abl"
    argv = [
        "--dataset",
        "synthetic",
        "--epochs",
        "1",
        "--max-train",
        "256",
        "--threads",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert list(rows) == [v.name for v in VARIANTS]
    assert set(rows) >= {"baseline", "avg-pool", "sgd-nesterov", "sigmoid", "batchnorm", "batch-64"}
    for r in rows.values():
        assert r["diverged"] is None and 0.0 <= r["test_acc"] <= 1.0 and r["s_per_epoch"] > 0
    # One factor at a time: each variant's own run records exactly the baseline plus its change.
    base = json.loads((out / "baseline/summary.json").read_text())["config"]
    for v in VARIANTS:
        cfg = json.loads((out / v.name / "summary.json").read_text())["config"]
        differs = {k for k in cfg if cfg[k] != base[k]} - {"out"}
        assert differs == set(v.changes), v.name
    assert rows["batchnorm"]["params"] > rows["baseline"]["params"]  # BN adds scale/shift parameters
    assert rows["batch-64"]["params"] == rows["baseline"]["params"]

    md = (out / "ablation.md").read_text()
    assert "| variant | factor | test acc | train loss | s/epoch | params |" in md
    for v in VARIANTS:
        assert f"| {v.name} |" in md
    assert f"{rows['sigmoid']['test_acc']:.4f}" in md
    # A second run into the same folder refuses instead of replacing the grid.
    assert main(argv) == 2
    assert "already holds an ablation grid" in capsys.readouterr().err
