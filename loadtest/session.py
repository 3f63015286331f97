"""The load test as functions: prepare the requests, open a client, run a sweep or a capacity
search. ``cnn-loadtest`` (``loadtest.__main__``) is these plus its printing and reports; another
tool that needs a model's capacity within a latency budget builds a ``LoadTestConfig`` with
``latency_threshold_ms`` and calls ``capacity(cfg)``."""

from __future__ import annotations

import dataclasses
import sys
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadtest import metrics_scrape
from loadtest.client import Described, LocalClient, describe_model, preflight, resolve_input
from loadtest.config import LoadTestConfig
from loadtest.controller import StepResult
from loadtest.multiproc import MultiProcClient
from loadtest.payload import MAX_PAYLOADS, KServeInput, build_payloads, load_images
from loadtest.runner import StepSpec
from loadtest.schedule import REPLAY, mean_rate
from loadtest.search import Probe, SearchResult, find_capacity


@dataclass(frozen=True)
class Prepared:
    """What the load sends: the image shape (C, H, W) and the serialized requests."""

    shape: tuple[int, int, int]
    payloads: list[Any]


def build_request_payloads(
    cfg: LoadTestConfig, shape: tuple[int, int, int], kserve: KServeInput = KServeInput()
) -> list[Any]:
    """Distinct requests, serialized now so that the measured loop does no protobuf or JSON work."""
    k = cfg.images_per_request
    n_requests = max(1, min(MAX_PAYLOADS, 2048 // k))  # bounded memory for big requests
    images = load_images(cfg.input, shape, n_requests * k, cfg.seed)  # (N, C, H, W)
    encoding = ("json" if cfg.json else "binary") if cfg.protocol == "http" else cfg.encoding
    return build_payloads(
        cfg.api, images, k, cfg.model, cfg.version, cfg.top_k, encoding, kserve, cfg.protocol
    )


def prepare(cfg: LoadTestConfig) -> Prepared:
    """Ask the server what the flags leave out, build the requests, send one checked request.
    Raises MissingShape, TargetError, or ValueError/OSError/EOFError for an unreadable --input."""
    # The flags may say all there is to know; otherwise the server's metadata fills in the rest.
    told = cfg.input_shape is not None and cfg.api == "classify"
    described = (
        Described(None)
        if told
        else describe_model(cfg.target, cfg.api, cfg.model, cfg.version, cfg.timeout_s, cfg.transport)
    )
    shape, kserve = resolve_input(
        described, cfg.input_shape, cfg.input_name, cfg.datatype, cfg.target, cfg.model
    )
    payloads = build_request_payloads(cfg, shape, kserve)
    preflight(
        cfg.target, cfg.api, payloads[0], cfg.images_per_request, cfg.timeout_s, cfg.transport, cfg.route
    )
    return Prepared(shape, payloads)


def step_spec(cfg: LoadTestConfig, mode: str, load: float) -> StepSpec:
    """One step at ``load`` (closed: concurrency; open: requests/s at --distribution)."""
    return StepSpec(
        mode=mode,
        load=load,
        warmup_s=cfg.warmup_s,
        window_s=cfg.window_s,
        duration_s=cfg.duration_s,
        max_requests=cfg.max_requests,
        timeout_s=cfg.timeout_s,
        max_inflight=cfg.max_inflight,
        seed=cfg.seed,
        distribution=cfg.distribution,
        percentile=cfg.percentile,
    )


def build_steps(cfg: LoadTestConfig) -> list[StepSpec]:
    steps = [step_spec(cfg, "closed", float(c)) for c in cfg.concurrency]
    steps += [step_spec(cfg, "open", r) for r in cfg.request_rates]
    if cfg.intervals_s:
        replay = step_spec(cfg, "open", mean_rate(cfg.intervals_s))
        steps.append(dataclasses.replace(replay, distribution=REPLAY, intervals_s=cfg.intervals_s))
    return steps


Client = LocalClient | MultiProcClient


def open_client(cfg: LoadTestConfig, payloads: list[Any]) -> Client:
    """One client for all steps: this process, or --processes children (each its own connections)."""
    stability = (cfg.stability_windows, cfg.stability_percent)
    if cfg.processes == 1:
        return LocalClient(
            cfg.target,
            cfg.api,
            payloads,
            cfg.images_per_request,
            *stability,
            cfg.connections,
            cfg.transport,
            cfg.route,
        )
    return MultiProcClient(
        cfg.target,
        cfg.route,
        payloads,
        cfg.images_per_request,
        cfg.processes,
        *stability,
        cfg.connections,
        cfg.transport,
    )


def _scrape(cfg: LoadTestConfig) -> metrics_scrape.Samples | None:
    if cfg.metrics_url is None:
        return None
    try:
        return metrics_scrape.scrape(cfg.metrics_url, cfg.model)
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"warning: cannot scrape {cfg.metrics_url}: {e}", file=sys.stderr)
        return None


def run_step(cfg: LoadTestConfig, client: Client, spec: StepSpec) -> StepResult:
    """One step, with the server's view of it where --metrics-url is given."""
    before = _scrape(cfg)
    r = client.run_step(spec)
    after = _scrape(cfg)
    if before is not None and after is not None:
        r.server = metrics_scrape.step_summary(before, after)
    return r


def run_sweep(
    cfg: LoadTestConfig,
    payloads: list[Any],
    steps: list[StepSpec],
    on_step: Callable[[StepResult], None] | None = None,
) -> list[StepResult]:
    client = open_client(cfg, payloads)
    results = []
    try:
        for spec in steps:
            results.append(run_step(cfg, client, spec))
            if on_step is not None:
                on_step(results[-1])
    finally:
        client.close()
    return results


def run_search(
    cfg: LoadTestConfig, payloads: list[Any], on_probe: Callable[[Probe], None] | None = None
) -> SearchResult:
    """The capacity search that --latency-threshold asks for, every probe one step."""
    slo, space = cfg.search()
    client = open_client(cfg, payloads)
    try:
        return find_capacity(
            lambda load: run_step(cfg, client, step_spec(cfg, space.mode, load)), slo, space, on_probe
        )
    finally:
        client.close()


def capacity(cfg: LoadTestConfig) -> SearchResult:
    """Prepare and search, printing nothing: the knee and every probe of the search ``cfg`` asks
    (``cfg.latency_threshold_ms`` must be set)."""
    if not cfg.searching:
        raise ValueError("capacity() needs a config with latency_threshold_ms")
    return run_search(cfg, prepare(cfg).payloads)
