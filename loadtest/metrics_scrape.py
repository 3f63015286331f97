"""Server-side view of a step: scrape Prometheus ``/metrics`` before and after, diff the counters.

Means come from histogram ``_sum``/``_count`` deltas, so they cover exactly the requests and
batches the server handled between the two scrapes (the whole step, warm-up included).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

# Server metric names (server/metrics.py). Histograms are given without the _sum/_count suffix.
QUEUE_WAIT = "cnn_queue_wait_seconds"
COMPUTE = "cnn_compute_seconds"
BATCH_SIZE = "cnn_batch_size"
REQUESTS = "cnn_requests_total"  # labels rpc, model, version, code

# Sample name (``name:CODE`` for series with a ``code`` label) -> value summed over the series
# whose labels match the filter (e.g. over versions and RPCs of one model).
Samples = dict[str, float]


def fetch(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (http(s) checked by the CLI)
        return resp.read().decode("utf-8")


def parse(text: str, labels: Mapping[str, str] | None = None) -> Samples:
    """Sum every sample by name over the series whose labels include ``labels`` (e.g. the model),
    so one model's numbers are not mixed with another's."""
    out: Samples = {}
    want = dict(labels or {})
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if any(s.labels.get(k) != v for k, v in want.items() if k in s.labels):
                continue
            key = f"{s.name}:{s.labels['code']}" if "code" in s.labels else s.name
            out[key] = out.get(key, 0.0) + float(s.value)
    return out


def scrape(url: str, model: str) -> Samples:
    return parse(fetch(url), {"model": model})


def _mean_delta(before: Samples, after: Samples, name: str) -> float | None:
    count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    if count <= 0:
        return None
    return (after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)) / count


def step_summary(before: Samples, after: Samples) -> dict[str, float]:
    """Mean queue wait and compute time (ms), mean batch size, batches run and requests answered
    OK in the step."""
    out: dict[str, float] = {}
    if (q := _mean_delta(before, after, QUEUE_WAIT)) is not None:
        out["queue_wait_ms"] = q * 1e3
    if (c := _mean_delta(before, after, COMPUTE)) is not None:
        out["compute_ms"] = c * 1e3
    if (b := _mean_delta(before, after, BATCH_SIZE)) is not None:
        out["batch_size"] = b
        out["batches"] = after.get(f"{BATCH_SIZE}_count", 0.0) - before.get(f"{BATCH_SIZE}_count", 0.0)
    ok = f"{REQUESTS}:OK"
    if ok in after:
        out["requests_ok"] = after[ok] - before.get(ok, 0.0)
    return out
