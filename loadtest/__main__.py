"""``cnn-loadtest`` / ``python -m loadtest``: sweep concurrency and/or request rate against a
server, or (``--latency-threshold``) search the highest throughput within a latency budget.

Exit status: 0 the sweep or search ran (errors, if any, are in the report; a search that found no
load meeting the SLO has still answered), 1 the target could not serve the model (unreachable,
unknown model, bad input), 2 bad command line.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from loadtest import plots, report
from loadtest.client import MissingShape, TargetError
from loadtest.config import LoadTestConfig, parse_args
from loadtest.controller import StepResult
from loadtest.search import Probe, SearchResult
from loadtest.session import Prepared, build_steps, prepare, run_search, run_sweep


def _show_step(cfg: LoadTestConfig, r: StepResult, verdict: str = "") -> None:
    """A step's row as it finishes (unless --quiet); its warnings on stderr whatever --quiet says."""
    if not cfg.quiet:
        row = report.table_row(r)
        if verdict:  # after the first line: an open-loop step has a second one
            first, _, rest = row.partition("\n")
            row = f"{first}  {verdict}" + (f"\n{rest}" if rest else "")
        print(row, flush=True)
    for warning in report.warnings(r):
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def _meta(cfg: LoadTestConfig, prepared: Prepared, started: float) -> dict[str, Any]:
    """The run's settings for the JSON report (never the token: only whether one was sent)."""
    return {
        "target": cfg.target,
        "model": cfg.model,
        "api": cfg.api,
        "wire": cfg.wire,
        "input_shape": list(prepared.shape),
        "images_per_request": cfg.images_per_request,
        "request_bytes": len(prepared.payloads[0]),
        "processes": cfg.processes,
        "connections": cfg.connections,
        "window_s": cfg.window_s,
        "stability": {"windows": cfg.stability_windows, "percent": cfg.stability_percent},
        "distribution": "replay" if cfg.request_intervals else cfg.distribution,
        "auth_token": cfg.auth_token_file is not None,
        "traceparent": cfg.traceparent,
        "started_unix": started,
    }


def _search_line(cfg: LoadTestConfig) -> str:
    slo, space = cfg.search()
    kind = "concurrency" if space.mode == "closed" else "request rate"
    return (
        f"searching {kind} {space.label(space.low)} .. {space.label(space.high)} for the highest "
        f"throughput with {slo} (at most {space.max_probes} probes, {space.budget_s:g} s)"
    )


def _search(cfg: LoadTestConfig, prepared: Prepared) -> tuple[list[StepResult], SearchResult]:
    def on_probe(p: Probe) -> None:
        _show_step(cfg, p.result, p.verdict)

    search = run_search(cfg, prepared.payloads, on_probe)
    if not cfg.quiet:
        for line in search.summary():
            print(line)
    return [p.result for p in search.probes], search


def _write_reports(
    cfg: LoadTestConfig, meta: dict[str, Any], results: list[StepResult], search: SearchResult | None
) -> None:
    if cfg.out:
        report.write_json(cfg.out, meta, results, search)
    if cfg.csv:
        report.write_csv(cfg.csv, results, search)
    if cfg.plot:
        title = f"{cfg.model} @ {cfg.target} ({cfg.api}, {cfg.wire}, {cfg.images_per_request} img/req)"
        if search is not None:
            plots.write_search_plot(cfg.plot, search, title)
        else:
            plots.write_plot(cfg.plot, results, title)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        prepared = prepare(cfg)
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
            f"target {cfg.target} ({cfg.wire}) model {cfg.model} api {cfg.api} input {prepared.shape} x "
            f"{cfg.images_per_request}/request, {len(prepared.payloads[0])} bytes/request, "
            f"{cfg.processes} client process(es) x {cfg.connections} connection(s)"
        )
        if cfg.searching:
            print(_search_line(cfg))
        print(report.table_header(cfg.metrics_url is not None), flush=True)
    started = time.time()
    search = None
    if cfg.searching:
        results, search = _search(cfg, prepared)
    else:
        results = run_sweep(cfg, prepared.payloads, build_steps(cfg), lambda r: _show_step(cfg, r))
    _write_reports(cfg, _meta(cfg, prepared, started), results, search)
    if not cfg.quiet:
        print("(latencies in ms; percentiles by nearest rank over the last stable windows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
