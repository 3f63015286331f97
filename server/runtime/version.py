"""One served model version: its bounded queue, one batcher per instance, its statistics.

Lifecycle: ``server.runtime.loader.load_version`` (blocking, in a thread) -> ``ServedVersion``
-> ``start()`` -> requests via ``submit`` -> ``drain()`` once a newer version has been swapped in
(or at shutdown): it stops accepting, answers everything queued, then frees the sessions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from cnnstack.contract import VersionFiles
from server.errors import unavailable
from server.metrics import ServerMetrics, VersionMetrics
from server.runtime.batcher import Batcher
from server.runtime.loader import LoadedModel
from server.runtime.postprocess import ranked
from server.runtime.queue import RequestQueue
from server.runtime.sessions import Instance
from server.tracing import RequestTrace

log = logging.getLogger(__name__)


class Retired(Exception):
    """The version stopped accepting requests between lookup and submit (a newer one took over)."""


@dataclass
class VersionStats:
    """Cumulative counters for KServe ModelStatistics (durations in ns)."""

    success: list[int] = field(default_factory=lambda: [0, 0])
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])
    compute: list[int] = field(default_factory=lambda: [0, 0])
    inference_count: int = 0  # images
    execution_count: int = 0  # batches
    last_inference_ms: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [count, compute ns]


def _run_ranked(inst: Instance, x: np.ndarray, solo: bool = False) -> list[np.ndarray]:
    """The batch function: (B, C, H, W) -> the model's outputs + probabilities and top-1 (see server.runtime.postprocess)."""
    return ranked(inst.run(x, solo), inst.output_names)


def _trace_attributes(index: int, inst: Instance, provider: str) -> dict[str, str | int]:
    """What a traced request's ``compute`` span says about the instance that ran its batch."""
    device = f"cuda:{inst.device_id}" if inst.device_id is not None else "cpu"
    return {"instance": index, "device": device, "provider": provider}


class ServedVersion:
    def __init__(
        self, name: str, files: VersionFiles, loaded: LoadedModel, provider: str, metrics: ServerMetrics
    ) -> None:
        self.name = name
        self.version = files.version
        self.files = files
        self.meta = loaded.meta
        self.config = loaded.config
        self.provider = provider
        self.output_names = loaded.output_names
        self.max_batch_size = loaded.max_batch_size
        self.input_shape: tuple[int, int, int] = loaded.meta.input_shape
        self.class_names = loaded.meta.class_names
        self.num_classes = loaded.meta.num_classes
        self.stats = VersionStats()
        self.inflight = 0  # admitted, not yet answered (read by the cnn_inflight_requests gauge)
        self.accepting = False
        self.loaded_at = time.time()
        self._loaded = loaded
        self._metrics_owner = metrics
        self.queue = RequestQueue(loaded.queue_policy)
        self.metrics: VersionMetrics = metrics.version_loaded(
            name,
            str(self.version),
            provider,
            loaded.meta.arch,
            loaded.meta.dataset,
            self.queue.qsize,
            lambda: self.inflight,
        )
        self.batchers = [
            Batcher(
                self.queue,
                functools.partial(_run_ranked, inst),
                inst.executor,
                run_solo=functools.partial(_run_ranked, inst, solo=True),  # inst.run falls back without one
                solo_max_images=loaded.solo_max_images,
                max_batch_size=loaded.max_batch_size,
                max_delay_s=loaded.max_delay_s,
                observe=self._observe_batch,
                inline_max_images=loaded.inline_max_images,
                preferred_batch_sizes=loaded.preferred_batch_sizes,
                trace_attributes=_trace_attributes(i, inst, provider),
            )
            for i, inst in enumerate(loaded.instances)
        ]
        self._tasks: list[asyncio.Task] = []

    @property
    def instances(self) -> list[Instance]:
        return self._loaded.instances

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(b.run(), name=f"batcher-{self.name}-v{self.version}-{i}")
            for i, b in enumerate(self.batchers)
        ]
        self.accepting = True

    def submit(
        self,
        x: np.ndarray,
        deadline: float | None,
        what: str = "input",
        priority: int = 0,
        timeout_us: int = 0,
        trace: RequestTrace | None = None,
    ) -> asyncio.Future:
        """x: (n, C, H, W) float32 -> future of [one (n, ...) array per output]; ``priority`` and
        ``timeout_us`` are the request's KServe v2 parameters (0: the model's defaults); ``trace``:
        the request's, when it is traced."""
        if not self.accepting:
            raise Retired(f"{self.name} version {self.version} is no longer accepting requests")
        return self.queue.submit(x, deadline, what, priority, timeout_us, trace)

    def _observe_batch(self, images: int, compute_s: float, waits: list[float]) -> None:
        st = self.stats
        compute_ns = int(compute_s * 1e9)
        st.execution_count += 1
        st.inference_count += images
        st.compute[0] += 1
        st.compute[1] += compute_ns
        st.queue[0] += len(waits)
        st.queue[1] += int(sum(waits) * 1e9)
        st.last_inference_ms = int(time.time() * 1000)
        b = st.batches.get(images)
        if b is None:
            st.batches[images] = [1, compute_ns]
        else:
            b[0] += 1
            b[1] += compute_ns
        self.metrics.observe_batch(images, compute_s, waits)

    def record_request(self, ok: bool, seconds: float) -> None:
        rec = self.stats.success if ok else self.stats.fail
        rec[0] += 1
        rec[1] += int(seconds * 1e9)

    @property
    def busy(self) -> bool:
        return not self.queue.empty() or any(b.busy for b in self.batchers)

    async def drain(self, timeout: float) -> None:
        """Stop accepting; answer every queued request (within ``timeout``), then free the sessions."""
        self.accepting = False
        for _ in self._tasks:
            self.queue.put_stop()  # taken once everything queued is answered
        pending: set[asyncio.Task] = set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning(
                "%s v%d: drain timed out after %.1fs; %d batcher(s) cancelled",
                self.name,
                self.version,
                timeout,
                len(pending),
            )
            await asyncio.gather(*pending, return_exceptions=True)
        # Anything still queued (only after a timeout) is told why instead of hanging.
        for item in self.queue.leftovers():
            item.future.set_exception(unavailable(f"{self.name} version {self.version} was unloaded"))
        for inst in self.instances:
            inst.close()
        self._metrics_owner.version_unloaded(self.name, str(self.version))
