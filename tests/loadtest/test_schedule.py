"""Open-loop schedules: constant and replayed gaps, shared among client processes; the intervals file."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.runner import StepSpec
from loadtest.schedule import build_schedule, gap_schedule, mean_rate, read_intervals


def test_constant_schedule_sends_every_one_over_rate() -> None:
    sched = build_schedule("constant", 200.0, (), horizon_s=1.0, seed=0, limit=10**6)
    assert sched[0] == pytest.approx(0.005)
    assert len(sched) == 199  # 0.005 .. 0.995; the one at 1.0 is past the horizon
    gaps = {round(b - a, 9) for a, b in zip(sched, sched[1:], strict=False)}
    assert gaps == {0.005}


@pytest.mark.parametrize("distribution", ["constant", "replay"])
def test_processes_together_send_the_one_schedule(distribution: str) -> None:
    gaps = (0.010, 0.030, 0.0)  # a zero gap: two sends due at once
    whole = build_schedule(distribution, 50.0, gaps, 2.0, seed=0, limit=10**6)
    spec = StepSpec("open", 50.0, 0, 1, 1, 10**6, 1, distribution=distribution, intervals_s=gaps)
    parts = [spec.share(i, 3) for i in range(3)]
    assert [(p.part, p.parts) for p in parts] == [(0, 3), (1, 3), (2, 3)]
    shares = [build_schedule(distribution, p.load, gaps, 2.0, p.seed, 10**6, p.part, p.parts) for p in parts]
    assert sorted(t for s in shares for t in s) == pytest.approx(whole)
    assert [len(s) for s in shares] == [len(whole[i::3]) for i in range(3)]


def test_replay_cycles_the_gaps_until_the_horizon_or_the_limit() -> None:
    sched = gap_schedule((0.1, 0.3), horizon_s=1.05, limit=100)
    assert sched == pytest.approx([0.1, 0.4, 0.5, 0.8, 0.9])
    assert gap_schedule((0.1, 0.3), horizon_s=100.0, limit=3) == pytest.approx([0.1, 0.4, 0.5])
    assert mean_rate((0.1, 0.3)) == pytest.approx(5.0)


def test_intervals_file_is_ms_per_line_with_comments_and_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "gaps.txt"
    f.write_text("# recorded 2026-12-01\n10\n\n  2.5 \n0\n# end\n")
    assert read_intervals(f) == pytest.approx((0.010, 0.0025, 0.0))


@pytest.mark.parametrize(
    "text, message",
    [
        ("10\nfast\n", "line 2: 'fast' is not a number of milliseconds"),
        ("10\n-1\n", "line 2: a gap must be a finite number of ms >= 0"),
        ("nan\n", "line 1: a gap must be a finite number of ms >= 0"),
        ("# nothing\n\n", "no gaps with a positive sum"),
        ("0\n0\n", "no gaps with a positive sum"),
    ],
)
def test_bad_intervals_files_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "gaps.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_intervals(f)
