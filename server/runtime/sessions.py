"""onnxruntime: explicit execution providers, sessions sized to the machine, one executor each.

The device is resolved once at start (``server.runtime.cuda.resolve_device``: a convolution must run on
every GPU asked for). After that no session may quietly leave it: sessions are created with
``enable_fallback=0`` and ``disable_fallback()``, so an execution-provider failure is an error
(at load: the version is rejected; in ``run()``: that batch fails) instead of onnxruntime moving
the session to the CPU for good with only a printed line.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.runtime.cuda import CPU, CUDA, DEFAULT_ALGO_SEARCH, DeviceError, provider_options
from server.runtime.placement import RECORD_KEY, NodePlacement, profiled_placement, recorded_placement
from server.runtime.share import usable_cpus

log = logging.getLogger(__name__)


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    # Idle intra-op threads would otherwise spin and steal the cores the event loop needs for I/O.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    # Node placement is read back at load (server.runtime.placement) instead of from warnings at this level.
    so.add_session_config_entry(RECORD_KEY, "1")
    return so


def providers_for(provider: str, device_id: int | None = 0, algo_search: str = DEFAULT_ALGO_SEARCH) -> list:
    if provider != CUDA:
        return [CPU]
    # CPU second: onnxruntime keeps shape arithmetic there; convolutions are checked at load.
    return [(CUDA, provider_options(device_id or 0, algo_search)), CPU]


def create_session(
    model_path: Path,
    provider: str,
    intra_op_threads: int,
    device_id: int | None = None,
    algo_search: str = DEFAULT_ALGO_SEARCH,
) -> ort.InferenceSession:
    session = ort.InferenceSession(
        str(model_path),
        sess_options=session_options(intra_op_threads),
        providers=providers_for(provider, device_id, algo_search),
        enable_fallback=0,
    )
    if session.get_providers()[0] != provider:
        raise DeviceError(f"{model_path}: wanted {provider}, onnxruntime gave {session.get_providers()}")
    session.disable_fallback()
    return session


def node_placement(
    session: ort.InferenceSession,
    model_path: Path,
    provider: str,
    device_id: int | None,
    algo_search: str,
    sample: np.ndarray,
) -> list[NodePlacement]:
    """Where each node of ``session`` runs: its own record, else a one-run profile of the same model."""
    placed = recorded_placement(session)
    if placed is None:
        feed = {session.get_inputs()[0].name: sample}
        placed = profiled_placement(
            ort, str(model_path), session_options(1), providers_for(provider, device_id, algo_search), feed
        )
    return placed


@dataclass
class Instance:
    """One session and the single thread that runs it (batches of one instance never overlap)."""

    session: ort.InferenceSession
    executor: ThreadPoolExecutor
    input_name: str
    output_names: list[str]
    device_id: int | None = None  # CUDA device ordinal; None on the CPU
    # A single-threaded session of the same model for small batches, inline on the event loop or on
    # the instance's thread (see server.runtime.batcher and server.runtime.solo): for a
    # LeNet-sized batch, waking the intra-op pool for every operator costs more than its threads
    # give back.
    solo: ort.InferenceSession | None = None

    def run(self, x: np.ndarray, solo: bool = False) -> Sequence[np.ndarray]:
        # x: (B, C, H, W) float32 -> one (B, ...) array per output, in output_names order
        session = self.solo if solo and self.solo is not None else self.session
        return session.run(self.output_names, {self.input_name: x})

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=False)


def create_instances(
    model_path: Path,
    provider: str,
    count: int,
    intra_op_threads: int,
    thread_prefix: str,
    devices: Sequence[int | None] | None = None,
    algo_search: str = DEFAULT_ALGO_SEARCH,
) -> list[Instance]:
    """``count`` instances; instance i on ``devices[i]`` (CUDA ordinals; default: all on device 0 / CPU)."""
    instances: list[Instance] = []
    try:
        for i in range(count):
            device_id = devices[i] if devices is not None else (0 if provider == CUDA else None)
            session = create_session(model_path, provider, intra_op_threads, device_id, algo_search)
            instances.append(
                Instance(
                    session=session,
                    executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{thread_prefix}-i{i}"),
                    input_name=session.get_inputs()[0].name,
                    output_names=[o.name for o in session.get_outputs()],
                    device_id=device_id,
                )
            )
    except Exception:
        for inst in instances:
            inst.close()
        raise
    return instances


def threads_per_instance(intra_op_threads: int, instances: int) -> int:
    return intra_op_threads or max(1, usable_cpus() // max(1, instances))


def release_memory() -> None:
    """Hand the memory of closed sessions back to the system. Their objects are freed once the
    last reference goes (cycles wait for the collector); glibc then keeps the freed heap in its
    arenas, so without a trim an unloaded model would stay in the process's RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator decides
        ctypes.CDLL("libc.so.6").malloc_trim(0)
