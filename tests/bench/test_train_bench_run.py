"""bench/train_bench.py end to end on synthetic data: each side in its own process, both reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import train_bench


@pytest.mark.slow
def test_the_two_sides_take_turns_epoch_by_epoch(tmp_path: Path) -> None:
    # Each side must train (and evaluate) alone on the CPU: turns alternate, baseline first, and
    # never overlap. The baseline has one turn per epoch plus its evaluation; ours has one for its
    # precision choice (a timed probe where bf16 is native), then one per epoch, evaluating within it.
    argv = [
        "--dataset",
        "synthetic",
        "--epochs",
        "2",
        "--workers",
        "0",
        "--baseline-data",
        "tensor",
        "--batch-size",
        "128",
        "--max-train",
        "512",
    ]
    pair = train_bench.pair_in_lockstep(argv, tmp_path)
    assert len(pair["baseline"]["turns"]) == 3 and len(pair["ours"]["turns"]) == 3
    turns = sorted((t[0], t[1], side) for side in pair for t in pair[side]["turns"])
    assert [side for _, _, side in turns] == ["baseline", "ours"] * 3
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(turns, turns[1:], strict=False))
    assert all(r["images_per_s"] > 0 and 0 <= r["test_acc"] <= 1 for r in pair.values())


@pytest.mark.slow
def test_pairs_run_in_subprocesses_and_report_the_median(capsys: pytest.CaptureFixture[str]) -> None:
    rc = train_bench.main(
        [
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--repeat",
            "2",
            "--baseline-data",
            "tensor",
            "--batch-size",
            "128",
        ]
    )
    out = capsys.readouterr().out
    assert rc in (0, 1)  # 1 = accuracies more than 0.5 points apart, possible after one synthetic epoch
    for rep in ("[1/2]", "[2/2]"):
        # Ours in the precision `auto` measured faster on this CPU: either, named.
        assert f"{rep} d2l-style loop" in out and re.search(
            rf"{re.escape(rep)} ours \(on-device batches, (fp32|bf16)\)", out
        )
    assert "speedup" in out and "median (pairs: " in out
    # Each pair its own seed; the loops' accuracies are compared as means over those seeds.
    assert "[1/2] seed 0: speedup" in out and "[2/2] seed 1: speedup" in out
    assert "test accuracy, mean of 2 seeds: d2l loop" in out
