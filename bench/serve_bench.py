"""Serving benchmark: how close cnn-serve gets to what this machine can do, in one run.

For a LeNet-5 (Fashion-MNIST, 1x28x28) and a ResNet-18 (CIFAR-10, 3x32x32) exported by cnn-export
(untrained weights unless --checkpoint gives trained ones: speed does not depend on them):

1. in-process onnxruntime at batch 1 and at the server's max batch (same session options);
2. bench/echo_server.py: a bare grpc.aio server answering Classify with canned bytes (RPC ceiling);
3. bench/naive_server.py: one onnxruntime call per RPC, no batching;
4. cnn-serve at concurrency 1, 16, 64 with 1-image requests and at 64 with 32-image requests;

then the ratios against the targets. Every server is a subprocess on 127.0.0.1 (its own GIL) and
is stopped at the end; the client is loadtest's pre-serialized uvloop client in this process.
Finally the client's own ceiling: loadtest against the echo server with 1 and 2 client processes.

    .venv/bin/python -m bench.serve_bench --out-dir artifacts/bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import h2load_client
from bench.procs import cpu_seconds, free_port, server_process
from bench.serve_models import prepare_repository
from bench.serve_report import MODELS, merge_repeats, ratio_table, ratios, table
from cnnstack.contract import MODEL_FILE
from cnnstack.serverproc import ServerProcess
from loadtest import metrics_scrape
from loadtest.client import LocalClient
from loadtest.multiproc import MultiProcClient
from loadtest.payload import CLASSIFY_METHOD, build_payloads, load_images
from loadtest.runner import StepSpec

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchConfig:
    out_dir: Path
    checkpoints: dict[str, Path]
    max_batch: int = 64
    concurrency: tuple[int, ...] = (1, 16, 64)
    big_request: int = 32
    warmup_s: float = 1.0
    window_s: float = 1.0
    duration_s: float = 8.0
    inprocess_s: float = 3.0
    models: tuple[str, ...] = tuple(MODELS)
    repeat: int = 1
    ceiling: bool = True
    server_args: tuple[str, ...] = ()
    h2load: bool = True  # also drive echo and cnn-serve with h2load, where it is installed
    h2load_s: float = 5.0


# ---------------------------------------------------------------- 1. in-process onnxruntime


def inprocess(model_file: Path, batch: int, seconds: float) -> dict[str, float]:
    """images/s and per-call latency of session.run at ``batch``, cnn-serve's session options."""
    import onnxruntime as ort

    from server.runtime.sessions import session_options, threads_per_instance

    sess = ort.InferenceSession(
        str(model_file), session_options(threads_per_instance(0, 1)), providers=["CPUExecutionProvider"]
    )
    shape = [d if isinstance(d, int) else batch for d in sess.get_inputs()[0].shape]
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).random(shape, dtype=np.float32)}
    for _ in range(10):
        sess.run(None, feed)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    times.sort()
    return {"images_per_s": batch * len(times) / sum(times), "p50_ms": times[len(times) // 2] * 1e3}


# ---------------------------------------------------------------- servers as subprocesses


# ---------------------------------------------------------------- load steps


def load_step(
    cfg: BenchConfig,
    target: str,
    model: str,
    shape: tuple[int, int, int],
    k: int,
    concurrency: int,
    processes: int = 1,
    metrics_url: str | None = None,
    expected_latency_s: float = 0.0,
    pid: int | None = None,
) -> dict[str, Any]:
    images = load_images("synthetic", shape, max(1, 2048 // k) * k, seed=0)  # (N, C, H, W)
    payloads = build_payloads("classify", images, k, model, 0)
    # A step whose requests take seconds (64 x 32 ResNet images queue behind each other) needs a
    # warm-up of about one latency to reach steady state, and windows long enough to hold several
    # completions.
    warmup = min(30.0, max(cfg.warmup_s, 1.2 * expected_latency_s))
    window = min(4.0, max(cfg.window_s, expected_latency_s / 3))
    duration = max(cfg.duration_s, 3 * window)
    spec = StepSpec("closed", float(concurrency), warmup, window, duration, 10_000_000, 60.0)
    client: LocalClient | MultiProcClient
    if processes == 1:
        client = LocalClient(target, "classify", payloads, k, 3, 10.0)
    else:
        client = MultiProcClient(target, CLASSIFY_METHOD, payloads, k, processes, 3, 10.0)
    before = metrics_scrape.scrape(metrics_url, model) if metrics_url else None
    # CPU time per answered request, server and client: unlike throughput on a machine shared with
    # other work, it hardly depends on what else is running, so it shows where the cost is.
    server_cpu0, client_cpu0 = cpu_seconds(pid) if pid else 0.0, time.process_time()
    try:
        r = client.run_step(spec)
    finally:
        client.close()
    client_cpu = time.process_time() - client_cpu0
    server_cpu = cpu_seconds(pid) - server_cpu0 if pid else float("nan")
    if metrics_url and before is not None:
        r.server = metrics_scrape.step_summary(before, metrics_scrape.scrape(metrics_url, model))
    d = r.to_dict()
    d["server_cpu_us_per_request"] = server_cpu / max(r.ok, 1) * 1e6
    d["client_cpu_us_per_request"] = client_cpu / max(r.ok, 1) * 1e6 if processes == 1 else float("nan")
    errors = sum(r.errors_total.values())
    print(
        f"[bench]   c={concurrency:<3} k={k:<2} p={processes}: {r.requests_per_s:8.1f} req/s {r.images_per_s:8.1f} img/s "
        f"p50 {r.latency_ms['p50_ms']:.2f} ms p99 {r.latency_ms['p99_ms']:.2f} ms "
        f"{'stable' if r.stable else 'NOT STABLE'} errors={errors} cpu/req server "
        f"{d['server_cpu_us_per_request']:.0f} us client {d['client_cpu_us_per_request']:.0f} us"
        + (f" server={r.server}" if r.server else ""),
        flush=True,
    )
    return d


def h2load_step(
    cfg: BenchConfig,
    target: str,
    model: str,
    shape: tuple[int, int, int],
    concurrency: int,
    pid: int,
    metrics_url: str | None = None,
) -> dict[str, Any]:
    """1-image requests from h2load (C client, ~no client cost); same keys as ``load_step``'s result.

    h2load cannot see gRPC status (it is in trailers): for cnn-serve the step's OK count on its own
    /metrics must cover every response h2load got (else RuntimeError), and other codes count as errors."""
    message = build_payloads("classify", load_images("synthetic", shape, 1, seed=0), 1, model, 0)[0]
    before = metrics_scrape.scrape(metrics_url, model) if metrics_url else None
    cpu0 = cpu_seconds(pid)
    r = h2load_client.run_h2load(
        target,
        CLASSIFY_METHOD,
        message,
        concurrency=concurrency,
        duration_s=cfg.h2load_s,
        warmup_s=cfg.warmup_s,
    )
    server_cpu = cpu_seconds(pid) - cpu0
    d: dict[str, Any] = {
        "requests_per_s": r.requests_per_s,
        "images_per_s": r.requests_per_s,
        "latency_ms": r.latency_ms,
        "ok": r.requests,
        "errors": r.failed,
        "client": "h2load",
    }
    # CPU over the whole call (warm-up included) per measured response: an upper bound.
    d["server_cpu_us_per_request"] = server_cpu / max(r.requests, 1) * 1e6
    if metrics_url and before is not None:
        after = metrics_scrape.scrape(metrics_url, model)
        codes = {
            k.split(":", 1)[1]: v - before.get(k, 0.0)
            for k, v in after.items()
            if k.startswith(metrics_scrape.REQUESTS + ":")
        }
        ok = codes.pop("OK", 0.0)
        # h2load resets the streams still open when its time is up: the server counts those
        # CANCELLED (up to `concurrency` of them); they are not failures of the server.
        d["cancelled_at_end"] = int(codes.pop("CANCELLED", 0.0))
        d["errors"] += int(sum(codes.values()))
        if ok < r.requests:
            raise RuntimeError(f"h2load counted {r.requests} responses but {target} answered {ok:.0f} OK")
        d["server"] = metrics_scrape.step_summary(before, after)
    print(
        f"[bench]   h2load c={concurrency:<3}: {r.requests_per_s:8.1f} req/s p50 {r.latency_ms['p50_ms']:.2f} ms "
        f"p99 {r.latency_ms['p99_ms']:.2f} ms errors={d['errors']} "
        f"cancelled-at-end={d.get('cancelled_at_end', 0)} cpu/req server "
        f"{d['server_cpu_us_per_request']:.0f} us",
        flush=True,
    )
    return d


def bench_model(cfg: BenchConfig, repo: Path, name: str) -> dict[str, Any]:
    _, _, shape = MODELS[name]
    model_file = repo / name / "1" / MODEL_FILE
    out: dict[str, Any] = {"shape": list(shape)}
    print(f"[bench] {name}: in-process onnxruntime", flush=True)
    out["inprocess_b1"] = inprocess(model_file, 1, cfg.inprocess_s)
    out["inprocess_max"] = inprocess(model_file, cfg.max_batch, cfg.inprocess_s)
    print(
        f"[bench]   batch 1: {out['inprocess_b1']}  batch {cfg.max_batch}: {out['inprocess_max']}", flush=True
    )

    port = free_port()
    target = f"127.0.0.1:{port}"
    py = sys.executable
    print(f"[bench] {name}: bare echo server", flush=True)
    echo = [
        py,
        "-m",
        "bench.echo_server",
        "--port",
        str(port),
        "--model",
        name,
        "--input-shape",
        ",".join(map(str, shape)),
    ]
    h2 = cfg.h2load and h2load_client.available()
    with server_process(echo, target, name) as proc:
        out["echo"] = {c: load_step(cfg, target, name, shape, 1, c, pid=proc.pid) for c in (1, 64)}
        if h2:
            out["echo_h2"] = {c: h2load_step(cfg, target, name, shape, c, proc.pid) for c in (1, 64)}
    print(f"[bench] {name}: naive server (one session.run per RPC)", flush=True)
    naive = [py, "-m", "bench.naive_server", "--model-file", str(model_file), "--port", str(port)]
    with server_process(naive, target, name) as proc:
        out["naive"] = {c: load_step(cfg, target, name, shape, 1, c, pid=proc.pid) for c in cfg.concurrency}
    print(f"[bench] {name}: cnn-serve", flush=True)
    ours = ServerProcess(
        "--metrics-port",
        "0",
        "--poll-interval-s",
        "0",
        "--log-level",
        "WARNING",
        *cfg.server_args,
        repository=repo,
        cwd=ROOT,
    )
    with ours:
        target, pid = ours.target, ours.pid
        murl = f"http://127.0.0.1:{ours.listening['metrics_port']}/metrics"
        out["ours"] = {
            c: load_step(cfg, target, name, shape, 1, c, metrics_url=murl, pid=pid) for c in cfg.concurrency
        }
        top = max(cfg.concurrency)
        # Latency to expect with top x big_request images in flight, at the 1-image throughput.
        expected = top * cfg.big_request / max(out["ours"][top]["images_per_s"], 1e-3)
        out["ours_big"] = load_step(
            cfg,
            target,
            name,
            shape,
            cfg.big_request,
            top,
            metrics_url=murl,
            expected_latency_s=expected,
            pid=pid,
        )
        if h2:
            out["ours_h2"] = {c: h2load_step(cfg, target, name, shape, c, pid, murl) for c in (1, 64)}
    return out


def client_ceiling(cfg: BenchConfig) -> dict[int, Any]:
    """The load tool's own limit: requests/s it drives into the bare echo server."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    shape = MODELS["lenet"][2]
    echo = [sys.executable, "-m", "bench.echo_server", "--port", str(port), "--model", "lenet"]
    with server_process(echo, target, "lenet") as proc:
        print("[bench] client ceiling: loadtest -> echo, 1 and 2 client processes", flush=True)
        return {p: load_step(cfg, target, "lenet", shape, 1, 64, processes=p, pid=proc.pid) for p in (1, 2)}


def parse_args(argv: list[str] | None) -> BenchConfig:
    p = argparse.ArgumentParser(description="cnn-serve serving benchmark (see the module docstring)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "artifacts" / "bench")
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help=f"trained checkpoint for one of {list(MODELS)} (default: untrained weights)",
    )
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument(
        "--repeat", type=int, default=1, help="runs of everything; each setup reports its median run"
    )
    p.add_argument("--duration", type=float, default=8.0, help="max measured seconds per load step")
    p.add_argument("--no-ceiling", action="store_true", help="skip the client-ceiling measurement")
    p.add_argument("--no-h2load", action="store_true", help="skip the h2load (C client) steps")
    p.add_argument("--server-arg", action="append", default=[], help="extra cnn-serve flag (repeatable)")
    a = p.parse_args(argv)
    ckpts = {}
    for item in a.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or name not in MODELS:
            p.error(f"--checkpoint takes NAME=PATH with NAME in {list(MODELS)}, got {item!r}")
        ckpts[name] = Path(path)
    models = tuple(m for m in a.models.split(",") if m)
    if not models or any(m not in MODELS for m in models):
        p.error(f"--models takes names from {list(MODELS)}, got {a.models!r}")
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    return BenchConfig(
        out_dir=a.out_dir,
        checkpoints=ckpts,
        models=models,
        repeat=a.repeat,
        duration_s=a.duration,
        ceiling=not a.no_ceiling,
        server_args=tuple(a.server_arg),
        h2load=not a.no_h2load,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    repo = prepare_repository(cfg.out_dir, cfg.models, cfg.checkpoints, cfg.max_batch)
    started, load_before = time.time(), os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cfg.models}
    for rep in range(cfg.repeat):
        for name in cfg.models:
            print(f"[bench] ---- {name}, run {rep + 1}/{cfg.repeat}", flush=True)
            runs[name].append(bench_model(cfg, repo, name))
    results: dict[str, Any] = {name: merge_repeats(r) for name, r in runs.items()}
    if cfg.ceiling:
        results["client_ceiling"] = client_ceiling(cfg)
    rat = ratios(results, max(cfg.concurrency))
    command = "python -m bench.serve_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"`{command.strip()}` on {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after; median of {cfg.repeat} run(s) per setup.",
        "",
        table(results, cfg.max_batch, cfg.concurrency, cfg.big_request),
        "",
        ratio_table(rat),
    ]
    if (cc := results.get("client_ceiling")) is not None:
        per_req = cc[1]["client_cpu_us_per_request"]
        lines += [
            "",
            f"Client ceiling (cnn-loadtest -> bare echo, c=64, 1 LeNet image per request): "
            f"{cc[1]['requests_per_s']:.0f} req/s with 1 client process, "
            f"{cc[2]['requests_per_s']:.0f} req/s with 2 (`--processes 2`); the client spends "
            f"{per_req:.0f} us of CPU per request, i.e. at most ~{1e6 / per_req:.0f} req/s per "
            f"client core (the echo server spent {cc[1]['server_cpu_us_per_request']:.0f} us).",
        ]
    markdown = "\n".join(lines) + "\n"
    print("\n" + markdown)
    doc = {
        "started_unix": started,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "command": command,
        "config": {k: str(v) for k, v in cfg.__dict__.items()},
        "results": results,
        "raw_runs": runs,
        "ratios": rat,
    }
    (cfg.out_dir / "serve_bench.json").write_text(
        json.dumps(doc, indent=2, default=str).replace("NaN", "null") + "\n"
    )
    (cfg.out_dir / "serve_bench.md").write_text(markdown)
    print(f"wrote {cfg.out_dir / 'serve_bench.json'} and serve_bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
