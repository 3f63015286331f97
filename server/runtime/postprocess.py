"""Model outputs -> what the APIs answer: class probabilities and top-k, computed once per batch.

The batcher's batch function is ``ranked``: it runs on the instance's executor thread right
after onnxruntime, so each request's slice of the outputs already holds its probabilities and
its top-1 class; the event loop only turns them into Python lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cnnstack.contract import LOGITS_NAME, PROBABILITIES_NAME
from server.errors import invalid


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# Per-request outputs the batch function appends after the model's own (see ``ranked``).
PROBS, TOP1, TOP1_PROB = -3, -2, -1


def ranked(outputs: Sequence[np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    """One batch's model outputs -> [*outputs, probabilities (B, K), top-1 index (B,), its probability (B,)].

    Runs with the batch on the instance's executor thread: numpy's argmax always releases the GIL,
    and on the event loop each release lets another thread cut in (see server.runtime.batcher).
    """
    if PROBABILITIES_NAME in names:
        probs = outputs[names.index(PROBABILITIES_NAME)]
    else:
        probs = softmax(outputs[names.index(LOGITS_NAME)])
    top1 = probs.argmax(axis=1)
    return [*outputs, probs, top1, probs[np.arange(top1.shape[0]), top1]]


def check_top_k(k: int, num_classes: int) -> None:
    """The classifier's ``top_k``, checked against the model's classes before it runs."""
    if not 1 <= k <= num_classes:
        raise invalid(f"top_k must be between 1 and {num_classes} (the model's classes), got {k}")


def top_k_of(outputs: Sequence[np.ndarray], k: int) -> tuple[list[list[int]], list[list[float]]]:
    """One request's ``ranked`` outputs -> (indices (n, k), probabilities (n, k)), highest first."""
    if k == 1:  # the common case: ranked already, only Python lists to build
        return [[i] for i in outputs[TOP1].tolist()], [[p] for p in outputs[TOP1_PROB].tolist()]
    return top_k(outputs[PROBS], k)


def top_k(probs: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """probs (n, K) -> (indices (n, k), probabilities (n, k)) highest first, as Python lists."""
    idx = probs.argmax(axis=1)[:, None] if k == 1 else np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return idx.tolist(), np.take_along_axis(probs, idx, axis=1).tolist()
