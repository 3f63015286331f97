"""``--processes P``: the load spread over P client processes (one GIL each).

Each child keeps one uvloop event loop and its connection (``connections`` gRPC channels, or an
HTTP keep-alive pool) for the whole sweep. For every step the
parent sends each child its share (concurrency split as evenly as possible, rate divided by P)
and a common start instant; ``time.perf_counter`` is CLOCK_MONOTONIC on Linux, shared by all
processes, so windows line up. Children stream their windows' raw latencies to the parent, which
merges them, applies the stability rule and raises a shared stop event.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Sequence
from typing import Any

from loadtest.controller import StepController, StepResult
from loadtest.runner import ProcessTotals, StepSpec
from loadtest.transport import Transport

READY_TIMEOUT_S = 60.0
START_DELAY_S = 0.2  # from sending a step to its start: lets every child arm before t0


def _child_main(
    index: int,
    target: str,
    route: str,  # the gRPC method, or the HTTP path
    payloads: Sequence[bytes],
    images_per_request: int,
    commands: Any,
    results: Any,
    stop: Any,
    connections: int = 1,
    transport: Transport = Transport(),
) -> None:
    import asyncio

    from loadtest.runner import new_event_loop, run_process_step
    from loadtest.transport import connect

    try:
        runner = asyncio.Runner(loop_factory=new_event_loop)
        conn = runner.run(connect(target, transport, route, connections, READY_TIMEOUT_S))
        call = conn.call
        results.put(("ready", index, None))
        while (cmd := commands.get()) is not None:
            spec, t0 = cmd

            def sink(w: Any) -> None:
                results.put(("window", index, w))

            totals = runner.run(
                run_process_step(call, payloads, spec, images_per_request, t0, sink, stop.is_set)
            )
            results.put(("done", index, totals))
        runner.run(conn.close())
        runner.close()
    except Exception:
        results.put(("error", index, traceback.format_exc()))


class MultiProcClient:
    def __init__(
        self,
        target: str,
        route: str,
        payloads: Sequence[bytes],
        images_per_request: int,
        processes: int,
        stability_windows: int,
        stability_percent: float,
        connections: int = 1,
        transport: Transport = Transport(),
    ) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that may hold gRPC state
        self.k = images_per_request
        self.p = processes
        self.stability = (stability_windows, stability_percent)
        self._results = ctx.Queue()
        self._stop = ctx.Event()
        self._commands = [ctx.Queue() for _ in range(processes)]
        self._procs = [
            ctx.Process(
                target=_child_main,
                args=(
                    i,
                    target,
                    route,
                    payloads,
                    images_per_request,
                    self._commands[i],
                    self._results,
                    self._stop,
                    connections,
                    transport,
                ),
                daemon=True,
                name=f"loadtest-client-{i}",
            )
            for i in range(processes)
        ]
        for proc in self._procs:
            proc.start()
        ready = 0
        while ready < processes:
            kind, index, payload = self._get(time.monotonic() + READY_TIMEOUT_S)
            if kind == "ready":
                ready += 1

    def _get(self, deadline: float) -> tuple[str, int, Any]:
        """Next message from the children; fails fast if one died (e.g. crashed while starting)."""
        while True:
            try:
                kind, index, payload = self._results.get(
                    timeout=min(0.5, max(0.0, deadline - time.monotonic()))
                )
                break
            except queue.Empty:
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead or time.monotonic() >= deadline:
                    self.close()
                    why = (
                        f"{dead[0].name} exited with code {dead[0].exitcode}" if dead else "no answer in time"
                    )
                    raise RuntimeError(f"client processes failed: {why}") from None
        if kind == "error":
            self.close()
            raise RuntimeError(f"client process {index} failed:\n{payload}")
        return kind, index, payload

    def run_step(self, spec: StepSpec) -> StepResult:
        self._stop.clear()
        ctl = StepController(spec, self.p, *self.stability, images_per_request=self.k)
        t0 = time.perf_counter() + START_DELAY_S
        for i, q in enumerate(self._commands):
            q.put((spec.share(i, self.p), t0))
        deadline = time.monotonic() + START_DELAY_S + spec.warmup_s + spec.duration_s + 2 * spec.window_s
        deadline += spec.timeout_s + 30.0  # in-flight requests drain within their deadline
        totals: dict[int, ProcessTotals] = {}
        while len(totals) < self.p:
            kind, index, payload = self._get(deadline)
            if kind == "window":
                ctl.add(payload)
                if ctl.done:
                    self._stop.set()
            elif kind == "done":
                totals[index] = payload
        return ctl.result(spec.load, self.p, list(totals.values()))

    def close(self) -> None:
        for q in self._commands:
            q.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
