"""onnxruntime: explicit execution providers, sessions sized to the machine, one executor each.

onnxruntime-gpu lists CUDA among the available providers even where it cannot load (no GPU, no
CUDA 13 / cuDNN 9 libraries) and a session asked for CUDA then silently runs on CPU. So the device
is resolved once at start by building a probe session and reading back ``get_providers()``:
``cuda`` fails start with the reason, ``auto`` falls back to CPU and says so (log + metric).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do."""


def usable_cpus() -> int:
    """Cores this process may use: CPU affinity, capped by a cgroup v2 CPU quota (docker --cpus)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _probe_model() -> bytes:
    # Identity on a (1,) float tensor; IR 10 / opset 17 are read by every onnxruntime we support.
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "device_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10
    ).SerializeToString()


def resolve_device(device: str) -> str:
    """Return the execution provider to use for ``device`` ("auto" | "cpu" | "cuda")."""
    if device == "cpu":
        return CPU
    if CUDA not in ort.get_available_providers():
        if device == "cuda":
            raise DeviceError(
                f"--device cuda: this onnxruntime ({ort.__version__}, providers {ort.get_available_providers()}) "
                "has no CUDAExecutionProvider; install onnxruntime-gpu or use --device cpu/auto"
            )
        log.info("device auto: onnxruntime has no CUDA execution provider; using CPU")
        return CPU
    try:
        session = ort.InferenceSession(_probe_model(), providers=[CUDA])
        loaded = session.get_providers()
    except Exception as e:  # onnxruntime raises its own Fail/RuntimeError types
        loaded, reason = [], f"{type(e).__name__}: {e}"
    else:
        reason = "onnxruntime fell back to CPU (see its log above: usually libcudart/libcublas/cuDNN not found or no GPU)"
    if loaded and loaded[0] == CUDA:
        return CUDA
    if device == "cuda":
        raise DeviceError(
            f"--device cuda: the CUDA execution provider did not load: {reason}. onnxruntime-gpu "
            f"{ort.__version__} needs an NVIDIA GPU with CUDA 13 and cuDNN 9 libraries on the library path; "
            "use --device auto to fall back to CPU"
        )
    log.warning("device auto: CUDA execution provider did not load (%s); using CPU", reason)
    return CPU


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    # Idle intra-op threads would otherwise spin and steal the cores the event loop needs for I/O.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def create_session(model_path: Path, provider: str, intra_op_threads: int) -> ort.InferenceSession:
    providers: list = [(CUDA, {"device_id": 0}), CPU] if provider == CUDA else [CPU]
    session = ort.InferenceSession(
        str(model_path), sess_options=session_options(intra_op_threads), providers=providers
    )
    if session.get_providers()[0] != provider:
        raise DeviceError(f"{model_path}: wanted {provider}, onnxruntime gave {session.get_providers()}")
    return session


@dataclass
class Instance:
    """One session and the single thread that runs it (batches of one instance never overlap)."""

    session: ort.InferenceSession
    executor: ThreadPoolExecutor
    input_name: str
    output_names: list[str]
    # A single-threaded session of the same model for the small batches run inline on the event
    # loop (see server.batcher): for a LeNet-sized batch, waking the intra-op pool for every
    # operator costs more than the second thread gives back.
    solo: ort.InferenceSession | None = None

    def run(self, x: np.ndarray, solo: bool = False) -> Sequence[np.ndarray]:
        # x: (B, C, H, W) float32 -> one (B, ...) array per output, in output_names order
        session = self.solo if solo and self.solo is not None else self.session
        return session.run(self.output_names, {self.input_name: x})

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=False)


def create_instances(
    model_path: Path, provider: str, count: int, intra_op_threads: int, thread_prefix: str
) -> list[Instance]:
    instances = []
    for i in range(count):
        session = create_session(model_path, provider, intra_op_threads)
        instances.append(
            Instance(
                session=session,
                executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{thread_prefix}-i{i}"),
                input_name=session.get_inputs()[0].name,
                output_names=[o.name for o in session.get_outputs()],
            )
        )
    return instances


def threads_per_instance(intra_op_threads: int, instances: int) -> int:
    return intra_op_threads or max(1, usable_cpus() // max(1, instances))
