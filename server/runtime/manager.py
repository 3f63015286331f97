"""ModelManager: which versions are served, and how they change while requests keep flowing.

The routing table (``name -> ModelEntry``) is replaced, never mutated: a request looks a model up
once and gets a consistent view. A sync pass (start, every poll interval, SIGHUP):

* scans the repository (a thread), picks the versions each model's version_policy asks for;
* loads new or changed versions in a thread (sessions, metadata and shape checks, warm-up) while
  the old ones keep serving; then swaps the model's entry in one assignment;
* drains replaced versions in the background (queued requests are answered, then sessions freed,
  then their response-cache entries dropped);
* rejects a broken version (corrupt ONNX, failed export report, wrong metadata) with one log line
  and a metric, remembers it by fingerprint so it is not retried every poll, and never serves
  *less* because of it: the versions already loaded stay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cnnstack.contract import RepoModel, RepositoryError, scan_repository, select_versions
from protos.inference import model_config_pb2 as mc
from server.errors import not_found
from server.metrics import ServerMetrics
from server.runtime.cache import ResponseCache
from server.runtime.loader import ServingSettings, load_version
from server.runtime.version import ServedVersion

log = logging.getLogger(__name__)

HealthCallback = Callable[[str, bool], Awaitable[None]]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    versions: dict[int, ServedVersion]
    latest: ServedVersion
    config: mc.ModelConfig


class ModelManager:
    def __init__(
        self,
        root: Path,
        settings: ServingSettings,
        metrics: ServerMetrics,
        on_health: HealthCallback | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.root = root
        self.settings = settings
        self.metrics = metrics
        self.cache = cache  # the server's response cache (None: --cache-size-bytes 0)
        self._on_health = on_health
        self._table: dict[str, ModelEntry] = {}
        self._failed: dict[tuple[str, int], tuple] = {}  # (name, version) -> fingerprint that failed
        self.errors: dict[tuple[str, int], str] = {}  # last load error, for RepositoryIndex
        self._config_errors: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._reload = asyncio.Event()
        self._retiring: set[asyncio.Task] = set()
        self._closed = False
        self.syncs = 0

    # ---- lookups (hot path) ----

    def resolve(self, name: str, version: int = 0) -> ServedVersion:
        entry = self._table.get(name)
        if entry is None:
            known = sorted(self._table)
            raise not_found(f"model {name!r} is not loaded; loaded models: {known[:20]}")
        if not version:
            return entry.latest
        served = entry.versions.get(version)
        if served is None:
            raise not_found(
                f"model {name!r} has no loaded version {version}; loaded versions: {sorted(entry.versions)}"
            )
        return served

    def entries(self) -> list[ModelEntry]:
        return [self._table[k] for k in sorted(self._table)]

    def get_entry(self, name: str) -> ModelEntry | None:
        return self._table.get(name)

    # ---- lifecycle ----

    def request_reload(self) -> None:
        """SIGHUP: run a sync pass now."""
        log.info("reload requested")
        self._reload.set()

    async def poll_forever(self, interval_s: float) -> None:
        while not self._closed:
            try:
                if interval_s > 0:
                    await asyncio.wait_for(self._reload.wait(), interval_s)
                else:
                    await self._reload.wait()
            except TimeoutError:
                pass
            self._reload.clear()
            if self._closed:
                return
            try:
                await self.sync()
            except Exception:  # a bug in one pass must not stop polling
                log.exception("repository sync failed")

    async def sync(self) -> None:
        async with self._lock:
            try:
                snapshot = await asyncio.to_thread(scan_repository, self.root)
            except RepositoryError as e:
                log.error("repository scan failed, keeping the loaded models: %s", e)
                return
            for repo_model in snapshot.values():
                if self._closed:
                    return
                await self._sync_model(repo_model)
            for name in [n for n in self._table if n not in snapshot]:
                log.info("model %s removed from the repository; unloading it", name)
                entry = self._table[name]
                self._table = {k: v for k, v in self._table.items() if k != name}
                self._retire(list(entry.versions.values()))
                await self._health(name, False)
            self.syncs += 1

    async def _sync_model(self, rm: RepoModel) -> None:
        name = rm.name
        if rm.config_error:
            if self._config_errors.get(name) != rm.config_error:
                log.error("model %s: %s; keeping what is loaded", name, rm.config_error)
                self.metrics.load_failures.labels(name).inc()
            self._config_errors[name] = rm.config_error
            return
        self._config_errors.pop(name, None)
        entry = self._table.get(name)
        current = entry.versions if entry else {}
        wanted = select_versions(rm.config, list(rm.versions))
        new: dict[int, ServedVersion] = {}
        failed = False
        for v in wanted:
            files = rm.versions[v]
            cur = current.get(v)
            if cur is not None and cur.files.fingerprint == files.fingerprint:
                new[v] = cur
                continue
            if self._failed.get((name, v)) == files.fingerprint:
                failed = True
                continue
            try:
                loaded = await asyncio.to_thread(load_version, name, rm.config, files, self.settings)
            except Exception as e:
                self._failed[(name, v)] = files.fingerprint
                self.errors[(name, v)] = str(e)
                self.metrics.load_failures.labels(name).inc()
                log.error(
                    "model %s version %d rejected (still serving versions %s): %s",
                    name,
                    v,
                    sorted(current) or "none",
                    e,
                )
                failed = True
                continue
            served = ServedVersion(name, files, loaded, self.settings.provider, self.metrics)
            if self.cache is not None and served.config.response_cache.enable:
                self.cache.attach(served)
            served.start()
            self._failed.pop((name, v), None)
            self.errors.pop((name, v), None)
            new[v] = served
            log.info(
                "loaded model %s version %d (%s, %s, input %s, %d classes, max batch %d, %d instance(s), "
                "batches <= %d run inline)",
                name,
                v,
                loaded.meta.arch,
                self.settings.provider,
                list(loaded.meta.input_shape),
                loaded.meta.num_classes,
                loaded.max_batch_size,
                len(loaded.instances),
                loaded.inline_max_images,
            )
        if failed:
            # Never serve less because a version is broken: keep every version already loaded.
            for v, cur in current.items():
                new.setdefault(v, cur)
        if not new:
            if entry is not None:
                self._table = {k: e for k, e in self._table.items() if k != name}
                self._retire(list(current.values()))
                await self._health(name, False)
            return
        latest = new[max(new)]
        if entry is None or new != current:
            self._table = {
                **self._table,
                name: ModelEntry(name, dict(sorted(new.items())), latest, rm.config),
            }
            retired = [cur for v, cur in current.items() if new.get(v) is not cur]
            if retired:
                log.info(
                    "model %s now serves versions %s; draining %s",
                    name,
                    sorted(new),
                    [r.version for r in retired],
                )
            self._retire(retired)
        await self._health(name, True)

    def _retire(self, versions: list[ServedVersion]) -> None:
        for served in versions:
            task = asyncio.create_task(self._drain(served))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _drain(self, served: ServedVersion) -> None:
        try:
            await served.drain(self.settings.drain_timeout_s)
        finally:
            if self.cache is not None:
                self.cache.detach(served)  # nothing answers from it any more: its memory returns

    async def _health(self, name: str, serving: bool) -> None:
        if self._on_health is not None:
            await self._on_health(name, serving)

    async def close(self) -> None:
        """Stop polling and drain every version (queued requests are answered first)."""
        self._closed = True
        self._reload.set()
        async with self._lock:
            table, self._table = self._table, {}
            for entry in table.values():
                self._retire(list(entry.versions.values()))
        if self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)
