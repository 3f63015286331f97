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

    .venv/bin/python bench/serve_bench.py --out-dir artifacts/bench          # ~5 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest import metrics_scrape  # noqa: E402
from loadtest.client import LocalClient, describe_model  # noqa: E402
from loadtest.multiproc import MultiProcClient  # noqa: E402
from loadtest.payload import CLASSIFY_METHOD, build_payloads, load_images  # noqa: E402
from loadtest.runner import StepSpec  # noqa: E402

MODELS = {  # name -> (arch, dataset, input shape, class names)
    "lenet": ("lenet5", "fashion-mnist", (1, 28, 28)),
    "resnet18": ("resnet18", "cifar10", (3, 32, 32)),
}
TARGETS = {
    "resnet18 c=64 1-img: ours / in-process max batch": 0.75,
    "resnet18 c=64 32-img: ours / in-process max batch": 0.9,
    "resnet18 c=64: ours / naive": 1.8,
    "lenet c=64 1-img: ours / bare echo": 0.8,
}


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
    server_args: tuple[str, ...] = ()


# ---------------------------------------------------------------- model repository


def write_untrained_checkpoint(name: str, path: Path) -> None:
    from trainer.checkpoint import SCHEMA_VERSION, save_checkpoint
    from trainer.data import FASHION_MNIST_CLASSES, STATS
    from trainer.meta import ModelMeta
    from trainer.models import get_model

    arch, dataset, shape = MODELS[name]
    classes = FASHION_MNIST_CLASSES if dataset == "fashion-mnist" else tuple(f"class{i}" for i in range(10))
    args = {"in_channels": shape[0], "num_classes": len(classes), "image_size": shape[1]}
    model = get_model(arch, **args).eval()
    meta = ModelMeta(arch, dataset, shape, *STATS[dataset], class_names=classes)
    ckpt = {"schema_version": SCHEMA_VERSION, "arch": arch, "model_args": args, "meta": meta.to_dict(),
            "state_dict": model.state_dict(), "optimizer": None, "scheduler": None, "epoch": 0,
            "metrics": {}, "config": {"note": "untrained, for serve_bench"}}  # fmt: skip
    save_checkpoint(path, ckpt)


def prepare_repository(cfg: BenchConfig) -> Path:
    repo = cfg.out_dir / "models"
    for name in MODELS:
        if (repo / name / "1" / "model.onnx").is_file():
            continue
        ckpt = cfg.checkpoints.get(name) or cfg.out_dir / "checkpoints" / f"{name}.pt"
        if name not in cfg.checkpoints and not ckpt.is_file():
            write_untrained_checkpoint(name, ckpt)
        cmd = [sys.executable, "-m", "exporter", str(ckpt), "-r", str(repo), "--name", name, "--no-progress",
               "--parity-samples", "512", "--batch1-samples", "8", "--bench-seconds", "0.2",
               "--max-batch-size", str(cfg.max_batch)]  # fmt: skip
        print(f"[bench] exporting {name}: {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=900)
    return repo


# ---------------------------------------------------------------- 1. in-process onnxruntime


def inprocess(model_file: Path, batch: int, seconds: float) -> dict[str, float]:
    """images/s and per-call latency of session.run at ``batch``, cnn-serve's session options."""
    import onnxruntime as ort

    from server.runtime import session_options, threads_per_instance

    sess = ort.InferenceSession(str(model_file), session_options(threads_per_instance(0, 1)),
                                providers=["CPUExecutionProvider"])  # fmt: skip
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server_process(cmd: list[str], target: str, model: str, startup_s: float = 120.0) -> Iterator[None]:
    """Start ``cmd``, wait until ``target`` lists ``model``, stop it (SIGTERM, then SIGKILL) after."""
    log = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                describe_model(target, "classify", model, 0, timeout=2.0)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"server did not list {model} within {startup_s}s: {' '.join(cmd)}"
                    ) from None
                time.sleep(0.3)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


# ---------------------------------------------------------------- load steps


def load_step(
    cfg: BenchConfig, target: str, model: str, shape: tuple[int, int, int], k: int, concurrency: int,
    processes: int = 1, metrics_url: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    images = load_images("synthetic", shape, 64 * k, seed=0)  # (N, C, H, W)
    payloads = build_payloads("classify", images, k, model, 0)
    spec = StepSpec(
        "closed", float(concurrency), cfg.warmup_s, cfg.window_s, cfg.duration_s, 10_000_000, 30.0
    )
    client: LocalClient | MultiProcClient
    if processes == 1:
        client = LocalClient(target, "classify", payloads, k, 3, 10.0)
    else:
        client = MultiProcClient(target, CLASSIFY_METHOD, payloads, k, processes, 3, 10.0)
    before = metrics_scrape.scrape(metrics_url, model) if metrics_url else None
    try:
        r = client.run_step(spec)
    finally:
        client.close()
    if metrics_url and before is not None:
        r.server = metrics_scrape.step_summary(before, metrics_scrape.scrape(metrics_url, model))
    errors = sum(r.errors_total.values())
    print(f"[bench]   c={concurrency:<3} k={k:<2} p={processes}: {r.requests_per_s:8.1f} req/s {r.images_per_s:8.1f} img/s "
          f"p50 {r.latency_ms['p50_ms']:.2f} ms p99 {r.latency_ms['p99_ms']:.2f} ms "
          f"{'stable' if r.stable else 'NOT STABLE'} errors={errors}"
          + (f" server={r.server}" if r.server else ""), flush=True)  # fmt: skip
    return r.to_dict()


def bench_model(cfg: BenchConfig, repo: Path, name: str) -> dict[str, Any]:
    _, _, shape = MODELS[name]
    model_file = repo / name / "1" / "model.onnx"
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
        "bench/echo_server.py",
        "--port",
        str(port),
        "--model",
        name,
        "--input-shape",
        ",".join(map(str, shape)),
    ]
    with server_process(echo, target, name):
        out["echo"] = {c: load_step(cfg, target, name, shape, 1, c) for c in (1, 64)}
    print(f"[bench] {name}: naive server (one session.run per RPC)", flush=True)
    with server_process(
        [py, "bench/naive_server.py", "--model-file", str(model_file), "--port", str(port)], target, name
    ):
        out["naive"] = {c: load_step(cfg, target, name, shape, 1, c) for c in cfg.concurrency}
    print(f"[bench] {name}: cnn-serve", flush=True)
    mport = free_port()
    ours = [py, "-m", "server", "--repository", str(repo), "--port", str(port), "--metrics-port", str(mport),
            "--poll-interval-s", "0", "--log-level", "WARNING", *cfg.server_args]  # fmt: skip
    murl = f"http://127.0.0.1:{mport}/metrics"
    with server_process(ours, target, name):
        out["ours"] = {
            c: load_step(cfg, target, name, shape, 1, c, metrics_url=murl) for c in cfg.concurrency
        }
        top = max(cfg.concurrency)
        out["ours_big"] = load_step(cfg, target, name, shape, cfg.big_request, top, metrics_url=murl)
    return out


def client_ceiling(cfg: BenchConfig) -> dict[str, Any]:
    """The load tool's own limit: requests/s it drives into the bare echo server."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    shape = MODELS["lenet"][2]
    with server_process(
        [sys.executable, "bench/echo_server.py", "--port", str(port), "--model", "lenet"], target, "lenet"
    ):
        print("[bench] client ceiling: loadtest -> echo, 1 and 2 client processes", flush=True)
        return {p: load_step(cfg, target, "lenet", shape, 1, 64, processes=p) for p in (1, 2)}


# ---------------------------------------------------------------- report


def ratios(results: dict[str, Any], max_batch: int, top: int) -> list[dict[str, Any]]:
    r18, lenet = results["resnet18"], results["lenet"]
    rows = [
        ("resnet18 c=64 1-img: ours / in-process max batch",
         r18["ours"][top]["images_per_s"] / r18["inprocess_max"]["images_per_s"]),
        ("resnet18 c=64 32-img: ours / in-process max batch",
         r18["ours_big"]["images_per_s"] / r18["inprocess_max"]["images_per_s"]),
        ("resnet18 c=64: ours / naive", r18["ours"][top]["images_per_s"] / r18["naive"][top]["images_per_s"]),
        ("lenet c=64 1-img: ours / bare echo", lenet["ours"][top]["requests_per_s"] / lenet["echo"][top]["requests_per_s"]),
    ]  # fmt: skip
    out = [{"ratio": k, "value": v, "target": TARGETS[k], "pass": v >= TARGETS[k]} for k, v in rows]
    for name in ("lenet", "resnet18"):
        m = results[name]
        p50, base = m["ours"][1]["latency_ms"]["p50_ms"], m["inprocess_b1"]["p50_ms"]
        out.append({"ratio": f"{name} c=1: ours p50 - in-process batch-1 (ms)", "value": p50 - base,
                    "target": 0.5, "pass": p50 - base <= 0.5, "lower_is_better": True})  # fmt: skip
    return out


def table(results: dict[str, Any], cfg: BenchConfig) -> str:
    lines = [
        f"{'model':<9} {'setup':<30} {'req/s':>9} {'img/s':>9} {'p50 ms':>8} {'p99 ms':>8}  server batch/queue/compute"
    ]
    lines.append("-" * len(lines[0]))
    for name in MODELS:
        m = results[name]
        lines.append(f"{name:<9} {'in-process batch 1':<30} {'':>9} {m['inprocess_b1']['images_per_s']:9.1f} "
                     f"{m['inprocess_b1']['p50_ms']:8.2f}")  # fmt: skip
        lines.append(f"{name:<9} {f'in-process batch {cfg.max_batch}':<30} {'':>9} "
                     f"{m['inprocess_max']['images_per_s']:9.1f} {m['inprocess_max']['p50_ms']:8.2f}")  # fmt: skip
        steps = [(f"bare echo c={c}", s) for c, s in m["echo"].items()]
        steps += [(f"naive c={c}", s) for c, s in m["naive"].items()]
        steps += [(f"ours c={c}", s) for c, s in m["ours"].items()]
        steps.append((f"ours c={max(cfg.concurrency)} x{cfg.big_request} img", m["ours_big"]))
        for label, s in steps:
            srv = s.get("server") or {}
            extra = (f"{srv.get('batch_size', float('nan')):.1f} / {srv.get('queue_wait_ms', float('nan')):.2f} / "
                     f"{srv.get('compute_ms', float('nan')):.2f} ms") if srv else ""  # fmt: skip
            lines.append(f"{name:<9} {label:<30} {s['requests_per_s']:9.1f} {s['images_per_s']:9.1f} "
                         f"{s['latency_ms']['p50_ms']:8.2f} {s['latency_ms']['p99_ms']:8.2f}  {extra}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> BenchConfig:
    p = argparse.ArgumentParser(description="cnn-serve serving benchmark (see the module docstring)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "artifacts" / "bench")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help=f"trained checkpoint for one of {list(MODELS)} (default: untrained weights)")  # fmt: skip
    p.add_argument("--duration", type=float, default=8.0, help="max measured seconds per load step")
    p.add_argument("--server-arg", action="append", default=[], help="extra cnn-serve flag (repeatable)")
    a = p.parse_args(argv)
    ckpts = {}
    for item in a.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or name not in MODELS:
            p.error(f"--checkpoint takes NAME=PATH with NAME in {list(MODELS)}, got {item!r}")
        ckpts[name] = Path(path)
    return BenchConfig(
        out_dir=a.out_dir, checkpoints=ckpts, duration_s=a.duration, server_args=tuple(a.server_arg)
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    repo = prepare_repository(cfg)
    started = time.time()
    results: dict[str, Any] = {name: bench_model(cfg, repo, name) for name in MODELS}
    results["client_ceiling"] = client_ceiling(cfg)
    rat = ratios(results, cfg.max_batch, max(cfg.concurrency))
    print("\n" + table(results, cfg))
    print("\nratio                                                value   target")
    for r in rat:
        op = "<=" if r.get("lower_is_better") else ">="
        print(f"{r['ratio']:<52} {r['value']:6.2f}   {op} {r['target']:<4} {'ok' if r['pass'] else 'MISSED'}")
    cc = results["client_ceiling"]
    print(f"\nclient ceiling (loadtest -> bare echo, c=64, 1 LeNet image): "
          f"{cc[1]['requests_per_s']:.0f} req/s with 1 process, {cc[2]['requests_per_s']:.0f} with 2")  # fmt: skip
    doc = {"started_unix": started, "cpus": os.cpu_count(), "config": {k: str(v) for k, v in cfg.__dict__.items()},
           "results": results, "ratios": rat}  # fmt: skip
    out = cfg.out_dir / "serve_bench.json"
    out.write_text(json.dumps(doc, indent=2, default=str).replace("NaN", "null") + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
