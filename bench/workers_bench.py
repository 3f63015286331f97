"""``cnn-serve --workers N`` benchmark: requests/s for each worker count, in one run.

1-image requests to one exported model (LeNet by default) from h2load (C, so the client takes
little of the cores it shares with the server), ``--concurrency`` streams in flight over
``--connections`` HTTP/2 connections, against ``cnn-serve --workers N`` for each N of
``--workers`` (1 is the plain single-process server). All the servers are started first and the
rounds alternate between them (N1, N2, N1, N2, ...), so that other work on a shared machine
weighs on every N alike. Each round opens new connections: the kernel hashes each connection to
one worker, so 4 connections over 2 workers split 2/2, 3/1 or 4/0 by chance, and each round
reports its split (measured through each worker's own ModelStatistics) and the server's CPU time
per request. The figure of an N is its median round; the ratio is against the first N.

    .venv/bin/python -m bench.workers_bench --repository artifacts/repository --model lenet
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench import h2load_client
from bench.procs import cpu_model, cpu_seconds, write_report
from cnnstack.serverproc import ServerProcess
from loadtest import metrics_scrape
from loadtest.client import describe_model
from loadtest.payload import CLASSIFY_METHOD, build_payloads, load_images
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from server.api.kserve.grpc import PID_METADATA

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class WorkersBench:
    repository: Path
    model: str
    workers: tuple[int, ...]
    connections: int
    concurrency: int
    duration_s: float
    warmup_s: float
    rounds: int
    device: str
    out_dir: Path


def worker_channels(target: str, pids: list[int], limit: int = 64) -> dict[int, grpc.Channel]:
    """One channel (its own connection) per worker pid, to read each worker's statistics."""
    out: dict[int, grpc.Channel] = {}
    for _ in range(limit):
        ch = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        _, call = ks_grpc.GRPCInferenceServiceStub(ch).ServerMetadata.with_call(
            ks.ServerMetadataRequest(), timeout=30
        )
        pid = int(dict(call.initial_metadata())[PID_METADATA])
        if pid in out:
            ch.close()
        else:
            out[pid] = ch
        if len(out) == len(pids):
            return out
    raise RuntimeError(f"{limit} connections did not reach every worker {pids}")


def inference_counts(channels: dict[int, grpc.Channel], model: str) -> dict[int, int]:
    req = ks.ModelStatisticsRequest(name=model)
    return {
        pid: sum(
            s.inference_count
            for s in ks_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(req, timeout=30).model_stats
        )
        for pid, ch in channels.items()
    }


def one_round(
    cfg: WorkersBench, server: ServerProcess, message: bytes, channels: dict[int, grpc.Channel]
) -> dict[str, Any]:
    murl = f"http://127.0.0.1:{server.listening['metrics_port']}/metrics"
    pids = [server.pid, *server.listening.get("workers", [])]
    before, counts0 = metrics_scrape.scrape(murl, cfg.model), inference_counts(channels, cfg.model)
    cpu0, t0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
    r = h2load_client.run_h2load(
        server.target,
        CLASSIFY_METHOD,
        message,
        concurrency=cfg.concurrency,
        duration_s=cfg.duration_s,
        warmup_s=cfg.warmup_s,
        connections=cfg.connections,
    )
    cpu, wall = sum(cpu_seconds(p) for p in pids) - cpu0, time.monotonic() - t0
    after, counts1 = metrics_scrape.scrape(murl, cfg.model), inference_counts(channels, cfg.model)
    ok = after.get(f"{metrics_scrape.REQUESTS}:OK", 0.0) - before.get(f"{metrics_scrape.REQUESTS}:OK", 0.0)
    if ok < r.requests:  # h2load cannot read gRPC statuses (trailers): the server's count must cover it
        raise RuntimeError(f"h2load counted {r.requests} responses but the server answered {ok:.0f} OK")
    served = sorted((counts1[p] - counts0[p] for p in counts1), reverse=True)
    split = [round(n / max(1, sum(served)), 2) for n in served]
    # CPU over the whole h2load call (its warm-up too) per measured response: an upper bound.
    return {
        "requests_per_s": r.requests_per_s,
        "latency_ms": r.latency_ms,
        "ok": r.requests,
        "failed": r.failed,
        "split": split,
        "server_cores": cpu / wall,
        "cpu_us_per_request": cpu / max(1, r.requests) * 1e6,
    }


def start_server(cfg: WorkersBench, n: int) -> tuple[ServerProcess, dict[int, grpc.Channel]]:
    args = [
        "--workers",
        str(n),
        "--metrics-port",
        "0",
        "--poll-interval-s",
        "0",
        "--log-level",
        "WARNING",
        "--device",
        cfg.device,
    ]
    server = ServerProcess(*args, repository=cfg.repository, cwd=ROOT)
    server.start()
    return server, worker_channels(server.target, server.listening.get("workers") or [server.pid])


def run_rounds(cfg: WorkersBench, message: bytes) -> dict[int, list[dict[str, Any]]]:
    """Every server started first, then the rounds alternate between them."""
    servers: dict[int, tuple[ServerProcess, dict[int, grpc.Channel]]] = {}
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in cfg.workers}
    try:
        for n in cfg.workers:
            servers[n] = start_server(cfg, n)
        for i in range(cfg.rounds):
            for n in cfg.workers:
                r = one_round(cfg, servers[n][0], message, servers[n][1])
                results[n].append(r)
                print(
                    f"[bench] round {i + 1}/{cfg.rounds} workers={n}: {r['requests_per_s']:8.0f} req/s  "
                    f"p50 {r['latency_ms']['p50_ms']:.2f} ms  p99 {r['latency_ms']['p99_ms']:.2f} ms  "
                    f"split {r['split']}  server {r['server_cores']:.2f} cores, "
                    f"{r['cpu_us_per_request']:.0f} us/request  failed {r['failed']}",
                    flush=True,
                )
    finally:
        for server, channels in servers.values():
            for ch in channels.values():
                ch.close()
            server.stop()
    return results


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(rounds, key=lambda r: r["requests_per_s"])[len(rounds) // 2]


def table(cfg: WorkersBench, results: dict[int, list[dict[str, Any]]]) -> str:
    base = median_round(results[cfg.workers[0]])["requests_per_s"]
    lines = [
        f"| workers | req/s (median round) | x workers={cfg.workers[0]} | p50 / p99 ms | server cores | "
        "CPU us/request | every round: req/s (split of requests over workers) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, rounds in results.items():
        med = median_round(rounds)
        each = ", ".join(
            f"{r['requests_per_s']:.0f} ({'/'.join(f'{x:.2f}' for x in r['split'])})" for r in rounds
        )
        lines.append(
            f"| {n} | {med['requests_per_s']:.0f} | {med['requests_per_s'] / base:.2f}x | "
            f"{med['latency_ms']['p50_ms']:.2f} / {med['latency_ms']['p99_ms']:.2f} | "
            f"{med['server_cores']:.2f} | {med['cpu_us_per_request']:.0f} | {each} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> WorkersBench:
    p = argparse.ArgumentParser(description="cnn-serve --workers benchmark (see the module docstring)")
    p.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "repository")
    p.add_argument("--model", default="lenet")
    p.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2,4,8")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=64, help="streams in flight (h2load -c x -m)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per round")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=5, help="h2load runs per worker count, new connections each")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", type=Path, default=ROOT / "artifacts" / "bench")
    a = p.parse_args(argv)
    workers = tuple(int(w) for w in a.workers.split(",") if w)
    if not workers or min(workers) < 1 or a.rounds < 1 or a.concurrency % a.connections:
        p.error("--workers takes counts >= 1, --rounds >= 1, --concurrency must divide by --connections")
    return WorkersBench(
        a.repository,
        a.model,
        workers,
        a.connections,
        a.concurrency,
        a.duration,
        a.warmup,
        a.rounds,
        a.device,
        a.out_dir,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if not h2load_client.available():
        print("h2load not found: apt-get install -y nghttp2-client", file=sys.stderr)
        return 2
    started, load0 = time.time(), os.getloadavg()
    with ServerProcess(
        "--metrics-port",
        "-1",
        "--poll-interval-s",
        "0",
        "--device",
        cfg.device,
        repository=cfg.repository,
        cwd=ROOT,
    ) as probe:
        shape = describe_model(probe.target, "classify", cfg.model, 0).shape  # the model's input, as served
    assert shape is not None, "ListModels always gives the input shape"
    message = build_payloads("classify", load_images("synthetic", shape, 1, seed=0), 1, cfg.model, 0)[0]
    results = run_rounds(cfg, message)
    command = "python -m bench.workers_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    head = (
        f"`{command.strip()}`: {cfg.model}, 1-image requests, h2load {cfg.concurrency} in flight over "
        f"{cfg.connections} connections, {cfg.duration_s:g} s x {cfg.rounds} rounds per worker count; "
        f"{cpu_model()}, {os.cpu_count()} cores, load average {load0[0]:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after, {time.strftime('%Y-%m-%d', time.localtime(started))}."
    )
    markdown = head + "\n\n" + table(cfg, results) + "\n"
    print("\n" + markdown)
    doc = {
        "command": command,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "started_unix": started,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "config": {k: str(v) for k, v in cfg.__dict__.items()},
        "results": results,
    }
    write_report(cfg.out_dir, "workers_bench", doc, markdown)
    print(f"wrote {cfg.out_dir / 'workers_bench.json'} and workers_bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
