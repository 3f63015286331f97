"""LoadTestConfig: built from the flags as ``LoadTestConfig(**vars(args))``, checking itself, one
ConfigError naming every problem; the search's and the open loop's flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cnnstack.cli import ConfigError
from loadtest.config import LoadTestConfig, build_parser, parse_args


def test_every_flag_is_a_field_of_the_config() -> None:
    fields = {f.name for f in dataclasses.fields(LoadTestConfig)}
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests == fields


def test_one_error_names_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", "h:1", "--model", "m", "--duration", "0", "--top-k", "0", "--json", "--timeout", "-1"]
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    for message in ("--duration must be > 0", "--top-k must be >= 1", "--json needs --protocol http"):
        assert message in err
    assert "--timeout must be > 0" in err


def test_code_that_builds_the_config_gets_the_same_checks() -> None:
    with pytest.raises(ConfigError) as e:
        LoadTestConfig(target="h:1", model="m", processes=0, max_probes=0, latency_threshold_ms=-1.0)
    assert "--processes must be >= 1" in e.value.problems
    assert "--latency-threshold must be > 0 (ms)" in e.value.problems
    assert "--max-probes must be >= 1" in e.value.problems


def test_search_bounds_default_to_concurrency_processes_to_256() -> None:
    cfg = parse_args(["--target", "h:1", "--model", "m", "--latency-threshold", "10"])
    slo, space = cfg.search()
    assert cfg.searching and (space.mode, space.low, space.high) == ("closed", 1, 256)
    assert (slo.threshold_ms, slo.percentile) == (10.0, 99.0)
    cfg = parse_args(["--target", "h:1", "--model", "m", "--latency-threshold", "10", "--processes", "4"])
    assert cfg.search()[1].low == 4
    argv = ["--target", "h:1", "--model", "m", "--latency-threshold", "50", "--request-rate", "100,5000"]
    slo, space = parse_args(
        [*argv, "--percentile", "99.9", "--max-probes", "5", "--search-budget", "60"]
    ).search()
    assert (space.mode, space.low, space.high, space.max_probes, space.budget_s) == ("open", 100, 5000, 5, 60)
    assert slo.percentile == 99.9


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--latency-threshold", "10", "--concurrency", "4"],
            "--concurrency gives the search's bounds LO,HI",
        ),
        (["--latency-threshold", "10", "--concurrency", "8,4"], "two values, LO < HI"),
        (
            ["--latency-threshold", "10", "--request-rate", "1,2,3"],
            "--request-rate gives the search's bounds",
        ),
        (["--latency-threshold", "10", "--concurrency", "1,4", "--request-rate", "1,9"], "not both"),
        (["--latency-threshold", "0"], "--latency-threshold must be > 0 (ms)"),
        (["--percentile", "0"], "--percentile must be in (0, 100]"),
        (["--percentile", "100.5"], "--percentile must be in (0, 100]"),
        (["--latency-threshold", "10", "--search-budget", "0"], "--search-budget must be > 0 (s)"),
        (["--distribution", "uniform"], "invalid choice"),
        (
            ["--request-intervals", "/nonexistent/gaps.txt"],
            "--request-intervals /nonexistent/gaps.txt: no such file",
        ),
    ],
)
def test_bad_search_and_open_loop_flags_are_named(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(["--target", "h:1", "--model", "m", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_request_intervals_are_one_step_read_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gaps = tmp_path / "gaps.txt"
    gaps.write_text("10\n30\n")
    cfg = parse_args(["--target", "h:1", "--model", "m", "--request-intervals", str(gaps)])
    assert cfg.intervals_s == pytest.approx((0.01, 0.03)) and cfg.concurrency == ()
    for extra in (["--request-rate", "5"], ["--latency-threshold", "5"]):
        with pytest.raises(SystemExit):
            parse_args(["--target", "h:1", "--model", "m", "--request-intervals", str(gaps), *extra])
    err = capsys.readouterr().err
    assert "leave out --request-rate" in err and "--request-intervals replays one fixed schedule" in err
    gaps.write_text("10\nsoon\n")
    with pytest.raises(SystemExit):
        parse_args(["--target", "h:1", "--model", "m", "--request-intervals", str(gaps)])
    assert (
        f"--request-intervals {gaps}: line 2: 'soon' is not a number of milliseconds"
        in capsys.readouterr().err
    )
