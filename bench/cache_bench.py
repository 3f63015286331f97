"""The response cache: the hit path's latency and throughput beside the miss path's (and beside the
cache switched off), and the hash of its key, xxh3-128 against blake3.

For each model (LeNet and fmnist by default) three cnn-serve processes serve a copy of the
repository whose config.pbtxt says ``response_cache { enable: true }``:

- ``off``: ``--cache-size-bytes 0``: the server has no cache, every request is batched and run;
- ``miss``: a cache (``--miss-cache-bytes``) that holds one entry of a 10-class model, while each
  of cnn-loadtest's closed-loop workers cycles through at least two of its 64 distinct requests:
  every request misses, is hashed, looked up, run, stored, and evicts the entry before it (the miss
  path at its most expensive);
- ``hit``: a 64 MiB cache: once the warm-up sent the 64 distinct requests, every request hits.

Beside them, in this process: what the cache's own work costs per request (a hit; a miss that
stores and evicts), and the key's hash.

The three servers run with the same ``--inline-compute-us`` (1000 by default): batch 1 of both
models runs on the event loop in each, so that they differ only in their cache (the server's
default leaves that to a load-time timing, which may decide differently in each process on a busy
machine). Each is driven by cnn-loadtest (``--api kserve``, gRPC, 1 image per request, closed loop
at each ``--concurrency``), the command a user runs; rounds alternate the three so that other work
on a shared machine weighs on each alike; each figure is its median round. The hits and misses of
each run are read from the server's /metrics (``cnn_cache_hits_total``, ``cnn_cache_misses_total``):
a run that did not take the path its name says (on ``miss`` a hit other than cnn-loadtest's
preflight request repeated, on ``hit`` more misses than distinct requests) stops the benchmark. The
server-side mean latency (``cnn_request_latency_seconds``) is printed beside the client's
percentiles: the client shares the cores and is the limit on requests/s long before a hit is.

    .venv/bin/python -m bench.cache_bench --repository artifacts/repository --models lenet,fmnist
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from prometheus_client import CollectorRegistry

from bench.procs import cpu_model, write_report
from cnnstack.contract import CONFIG_FILE
from cnnstack.serverproc import ServerProcess
from loadtest import metrics_scrape
from loadtest.payload import MAX_PAYLOADS
from server.metrics import ServerMetrics
from server.runtime.cache import ResponseCache, entry_bytes

ROOT = Path(__file__).resolve().parents[1]
MODES = ("off", "miss", "hit")
HIT_CACHE_BYTES = 64 << 20
HITS, MISSES = "cnn_cache_hits_total", "cnn_cache_misses_total"
LATENCY = "cnn_request_latency_seconds"


@dataclass(frozen=True)
class CacheBench:
    repository: Path
    models: tuple[str, ...]
    concurrency: tuple[int, ...]
    duration_s: float
    warmup_s: float
    rounds: int
    miss_cache_bytes: int
    inline_compute_us: float
    out_dir: Path


def cached_repository(src: Path, models: tuple[str, ...], dst: Path) -> Path:
    """A copy of ``models`` from ``src`` whose config.pbtxt enables the response cache."""
    for name in models:
        shutil.copytree(src / name, dst / name)
        config = dst / name / CONFIG_FILE
        config.write_text(config.read_text() + "response_cache {\n  enable: true\n}\n")
    return dst


def start_server(repository: Path, cache_bytes: int, inline_compute_us: float) -> ServerProcess:
    args = ["--metrics-port", "0", "--poll-interval-s", "0", "--log-level", "WARNING", "--device", "cpu"]
    args += ["--cache-size-bytes", str(cache_bytes), "--inline-compute-us", str(inline_compute_us)]
    server = ServerProcess(*args, repository=repository, cwd=ROOT)
    server.start()
    return server


def loadtest(cfg: CacheBench, server: ServerProcess, model: str, c: int, tmp: Path) -> dict[str, Any]:
    """One cnn-loadtest run (a subprocess, as a user runs it) and the server's counters around it."""
    murl = f"http://127.0.0.1:{server.listening['metrics_port']}/metrics"
    before = metrics_scrape.scrape(murl, model)
    out = tmp / "step.json"
    cmd = [
        *(sys.executable, "-m", "loadtest", "--target", server.target, "--model", model),
        *("--api", "kserve", "--concurrency", str(c), "--duration", str(cfg.duration_s)),
        *("--warmup", str(cfg.warmup_s), "--window", str(cfg.duration_s / 4)),
        *("--stability-windows", "100", "--out", str(out), "--quiet"),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=cfg.duration_s * 3 + 120)
    after = metrics_scrape.scrape(murl, model)
    (step,) = json.loads(out.read_text())["steps"]
    if step["errors_total"]:
        raise RuntimeError(f"{model} c={c}: {step['errors_total']} errors")
    hits, misses = (after.get(k, 0.0) - before.get(k, 0.0) for k in (HITS, MISSES))
    served = after.get(f"{LATENCY}_count", 0.0) - before.get(f"{LATENCY}_count", 0.0)
    server_s = after.get(f"{LATENCY}_sum", 0.0) - before.get(f"{LATENCY}_sum", 0.0)
    lat = step["latency_ms"]
    return {
        "requests_per_s": step["requests_per_s"],
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "server_mean_ms": server_s / served * 1e3 if served else float("nan"),
        "hits": hits,
        "misses": misses,
        "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
    }


def check_path(mode: str, hits: float, misses: float) -> None:
    """Each mode measures the path its name says, or the figures mean nothing."""
    ok = {
        "off": hits == misses == 0,
        # cnn-loadtest's preflight sends its first request (a hit when the previous run on this
        # server ended with it), which its first worker then repeats: 2 hits at most
        "miss": hits <= 2 and misses > 0,
        "hit": hits > 0 and misses <= MAX_PAYLOADS,  # each distinct request misses once at most
    }[mode]
    if not ok:
        raise RuntimeError(f"the {mode} run took another path: {hits:.0f} hits, {misses:.0f} misses")


def run(cfg: CacheBench) -> dict[str, Any]:
    runs: dict[tuple[str, str, int], list[dict]] = {}
    load_before = os.getloadavg()
    sizes = {"off": 0, "miss": cfg.miss_cache_bytes, "hit": HIT_CACHE_BYTES}
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp_name:
        tmp = Path(tmp_name)
        repo = cached_repository(cfg.repository, cfg.models, tmp / "repository")
        servers = {mode: start_server(repo, sizes[mode], cfg.inline_compute_us) for mode in MODES}
        try:
            for rnd in range(cfg.rounds):
                for model in cfg.models:
                    for c in cfg.concurrency:
                        for mode in MODES:
                            r = loadtest(cfg, servers[mode], model, c, tmp)
                            check_path(mode, r["hits"], r["misses"])
                            runs.setdefault((model, mode, c), []).append(r)
                            print(f"round {rnd + 1} {model:>8} {mode:>4} c={c:<3} {line(r)}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    metrics = ("requests_per_s", "p50_ms", "p99_ms", "server_mean_ms", "hit_ratio")
    rows = [
        {"model": k[0], "mode": k[1], "concurrency": k[2], "rounds": len(v)}
        | {m: statistics.median(x[m] for x in v) for m in metrics}
        for k, v in runs.items()
    ]
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "rows": rows,
        "ratios": ratios(rows),
        "hashes": hash_rates(),
        "operations": operation_costs(),
    }


def line(r: dict) -> str:
    return (
        f"{r['requests_per_s']:8.0f} req/s p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} ms, "
        f"server mean {r['server_mean_ms']:.3f} ms, hit ratio {r['hit_ratio']:.3f}"
    )


def ratios(rows: list[dict]) -> dict[str, float]:
    """Per model and concurrency: hit / miss requests/s, miss / hit p50, p99 and server-side mean
    latency, miss / off requests/s."""
    by = {(r["model"], r["mode"], r["concurrency"]): r for r in rows}
    out = {}
    for (model, mode, c), hit in sorted(by.items()):
        miss, off = by.get((model, "miss", c)), by.get((model, "off", c))
        if mode != "hit" or miss is None:
            continue
        out[f"{model} c={c}: hit / miss req/s"] = hit["requests_per_s"] / miss["requests_per_s"]
        out[f"{model} c={c}: miss / hit p50"] = miss["p50_ms"] / hit["p50_ms"]
        out[f"{model} c={c}: miss / hit p99"] = miss["p99_ms"] / hit["p99_ms"]
        out[f"{model} c={c}: miss / hit server mean"] = miss["server_mean_ms"] / hit["server_mean_ms"]
        if off is not None:
            out[f"{model} c={c}: miss / off req/s"] = miss["requests_per_s"] / off["requests_per_s"]
    return out


def hash_rates(shape: tuple[int, int, int] = (1, 28, 28), repeats: int = 5) -> list[dict]:
    """Microseconds to hash one request's input (1 and 64 images of ``shape``, float32) with xxh3-128
    and, when it is installed, blake3: each input distinct, 8 MiB of them, best of ``repeats``."""
    seed = 0x9E3779B97F4A7C15  # the server seeds xxh3 (server/runtime/cache.py)
    hashes: dict[str, Any] = {"xxh3_128": lambda b: xxhash.xxh3_128_digest(b, seed)}
    try:
        import blake3

        hashes["blake3"] = lambda b: blake3.blake3(b).digest()
    except ImportError:
        print("blake3 is not installed (pip install blake3): xxh3-128 only", file=sys.stderr)
    rng = np.random.default_rng(0)
    out = []
    for n in (1, 64):
        count = max(1, (8 << 20) // (n * 4 * int(np.prod(shape))))
        inputs = [rng.random((n, *shape), dtype=np.float32) for _ in range(count)]
        for name, digest in hashes.items():
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for x in inputs:
                    digest(x.data.cast("B"))  # blake3 takes byte buffers only
                best = min(best, (time.perf_counter() - t0) / count)
            out.append({"hash": name, "images": n, "bytes": inputs[0].nbytes, "us": best * 1e6})
    return out


class _Version:
    """What the cache reads of a served version (hashed by identity, as ServedVersion is)."""

    def __init__(self) -> None:
        self.name, self.version, self.accepting = "bench", 1, True
        self.files = types.SimpleNamespace(fingerprint=(1, 2, 3, (4, 5), "0123456789abcdef"))


def operation_costs(shape: tuple[int, int, int] = (1, 28, 28), classes: int = 10) -> list[dict]:
    """Microseconds of the cache's own work in the server's process, per request of 1 and 64 images:
    a hit (hash, lookup, counter) and a miss that stores its answer and evicts one (hash, lookup,
    copies of the 5 output arrays the batch function returns, eviction, counters, bytes gauge)."""
    rng = np.random.default_rng(0)
    out = []
    for n in (1, 64):
        probs = rng.random((n, classes), dtype=np.float32)
        outputs = [probs, probs, probs, probs.argmax(axis=1), probs.max(axis=1)]
        inputs = [rng.random((n, *shape), dtype=np.float32) for _ in range(64)]
        served: Any = _Version()
        for what, capacity in (("hit", 1 << 30), ("miss + store + evict", entry_bytes(outputs))):
            cache = ResponseCache(capacity, ServerMetrics(CollectorRegistry()))
            cache.attach(served)
            if what == "hit":
                key, _ = cache.lookup(served, inputs[0])
                assert key is not None and cache.put(served, key, outputs)
                xs = [inputs[0]] * len(inputs)
            else:
                xs = inputs  # 64 distinct inputs through a one-entry cache: every one misses
            best = float("inf")
            for _ in range(20):
                t0 = time.perf_counter()
                for x in xs:
                    key, hit = cache.lookup(served, x)
                    if hit is None and key is not None:
                        cache.put(served, key, outputs)
                best = min(best, (time.perf_counter() - t0) / len(xs))
            out.append({"operation": what, "images": n, "us": best * 1e6})
    return out


def markdown(doc: dict) -> str:
    lines = [
        f"1 image per request, gRPC (KServe v2), cnn-loadtest closed loop; CPU {doc['cpu']}, "
        f"{doc.get('cores', '?')} cores, load average {doc.get('loadavg_before', [0])[0]:.1f} before / "
        f"{doc.get('loadavg_after', [0])[0]:.1f} after, {doc['date']}",
        "",
        "| model | path | concurrency | req/s | p50 ms | p99 ms | server mean ms | hit ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['concurrency']} | {r['requests_per_s']:,.0f} "
            f"| {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['server_mean_ms']:.3f} | {r['hit_ratio']:.3f} |"
        )
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in doc["ratios"].items()]
    lines += ["", "| key hash | images | input bytes | us per input |", "|---|---:|---:|---:|"]
    lines += [f"| {h['hash']} | {h['images']} | {h['bytes']:,} | {h['us']:.2f} |" for h in doc["hashes"]]
    lines += ["", "| cache operation (in process) | images | us per request |", "|---|---:|---:|"]
    lines += [f"| {o['operation']} | {o['images']} | {o['us']:.2f} |" for o in doc.get("operations", [])]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> CacheBench:
    p = argparse.ArgumentParser(prog="python -m bench.cache_bench", description=__doc__.split("\n")[0])
    p.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "repository")
    p.add_argument("--models", default="lenet,fmnist")
    p.add_argument("--concurrency", default="1,16", help="closed-loop steps, e.g. 1,16")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="also sends the hit server its 64 first misses")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--miss-cache-bytes",
        type=int,
        default=2048,
        help="the miss server's cache: one entry of a 10-class model (a bigger model's entry is not stored)",
    )
    p.add_argument(
        "--inline-compute-us",
        type=float,
        default=1000.0,
        help="every server's --inline-compute-us (see the module's doc)",
    )
    p.add_argument("--out-dir", type=Path, default=ROOT / "artifacts" / "bench")
    a = p.parse_args(argv)
    models = tuple(m for m in a.models.split(",") if m)
    for m in models:
        if not (a.repository / m).is_dir():
            p.error(f"no model {m!r} in {a.repository}: run cnn-pipeline (or cnn-export) first")
    conc = tuple(int(v) for v in a.concurrency.split(","))
    if max(conc) >= MAX_PAYLOADS:
        p.error(f"--concurrency below {MAX_PAYLOADS}: a worker must cycle through two requests or more")
    return CacheBench(
        a.repository,
        models,
        conc,
        a.duration,
        a.warmup,
        a.rounds,
        a.miss_cache_bytes,
        a.inline_compute_us,
        a.out_dir,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    doc = run(cfg)
    write_report(cfg.out_dir, "cache_bench", doc, markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
