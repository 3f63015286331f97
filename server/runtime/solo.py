"""Which batches run on a second, single-threaded session of a model instead of its intra-op pool.

For small models and batches, waking onnxruntime's intra-op pool for every operator costs more
than its threads give back, and those threads also take cores that the event loop needs for the
network. Which side wins depends on the model, the batch and the CPU, so it is timed at load,
where the server runs, with both sessions on the same batches: batches up to the largest size at
which the pool was not at least ``POOL_MIN_SPEEDUP`` times faster run on the single thread, inline
on the event loop or on the instance's thread (server.runtime.batcher).

Why a margin and not "whichever is faster": a pool spends more CPU than one thread on the same
batch (its threads wake, split the work and wait for each other), so a pool that is only a little
faster on an idle machine costs a loaded server throughput: under a load of many small requests
the event loop needs those cores for the network. Where the pool is clearly faster (large models,
large batches, many cores) it keeps its batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from server.runtime.cuda import CPU
from server.runtime.sessions import Instance, create_session

POOL_MIN_SPEEDUP = 1.25  # the pool runs a batch only when it is at least this much faster


def solo_limit(timed: Callable[[int], tuple[float, float]], max_batch: int) -> int:
    """Largest of the batch sizes 1, 2, 4, ... ``max_batch`` up to which the pool was not
    ``POOL_MIN_SPEEDUP`` times faster than the single-threaded session (``timed(b)`` -> (its
    seconds, the pool's)); 0 when it was at batch 1. Stops there: larger batches only favour the
    pool, and a large model's slow runs are not timed for nothing."""
    limit = 0
    b = 1
    while True:
        solo_s, pool_s = timed(b)
        if solo_s > pool_s * POOL_MIN_SPEEDUP:
            return limit
        limit = b
        if b >= max_batch:
            return limit
        b = min(2 * b, max_batch)


def add_solo_sessions(
    instances: Sequence[Instance], model_path: Path, input_shape: tuple[int, ...], max_batch: int, keep: bool
) -> int:
    """Give each instance its single-threaded session where some batch runs on it (``keep``: the
    inline runs do); returns the largest batch that runs on it besides those (0: none)."""
    first = instances[0]
    first.solo = create_session(model_path, CPU, 1)
    limit = solo_limit(lambda b: _time_both(first, input_shape, b), max_batch)
    if not (limit or keep):
        first.solo = None
        return 0
    for inst in instances[1:]:
        inst.solo = create_session(model_path, CPU, 1)
        inst.run(np.zeros((1, *input_shape), dtype=np.float32), solo=True)  # first-run allocations
    return limit


def _time_both(
    inst: Instance, input_shape: tuple[int, ...], images: int, runs: int = 5
) -> tuple[float, float]:
    """Best seconds of a batch of ``images`` on the single-threaded session and on the pool, their
    runs alternated (after one untimed, allocating run each): the machine may be busy, and the
    best run is the one least disturbed."""
    x = np.zeros((images, *input_shape), dtype=np.float32)  # (B, C, H, W)
    best = {True: math.inf, False: math.inf}
    for solo in best:
        inst.run(x, solo=solo)
    for _ in range(runs):
        for solo in best:
            t0 = time.perf_counter()
            inst.run(x, solo=solo)
            best[solo] = min(best[solo], time.perf_counter() - t0)
    return best[True], best[False]
