"""Model control, measured: the server's resident memory (RSS) as a model is loaded, unloaded and
loaded again (does the memory come back?), and an unload while 32 clients keep calling the model
(no admitted request may fail; the later ones get NOT_FOUND).

cnn-serve runs with ``--model-control-mode explicit`` and nothing loaded at start; every step is a
stock ``tritonclient.grpc`` call. RSS is read from /proc after each step has answered.

    .venv/bin/python -m bench.model_control_bench --repository REPO --model resnet18
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from bench.procs import cpu_model
from cnnstack.serverproc import ServerProcess
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def memory_steps(server: ServerProcess, model: str, cycles: int) -> list[tuple[str, float]]:
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(server.target)
    steps = [("started, nothing loaded", rss_mib(server.pid))]
    for i in range(cycles):
        client.load_model(model)
        infer_once(server.target, model)  # the first request's allocations count too
        steps.append((f"load #{i + 1} (+1 request)", rss_mib(server.pid)))
        client.unload_model(model)
        steps.append((f"unload #{i + 1}", rss_mib(server.pid)))
    return steps


def request_for(target: str, model: str) -> ks.ModelInferRequest:
    import tritonclient.grpc as tg

    meta = tg.InferenceServerClient(target).get_model_metadata(model).inputs[0]
    shape = (1, *[int(d) for d in meta.shape[1:]])  # (1, C, H, W)
    req = ks.ModelInferRequest(model_name=model)
    req.inputs.add(name=meta.name, datatype="FP32", shape=list(shape))
    req.raw_input_contents.append(np.random.default_rng(0).random(shape, dtype=np.float32).tobytes())
    return req


def infer_once(target: str, model: str) -> None:
    with grpc.insecure_channel(target) as ch:
        ks_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request_for(target, model), timeout=60)


def unload_under_load(server: ServerProcess, model: str, clients: int) -> Counter:
    import tritonclient.grpc as tg

    tg.InferenceServerClient(server.target).load_model(model)
    req = request_for(server.target, model)
    results: Counter = Counter()
    lock = threading.Lock()
    started = threading.Barrier(clients + 1)

    def client() -> None:
        with grpc.insecure_channel(server.target) as ch:
            stub = ks_grpc.GRPCInferenceServiceStub(ch)
            started.wait(60)
            while True:
                try:
                    stub.ModelInfer(req, timeout=120)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    results[code] += 1
                if code != "OK":
                    return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    started.wait(60)
    time.sleep(1.0)
    tg.InferenceServerClient(server.target).unload_model(model)
    for t in threads:
        t.join(300)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.model_control_bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--clients", type=int, default=32)
    args = p.parse_args(argv)
    flags = ["--metrics-port", "-1", "--device", "cpu", "--model-control-mode", "explicit"]
    print(f"cnn-serve {' '.join(flags)} --repository {args.repository}; CPU {cpu_model()}")
    with ServerProcess(*flags, repository=args.repository) as server:
        steps = memory_steps(server, args.model, args.cycles)
        results = unload_under_load(server, args.model, args.clients)
    stopped = server.stopped
    print(f"\n{'step':<28} {'RSS MiB':>8}")
    for name, mib in steps:
        print(f"{name:<28} {mib:>8.0f}")
    loaded = [m for n, m in steps if n.startswith("load")]
    unloaded = [m for n, m in steps if n.startswith("unload")]
    print(
        f"each load adds {loaded[0] - steps[0][1]:.0f} MiB; each unload returns to within "
        f"{max(u - steps[0][1] for u in unloaded):.0f} MiB of the start"
    )
    print(
        f"\nunload while {args.clients} clients call {args.model}: {dict(results)}; "
        f"server: admitted {stopped['admitted']}, failed {stopped['admitted_failed']}"
    )
    return 0 if stopped["admitted_failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
