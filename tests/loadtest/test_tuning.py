"""cnn-tune's search without a server (a fake measure with known scores): the space and its
neighbours, the quick climb reaching the best candidate from the defaults, brute force covering
the space, the time budget, the Pareto front, a candidate's config; then cnn-tune itself against a
real server started on a tiny repository: every candidate measured, the report and config written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cnnstack.contract import CONFIG_FILE, parse_config
from loadtest.search import FOUND, Probe, SearchResult, SearchSpace, Slo
from loadtest.tuning import Settings, Space, Trial, Tuner, pareto
from protos.inference import model_config_pb2 as mc

SPACE = Space(max_batch_size=(1, 8, 64), max_queue_delay_us=(0, 1000), instances=(1, 2))


class FakeStep:
    """The bits of a StepResult a SearchResult's knee reads."""

    def __init__(self, rps: float, p99: float) -> None:
        self.requests_per_s, self.images_per_s = rps, rps
        self.latency_ms = {"p99_ms": p99}
        self.load, self.label, self.stable = 1.0, "c=1", True


def result_of(rps: float, p99: float = 5.0) -> SearchResult:
    r = SearchResult(Slo(10.0), SearchSpace("closed", 1, 8))
    r.probes.append(Probe(FakeStep(rps, p99), rps > 0, "meets" if rps > 0 else "breaks", 0.0))  # type: ignore[arg-type]
    r.outcome = FOUND
    return r


def score(s: Settings) -> float:
    """A landscape with one peak: batch 64, delay 1000, 2 instances."""
    return s.max_batch_size * (2 if s.max_queue_delay_us else 1) * s.instances


def fake(measured: list[Settings], seconds: float = 0.0):
    def measure(s: Settings, left: float) -> Trial:
        measured.append(s)
        return Trial(s, result_of(score(s)), seconds)

    return measure


def test_neighbours_move_one_setting_one_step() -> None:
    s = Settings(8, 0, 1)
    assert set(SPACE.neighbours(s)) == {
        Settings(1, 0, 1),
        Settings(64, 0, 1),
        Settings(8, 1000, 1),
        Settings(8, 0, 2),
    }
    assert SPACE.size() == 12


def test_the_quick_climb_reaches_the_peak_from_the_defaults_without_measuring_everything() -> None:
    measured: list[Settings] = []
    tuner = Tuner(SPACE, Settings(8, 0, 1), fake(measured), budget_s=600)
    best = tuner.quick()
    assert best.settings == Settings(64, 1000, 2) and best.score == 256
    assert measured[0] == Settings(8, 0, 1) and len(measured) == len(set(measured)) < SPACE.size()


def test_brute_force_measures_every_candidate_once() -> None:
    measured: list[Settings] = []
    best = Tuner(SPACE, Settings(8, 0, 1), fake(measured), budget_s=600).brute()
    assert best.settings == Settings(64, 1000, 2) and sorted(measured) == sorted(SPACE.every())


def test_the_budget_stops_the_search_before_a_candidate_would_pass_it() -> None:
    measured: list[Settings] = []
    tuner = Tuner(SPACE, Settings(8, 0, 1), fake(measured, seconds=5.0), budget_s=12)
    tuner.started = time.monotonic() - 8  # 4 s left, and a candidate takes 5
    tuner.brute()
    assert len(measured) == 1 and tuner.stopped_by_budget


def test_the_pareto_front_keeps_what_nothing_beats_on_both() -> None:
    trials = [
        Trial(Settings(b, 0), result_of(rps, p99), 0)
        for b, rps, p99 in ((1, 100, 2), (2, 200, 5), (4, 150, 6), (8, 300, 9))
    ]
    front = pareto(trials, lambda t: t.result.knee.result.latency_ms["p99_ms"])  # type: ignore[union-attr]
    assert [t.settings.max_batch_size for t in front] == [1, 2, 8]


def test_a_candidate_config_changes_batching_and_instances_only() -> None:
    base = mc.ModelConfig(name="m", max_batch_size=64)
    base.version_policy.latest.num_versions = 2
    base.dynamic_batching.max_queue_delay_microseconds = 500
    config = Settings(16, 2000, 3).config(base)
    assert (config.max_batch_size, config.dynamic_batching.max_queue_delay_microseconds) == (16, 2000)
    assert [g.count for g in config.instance_group] == [3] and config.version_policy.latest.num_versions == 2
    assert json.loads(Settings(16, 2000, 3).config_json(base))["max_batch_size"] == 16


@pytest.mark.integration
@pytest.mark.slow
def test_cnn_tune_measures_every_candidate_and_writes_the_winner(tmp_path: Path) -> None:
    from loadtest.tune import main
    from tests.server.helpers import publish, tiny_model

    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    before = parse_config((root / "tiny" / CONFIG_FILE).read_text())
    out = tmp_path / "tune.json"
    code = main(
        [
            "--repository",
            str(root),
            "--model",
            "tiny",
            "--latency-threshold",
            "1000",
            "--search",
            "brute",
            "--max-batch-sizes",
            "1,8",
            "--queue-delays-us",
            "0",
            "--instances",
            "1",
            "--workers",
            "1",
            "--variants",
            "none",
            "--concurrency",
            "1,4",
            "--duration",
            "2",
            "--window",
            "0.5",
            "--warmup",
            "0.5",
            "--budget-s",
            "300",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    labels = {c["label"] for c in doc["candidates"]}
    # Brute force: every candidate, the defaults (max batch 64, delay 2000 us) among the values searched.
    assert doc["space_size"] == 6 and len(doc["candidates"]) == 6, doc
    assert all(c["requests_per_s"] > 0 for c in doc["candidates"]), doc
    # What the server ran is what each candidate asked (its flags did not cap the batch or delay).
    for c in doc["candidates"]:
        asked = c["settings"]
        assert c["effective"] == {
            "max_batch_size": asked["max_batch_size"],
            "max_queue_delay_us": asked["max_queue_delay_us"],
            "instances": asked["instances"],
        }, c
    assert any("batch 1," in label for label in labels) and any("batch 8," in label for label in labels)
    assert doc["default"]["settings"]["max_batch_size"] == before.max_batch_size
    after = parse_config((root / "tiny" / CONFIG_FILE).read_text())
    if doc["written"]:
        assert after.max_batch_size == doc["winner"]["settings"]["max_batch_size"]
    else:
        assert after == before and doc["winner"]["settings"] == doc["default"]["settings"]
