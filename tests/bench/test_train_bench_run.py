"""bench/train_bench.py end to end on synthetic data: each side in its own process, both reported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import train_bench  # noqa: E402


@pytest.mark.slow
def test_pairs_run_in_subprocesses_and_report_the_median(capsys: pytest.CaptureFixture[str]) -> None:
    rc = train_bench.main(["--dataset", "synthetic", "--epochs", "1", "--workers", "0", "--repeat", "2",
                           "--baseline-data", "tensor", "--batch-size", "128"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc in (0, 1)  # 1 = accuracies more than 0.5 points apart, possible after one synthetic epoch
    for rep in ("[1/2]", "[2/2]"):
        assert f"{rep} d2l-style loop" in out and f"{rep} ours (on-device batches, fp32)" in out
    assert "speedup" in out and "median (pairs: " in out
