"""Loading one model version: sessions on the chosen device, the checks a version must pass
(export report, metadata, input and output shapes, convolution placement on CUDA), warm-up, and
the limits it is served with (the server's flags as ceilings, its config.pbtxt lowering them).

``load_version`` blocks (sessions, warm-up): the manager runs it in a thread while the versions
already loaded keep serving. A version that fails any check raises RepositoryError naming its file.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

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
from server.runtime.batcher import batch_sizes
from server.runtime.cuda import CPU, CUDA, DEFAULT_ALGO_SEARCH
from server.runtime.devices import instance_devices, instance_groups
from server.runtime.placement import conv_placement_problem, describe
from server.runtime.queue import QueuePolicy
from server.runtime.sessions import (
    Instance,
    create_instances,
    node_placement,
    threads_per_instance,
)
from server.runtime.solo import add_solo_sessions

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
    response_cache: bool = False  # the server has a response cache (--cache-size-bytes > 0)


@dataclass
class LoadedModel:
    """Result of the blocking part of loading: ready-to-run instances and what they serve."""

    meta: ModelMeta
    config: mc.ModelConfig  # effective config (what ModelConfig returns)
    instances: list[Instance]
    output_names: list[str]
    max_batch_size: int
    max_delay_s: float
    queue_policy: QueuePolicy
    preferred_batch_sizes: tuple[int, ...] = ()
    inline_max_images: int = 0
    solo_max_images: int = 0  # batches up to this size run on the single-threaded session


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
        config_path = str(files.model_path.parent.parent / "config.pbtxt")
        try:
            policy = QueuePolicy.from_config(batching, s.max_queue_size, config_path)
        except ValueError as e:
            raise RepositoryError(str(e)) from None
        preferred = tuple(sorted({int(b) for b in batching.preferred_batch_size if 0 < b <= max_batch}))
        timings = [
            _warm_up(inst, meta, max_batch, str(files.model_path), s.inline_compute_s, s.provider)
            for inst in instances
        ]
        inline_max = _inline_limit(timings[0], max_batch, s.inline_compute_s)
        solo_max = 0
        if s.provider == CPU and threads > 1:
            solo_max = add_solo_sessions(
                instances, files.model_path, meta.input_shape, max_batch, keep=inline_max > 0
            )
    except Exception:
        for inst in instances:
            inst.close()
        raise
    config = _effective_config(name, repo_config, meta, names, max_batch, delay_s, devices)
    if not (s.response_cache and repo_config.response_cache.enable):
        config.ClearField("response_cache")  # shown only where the cache really serves the model
    return LoadedModel(
        meta, config, instances, names, max_batch, delay_s, policy, preferred, inline_max, solo_max
    )


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
