"""The front door's cost: cnn-serve's requests/s at the four loads of the TorchServe comparison, over
gRPC and HTTP binary, with 1 and 2 workers, beside the floor and echo servers, all driven by h2load.

Loads (KServe v2 ModelInfer, real test images of the model's shape):

* lenet, 1 image per request, 1 in flight
* lenet, 1 image per request, 64 in flight
* lenet, 32 images per request, 64 in flight (images/s)
* fmnist, 1 image per request, 64 in flight

gRPC runs over ``--grpc-connections`` HTTP/2 connections (h2load ``-c``, the in-flight requests
spread over them), HTTP/1.1 over one keep-alive connection per request in flight. Every server is
alone on the machine while it is measured; rounds alternate the servers, and each figure is its
median round. Besides requests/s: the server's CPU per request (user + system time of the server
and its workers, from /proc, over the requests answered), the figure a busy machine moves least.

The echo ceilings (bench/echo_server.py) answer the same methods with canned bytes: what the
protocol stack alone costs. The floor (bench/floor_server.py) batches the same requests onto the
same model as cnn-serve does, with none of its features (checks, metrics, limits, queue policy):
what a batching server on this stack costs at least, so ours / floor is what the features cost.
The ratios are taken against TorchServe's best configuration per load: with ``--torchserve
VENV``, TorchServe itself, measured in every round beside ours (bench/torchserve_peer.py: the same
ONNX files, loads and client); without it, the figures measured side by side with an earlier
version of this server on a 2-core Intel Xeon (TorchServe 0.12, onnxruntime handler, batch 64,
2 ms delay). The table names the peer's CPU.

    .venv/bin/python -m bench.front_door_bench --repository artifacts/repository \
        --torchserve /opt/torchserve
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import h2load_client, torchserve_peer
from bench.front_door_loads import LOADS, MODELS, Wires, drive, test_images
from bench.procs import cpu_model, write_report
from cnnstack.serverproc import ServerProcess
from loadtest.payload import KSERVE_METHOD, build_payloads, infer_path

ROOT = Path(__file__).resolve().parents[1]
# TorchServe 0.12 on a 2-core Intel Xeon: [1 worker, 2 workers] per load and protocol, req/s or
# img/s. The peer's figures when TorchServe is not measured here (no --torchserve).
XEON_TORCHSERVE = {
    "peer": "TorchServe 0.12",
    "cpu": "a 2-core Intel Xeon (not this machine)",
    "figures": {
        str(("lenet", 1, 1)): {"grpc": [286, 284], "http": [325, 322]},
        str(("lenet", 1, 64)): {"grpc": [9609, 9295], "http": [11552, 10432]},
        str(("lenet", 32, 64)): {"grpc": [26947, 43558], "http": [26623, 44397]},
        str(("fmnist", 1, 64)): {"grpc": [4771, 5234], "http": [5070, 5016]},
    },
}


@dataclass(frozen=True)
class FrontDoorBench:
    repository: Path
    rounds: int
    duration_s: float
    warmup_s: float
    grpc_connections: int
    workers: tuple[int, ...]
    server_args: tuple[str, ...]
    out_dir: Path
    torchserve: Path | None  # a venv with TorchServe: measured in every round beside ours


class Child:
    """A bench server (``python -m MODULE ARGS``, printing "listening on HOST:PORT http PORT") as a
    child process."""

    def __init__(self, module: str, *args: str) -> None:
        cmd = [sys.executable, "-m", module, "--port", "0", "--http-port", "0", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()  # listening on HOST:PORT http PORT
        self.target, self.http = words[2], f"127.0.0.1:{words[4]}"
        self.pid = self.proc.pid

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def echo(images: int) -> Child:
    """bench/echo_server.py: canned answers of ``images`` images, gRPC and HTTP."""
    return Child("bench.echo_server", "--images", str(images))


def floor(repository: Path, model: str) -> Child:
    """bench/floor_server.py on the model's latest ONNX file, batching as cnn-serve does by default."""
    model_path = torchserve_peer.model_file(repository, model)
    return Child("bench.floor_server", "--model", str(model_path), "--name", model)


def payloads(model: str, images: int) -> tuple[bytes, Any]:
    x = test_images(model, images)  # (images, C, H, W)
    grpc_message = build_payloads("kserve", x, images, model, 0)[0]
    http_payload = build_payloads("kserve", x, images, model, 0, encoding="binary", protocol="http")[0]
    return grpc_message, http_payload


def measure(cfg: FrontDoorBench, pid: int, grpc_target: str, http_target: str, load: tuple) -> dict:
    """Both protocols at one load (``front_door_loads.drive``); any failed request stops the bench."""
    model, images, _ = load
    message, http = payloads(model, images)
    url = f"http://{http_target}{infer_path(model, 0)}"
    wires = Wires(grpc_target, KSERVE_METHOD, message, url, http.body, http.headers)
    out = drive(pid, wires, load, cfg.grpc_connections, cfg.duration_s, cfg.warmup_s)
    for protocol, r in out.items():
        if r["failed"]:
            raise RuntimeError(f"{protocol} {load}: {r['failed']} failed requests")
    return out


def one_round(cfg: FrontDoorBench) -> dict[str, dict]:
    """Every server at every load once: {server: {load key: measure()}}."""
    results: dict[str, dict] = {}
    if cfg.torchserve:
        peer = peer_config(cfg)
        for label, measured in torchserve_peer.one_round(peer, peer.out_dir / "torchserve/store").items():
            results[f"torchserve {label}"] = measured
    for workers in cfg.workers:
        args = ["--metrics-port", "-1", "--device", "cpu", "--workers", str(workers), *cfg.server_args]
        with ServerProcess(*args, repository=cfg.repository) as s:
            time.sleep(1.0)
            results[f"ours {workers}w"] = {
                str(load): measure(
                    cfg,
                    s.pid,
                    s.target,
                    s.listening["http_port"] and f"127.0.0.1:{s.listening['http_port']}",
                    load,
                )
                for load in LOADS
            }
    # The floor (the same batching onto the same model, none of cnn-serve's features), one process
    # per model, and the echo ceilings, one per image count.
    for model in MODELS:
        of_model = [ld for ld in LOADS if ld[0] == model]
        results.setdefault("floor", {}).update(measure_child(cfg, floor(cfg.repository, model), of_model))
    for images in sorted({ld[1] for ld in LOADS}):
        of_size = [ld for ld in LOADS if ld[1] == images]
        results.setdefault("echo", {}).update(measure_child(cfg, echo(images), of_size))
    return results


def measure_child(cfg: FrontDoorBench, child: Child, loads: list[tuple]) -> dict[str, dict]:
    """A bench server at its loads, then stopped: {load key: measure()}."""
    try:
        return {str(load): measure(cfg, child.pid, child.target, child.http, load) for load in loads}
    finally:
        child.close()


def peer_config(cfg: FrontDoorBench) -> torchserve_peer.PeerBench:
    """TorchServe at its best here: the same workers, loads and windows, batch 64, 2 ms, quiet logs."""
    assert cfg.torchserve is not None
    return torchserve_peer.PeerBench(
        cfg.torchserve, cfg.repository, cfg.duration_s, cfg.warmup_s, cfg.grpc_connections,
        cfg.workers, 64, 2, "quiet", cfg.out_dir,
    )  # fmt: skip


def peer_figures(m: dict[str, dict]) -> dict[str, Any]:
    """The peer's figures: TorchServe's medians of this run where it ran, else the Xeon's."""
    servers = [s for s in m if s.startswith("torchserve")]
    if not servers:
        return XEON_TORCHSERVE
    figures = {
        str(load): {p: [m[s][str(load)][p]["rate"] for s in servers] for p in ("grpc", "http")}
        for load in LOADS
    }
    return {"peer": "TorchServe (measured in this run)", "cpu": cpu_model(), "figures": figures}


def medians(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for server in rounds[0]:
        out[server] = {}
        for load in rounds[0][server]:
            out[server][load] = {
                p: {
                    **{
                        k: statistics.median(r[server][load][p][k] for r in rounds)
                        for k in ("rate", "cpu_us", "p99_ms")
                    },
                    "failed": sum(r[server][load][p]["failed"] for r in rounds),
                }
                for p in ("grpc", "http")
            }
    return out


def markdown(doc: dict) -> str:
    m, one, best = doc["medians"], doc["single"], doc["best"]
    lines = [
        f"CPU: {doc['cpu']}; {doc['rounds']} rounds of {doc['duration_s']:g} s; gRPC over {doc['grpc_connections']} connections",
        f"Peer: {doc['peer']['peer']} on {doc['peer']['cpu']}",
        "",
        "| load | " + " | ".join(f"{s}: gRPC / HTTP" for s in m) + " | peer best: gRPC / HTTP |",
        "|---|" + "---:|" * (len(m) + 1),
    ]
    for load in LOADS:
        k = str(load)
        ts = doc["peer"]["figures"][k]
        row = [f"{load[0]}, {load[1]} img, {load[2]} in flight"]
        row += [f"{m[s][k]['grpc']['rate']:,.0f} / {m[s][k]['http']['rate']:,.0f}" for s in m]
        row.append(f"{max(ts['grpc']):,.0f} / {max(ts['http']):,.0f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "| load | server CPU per request, µs: " + " | ".join(f"{s}: gRPC / HTTP" for s in m) + " |",
        "|---|" + "---:|" * len(m),
    ]
    for load in LOADS:
        k = str(load)
        lines.append(
            f"| {load[0]}, {load[1]} img, {load[2]} | "
            + " | ".join(f"{m[s][k]['grpc']['cpu_us']:.0f} / {m[s][k]['http']['cpu_us']:.0f}" for s in m)
            + " |"
        )
    lines += [
        "",
        "| load | ours best / peer best: gRPC, HTTP (goal >= 1.2) | ours 1 worker / peer 1 worker: gRPC, HTTP (goal >= 1.0) |",
        "|---|---:|---:|",
    ]
    for load in LOADS:
        k = str(load)
        lines.append(
            f"| {load[0]}, {load[1]} img, {load[2]} | {best[k]['grpc']:.2f}, {best[k]['http']:.2f} | {one[k]['grpc']:.2f}, {one[k]['http']:.2f} |"
        )
    failed = [
        f"{s} {k} {p}: {m[s][k][p]['failed']}"
        for s in m
        for k in m[s]
        for p in m[s][k]
        if m[s][k][p]["failed"]
    ]
    lines += ["", "Failed requests, all rounds: " + ("; ".join(failed) or "none"), "", *doc["other_ratios"]]
    return "\n".join(lines) + "\n"


def summarize(cfg: FrontDoorBench, rounds: list[dict]) -> dict:
    m = medians(rounds)
    peer = peer_figures(m)
    ours = [s for s in m if s.startswith("ours")]
    single = f"ours {min(cfg.workers)}w"
    best, one = {}, {}
    for load in LOADS:
        k = str(load)
        ts = peer["figures"][k]
        best[k] = {p: max(m[s][k][p]["rate"] for s in ours) / max(ts[p]) for p in ("grpc", "http")}
        one[k] = {p: m[single][k][p]["rate"] / ts[p][0] for p in ("grpc", "http")}
    other = []
    grpc_64 = str(("lenet", 1, 64))
    other.append(
        f"gRPC server CPU per request at lenet c=64, ours 1 worker / echo: "
        f"{m[single][grpc_64]['grpc']['cpu_us'] / m['echo'][grpc_64]['grpc']['cpu_us']:.2f}x (goal <= 1.5)"
    )
    ours_cpu, floor_cpu, echo_cpu = (m[s][grpc_64]["grpc"]["cpu_us"] for s in (single, "floor", "echo"))
    other.append(
        f"gRPC server CPU per request at lenet c=64: floor / echo {floor_cpu / echo_cpu:.2f}x (batching and "
        f"the compute hand-off on this stack), ours 1 worker / floor {ours_cpu / floor_cpu:.2f}x (cnn-serve's features)"
    )
    for load in LOADS:
        k = str(load)
        other.append(
            f"{load}: ours 1 worker / floor: gRPC {m[single][k]['grpc']['rate'] / m['floor'][k]['grpc']['rate']:.2f}x, "
            f"HTTP {m[single][k]['http']['rate'] / m['floor'][k]['http']['rate']:.2f}x; floor / peer best: "
            f"gRPC {m['floor'][k]['grpc']['rate'] / max(peer['figures'][k]['grpc']):.2f}x, "
            f"HTTP {m['floor'][k]['http']['rate'] / max(peer['figures'][k]['http']):.2f}x"
        )
    if len(ours) > 1:
        two = f"ours {max(cfg.workers)}w"
        for load in LOADS[1:]:
            k = str(load)
            other.append(
                f"{load}: {max(cfg.workers)} workers / 1: gRPC {m[two][k]['grpc']['rate'] / m[single][k]['grpc']['rate']:.2f}x, "
                f"HTTP {m[two][k]['http']['rate'] / m[single][k]['http']['rate']:.2f}x (goal >= 1.6)"
            )
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "rounds": cfg.rounds,
        "duration_s": cfg.duration_s,
        "grpc_connections": cfg.grpc_connections,
        "peer": peer,
        "medians": m,
        "best": best,
        "single": one,
        "other_ratios": other,
        "raw": rounds,
        "load_average": os.getloadavg(),
    }


def parse_args(argv: list[str] | None) -> FrontDoorBench:
    p = argparse.ArgumentParser(prog="python -m bench.front_door_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=ROOT / "artifacts/repository")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--grpc-connections", type=int, default=4)
    p.add_argument("--workers", default="1,2", help="the server configurations, e.g. 1,2")
    p.add_argument("--server-arg", action="append", default=[], help="an extra cnn-serve flag (repeatable)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "artifacts/bench")
    p.add_argument(
        "--torchserve",
        type=Path,
        help="a venv with torchserve: measure it in every round (torchserve_peer.py)",
    )
    a = p.parse_args(argv)
    if not h2load_client.available():
        p.error("h2load is not installed: apt-get install -y nghttp2-client")
    workers = tuple(int(w) for w in a.workers.split(","))
    return FrontDoorBench(
        a.repository,
        a.rounds,
        a.duration,
        a.warmup,
        a.grpc_connections,
        workers,
        tuple(a.server_arg),
        a.out_dir,
        a.torchserve,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.torchserve:
        torchserve_peer.prepare_store(peer_config(cfg))
    rounds = []
    for i in range(cfg.rounds):
        print(f"[front_door_bench] round {i + 1}/{cfg.rounds}", flush=True)
        rounds.append(one_round(cfg))
    doc = summarize(cfg, rounds)
    md = markdown(doc)
    write_report(cfg.out_dir, "front_door_bench", doc, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
