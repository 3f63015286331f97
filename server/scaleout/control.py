"""Model control under ``--workers N``, the worker's side: a repository load or unload one worker
receives is applied by every worker, and answered once all have (the supervisor's side:
server.scaleout.relay).

The pipes the supervisor already has to each worker carry it: the worker prints a
``control_request`` event line on stdout; the supervisor writes ``apply`` to every worker's stdin,
each applies it to its own ModelManager and prints ``control_done``; the supervisor then writes
``result`` (the first worker's error, if any) to the asking worker's stdin.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from typing import Any

import grpc

from server.errors import ServeError
from server.logs import event
from server.runtime.manager import ModelManager


class WorkerControl:
    """Model control in a worker: a load or unload this worker receives goes to the supervisor
    (an event line on stdout), which has every worker apply it (a line on each one's stdin:
    ``apply``, answered by a ``control_done`` event) and then answers this one (``result``).
    The call returns, or raises the first worker's error, once all have applied it."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self._pending: dict[str, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._reader = asyncio.get_running_loop().create_task(self._read_supervisor(), name="supervisor-pipe")

    async def load(self, name: str, config_json: str | None = None) -> None:
        await self._ask({"op": "load", "model": name, "config": config_json})

    async def unload(self, name: str) -> None:
        await self._ask({"op": "unload", "model": name})

    async def _ask(self, request: dict[str, Any]) -> None:
        call_id = f"{os.getpid()}-{next(self._ids)}"
        done = asyncio.get_running_loop().create_future()
        self._pending[call_id] = done
        event("control_request", id=call_id, **request)
        try:
            code, message = await done
        finally:
            self._pending.pop(call_id, None)
        if code != "OK":
            raise ServeError(grpc.StatusCode[code], message)

    async def _read_supervisor(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            msg = json.loads(line)
            if msg["op"] == "result":
                future = self._pending.get(msg["id"])
                if future is not None and not future.done():
                    future.set_result((msg["code"], msg["message"]))
            elif msg["op"] == "apply":
                await self._apply(msg)

    async def _apply(self, msg: dict[str, Any]) -> None:
        code, message = "OK", ""
        try:
            if msg["request"]["op"] == "load":
                await self.manager.load(msg["request"]["model"], msg["request"].get("config"))
            else:
                await self.manager.unload(msg["request"]["model"])
        except ServeError as e:
            code, message = e.code.name, e.message
        event("control_done", id=msg["id"], code=code, message=message)
