"""Model control, as the KServe v2 repository extension asks for it: load (or reload) and unload
a model by name, answered once it is done.

``LocalControl`` applies a call to this process's ``ModelManager``. Under ``--workers N`` every
worker must apply it, and the call answers once all have: the worker that received it hands it to
the supervisor instead (server.scaleout), which has every worker apply it through its own
``LocalControl``. Both APIs (gRPC, HTTP) call through this one interface.
"""

from __future__ import annotations

from typing import Protocol

from server.runtime.manager import ModelManager


class ModelControl(Protocol):
    async def load(self, name: str, config_json: str | None = None) -> None: ...

    async def unload(self, name: str) -> None: ...


class LocalControl:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    async def load(self, name: str, config_json: str | None = None) -> None:
        await self.manager.load(name, config_json)

    async def unload(self, name: str) -> None:
        await self.manager.unload(name)
