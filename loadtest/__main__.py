"""``cnn-loadtest`` / ``python -m loadtest``: sweep concurrency and/or request rate against a server.

Exit status: 0 the sweep ran (errors, if any, are in the report), 1 the target could not serve
the model (unreachable, unknown model, bad input), 2 bad command line.
"""

from __future__ import annotations

import sys
import time
import urllib.error
from typing import Any

from loadtest import metrics_scrape, report
from loadtest.client import (
    Described,
    LocalClient,
    MissingShape,
    TargetError,
    describe_model,
    preflight,
    resolve_input,
)
from loadtest.config import LoadTestConfig, parse_args
from loadtest.controller import StepResult
from loadtest.multiproc import MultiProcClient
from loadtest.payload import MAX_PAYLOADS, KServeInput, build_payloads, load_images
from loadtest.runner import StepSpec


def build_steps(cfg: LoadTestConfig) -> list[StepSpec]:
    common = dict(
        warmup_s=cfg.warmup_s,
        window_s=cfg.window_s,
        duration_s=cfg.duration_s,
        max_requests=cfg.max_requests,
        timeout_s=cfg.timeout_s,
        max_inflight=cfg.max_inflight,
        seed=cfg.seed,
    )
    steps = [StepSpec(mode="closed", load=float(c), **common) for c in cfg.concurrency]  # type: ignore[arg-type]
    steps += [StepSpec(mode="open", load=r, **common) for r in cfg.request_rates]  # type: ignore[arg-type]
    return steps


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


def _scrape(cfg: LoadTestConfig) -> metrics_scrape.Samples | None:
    if cfg.metrics_url is None:
        return None
    try:
        return metrics_scrape.scrape(cfg.metrics_url, cfg.model)
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"warning: cannot scrape {cfg.metrics_url}: {e}", file=sys.stderr)
        return None


def run_sweep(cfg: LoadTestConfig, payloads: list[Any], steps: list[StepSpec]) -> list[StepResult]:
    if cfg.processes == 1:
        client: LocalClient | MultiProcClient = LocalClient(
            cfg.target,
            cfg.api,
            payloads,
            cfg.images_per_request,
            cfg.stability_windows,
            cfg.stability_percent,
            cfg.connections,
            cfg.transport,
            cfg.route,
        )
    else:
        client = MultiProcClient(
            cfg.target,
            cfg.route,
            payloads,
            cfg.images_per_request,
            cfg.processes,
            cfg.stability_windows,
            cfg.stability_percent,
            cfg.connections,
            cfg.transport,
        )
    results = []
    try:
        if not cfg.quiet:
            print(report.table_header(cfg.metrics_url is not None), flush=True)
        for spec in steps:
            before = _scrape(cfg)
            r = client.run_step(spec)
            after = _scrape(cfg)
            if before is not None and after is not None:
                r.server = metrics_scrape.step_summary(before, after)
            results.append(r)
            if not cfg.quiet:
                print(report.table_row(r), flush=True)
    finally:
        client.close()
    return results


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
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
    except MissingShape as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, EOFError) as e:  # --input is not a readable IDX file or image folder
        print(f"error: --input {cfg.input}: {e}", file=sys.stderr)
        return 1
    if not cfg.quiet:
        print(
            f"target {cfg.target} ({cfg.wire}) model {cfg.model} api {cfg.api} input {shape} x {cfg.images_per_request}/request, "
            f"{len(payloads[0])} bytes/request, {cfg.processes} client process(es) x {cfg.connections} connection(s)"
        )
    started = time.time()
    results = run_sweep(cfg, payloads, build_steps(cfg))
    meta = {
        "target": cfg.target,
        "model": cfg.model,
        "api": cfg.api,
        "wire": cfg.wire,
        "input_shape": list(shape),
        "images_per_request": cfg.images_per_request,
        "request_bytes": len(payloads[0]),
        "processes": cfg.processes,
        "connections": cfg.connections,
        "window_s": cfg.window_s,
        "stability": {"windows": cfg.stability_windows, "percent": cfg.stability_percent},
        "started_unix": started,
    }
    if cfg.out:
        report.write_json(cfg.out, meta, results)
    if cfg.csv:
        report.write_csv(cfg.csv, results)
    if cfg.plot:
        report.write_plot(
            cfg.plot,
            results,
            f"{cfg.model} @ {cfg.target} ({cfg.api}, {cfg.wire}, {cfg.images_per_request} img/req)",
        )
    if not cfg.quiet:
        print("(latencies in ms; percentiles by nearest rank over the last stable windows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
