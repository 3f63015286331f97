"""cnn-loadtest --latency-threshold end to end, against a fake server of known capacity: it serves
2 requests at a time, 100 ms each, so every request takes 100 ms up to 2 in flight, and beyond
that at least half take 200 ms or more (at 3 in flight, one of the two answered in each 100 ms
waited for a slot). Latency can only grow on a busy machine; the search is on p90 (not p99) with
80 ms to spare, so that a few stalled requests do not turn 2 in flight into a miss."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loadtest.__main__ import main
from tests.loadtest.fakes import FAKE_MODEL, FakeServer

# Lenient stability: a busy CI box must not turn a 50 ms step into an unstable probe.
FAST = ["--warmup", "0.2", "--window", "0.5", "--duration", "4", "--stability-percent", "100"]


def _search(server: FakeServer, *flags: str) -> list[str]:
    return ["--target", server.target, "--model", FAKE_MODEL, *FAST, *flags]


@pytest.fixture
def two_at_a_time(fake_server: FakeServer) -> FakeServer:
    b = fake_server.behaviour
    b.capacity, b.delay_s = 2, 0.1
    return fake_server


def test_search_finds_the_knee_prints_every_probe_and_writes_the_reports(
    two_at_a_time: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, table, plot = tmp_path / "s.json", tmp_path / "s.csv", tmp_path / "s.png"
    argv = _search(two_at_a_time, "--latency-threshold", "180", "--percentile", "90", "--concurrency", "1,8")
    assert main([*argv, "--out", str(out), "--csv", str(table), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    # c <= 2 meets; from c = 3 on, p90 is 200 ms or more (sleeps can only run late): breaks.
    doc = json.loads(out.read_text())
    search = doc["search"]
    assert [p["load"] for p in search["probes"]] == [1, 2, 4, 3], printed
    assert [p["meets"] for p in search["probes"]] == [True, True, False, False]
    assert search["outcome"] == "found" and search["knee_load"] == 2 and search["lowest_breaking_load"] == 3
    assert [s["load"] for s in doc["steps"]] == [1, 2, 4, 3]  # every probe is a full step
    assert "searching concurrency c=1 .. c=8 for the highest throughput with p90 <= 180 ms" in printed
    rows = [line for line in printed.splitlines() if line.strip().startswith("c=")]
    assert len(rows) == 4 and "meets: p90" in rows[1] and "breaks: p90" in rows[2]
    assert "knee: c=2:" in printed and "boundary: c=2 meets the SLO, c=3 breaks: " in printed
    assert [r["slo"][:6] for r in csv.DictReader(table.open())] == ["meets:", "meets:", "breaks", "breaks"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "threshold, bounds, said, probes",
    [
        ("50", "1,8", ["even the lowest load, c=1, breaks p99 <= 50 ms"], 1),
        (
            "500",
            "1,2",
            ["the highest load probed, c=2, still meets p99 <= 500 ms", "raise --concurrency's high bound"],
            2,
        ),
    ],
    ids=["too-slow-for-the-slo", "range-below-the-capacity"],
)
def test_a_search_that_cannot_bracket_the_knee_says_why(
    two_at_a_time: FakeServer,
    capsys: pytest.CaptureFixture[str],
    threshold: str,
    bounds: str,
    said: list[str],
    probes: int,
) -> None:
    assert main(_search(two_at_a_time, "--latency-threshold", threshold, "--concurrency", bounds)) == 0
    printed = capsys.readouterr().out
    assert all(words in printed for words in said)
    assert sum(line.strip().startswith("c=") for line in printed.splitlines()) == probes


def test_open_loop_search_over_request_rate_with_max_probes(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One window decides stability (it has answers: stable), so 50/s meets a 500 ms p99 whatever
    # the box is doing, and 3 probes cannot finish a search up to 800/s.
    fake_server.behaviour.delay_s = 0.01
    out = tmp_path / "s.json"
    argv = _search(fake_server, "--latency-threshold", "500", "--request-rate", "50,800", "--max-probes", "3")
    argv += ["--stability-windows", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    search = doc["search"]
    assert search["mode"] == "open" and len(search["probes"]) == 3 and search["probes"][0]["load"] == 50
    assert search["outcome"] == "stopped" and search["stopped_by"] == "--max-probes (3)"
    assert all(s["mode"] == "open" and s["service_ms"] is not None for s in doc["steps"])
    assert "the search stopped at --max-probes (3)" in capsys.readouterr().out


def test_capacity_is_the_search_as_a_function_printing_nothing(
    two_at_a_time: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from loadtest.config import LoadTestConfig
    from loadtest.session import capacity

    timing = dict(warmup_s=0.2, window_s=0.5, duration_s=4.0, stability_percent=100.0)
    cfg = LoadTestConfig(
        target=two_at_a_time.target,
        model=FAKE_MODEL,
        latency_threshold_ms=180.0,
        percentile=90.0,
        concurrency=(1, 8),
        **timing,
    )
    result = capacity(cfg)
    assert result.knee is not None and result.knee.result.load == 2 and result.breaks == 3
    assert [p.result.load for p in result.probes] == [1, 2, 4, 3]
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match="latency_threshold_ms"):
        capacity(LoadTestConfig(target=two_at_a_time.target, model=FAKE_MODEL))
