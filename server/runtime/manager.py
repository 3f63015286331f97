"""ModelManager: which versions are served, and how they change while requests keep flowing.

The routing table (``name -> ModelEntry``) is replaced, never mutated: a request looks a model up
once and gets a consistent view. Which models it holds is the model control mode's (Triton's
``--model-control-mode``):

* ``poll`` (the default): every model of the repository, synced at start, every poll interval and
  on SIGHUP;
* ``none``: every model of the repository, loaded at start, then left as it is;
* ``explicit``: the ``--load-model`` names at start (``*``: all), then what ``load`` and
  ``unload`` (the KServe v2 repository extension) say.

A sync of a model (a pass of poll, a start, a ``load``):

* scans the repository (a thread), picks the versions the model's version_policy asks for;
* loads new or changed versions in a thread (sessions, metadata and shape checks, warm-up) while
  the old ones keep serving; then swaps the model's entry in one assignment;
* drains replaced versions in the background (queued requests are answered, then sessions freed,
  then their response-cache entries dropped);
* rejects a broken version (corrupt ONNX, failed export report, wrong metadata) with one log line
  and a metric, remembers it by fingerprint so it is not retried every poll, and never serves
  *less* because of it: the versions already loaded stay. ``load`` reports that failure to its
  caller, naming the file.

``unload`` takes the model out of the table at once (new requests: NOT_FOUND), lets its queued and
in-flight requests finish, closes its sessions and hands the freed memory back to the system.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from cnnstack.contract import RepoModel, RepositoryError, parse_config_json, scan_repository, select_versions
from protos.inference import model_config_pb2 as mc
from server.errors import ServeError, not_found
from server.metrics import ServerMetrics
from server.runtime.cache import ResponseCache
from server.runtime.loader import ServingSettings, load_version
from server.runtime.sessions import release_memory
from server.runtime.version import ServedVersion

log = logging.getLogger(__name__)

HealthCallback = Callable[[str, bool], Awaitable[None]]
READY, UNAVAILABLE = "READY", "UNAVAILABLE"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    versions: dict[int, ServedVersion]
    latest: ServedVersion
    config: mc.ModelConfig


@dataclass(frozen=True)
class IndexEntry:
    """One line of the repository index: a model version and its state."""

    name: str
    version: str
    state: str
    reason: str = ""


def control_refused(mode: str) -> ServeError:
    return ServeError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"model load and unload need --model-control-mode explicit (this server runs {mode!r})",
    )


class ModelManager:
    def __init__(
        self,
        root: Path,
        settings: ServingSettings,
        metrics: ServerMetrics,
        on_health: HealthCallback | None = None,
        mode: str = "poll",
        load_models: tuple[str, ...] = (),
        configs: dict[str, str] | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.root = root
        self.settings = settings
        self.metrics = metrics
        self.mode = mode
        self.cache = cache  # the server's response cache (None: --cache-size-bytes 0)
        self._on_health = on_health
        self._table: dict[str, ModelEntry] = {}
        # The models the table should hold: None = every model of the repository.
        self._wanted: set[str] | None = None if mode != "explicit" or "*" in load_models else set(load_models)
        # Explicit loads with a config of their own (``configs``: as JSON, for a restarted worker).
        self._overrides = {n: parse_config_json(c, f"model {n!r}") for n, c in (configs or {}).items()}
        self._failed: dict[tuple[str, int], tuple] = {}  # (name, version) -> fingerprint that failed
        self.errors: dict[tuple[str, int], str] = {}  # last load error, for the repository index
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

    @property
    def loaded_names(self) -> list[str]:
        return sorted(self._table)

    # ---- lifecycle ----

    def request_reload(self) -> None:
        """SIGHUP: a sync pass now (poll mode; the other modes change only by load and unload)."""
        if self.mode != "poll":
            log.info("SIGHUP: --model-control-mode %s does not rescan the repository", self.mode)
            return
        log.info("reload requested")
        self._reload.set()

    async def poll_forever(self, interval_s: float) -> None:
        if self.mode != "poll":
            return
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
        """Bring the table to what the repository holds of the wanted models."""
        async with self._lock:
            try:
                snapshot = await asyncio.to_thread(scan_repository, self.root)
            except RepositoryError as e:
                log.error("repository scan failed, keeping the loaded models: %s", e)
                return
            if self._wanted is not None:
                for name in sorted(self._wanted - set(snapshot)):
                    log.error("--load-model %s: no such model in %s", name, self.root)
            for repo_model in snapshot.values():
                if self._closed:
                    return
                if self._wanted is None or repo_model.name in self._wanted:
                    await self._sync_model(self._configured(repo_model))
            for name in [n for n in self._table if n not in snapshot]:
                log.info("model %s removed from the repository; unloading it", name)
                self._retire(await self._take_out(name))
            self.syncs += 1

    # ---- model control (explicit mode) ----

    async def load(self, name: str, config_json: str | None = None) -> None:
        """Load ``name`` from the repository, or reload it (new versions, a changed config); with
        ``config_json`` its config is that instead of config.pbtxt. Raises ServeError naming what
        failed; what was serving keeps serving."""
        if self.mode != "explicit":
            raise control_refused(self.mode)
        async with self._lock:
            try:
                snapshot = await asyncio.to_thread(scan_repository, self.root)
            except RepositoryError as e:
                raise ServeError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
            rm = snapshot.get(name)
            if rm is None:
                raise not_found(f"no model {name!r} in the repository {self.root}")
            if config_json is not None:
                try:
                    self._overrides[name] = parse_config_json(
                        config_json, f"load {name!r}: parameter 'config'"
                    )
                except RepositoryError as e:
                    raise ServeError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            failures = await self._sync_model(self._configured(rm))
            if self._wanted is not None and name in self._table:
                self._wanted.add(name)
            if failures:
                raise ServeError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"model {name!r}: " + "; ".join(failures)
                )
            if name not in self._table:
                raise ServeError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"model {name!r} has no version its version_policy selects among {sorted(rm.versions)}",
                )

    async def unload(self, name: str) -> None:
        """Take ``name`` out at once; answer its queued and in-flight requests; free its sessions."""
        if self.mode != "explicit":
            raise control_refused(self.mode)
        async with self._lock:
            if name not in self._table:
                raise not_found(f"model {name!r} is not loaded; loaded models: {self.loaded_names[:20]}")
            if self._wanted is not None:
                self._wanted.discard(name)
            self._overrides.pop(name, None)
            versions = await self._take_out(name)
        await asyncio.gather(*(self._drain(v) for v in versions))  # cache entries dropped too
        await asyncio.to_thread(release_memory)
        log.info("model %s unloaded", name)

    async def index(self, ready_only: bool) -> list[IndexEntry]:
        """Every version of every model in the repository with its state: READY when served, else
        UNAVAILABLE and why (not loaded, not selected by its version_policy, failed to load)."""
        try:
            snapshot = await asyncio.to_thread(scan_repository, self.root)
        except RepositoryError:
            snapshot = {}
        out = []
        for name in sorted(set(snapshot) | set(self._table)):
            entry, rm = self._table.get(name), snapshot.get(name)
            served = entry.versions if entry else {}
            on_disk = sorted(rm.versions) if rm else []
            selected = set(select_versions(self._configured(rm).config, on_disk)) if rm else set()
            for v in sorted(set(on_disk) | set(served)):
                if v in served:
                    out.append(IndexEntry(name, str(v), READY))
                elif not ready_only:
                    out.append(IndexEntry(name, str(v), UNAVAILABLE, self._why_not(name, v, entry, selected)))
        return out

    def _why_not(self, name: str, version: int, entry: ModelEntry | None, selected: set[int]) -> str:
        if (name, version) in self.errors:
            return self.errors[(name, version)]
        if entry is None and self._wanted is not None and name not in self._wanted:
            return "unloaded (explicit model control: load it with the repository API)"
        if version not in selected:
            return "not selected by the model's version_policy"
        return "not loaded yet"

    # ---- the sync of one model ----

    def _configured(self, rm: RepoModel) -> RepoModel:
        """``rm`` with the config an explicit load gave it, if any (a changed one reloads)."""
        override = self._overrides.get(rm.name)
        if override is None:
            return rm
        digest = hashlib.sha256(override.SerializeToString(deterministic=True)).hexdigest()[:16]
        versions = {
            v: dataclasses.replace(files, fingerprint=(*files.fingerprint, "config", digest))
            for v, files in rm.versions.items()
        }
        return dataclasses.replace(rm, config=override, config_error=None, versions=versions)

    async def _sync_model(self, rm: RepoModel) -> list[str]:
        """Load what ``rm`` asks for, swap it in; returns the load failures of this pass."""
        name = rm.name
        if rm.config_error:
            if self._config_errors.get(name) != rm.config_error:
                log.error("model %s: %s; keeping what is loaded", name, rm.config_error)
                self.metrics.load_failures.labels(name).inc()
            self._config_errors[name] = rm.config_error
            return [rm.config_error]
        self._config_errors.pop(name, None)
        entry = self._table.get(name)
        current = entry.versions if entry else {}
        new: dict[int, ServedVersion] = {}
        failures: list[str] = []
        for v in select_versions(rm.config, list(rm.versions)):
            files = rm.versions[v]
            cur = current.get(v)
            if cur is not None and cur.files.fingerprint == files.fingerprint:
                new[v] = cur
                continue
            if self._failed.get((name, v)) == files.fingerprint:
                failures.append(self.errors.get((name, v), f"version {v} failed to load"))
                continue
            served = await self._load_one(rm, v, sorted(current))
            if isinstance(served, str):
                failures.append(served)
                continue
            new[v] = served
        if failures:
            # Never serve less because a version is broken: keep every version already loaded.
            for v, cur in current.items():
                new.setdefault(v, cur)
        if not new:
            if entry is not None:
                self._retire(await self._take_out(name))
            return failures
        if entry is None or new != current:
            self._table = {
                **self._table,
                name: ModelEntry(name, dict(sorted(new.items())), new[max(new)], rm.config),
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
        return failures

    async def _load_one(self, rm: RepoModel, v: int, serving: list[int]) -> ServedVersion | str:
        """One version loaded and started, or the reason it was rejected."""
        name, files = rm.name, rm.versions[v]
        try:
            loaded = await asyncio.to_thread(load_version, name, rm.config, files, self.settings)
        except Exception as e:
            self._failed[(name, v)] = files.fingerprint
            self.errors[(name, v)] = str(e)
            self.metrics.load_failures.labels(name).inc()
            log.error(
                "model %s version %d rejected (still serving versions %s): %s", name, v, serving or "none", e
            )
            return str(e)
        served = ServedVersion(name, files, loaded, self.settings.provider, self.metrics)
        if self.cache is not None and served.config.response_cache.enable:
            self.cache.attach(served)
        served.start()
        self._failed.pop((name, v), None)
        self.errors.pop((name, v), None)
        log.info(
            "loaded model %s version %d (%s, %s, input %s, %d classes, max batch %d, %d instance(s), "
            "batches <= %d run inline, <= %d on one thread)",
            name,
            v,
            loaded.meta.arch,
            self.settings.provider,
            list(loaded.meta.input_shape),
            loaded.meta.num_classes,
            loaded.max_batch_size,
            len(loaded.instances),
            loaded.inline_max_images,
            loaded.solo_max_images,
        )
        return served

    async def _take_out(self, name: str) -> list[ServedVersion]:
        """Out of the table (new requests: NOT_FOUND) and NOT_SERVING; returns its versions, which
        the caller drains (unload: before answering) or leaves to drain in the background."""
        entry = self._table.get(name)
        if entry is None:
            return []
        self._table = {k: e for k, e in self._table.items() if k != name}
        versions = list(entry.versions.values())
        for served in versions:
            served.accepting = False
        await self._health(name, False)
        return versions

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
