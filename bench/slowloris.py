"""A slowloris run against cnn-serve: stalled and idle connections on both ports, while a real
client keeps calling; how long each kind of connection is held, and what the attack costs the
real client's latency.

Attack kinds, ``--n`` connections each:

* ``http idle``     connects and sends nothing
* ``http headers``  sends the start of a request's headers, then nothing
* ``http trickle``  sends a request's headers one byte a second (never finishing them in time)
* ``http body``     sends headers announcing 100 bytes of body, then one byte
* ``grpc idle``     connects and sends nothing (no HTTP/2 preface)
* ``grpc preface``  sends the HTTP/2 preface and SETTINGS, then never a call

The real client runs the same requests twice, alone and during the attack: KServe v2 ModelInfer
over gRPC and over HTTP (binary tensors), one at a time, one real test image each; p50/p99 of
each. The server runs with its default limits except the timeouts, which are set short so that a
run takes seconds (``--header-timeout-s``, ``--body-timeout-s``, ``--idle-s``).

    .venv/bin/python -m bench.slowloris --repository artifacts/repository --model lenet
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench.procs import cpu_model
from cnnstack.serverproc import ServerProcess
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
HEAD = b"POST /v2/models/{m}/infer HTTP/1.1\r\nHost: x\r\n"
KINDS = ("http idle", "http headers", "http trickle", "http body", "grpc idle", "grpc preface")


@dataclass
class Held:
    kind: str
    opened: float
    closed: float | None = None
    answer: bytes = b""


async def hold(kind: str, port: int, model: str, out: Held, budget_s: float) -> None:
    """Open one attacking connection of ``kind`` and wait until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = HEAD.replace(b"{m}", model.encode())
    if kind == "http headers":
        writer.write(head)
    elif kind == "http body":
        writer.write(head + b"Content-Length: 100\r\n\r\nx")
    elif kind == "grpc preface":
        writer.write(PREFACE)

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(1.0)

    trickler = asyncio.create_task(trickle()) if kind == "http trickle" else None
    try:
        async with asyncio.timeout(budget_s):
            while chunk := await reader.read(65536):
                out.answer += chunk
        out.closed = time.monotonic()
    except ConnectionError:  # reset by the server: closed too
        out.closed = time.monotonic()
    except TimeoutError:
        pass  # still open when the run's budget ran out
    finally:
        if trickler is not None:
            trickler.cancel()
        writer.close()


def attack(
    ports: dict[str, int], model: str, n: int, budget_s: float, started: threading.Event
) -> list[Held]:
    async def main() -> list[Held]:
        held: list[Held] = []
        tasks = []
        for kind in KINDS:
            port = ports["grpc" if kind.startswith("grpc") else "http"]
            for _ in range(n):
                h = Held(kind, time.monotonic())
                held.append(h)
                tasks.append(asyncio.create_task(hold(kind, port, model, h, budget_s)))
        await asyncio.sleep(0.5)  # every connection open before the client measures
        started.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return held

    return asyncio.run(main())


def grpc_calls(target: str, model: str, x: np.ndarray) -> Callable[[], None]:
    channel = grpc.insecure_channel(target)
    stub = ks_grpc.GRPCInferenceServiceStub(channel)
    req = ks.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return lambda: stub.ModelInfer(req, timeout=30) and None


def http_calls(port: int, model: str, x: np.ndarray) -> Callable[[], None]:
    import json

    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    body = head + x.tobytes()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call() -> None:
        conn.request("POST", f"/v2/models/{model}/infer", body, headers)
        reply = conn.getresponse()
        reply.read()
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}")

    return call


def latencies(call: Callable[[], None], requests: int) -> dict[str, float]:
    call()  # warm
    ms = []
    for _ in range(requests):
        t0 = time.perf_counter()
        call()
        ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    return {"p50": statistics.median(ms), "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))]}


def report(held: list[Held], budget_s: float) -> None:
    print(f"\n{'attack':<14} {'conns':>6} {'closed':>7} {'held min/median/max s':>24}  server's answer")
    for kind in KINDS:
        mine = [h for h in held if h.kind == kind]
        closed = sorted(h.closed - h.opened for h in mine if h.closed is not None)
        span = f"{closed[0]:.1f} / {statistics.median(closed):.1f} / {closed[-1]:.1f}" if closed else "-"
        first = next((h.answer for h in mine if h.answer), b"")
        answer = (
            first.split(b"\r\n", 1)[0].decode(errors="replace")
            if first.startswith(b"HTTP")
            else ("GOAWAY / closed" if first else "closed, nothing sent")
        )
        print(f"{kind:<14} {len(mine):>6} {len(closed):>7} {span:>24}  {answer}")
    still = sum(1 for h in held if h.closed is None)
    print(f"still open after {budget_s:.0f} s: {still}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.slowloris", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("artifacts/repository"))
    p.add_argument("--model", default="lenet")
    p.add_argument("--n", type=int, default=200, help="connections of each attack kind")
    p.add_argument("--requests", type=int, default=400, help="real client requests per protocol and phase")
    p.add_argument("--header-timeout-s", type=float, default=5.0)
    p.add_argument("--body-timeout-s", type=float, default=10.0)
    p.add_argument("--idle-s", type=float, default=10.0, help="gRPC: a connection without calls")
    args = p.parse_args(argv)
    flags = [
        "--metrics-port",
        "-1",
        "--http-header-timeout-s",
        str(args.header_timeout_s),
        "--http-body-timeout-s",
        str(args.body_timeout_s),
        "--grpc-handshake-timeout-s",
        str(args.header_timeout_s),
        "--grpc-max-connection-idle-s",
        str(args.idle_s),
    ]
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    budget = 3 * max(args.header_timeout_s, args.body_timeout_s, args.idle_s) + 30
    print(f"cnn-serve {' '.join(flags)}; {args.n} connections per attack kind; CPU {cpu_model()}")
    with ServerProcess(*flags, repository=args.repository) as server:
        ports = {"grpc": server.listening["port"], "http": server.listening["http_port"]}
        clients = {
            "grpc": grpc_calls(server.target, args.model, x),
            "http": http_calls(ports["http"], args.model, x),
        }
        alone = {name: latencies(call, args.requests) for name, call in clients.items()}
        started = threading.Event()
        result: list[list[Held]] = []
        attacker = threading.Thread(
            target=lambda: result.append(attack(ports, args.model, args.n, budget, started))
        )
        attacker.start()
        started.wait(60)
        during = {name: latencies(call, args.requests) for name, call in clients.items()}
        attacker.join()
    report(result[0], budget)
    print(f"\n{'real client':<12} {'alone p50/p99 ms':>18} {'under attack p50/p99 ms':>25} {'p99 ratio':>10}")
    for name in clients:
        a, d = alone[name], during[name]
        print(
            f"{name:<12} {a['p50']:>8.2f} / {a['p99']:<7.2f} {d['p50']:>12.2f} / {d['p99']:<9.2f} {d['p99'] / a['p99']:>9.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
