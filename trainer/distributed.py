"""Data-parallel plumbing for runs launched by ``torchrun`` (env RANK / WORLD_SIZE / LOCAL_RANK).

Without those variables everything here is a no-op for a single process, so the training loop
reads the same either way: ``dist_info.is_main`` guards output writes, ``all_reduce_sum`` merges
per-rank counts. ``process_group`` opens the group and, on every path out, destroys it.

Why the teardown is careful: gloo runs collectives on worker threads, and a worker frees a finished
collective's tensors a moment after the caller's ``wait()`` returned (the last ``barrier`` also
frees the collectives before it). A tensor made in Python needs the GIL to be freed; if the
interpreter is already finalizing, CPython ends that thread with ``pthread_exit``, whose unwinding
through a ``noexcept`` destructor calls ``std::terminate``: "terminate called without an active
exception", SIGABRT, and torchrun exits 1 after a run that trained fine. The rank with least left
to do after the last barrier (rank 1: rank 0 still writes the outputs) loses that race on a busy
machine. ``destroy_process_group`` joins the workers, but only when nothing else holds the group:
hence the import in ``init_distributed`` and the released frames in ``process_group``.
"""

from __future__ import annotations

import gc
import importlib
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); single process otherwise."""
    if not launched_by_torchrun():
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if info.world_size == 1:
        return info
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        # DDP imports torch._dynamo on first use, and with it torch.distributed.nn.functional & co.,
        # whose ``group=group.WORLD`` default arguments are evaluated at import: after
        # init_process_group that is the live group, held until the process exits, so that
        # destroy_process_group could not join gloo's worker threads. Imported first, they hold None.
        importlib.import_module("torch._dynamo")

        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # N processes on one box share its cores; N x all-cores threads thrash.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(info.world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return info


def device_for(device_type: str, info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if device_type == "cuda" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op for one process); returns ``t``."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@contextmanager
def process_group(device_type: str) -> Iterator[DistInfo]:
    """``init_distributed``, then on the way out (returned or raised) ``cleanup``.

    An exception's traceback holds the frames that hold the DDP wrapper, which holds the group: the
    frames' locals are released first, so that ``cleanup`` frees the group on this path too. Freed
    later, by the wrapper, the group's destructor would join the workers while holding the GIL that
    a worker freeing a tensor waits for: a hang instead of an abort.
    """
    info = init_distributed(device_type)
    try:
        yield info
    except BaseException as e:
        if info.enabled:
            traceback.clear_frames(e.__traceback__)  # the message and the lines stay
        raise
    finally:
        cleanup(info)


def cleanup(info: DistInfo) -> None:
    """Destroy the process group: its last reference goes, and with it gloo's worker threads are
    joined, before the interpreter can start finalizing (see the module docstring)."""
    if info.enabled and dist.is_initialized():
        gc.collect()  # a reference cycle through the DDP wrapper would keep the group alive
        dist.destroy_process_group()
