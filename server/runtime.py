"""onnxruntime: explicit execution providers, sessions sized to the machine, one executor each.

onnxruntime-gpu lists CUDA among the available providers even where it cannot load (no GPU, no
CUDA 13 / cuDNN 9 libraries) and a session asked for CUDA then silently runs on CPU. So the device
is resolved once at start by building a probe session and reading back ``get_providers()``:
``cuda`` fails start with the reason, ``auto`` falls back to CPU and says so (log + metric).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.share import instance_device, usable_cpus

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do."""


# Identity on a (1,) float tensor, IR 10 / opset 17 (read by every onnxruntime we support),
# serialized once with onnx.helper: the server does not depend on the onnx package for 76 bytes.
# tests/server/test_share.py rebuilds it with onnx and compares.
PROBE_MODEL = (
    b'\x08\n:B\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x0cdevice_probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04'
    b"\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11"
)


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
        session = ort.InferenceSession(PROBE_MODEL, providers=[CUDA])
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


def create_session(
    model_path: Path, provider: str, intra_op_threads: int, device_id: int = 0
) -> ort.InferenceSession:
    providers: list = [(CUDA, {"device_id": device_id}), CPU] if provider == CUDA else [CPU]
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
        # Workers of one host start at different GPUs (server.share); one GPU: always device 0.
        device = instance_device(i) if provider == CUDA else 0
        session = create_session(model_path, provider, intra_op_threads, device)
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
