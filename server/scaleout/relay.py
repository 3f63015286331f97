"""Model control under ``--workers N``, the supervisor's side (the worker's: server.scaleout.control).

A worker that receives a repository load or unload prints a ``control_request`` event; the relay
writes ``apply`` to every running worker's stdin, one call at a time, waits for each worker's
``control_done`` (a worker that dies meanwhile counts as done: its replacement starts with the
models the others serve), then answers the asking worker with ``result``: OK, or the first
worker's error. It also keeps what the workers serve (explicit mode: the models loaded and the
configs loads gave them), for the config of a restarted worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from server.config import ServerConfig

log = logging.getLogger(__name__)


class WorkerPipe(Protocol):
    """What the relay needs of a worker (server.scaleout.supervisor.Worker)."""

    index: int
    proc: asyncio.subprocess.Process | None

    @property
    def running(self) -> bool: ...


class ControlRelay:
    def __init__(self, workers: Callable[[], Sequence[WorkerPipe]]) -> None:
        self._workers = workers
        self._lock = asyncio.Lock()
        self._done: dict[tuple[int, str], asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self.models: dict[str, str | None] | None = None  # what the workers serve, once known

    def listening(self, ev: dict[str, Any]) -> None:
        """A worker's listening line: the first one tells which models the workers start with."""
        if self.models is None:
            self.models = {m["name"]: None for m in ev.get("models", [])}

    def on_event(self, w: WorkerPipe, ev: dict[str, Any]) -> None:
        if ev.get("event") == "control_request":
            task = asyncio.create_task(self._relay(w, ev))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif ev.get("event") == "control_done":
            done = self._done.get((w.index, ev["id"]))
            if done is not None and not done.done():
                done.set_result((ev["code"], ev["message"]))

    def worker_config(self, cfg: ServerConfig) -> ServerConfig:
        """A (re)started worker's config: in explicit mode, the models the others serve now."""
        if cfg.model_control_mode != "explicit" or self.models is None:
            return cfg
        configs = tuple((name, c) for name, c in sorted(self.models.items()) if c is not None)
        return replace(cfg, load_model=tuple(sorted(self.models)), model_configs=configs)

    async def _relay(self, origin: WorkerPipe, ev: dict[str, Any]) -> None:
        request: dict[str, Any] = {k: ev[k] for k in ("op", "model", "config") if k in ev}
        async with self._lock:
            results = await asyncio.gather(
                *(self._apply(w, ev["id"], request) for w in self._workers() if w.running)
            )
            code, message = next(((c, m) for c, m in results if c != "OK"), ("OK", ""))
            if code == "OK" and self.models is not None:
                if request["op"] == "load":
                    self.models[request["model"]] = request.get("config")
                else:
                    self.models.pop(request["model"], None)
        send(origin, {"op": "result", "id": ev["id"], "code": code, "message": message})

    async def _apply(self, w: WorkerPipe, call_id: str, request: dict[str, Any]) -> tuple[str, str]:
        assert w.proc is not None
        done = asyncio.get_running_loop().create_future()
        self._done[(w.index, call_id)] = done
        exited = asyncio.ensure_future(w.proc.wait())
        try:
            send(w, {"op": "apply", "id": call_id, "request": request})
            await asyncio.wait({done, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            self._done.pop((w.index, call_id), None)
        if done.done():
            return done.result()
        log.warning("worker %d exited while applying %s %s", w.index, request["op"], request["model"])
        return "OK", ""


def send(w: WorkerPipe, msg: dict[str, Any]) -> None:
    """One JSON line to the worker's stdin (dropped if it has gone)."""
    if w.proc is None or w.proc.stdin is None or w.proc.stdin.is_closing():
        return
    w.proc.stdin.write((json.dumps(msg) + "\n").encode())
