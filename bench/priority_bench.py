"""Priorities, measured: the latency of high-priority requests while low-priority ones keep the
model's queue full, against the same requests when nothing tells them apart.

One model is served from a copy of the repository whose config.pbtxt adds
``priority_levels: 2, default_priority_level: 2``. A flood of ``--flood`` low-priority callers
(closed loop, priority 2, KServe v2 over gRPC) saturates the queue; one caller sends the measured
requests at priority 1, one at a time. Then the same run with every request at priority 2. Each
phase reports the measured caller's p50/p99 and the flood's throughput; the ratio says what a
priority buys.

    .venv/bin/python -m bench.priority_bench --repository artifacts/repository --model fmnist
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.procs import cpu_model
from cnnstack.contract import CONFIG_FILE, parse_config, render_config
from cnnstack.serverproc import ServerProcess
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def prioritized_copy(repository: Path, model: str, into: Path) -> Path:
    shutil.copytree(repository / model, into / model)
    path = into / model / CONFIG_FILE
    config = parse_config(path.read_text())
    config.dynamic_batching.priority_levels = 2
    config.dynamic_batching.default_priority_level = 2
    path.write_text(render_config(config))
    return into


def request(model: str, shape: list[int], priority: int) -> ks.ModelInferRequest:
    req = ks.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=shape)
    req.raw_input_contents.append(np.random.default_rng(0).random(shape, dtype=np.float32).tobytes())
    req.parameters["priority"].int64_param = priority
    return req


async def phase(target: str, model: str, shape: list[int], high: int, flood: int, seconds: float) -> dict:
    """``flood`` low-priority callers and one measured caller at priority ``high``."""
    stop = asyncio.Event()
    flooded = 0

    async def low(stub) -> None:
        nonlocal flooded
        req = request(model, shape, 2)
        while not stop.is_set():
            try:
                await stub.ModelInfer(req, timeout=60)
                flooded += 1
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise

    async with grpc.aio.insecure_channel(target) as flood_ch, grpc.aio.insecure_channel(target) as probe_ch:
        flood_stub, probe_stub = (
            ks_grpc.GRPCInferenceServiceStub(flood_ch),
            ks_grpc.GRPCInferenceServiceStub(probe_ch),
        )
        tasks = [asyncio.create_task(low(flood_stub)) for _ in range(flood)]
        await asyncio.sleep(2.0)  # the queue fills
        probe, ms = request(model, shape, high), []
        t_end = time.perf_counter() + seconds
        start_flooded = flooded
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            await probe_stub.ModelInfer(probe, timeout=60)
            ms.append((time.perf_counter() - t0) * 1e3)
        flood_rps = (flooded - start_flooded) / seconds
        stop.set()
        await asyncio.gather(*tasks)
    ms.sort()
    return {
        "p50": statistics.median(ms),
        "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
        "n": len(ms),
        "flood_rps": flood_rps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.priority_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("artifacts/repository"))
    p.add_argument("--model", default="fmnist")
    p.add_argument("--flood", type=int, default=128, help="low-priority callers")
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="priority-bench-") as tmp:
        repo = prioritized_copy(args.repository, args.model, Path(tmp))
        flags = ["--metrics-port", "-1", "--device", "cpu", "--max-queue-size", "256"]
        print(
            f"cnn-serve {' '.join(flags)}; {args.model} with priority_levels 2; {args.flood} low-priority callers; CPU {cpu_model()}"
        )
        with ServerProcess(*flags, repository=repo) as server:
            import tritonclient.grpc as tg

            meta = tg.InferenceServerClient(server.target).get_model_metadata(args.model).inputs[0]
            shape = [1, *[int(d) for d in meta.shape[1:]]]
            rows: dict[str, dict] = {}
            for name, high in (("priority 1 (high)", 1), ("priority 2 (same as the flood)", 2)):
                rows[name] = asyncio.run(
                    phase(server.target, args.model, shape, high, args.flood, args.seconds)
                )
    print(f"\n{'measured requests':<32} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'flood req/s':>12}")
    for name, r in rows.items():
        print(f"{name:<32} {r['n']:>5} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['flood_rps']:>12.0f}")
    first, second = rows["priority 1 (high)"], rows["priority 2 (same as the flood)"]
    print(f"p99 with priority / without: {first['p99'] / second['p99']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
