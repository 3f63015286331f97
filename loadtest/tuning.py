"""The search behind ``cnn-tune``: which serving settings of one model give the most throughput
within a latency SLO, measured, as Model Analyzer answers it for Triton.

A candidate is a ``Settings`` (max_batch_size, the dynamic batcher's max_queue_delay, the instance
count, ``--workers``, the precision variant). ``Tuner`` applies each through the server's own
mechanisms: a repository load carrying the candidate's config (model control, explicit mode), a
restart only when ``--workers`` changes. It measures each with the capacity search of
``cnn-loadtest --latency-threshold`` (``loadtest.session.capacity``): the candidate's score is its
knee, the highest throughput whose percentile stays within the threshold.

Two strategies: ``quick`` starts from the defaults (the model's own config) and climbs, one
setting at a time, to the neighbour that measures better, until none does (Model Analyzer's quick
mode); ``brute`` measures every combination. Both stop when ``budget_s`` would be passed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from loadtest.search import SearchResult
from protos.inference import model_config_pb2 as mc

DIMENSIONS = ("max_batch_size", "max_queue_delay_us", "instances", "workers", "variant")


@dataclass(frozen=True, order=True)
class Settings:
    max_batch_size: int
    max_queue_delay_us: int
    instances: int = 1
    workers: int = 1
    variant: str = ""  # "" (the model itself), "fp16", "int8": the published NAME-VARIANT model

    def label(self) -> str:
        parts = [
            f"batch {self.max_batch_size}",
            f"delay {self.max_queue_delay_us} us",
            f"inst {self.instances}",
        ]
        parts.append(f"workers {self.workers}")
        return ", ".join(parts) + (f", {self.variant}" if self.variant else "")

    def model(self, name: str) -> str:
        return f"{name}-{self.variant}" if self.variant else name

    def config(self, base: mc.ModelConfig) -> mc.ModelConfig:
        """``base`` with this candidate's batching and instances."""
        config = mc.ModelConfig()
        config.CopyFrom(base)
        config.max_batch_size = self.max_batch_size
        config.dynamic_batching.max_queue_delay_microseconds = self.max_queue_delay_us
        del config.instance_group[:]
        config.instance_group.add(count=self.instances)
        return config

    def config_json(self, base: mc.ModelConfig) -> str:
        return json_format.MessageToJson(self.config(base), preserving_proto_field_name=True)


@dataclass(frozen=True)
class Space:
    """The values each setting may take; a setting with one value is not searched."""

    max_batch_size: tuple[int, ...]
    max_queue_delay_us: tuple[int, ...]
    instances: tuple[int, ...] = (1,)
    workers: tuple[int, ...] = (1,)
    variant: tuple[str, ...] = ("",)

    def size(self) -> int:
        return len(list(self.every()))

    def every(self) -> Iterable[Settings]:
        for values in itertools.product(*(getattr(self, d) for d in DIMENSIONS)):
            yield Settings(*values)

    def neighbours(self, s: Settings) -> list[Settings]:
        """One setting moved one step up or down its list (the next value either way)."""
        out = []
        for d in DIMENSIONS:
            values = list(getattr(self, d))
            current = getattr(s, d)
            if current not in values:
                continue
            i = values.index(current)
            for j in (i + 1, i - 1):
                if 0 <= j < len(values):
                    out.append(dataclasses.replace(s, **{d: values[j]}))
        return out


@dataclass
class Trial:
    settings: Settings
    result: SearchResult | None  # None: the candidate could not be applied
    seconds: float
    error: str = ""
    effective: dict[str, Any] = field(default_factory=dict)  # what the server says it runs

    @property
    def score(self) -> float:
        """The knee's requests/s (0 when nothing met the SLO or the candidate failed)."""
        knee = self.result.knee if self.result is not None else None
        return knee.result.requests_per_s if knee is not None else 0.0

    @property
    def images_per_s(self) -> float:
        knee = self.result.knee if self.result is not None else None
        return knee.result.images_per_s if knee is not None else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dataclasses.asdict(self.settings),
            "label": self.settings.label(),
            "requests_per_s": self.score,
            "images_per_s": self.images_per_s,
            "seconds": self.seconds,
            "error": self.error,
            "effective": self.effective,
            "search": self.result.to_dict() if self.result is not None else None,
        }


Measure = Callable[[Settings, float], Trial]  # (candidate, seconds it may take) -> its trial


@dataclass
class Tuner:
    """Runs a strategy over a space, measuring each candidate once, within a time budget."""

    space: Space
    default: Settings
    measure: Measure
    budget_s: float
    on_trial: Callable[[Trial], None] | None = None
    trials: dict[Settings, Trial] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    stopped_by_budget: bool = False

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def trial(self, s: Settings) -> Trial | None:
        """The candidate's trial, measured now unless it was already (None: no time left)."""
        if s in self.trials:
            return self.trials[s]
        longest = max((t.seconds for t in self.trials.values()), default=0.0)
        if self.trials and self.left() < longest:
            self.stopped_by_budget = True
            return None
        trial = self.measure(s, max(self.left(), 1.0))
        self.trials[s] = trial
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial

    def quick(self) -> Trial:
        """From the defaults, climb to the best neighbour until none measures better."""
        best = self.trial(self.default)
        assert best is not None  # the first candidate always runs
        while True:
            better = None
            for s in self.space.neighbours(best.settings):
                t = self.trial(s)
                if t is None:
                    return self.best()
                if t.score > (better or best).score:
                    better = t
            if better is None:
                return self.best()
            best = better

    def brute(self) -> Trial:
        """Every candidate (the defaults first), as long as the budget lasts."""
        self.trial(self.default)
        for s in self.space.every():
            if self.trial(s) is None:
                break
        return self.best()

    def best(self) -> Trial:
        return max(self.trials.values(), key=lambda t: (t.score, -t.settings.max_queue_delay_us))


def pareto(trials: Sequence[Trial], percentile_of: Callable[[Trial], float]) -> list[Trial]:
    """The trials no other beats on both throughput (higher) and latency at the knee (lower)."""
    scored = [t for t in trials if t.score > 0]
    return [
        t
        for t in scored
        if not any(
            o.score >= t.score
            and percentile_of(o) <= percentile_of(t)
            and (o.score, percentile_of(o)) != (t.score, percentile_of(t))
            for o in scored
        )
    ]


def describe_effective(config: mc.ModelConfig) -> dict[str, Any]:
    """What the server runs of a candidate (its flags may have lowered what the config asked)."""
    return {
        "max_batch_size": config.max_batch_size,
        "max_queue_delay_us": config.dynamic_batching.max_queue_delay_microseconds,
        "instances": sum(g.count for g in config.instance_group),
    }


def settings_json(s: Settings) -> str:
    return json.dumps(dataclasses.asdict(s))
