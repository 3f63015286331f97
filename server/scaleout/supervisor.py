"""``cnn-serve --workers N``: N worker processes (server.scaleout.worker) serving one port, one supervisor.

One server process is one event loop, so it tops out at about one core of RPC handling however
many the machine has. The supervisor reserves the gRPC port (bound with SO_REUSEPORT, never
listening, as in gRPC's own multiprocessing example) and starts N workers that each bind it with
SO_REUSEPORT; the kernel then hands every new *connection* to one of the listening workers. It:

* prints one ``listening`` line once every worker listens (with the workers' pids) and serves the
  one ``/metrics`` over all of them (server.scaleout.metrics);
* restarts a worker that dies (logged, counted in ``cnn_worker_restarts_total``, a
  ``worker_exited`` and a ``worker_started`` line), after a back-off when it keeps dying young;
* forwards SIGTERM/SIGINT (every worker drains as a single server does; ``stopped`` sums their
  admission counts; exit 0 when all exited 0) and SIGHUP (every worker reloads the repository).

It never loads onnxruntime or a model itself. Exit 2 when it cannot start (like a single server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

from server.config import ServerConfig
from server.logs import event
from server.net import bind
from server.scaleout.metrics import ENV, SharedMetrics, SupervisorCollector
from server.scaleout.relay import ControlRelay
from server.scaleout.worker import WorkerSpec

log = logging.getLogger(__name__)

STOP_MARGIN_S = 10.0  # beyond --grace-s: the drain's linger, closing the port, freeing sessions
YOUNG_S = 10.0  # a worker dying sooner than this after its start backs off its next start
BACKOFF_S = (0.5, 30.0)  # first and longest wait before restarting a worker that died young


class StartError(RuntimeError):
    """The supervisor cannot start serving (port taken, repository missing, a worker failed)."""


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen) ``host:port`` with SO_REUSEPORT: picks the port when it is 0 and keeps
    it ours while workers come and go; their listening sockets share it with this one."""
    if port:
        # Without SO_REUSEPORT first, so that any server already listening there makes this fail.
        bind(host, port, listen=False).close()
    return bind(host, port, reuse_port=True, listen=False)


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    listening: dict[str, Any] = field(default_factory=dict)
    stopped: dict[str, Any] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    backoff_s: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.count = cfg.worker_count
        self.workers = [Worker(i) for i in range(self.count)]
        self.restarts = 0
        self.stopping = False
        self.port = 0
        self.metrics: SharedMetrics | None = None
        self._reservation: socket.socket | None = None
        self._http_reservation: socket.socket | None = None
        self.http_port: int | None = None
        self.relay = ControlRelay(lambda: self.workers)
        self._keepers: set[asyncio.Task] = set()  # keep_alive, one per worker
        self._readers: set[asyncio.Task] = set()  # read_events, one per worker process

    # ---- one worker

    def worker_config(self) -> ServerConfig:
        # Every worker: the reserved port, no /metrics of its own (the supervisor serves it), and
        # the models the others serve now.
        http = self.http_port if self.http_port is not None else -1
        base = self.relay.worker_config(self.cfg)
        return replace(base, port=self.port, http_port=http, metrics_port=-1, workers="1")

    def worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in (ENV, ENV.lower())}
        if self.metrics is not None:
            env[ENV] = str(self.metrics.folder)
        return env

    async def spawn(self, w: Worker) -> None:
        spec = WorkerSpec(w.index, self.count, os.getpid(), self.worker_config())
        w.ready.clear()
        w.listening, w.stopped = {}, {}
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server.scaleout.worker",
            spec.to_json(),
            stdin=asyncio.subprocess.PIPE,  # model control: the relay's lines (server.scaleout.relay)
            stdout=asyncio.subprocess.PIPE,
            env=self.worker_env(),
        )
        w.started_at = time.monotonic()
        _track(self._readers, self.read_events(w, w.proc))

    async def read_events(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            try:
                ev = json.loads(line)
            except ValueError:
                ev = None
            if not isinstance(ev, dict):
                print(line, file=sys.stderr)  # stdout stays machine-readable
                continue
            if ev.get("event") == "listening":
                w.listening = ev
                self.relay.listening(ev)
                w.ready.set()
            elif ev.get("event") == "stopped":
                w.stopped = ev
            else:
                self.relay.on_event(w, ev)

    async def wait_ready(self, w: Worker) -> bool:
        """True once ``w`` listens; False if it exited first."""
        assert w.proc is not None
        ready = asyncio.ensure_future(w.ready.wait())
        exited = asyncio.ensure_future(w.proc.wait())
        await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (ready, exited):
            fut.cancel()
        return w.ready.is_set()

    async def keep_alive(self, w: Worker) -> None:
        """Restart ``w`` whenever it dies, until the supervisor stops."""
        while not self.stopping:
            assert w.proc is not None
            code = await w.proc.wait()
            if self.stopping:
                return
            pid, lived = w.pid, time.monotonic() - w.started_at
            self.restarts += 1
            log.error(
                "worker %d (pid %s) exited with %s after %.1fs; restarting it (restart #%d)",
                w.index,
                pid,
                code,
                lived,
                self.restarts,
            )
            event("worker_exited", index=w.index, pid=pid, returncode=code)
            if self.metrics is not None and pid is not None:
                self.metrics.worker_died(pid)
            w.backoff_s = min(max(w.backoff_s * 2, BACKOFF_S[0]), BACKOFF_S[1]) if lived < YOUNG_S else 0.0
            await asyncio.sleep(w.backoff_s)
            if self.stopping:
                return
            await self.spawn(w)
            if self.stopping:  # stop() began while this one was being started
                self.forward_to(w, signal.SIGTERM)
                return
            if await self.wait_ready(w):
                log.info("worker %d is back (pid %s)", w.index, w.pid)
                event("worker_started", index=w.index, pid=w.pid)

    # ---- all of them

    async def start(self) -> None:
        if not self.cfg.repository.is_dir():
            raise StartError(f"model repository {self.cfg.repository} is not a directory")
        try:
            self._reservation = reserve_port(self.cfg.host, self.cfg.port)
        except OSError as e:
            raise StartError(f"cannot bind gRPC to {self.cfg.host}:{self.cfg.port}: {e}") from e
        self.port = self._reservation.getsockname()[1]
        if self.cfg.http_port >= 0:  # the HTTP port too: with port 0 every worker must get the same one
            try:
                self._http_reservation = reserve_port(self.cfg.host, self.cfg.http_port)
            except OSError as e:
                raise StartError(f"cannot bind HTTP to {self.cfg.host}:{self.cfg.http_port}: {e}") from e
            self.http_port = self._http_reservation.getsockname()[1]
        if self.cfg.metrics_port >= 0:
            try:
                self.metrics = SharedMetrics.create()
            except OSError as e:
                raise StartError(
                    f"cannot create the workers' metrics folder (TMPDIR must be writable): {e}"
                ) from e
            collector = SupervisorCollector(self.serving, lambda: self.restarts)
            try:
                self.metrics.serve(self.cfg.host, self.cfg.metrics_port, collector)
            except OSError as e:
                raise StartError(
                    f"cannot bind /metrics to {self.cfg.host}:{self.cfg.metrics_port}: {e}"
                ) from e
        for w in self.workers:
            await self.spawn(w)
        for w in self.workers:
            if not await self.wait_ready(w):
                raise StartError(
                    f"worker {w.index} exited with {w.proc.returncode if w.proc else '?'} while starting"
                )
        for w in self.workers:
            _track(self._keepers, self.keep_alive(w))

    def serving(self) -> int:
        return sum(1 for w in self.workers if w.running and w.ready.is_set())

    def forward(self, sig: int, only_ready: bool = False) -> None:
        # SIGHUP only to workers that listen: one still loading has not installed its handler yet.
        for w in self.workers:
            if w.ready.is_set() or not only_ready:
                self.forward_to(w, sig)

    @staticmethod
    def forward_to(w: Worker, sig: int) -> None:
        if w.proc is not None and w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(sig)

    async def stop(self) -> dict[str, Any]:
        """SIGTERM to every worker, wait for each to drain (SIGKILL past the grace period)."""
        self.stopping = True
        self.forward(signal.SIGTERM)
        timeout = self.cfg.grace_s + STOP_MARGIN_S
        await asyncio.gather(*(self._wait_stopped(w, timeout) for w in self.workers))
        # A reader ends at its worker's EOF, after the worker's last ("stopped") line.
        if self._readers:
            await asyncio.wait(list(self._readers), timeout=5)
        for task in [*self._keepers, *self._readers]:
            task.cancel()
        await asyncio.gather(*self._keepers, *self._readers, return_exceptions=True)
        per_worker = [
            {"index": w.index, "pid": w.pid, "returncode": w.proc.returncode if w.proc else None, **w.stopped}
            for w in self.workers
        ]
        totals = {
            k: sum(int(p.get(k, 0)) for p in per_worker)
            for k in ("admitted", "admitted_ok", "admitted_failed")
        }
        for p in per_worker:
            p.pop("event", None)
        return {**totals, "restarts": self.restarts, "workers": per_worker}

    async def _wait_stopped(self, w: Worker, timeout: float) -> None:
        if w.proc is None:
            return
        try:
            await asyncio.wait_for(w.proc.wait(), timeout)
        except TimeoutError:
            log.error("worker %d (pid %s) did not stop within %.0fs; killing it", w.index, w.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            await w.proc.wait()

    def close(self) -> None:
        for reservation in (self._reservation, self._http_reservation):
            if reservation is not None:
                reservation.close()
        if self.metrics is not None:
            self.metrics.close()


def _track(tasks: set[asyncio.Task], coro: Any) -> None:
    task = asyncio.create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def serve(cfg: ServerConfig) -> int:
    sup = Supervisor(cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await sup.start()
        except StartError as e:
            log.error("cannot start: %s", e)
            await sup.stop()
            return 2
        loop.add_signal_handler(signal.SIGHUP, sup.forward, signal.SIGHUP, True)
        first = sup.workers[0].listening
        event(
            "listening",
            host=cfg.host,
            port=sup.port,
            http_port=sup.http_port,
            metrics_port=sup.metrics.port if sup.metrics else None,
            provider=first.get("provider"),
            models=first.get("models", []),
            pid=os.getpid(),
            workers=[w.pid for w in sup.workers],
        )
        await stop.wait()
        log.info("signal received: every worker drains (grace %.1fs)", cfg.grace_s)
        summary = await sup.stop()
        event("stopped", **summary)
        codes = [p["returncode"] for p in summary["workers"]]
        return 0 if all(c == 0 for c in codes) else 1
    finally:
        sup.close()


def supervise(cfg: ServerConfig) -> int:
    return asyncio.run(serve(cfg))
