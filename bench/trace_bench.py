"""What tracing costs: requests/s with tracing off, on for every request, and on for 1 in 100.

Three cnn-serve processes on 127.0.0.1 serve the same model (LeNet by default) on the CPU:
without ``--trace-config`` (off), with ``level=TIMESTAMPS rate=1`` (every request traced: a
request span and its queue, compute and postprocess children) and with ``rate=100`` (1%); the
traced ones export over OTLP/HTTP to local receivers (bench.otlp_sink: they keep the bodies and
decode them only after the measurement, to count the spans that arrived). One image per request,
closed loop, KServe v2 ModelInfer over gRPC, driven by h2load (C, little client cost on the cores
the server shares) or, without it, by cnn-loadtest. Rounds alternate the three servers so that
other work on a shared machine weighs on each alike; each figure is its median round.

Printed: requests/s, latency and the server's CPU time per request of each (user + system over
all its threads, from /proc: on a shared machine the steadier measure of what tracing adds), the
ratios on/off of both, and the spans exported per request (4 at 100%: nothing was dropped).

    .venv/bin/python -m bench.trace_bench --repository artifacts/repository --model lenet
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import h2load_client
from bench.otlp_sink import OtlpSink
from bench.procs import cpu_model, cpu_seconds, write_report
from bench.protocol_bench import (
    ProtocolBench,
    add_run_args,
    h2load_step,
    loadtest_step,
    parse_run_args,
    ratio_lines,
)
from cnnstack.serverproc import ServerProcess
from loadtest import metrics_scrape
from loadtest.client import describe_model

ROOT = Path(__file__).resolve().parents[1]
GRPC = ("grpc", "grpc", False, False)  # protocol_bench's wire: name, protocol, json, tls
# name -> the server's rate (None: tracing off). The processor's queue is large enough that no
# span is dropped at 100%, so its whole cost is measured.
SETTINGS = {"off": None, "on, 100%": 1, "on, 1%": 100}
QUEUE = "opentelemetry,bsp_max_queue_size=262144"
METRICS = ("requests_per_s", "p50_ms", "p99_ms", "cpu_us_per_request")


@dataclass(frozen=True)
class TraceBench:
    repository: Path
    model: str
    concurrency: int
    duration_s: float
    warmup_s: float
    rounds: int
    h2load: bool
    out_dir: Path


def start(cfg: TraceBench, rate: int | None, sink: OtlpSink | None) -> ServerProcess:
    args = ["--metrics-port", "0", "--poll-interval-s", "0", "--log-level", "WARNING", "--device", "cpu"]
    if rate is not None and sink is not None:
        for item in ("level=TIMESTAMPS", f"rate={rate}", f"opentelemetry,url={sink.url}", QUEUE):
            args += ["--trace-config", item]
    server = ServerProcess(*args, repository=cfg.repository, cwd=ROOT)
    server.start()
    return server


def step(cfg: TraceBench, server: ServerProcess, shape: tuple, tmp: Path) -> dict[str, float]:
    """One closed-loop run against ``server``: requests/s, p50, p99, and the server's CPU time per
    request it answered (user + system, all its threads: the measure other load on a shared
    machine disturbs least)."""
    pcfg = ProtocolBench(
        cfg.repository,
        cfg.model,
        (cfg.concurrency,),
        cfg.duration_s,
        cfg.warmup_s,
        1,
        cfg.h2load,
        cfg.out_dir,
    )
    cpu0, ok0 = cpu_seconds(server.pid), served(server, cfg.model)
    if cfg.h2load:
        r = h2load_step(pcfg, server, GRPC, cfg.concurrency, shape)
    else:
        r = loadtest_step(pcfg, server, GRPC, cfg.concurrency, tmp / "unused-ca.pem", tmp)
    cpu1, ok1 = cpu_seconds(server.pid), served(server, cfg.model)
    return {**r, "cpu_us_per_request": (cpu1 - cpu0) / max(1, ok1 - ok0) * 1e6}


def run(cfg: TraceBench) -> dict[str, Any]:
    sinks = {name: OtlpSink(decode=False).start() for name, rate in SETTINGS.items() if rate is not None}
    servers: dict[str, ServerProcess] = {}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    load_before = os.getloadavg()[0]
    try:
        for name, rate in SETTINGS.items():
            servers[name] = start(cfg, rate, sinks.get(name))
        shape = describe_model(servers["off"].target, "kserve", cfg.model, 0).shape
        assert shape is not None, f"{cfg.model}: the server's metadata gives no input shape"
        with tempfile.TemporaryDirectory(prefix="trace-bench-") as tmp:
            for rnd in range(cfg.rounds):
                for name in SETTINGS:
                    r = step(cfg, servers[name], shape, Path(tmp))
                    runs[name].append(r)
                    print(
                        f"round {rnd + 1} tracing {name:<9} c={cfg.concurrency} {r['requests_per_s']:8.0f} req/s "
                        f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms, "
                        f"server CPU {r['cpu_us_per_request']:.0f} us/request",
                        flush=True,
                    )
        answered = {name: served(server, cfg.model) for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()  # the traced ones flush their spans
    spans = {name: len(sink.spans()) for name, sink in sinks.items()}
    for sink in sinks.values():
        sink.stop()
    rows = [summary(name, v, spans.get(name, 0), answered[name]) for name, v in runs.items()]
    return {
        "cpu": cpu_model(),
        "date": time.strftime("%Y-%m-%d"),
        "load_before": load_before,
        "client": "h2load" if cfg.h2load else "cnn-loadtest",
        "model": cfg.model,
        "concurrency": cfg.concurrency,
        "rows": rows,
        "ratios": ratios(rows),
    }


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each traced setting against "off": requests/s, and the server's CPU time per request."""
    rps = {r["tracing"]: r["requests_per_s"] for r in rows}
    cpu = {r["tracing"]: r["cpu_us_per_request"] for r in rows}
    traced = [name for name in rps if name != "off"]
    return {
        **{f"req/s, {name} / off": rps[name] / rps["off"] for name in traced},
        **{f"server CPU per request, {name} / off": cpu[name] / cpu["off"] for name in traced},
    }


def summary(name: str, runs: list[dict[str, float]], spans: int, answered: int) -> dict[str, Any]:
    """The median round of one setting, and the spans its sink got per request it answered."""
    medians = {m: statistics.median(x[m] for x in runs) for m in METRICS}
    return {"tracing": name, "rounds": len(runs), **medians, "spans_per_request": spans / max(1, answered)}


def served(server: ServerProcess, model: str) -> int:
    """Requests the server answered OK so far (warm-ups included: its spans count them too)."""
    url = f"http://127.0.0.1:{server.listening['metrics_port']}/metrics"
    return int(metrics_scrape.scrape(url, model).get(f"{metrics_scrape.REQUESTS}:OK", 0.0))


def markdown(doc: dict) -> str:
    lines = [
        f"{doc['model']}, 1 image per request, closed loop c={doc['concurrency']}, KServe ModelInfer over "
        f"gRPC ({doc['client']}); CPU {doc['cpu']}, {doc['date']}, 1-minute load average "
        f"{doc['load_before']:.1f} at the start",
        "",
        "| tracing | req/s | p50 ms | p99 ms | server CPU us/request | spans exported per request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['tracing']} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['cpu_us_per_request']:.0f} | {r['spans_per_request']:.3f} |"
        )
    return "\n".join(lines + ratio_lines(doc["ratios"])) + "\n"


def parse_args(argv: list[str] | None) -> TraceBench:
    p = argparse.ArgumentParser(prog="python -m bench.trace_bench", description=__doc__.split("\n")[0])
    add_run_args(p)
    p.add_argument("--concurrency", type=int, default=16, help="requests kept in flight")
    a = parse_run_args(p, argv)
    if a.concurrency < 1 or a.rounds < 1 or a.duration <= 0 or a.warmup < 0:
        p.error("--concurrency and --rounds must be >= 1, --duration > 0, --warmup >= 0")
    h2load = not a.no_h2load and h2load_client.available()
    return TraceBench(a.repository, a.model, a.concurrency, a.duration, a.warmup, a.rounds, h2load, a.out_dir)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    doc = run(cfg)
    write_report(cfg.out_dir, "trace_bench", doc, markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
