"""One loaded model version: its sessions, its bounded queue, one batcher per instance, its stats.

Lifecycle: ``load_version`` (blocking: sessions, metadata checks, warm-up; run in a thread) ->
``ServedVersion.start()`` -> requests via ``submit`` -> ``drain()`` once a newer version has been
swapped in (or at shutdown): it stops accepting, answers everything queued, then frees the sessions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from cnnstack.contract import (
    LOGITS_NAME,
    OUTPUT_NAMES,
    PLATFORM,
    PROBABILITIES_NAME,
    ModelMeta,
    RepositoryError,
    VersionFiles,
    add_tensors,
    check_report,
    meta_from_props,
)
from protos.inference import model_config_pb2 as mc
from server.batcher import STOP, Batcher, batch_sizes, submit
from server.cuda import DEFAULT_ALGO_SEARCH
from server.devices import instance_devices, instance_groups
from server.errors import unavailable
from server.metrics import ServerMetrics, VersionMetrics
from server.placement import conv_placement_problem, describe
from server.postprocess import ranked
from server.runtime import (
    CPU,
    CUDA,
    Instance,
    create_instances,
    create_session,
    node_placement,
    threads_per_instance,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingSettings:
    """What loading and batching need from ServerConfig (after the device was resolved)."""

    provider: str
    max_batch_size: int
    max_queue_delay_s: float
    max_queue_size: int
    instances: int
    intra_op_threads: int  # 0: cores / instances
    drain_timeout_s: float
    inline_compute_s: float = 0.0  # batches measured faster than this run on the event loop
    gpus: tuple[int, ...] = (0,)  # CUDA devices instances may use (instance_group may pick among them)
    cudnn_conv_algo_search: str = DEFAULT_ALGO_SEARCH
    strict_device: bool = False  # --device cuda: refuse a model with a convolution not on CUDA


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


@dataclass
class LoadedModel:
    """Result of the blocking part of loading: ready-to-run instances and what they serve."""

    meta: ModelMeta
    config: mc.ModelConfig  # effective config (what ModelConfig returns)
    instances: list[Instance]
    output_names: list[str]
    max_batch_size: int
    max_delay_s: float
    max_queue_size: int
    inline_max_images: int = 0


def load_version(
    name: str, repo_config: mc.ModelConfig, files: VersionFiles, s: ServingSettings
) -> LoadedModel:
    """Sessions + checks + warm-up for one version; raises RepositoryError (with the file) if unusable."""
    check_report(files)
    devices = instance_devices(
        repo_config.instance_group,
        s.provider == CUDA,
        s.gpus,
        s.instances,
        str(files.model_path.parent.parent / "config.pbtxt"),
    )
    count = len(devices)
    threads = threads_per_instance(s.intra_op_threads, count)
    try:
        instances = create_instances(
            files.model_path,
            s.provider,
            count,
            threads,
            f"{name}-v{files.version}",
            devices,
            s.cudnn_conv_algo_search,
        )
    except Exception as e:
        raise RepositoryError(
            f"{files.model_path}: onnxruntime cannot load it: {type(e).__name__}: {e}"
        ) from e
    try:
        session = instances[0].session
        meta = meta_from_props(dict(session.get_modelmeta().custom_metadata_map), str(files.model_path))
        if s.provider == CUDA:
            _check_placement(instances[0], files, meta, s)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 4:
            raise RepositoryError(
                f"{files.model_path}: expected one float32 input (N, C, H, W), got "
                f"{[(i.name, i.type, i.shape) for i in inputs]}"
            )
        static = [d for d in inputs[0].shape[1:]]
        if all(isinstance(d, int) for d in static) and tuple(static) != meta.input_shape:
            raise RepositoryError(
                f"{files.model_path}: input dims {static} disagree with metadata {meta.input_shape}"
            )
        names = [o.name for o in outputs]
        if not set(OUTPUT_NAMES) & set(names):
            raise RepositoryError(
                f"{files.model_path}: needs a {PROBABILITIES_NAME!r} or {LOGITS_NAME!r} output, has {names}"
            )
        # The server flags are ceilings; a model's config.pbtxt may only lower them.
        batching = repo_config.dynamic_batching
        max_batch = int(effective_limit(s.max_batch_size, repo_config.max_batch_size))
        delay_s = s.max_queue_delay_s
        if repo_config.HasField("dynamic_batching"):  # an explicit 0 us means "do not wait"
            delay_s = min(delay_s, batching.max_queue_delay_microseconds / 1e6)
        max_queue = int(effective_limit(s.max_queue_size, batching.default_queue_policy.max_queue_size))
        timings = [
            _warm_up(inst, meta, max_batch, str(files.model_path), s.inline_compute_s, s.provider)
            for inst in instances
        ]
        inline_max = _inline_limit(timings[0], max_batch, s.inline_compute_s)
        if inline_max and s.provider == CPU and threads > 1:
            for inst in instances:
                inst.solo = create_session(files.model_path, CPU, 1)
                inst.run(
                    np.zeros((1, *meta.input_shape), dtype=np.float32), solo=True
                )  # first-run allocations
    except Exception:
        for inst in instances:
            inst.close()
        raise
    config = _effective_config(name, repo_config, meta, names, max_batch, delay_s, devices)
    return LoadedModel(meta, config, instances, names, max_batch, delay_s, max_queue, inline_max)


def effective_limit(server_value: float, model_value: float) -> float:
    """A model's config may lower a server ceiling (0 in the config means "not set")."""
    return min(server_value, model_value) if model_value > 0 else server_value


def _check_placement(inst: Instance, files: VersionFiles, meta: ModelMeta, s: ServingSettings) -> None:
    """Every convolution on CUDA, or (``--device cuda``) the version is refused; logged either way."""
    sample = np.zeros((1, *meta.input_shape), dtype=np.float32)
    placed = node_placement(
        inst.session, files.model_path, s.provider, inst.device_id, s.cudnn_conv_algo_search, sample
    )
    problem = conv_placement_problem(placed)
    if problem and s.strict_device:
        raise RepositoryError(
            f"{files.model_path}: {problem}; --device cuda serves no convolution on the CPU"
        )
    if problem:
        log.warning("%s: %s; serving it anyway (--device auto)", files.model_path, problem)
    log.info("%s: %s", files.model_path, describe(placed))


def warmup_batch_sizes(max_batch: int, provider: str) -> list[int]:
    """The batch sizes run at load. On CUDA every size the batcher can produce: cuDNN picks (and with
    EXHAUSTIVE, times) its algorithms per input shape the first time it sees one, which would
    otherwise land on the first request of each batch size. On the CPU, batch 1 and the largest:
    onnxruntime's CPU kernels keep no per-shape state worth moving out of the requests."""
    return list(batch_sizes(max_batch)) if provider == CUDA else sorted({1, max_batch})


def _warm_up(
    inst: Instance, meta: ModelMeta, max_batch: int, source: str, inline_s: float, provider: str = CPU
) -> dict[int, float]:
    """Run the warm-up batch sizes: proves the graph executes, checks output shapes, moves
    onnxruntime's first-run work out of the first requests; returns {batch: best seconds} for batch
    1 and the largest batch."""
    timings: dict[int, float] = {}
    for b in warmup_batch_sizes(max_batch, provider):
        x = np.zeros((b, *meta.input_shape), dtype=np.float32)
        # Time (after the first, allocating run) only what the inline decision needs.
        timed = 20 if b == 1 else (3 if b == max_batch and timings.get(1, math.inf) <= inline_s else 0)
        try:
            outs = inst.run(x)
            best = math.inf
            for _ in range(timed):  # best of several: the machine may be busy
                t0 = time.perf_counter()
                inst.run(x)
                best = min(best, time.perf_counter() - t0)
        except Exception as e:
            raise RepositoryError(f"{source}: fails to run a batch of {b}: {type(e).__name__}: {e}") from e
        if b in (1, max_batch):
            timings[b] = best
        for name, out in zip(inst.output_names, outs, strict=True):
            if name in OUTPUT_NAMES and out.shape != (b, meta.num_classes):
                raise RepositoryError(
                    f"{source}: output {name!r} has shape {list(out.shape)} for a batch of {b}, "
                    f"expected [{b}, {meta.num_classes}] ({meta.num_classes} class names in the metadata)"
                )
    return timings


def _inline_limit(timings: dict[int, float], max_batch: int, budget_s: float) -> int:
    """Largest batch whose compute, interpolated linearly between the measured batch 1 and max
    batch, stays under ``budget_s``; 0 when even batch 1 is slower (then every batch uses a thread)."""
    t1 = timings[1]
    if budget_s <= 0 or t1 > budget_s:
        return 0
    if max_batch == 1:
        return 1
    per_image = max(0.0, (timings[max_batch] - t1) / (max_batch - 1))
    if per_image == 0:
        return max_batch
    return int(min(max_batch, 1 + (budget_s - t1) // per_image))


def _run_ranked(inst: Instance, x: np.ndarray, solo: bool = False) -> list[np.ndarray]:
    """The batch function: (B, C, H, W) -> the model's outputs + probabilities and top-1 (see server.postprocess)."""
    return ranked(inst.run(x, solo), inst.output_names)


def _effective_config(
    name: str,
    repo: mc.ModelConfig,
    meta: ModelMeta,
    outputs: list[str],
    max_batch: int,
    delay_s: float,
    devices: list[int | None],
) -> mc.ModelConfig:
    config = mc.ModelConfig()
    config.CopyFrom(repo)
    config.name = name
    config.platform = PLATFORM
    config.max_batch_size = max_batch
    add_tensors(config, meta.input_shape, meta.num_classes, outputs)
    config.dynamic_batching.max_queue_delay_microseconds = int(round(delay_s * 1e6))
    del config.instance_group[:]
    config.instance_group.extend(instance_groups(devices))
    return config


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
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=loaded.max_queue_size)
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
                run_inline=functools.partial(_run_ranked, inst, solo=True),  # inst.run falls back without one
                max_batch_size=loaded.max_batch_size,
                max_delay_s=loaded.max_delay_s,
                observe=self._observe_batch,
                inline_max_images=loaded.inline_max_images,
            )
            for inst in loaded.instances
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

    def submit(self, x: np.ndarray, deadline: float | None, what: str = "input") -> asyncio.Future:
        """x: (n, C, H, W) float32 -> future of [one (n, ...) array per output]."""
        if not self.accepting:
            raise Retired(f"{self.name} version {self.version} is no longer accepting requests")
        return submit(self.queue, x, deadline, what)

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
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            for _ in self._tasks:
                await asyncio.wait_for(self.queue.put(STOP), max(0.0, end - loop.time()))
            if self._tasks:
                done, pending = await asyncio.wait(self._tasks, timeout=max(0.0, end - loop.time()))
            else:
                pending = set()
        except TimeoutError:
            pending = {t for t in self._tasks if not t.done()}
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
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not STOP and not item.future.done():
                item.future.set_exception(unavailable(f"{self.name} version {self.version} was unloaded"))
        for inst in self.instances:
            inst.close()
        self._metrics_owner.version_unloaded(self.name, str(self.version))
