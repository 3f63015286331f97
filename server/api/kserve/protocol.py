"""KServe v2 / Open Inference Protocol semantics shared by the gRPC service and the REST API:
input and output checks (one bad-input matrix, one set of messages), the classification
extension, model metadata, statistics and the repository index.

Both front ends call these with what they parsed from their wire format, so a request gets the
same verdict whichever protocol carried it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnstack import version
from cnnstack.contract import INPUT_NAME, PLATFORM, TENSOR_DATATYPE
from protos.inference import grpc_service_pb2 as ks
from server.api.dataplane import parse_version
from server.errors import invalid, not_found
from server.runtime.manager import ModelManager
from server.runtime.postprocess import top_k_of
from server.runtime.preprocess import check_count
from server.runtime.version import ServedVersion

SERVER_NAME = "cnnstack"
EXTENSIONS = [
    "classification",
    "model_configuration",
    "model_repository",
    "statistics",
    "binary_tensor_data",
]


def server_metadata() -> dict[str, Any]:
    """ServerMetadata's fields (gRPC and REST answer the same)."""
    return {"name": SERVER_NAME, "version": version(), "extensions": EXTENSIONS}


def scheduling(priority: Any, timeout: Any) -> tuple[int, int]:
    """A request's ``priority`` and ``timeout`` (microseconds) parameters, Triton's names, as
    integers >= 0 (absent: 0, the model's defaults); the queue policy judges them
    (server.runtime.queue)."""
    out = []
    for name, value in (("priority", priority), ("timeout", timeout)):
        if value is None:
            out.append(0)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise invalid(f"parameter {name!r} must be an integer >= 0, got {value!r}")
        else:
            out.append(value)
    return out[0], out[1]


def check_input_count(served: ServedVersion, n_inputs: int) -> None:
    if n_inputs != 1:
        raise invalid(f"model {served.name!r} takes exactly 1 input ({INPUT_NAME!r}), got {n_inputs}")


def check_input(served: ServedVersion, name: str, datatype: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The request's one input header -> its shape (N, C, H, W), or INVALID_ARGUMENT."""
    expected_name = served.instances[0].input_name
    if name != expected_name:
        raise invalid(f"unknown input {name!r}; model {served.name!r} has one input {expected_name!r}")
    if datatype != TENSOR_DATATYPE:
        raise invalid(f"input {name!r} must be {TENSOR_DATATYPE}, got {datatype!r}")
    dims = tuple(shape)
    if len(dims) != 4 or dims[1:] != served.input_shape:
        raise invalid(
            f"input {name!r} has shape {list(dims)}, expected [N, {', '.join(map(str, served.input_shape))}]"
        )
    check_count(dims[0], served.max_batch_size)
    return dims


def check_output(served: ServedVersion, name: str, classification: int | None) -> None:
    """Reject unknown output names and bad classification counts before running the model."""
    if name not in served.output_names:
        raise invalid(f"unknown output {name!r}; model {served.name!r} has outputs {served.output_names}")
    if classification is not None and not 1 <= classification <= served.num_classes:
        raise invalid(f"classification must be between 1 and {served.num_classes}, got {classification}")


def classification_labels(served: ServedVersion, outputs: list[np.ndarray], k: int) -> list[bytes]:
    """The classification extension, as Triton answers it: ``"probability:index:label"`` for the
    top ``k`` classes of every image, row-major ([N, k])."""
    idx, vals = top_k_of(outputs, k)
    names = served.class_names
    return [
        f"{v:f}:{i}:{names[i]}".encode()
        for ri, rv in zip(idx, vals, strict=True)
        for i, v in zip(ri, rv, strict=True)
    ]


def fp32_bytes(out: np.ndarray) -> bytes:
    """An FP32 tensor's raw form (gRPC ``raw_output_contents``, REST binary data): little-endian."""
    return np.ascontiguousarray(out, dtype="<f4").tobytes()


def bytes_tensor(items: list[bytes]) -> bytes:
    """A BYTES tensor's raw form: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def model_metadata(manager: ModelManager, served: ServedVersion) -> ks.ModelMetadataResponse:
    entry = manager.get_entry(served.name)
    T = ks.ModelMetadataResponse.TensorMetadata
    return ks.ModelMetadataResponse(
        name=served.name,
        versions=[str(v) for v in sorted(entry.versions)] if entry else [str(served.version)],
        platform=PLATFORM,
        inputs=[
            T(name=served.instances[0].input_name, datatype=TENSOR_DATATYPE, shape=[-1, *served.input_shape])
        ],
        outputs=[
            T(name=n, datatype=TENSOR_DATATYPE, shape=[-1, served.num_classes]) for n in served.output_names
        ],
    )


def versions_for_statistics(manager: ModelManager, name: str, version: str) -> list[ServedVersion]:
    """The versions ModelStatistics reports on: one, every version of a model, or everything."""
    if not name:
        return [s for e in manager.entries() for s in e.versions.values()]
    if version:
        return [manager.resolve(name, parse_version(version))]
    entry = manager.get_entry(name)
    if entry is None:
        raise not_found(f"model {name!r} is not loaded")
    return list(entry.versions.values())


def statistics(served: ServedVersion) -> ks.ModelStatistics:
    st = served.stats
    D = ks.StatisticDuration
    return ks.ModelStatistics(
        name=served.name,
        version=str(served.version),
        last_inference=st.last_inference_ms,
        inference_count=st.inference_count,
        execution_count=st.execution_count,
        inference_stats=ks.InferStatistics(
            success=D(count=st.success[0], ns=st.success[1]),
            fail=D(count=st.fail[0], ns=st.fail[1]),
            queue=D(count=st.queue[0], ns=st.queue[1]),
            compute_infer=D(count=st.compute[0], ns=st.compute[1]),
        ),
        batch_stats=[
            ks.InferBatchStatistics(batch_size=b, compute_infer=D(count=c, ns=ns))
            for b, (c, ns) in sorted(st.batches.items())
        ],
    )


async def repository_index(manager: ModelManager, ready_only: bool) -> ks.RepositoryIndexResponse:
    """Every version of every model in the repository, with its state (READY, or UNAVAILABLE and
    why); only the READY ones with ``ready_only``."""
    Index = ks.RepositoryIndexResponse.ModelIndex
    entries = await manager.index(ready_only)
    return ks.RepositoryIndexResponse(
        models=[Index(name=e.name, version=e.version, state=e.state, reason=e.reason) for e in entries]
    )


def config_parameter(value: object) -> str | None:
    """A repository load's ``config`` parameter: a JSON ModelConfig as a string (None: absent)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise invalid(f"parameter 'config' must be a JSON ModelConfig as a string, got {value!r}")
    return value
