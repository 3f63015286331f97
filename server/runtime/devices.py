"""Which device each model instance runs on: Triton's ``instance_group`` rules over ``--gpus``.

As in Triton, a group's ``count`` is per GPU: ``instance_group { kind: KIND_GPU count: 2 gpus: [0, 1] }``
places two instances on GPU 0 and two on GPU 1. A GPU group without ``gpus`` uses the server's
``--gpus``; without any group, each of ``--gpus`` gets ``--instances`` instances. A group may only
name GPUs the server was given (those are the ones the start-up probe proved). On a CPU server
every group's ``count`` instances run on the CPU, whatever its kind (the device fell back).
"""

from __future__ import annotations

from collections.abc import Sequence

from cnnstack.contract import RepositoryError
from protos.inference import model_config_pb2 as mc

KIND = mc.ModelInstanceGroup
DEVICES = ("auto", "cpu", "cuda")  # --device
ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")  # onnxruntime's cudnn_conv_algo_search values


def instance_devices(
    groups: Sequence[mc.ModelInstanceGroup],
    cuda: bool,
    gpus: Sequence[int],
    default_count: int,
    source: str = "",
) -> list[int | None]:
    """One entry per instance: its CUDA device ordinal, or None for the CPU."""
    if not cuda:
        return [None] * (sum(g.count if g.count > 0 else default_count for g in groups) or default_count)
    if not groups:
        return [gpu for _ in range(default_count) for gpu in gpus]
    out: list[int | None] = []
    for g in groups:
        if g.kind not in (KIND.KIND_AUTO, KIND.KIND_GPU):
            raise RepositoryError(
                f"{source}: instance_group kind {KIND.Kind.Name(g.kind)} on a CUDA server: this server runs "
                "every instance on the GPU; use KIND_GPU (or drop the kind)"
            )
        ids = list(g.gpus) or list(gpus)
        unknown = sorted(set(ids) - set(gpus))
        if unknown:
            raise RepositoryError(
                f"{source}: instance_group names GPU(s) {unknown}, but this server was started with "
                f"--gpus {','.join(map(str, gpus))}"
            )
        count = g.count if g.count > 0 else default_count
        out += [gpu for _ in range(count) for gpu in ids]
    return out


def instance_groups(devices: Sequence[int | None]) -> list[mc.ModelInstanceGroup]:
    """The effective groups (what ModelConfig answers): one per GPU with its instance count, or one CPU group."""
    if not devices or devices[0] is None:
        return [KIND(count=len(devices), kind=KIND.KIND_CPU)]
    per_gpu: dict[int, int] = {}
    for d in devices:
        if d is not None:
            per_gpu[d] = per_gpu.get(d, 0) + 1
    return [KIND(count=n, kind=KIND.KIND_GPU, gpus=[gpu]) for gpu, n in per_gpu.items()]
