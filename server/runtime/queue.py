"""The waiting requests of one model version, ordered as Triton's dynamic batcher orders them.

A model's ``dynamic_batching`` in config.pbtxt sets the policy (``QueuePolicy.from_config``):

* ``priority_levels`` (1 = highest) and ``default_priority_level``: a request names its level
  with the KServe v2 parameter ``priority`` (0 or absent: the default). Every level is its own
  FIFO; batchers take from the highest non-empty level first, so a high-priority request
  overtakes every queued request of a lower one (never one already in a batch).
* ``default_queue_policy`` and ``priority_queue_policy`` (per level): ``max_queue_size`` bounds
  each level (beyond: RESOURCE_EXHAUSTED at once; the server's ``--max-queue-size`` is the
  ceiling), ``default_timeout_microseconds`` is how long a request may wait in the queue
  (0: no limit), ``allow_timeout_override`` lets a request's ``timeout`` parameter shorten it
  (never lengthen it), ``timeout_action`` says what happens once it passes: REJECT answers
  DEADLINE_EXCEEDED at once (the request leaves the queue), DELAY moves it behind every request of
  its own and higher levels that has not timed out (it still runs, before lower levels).

Only the expired request is affected, never the requests batched with it. Timers exist only for
requests with a queue timeout; a model without a policy pays nothing for any of this.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

import numpy as np

from protos.inference import model_config_pb2 as mc
from server.errors import deadline_exceeded, invalid, overloaded
from server.tracing import RequestTrace

STOP = object()  # queue sentinel: the batcher that takes it finishes its batch and exits


@dataclass(slots=True, eq=False)
class WorkItem:
    inputs: np.ndarray  # (n, C, H, W) float32
    future: asyncio.Future
    n: int
    enqueued: float  # loop.time()
    deadline: float | None  # loop.time() after which the result is useless (a gRPC deadline)
    what: str = "input"  # how an error names this request's tensor ("image": per image, classifier.v1)
    level: int = 0  # its priority level's index (0: priority 1)
    expiry: asyncio.TimerHandle | None = None  # its queue timeout, while it waits
    trace: RequestTrace | None = None  # its trace (server.tracing); None when it is not traced


@dataclass(frozen=True)
class LevelPolicy:
    max_size: int  # requests waiting at this level
    timeout_s: float = 0.0  # how long one may wait; 0: no limit
    delay: bool = False  # what a timeout does: True DELAY, False REJECT
    allow_override: bool = False  # a request's "timeout" may shorten timeout_s


@dataclass(frozen=True)
class QueuePolicy:
    levels: tuple[LevelPolicy, ...]  # [0] is priority 1, the highest
    default_level: int = 1
    prioritized: bool = False  # the model set priority_levels: requests may name one

    @classmethod
    def simple(cls, max_size: int) -> QueuePolicy:
        return cls((LevelPolicy(max_size),))

    @classmethod
    def from_config(
        cls, batching: mc.ModelDynamicBatching, max_queue_ceiling: int, source: str
    ) -> QueuePolicy:
        """The policy of a model's ``dynamic_batching``; its sizes never above ``max_queue_ceiling``."""
        default = batching.default_queue_policy
        count = int(batching.priority_levels)
        default_level = int(batching.default_priority_level) or 1
        if count and not 1 <= default_level <= count:
            raise ValueError(
                f"{source}: default_priority_level {default_level} is not in [1, priority_levels {count}]"
            )
        unknown = sorted(set(batching.priority_queue_policy) - set(range(1, count + 1)))
        if unknown:
            raise ValueError(
                f"{source}: priority_queue_policy names levels {unknown} beyond priority_levels {count}"
            )
        per_level = dict(batching.priority_queue_policy)
        levels = tuple(
            _level(per_level.get(i, default), max_queue_ceiling) for i in range(1, max(count, 1) + 1)
        )
        return cls(levels, default_level if count else 1, prioritized=count > 0)

    def level_of(self, priority: int) -> int:
        """A request's ``priority`` parameter -> its level's index (0: the model's default)."""
        if not self.prioritized or priority == 0:
            return self.default_level - 1
        if not 1 <= priority <= len(self.levels):
            raise invalid(
                f"priority must be between 1 (highest) and {len(self.levels)} (the model's priority_levels), "
                f"or 0 for the default, got {priority}"
            )
        return priority - 1

    def timeout_of(self, level: int, requested_us: int) -> float:
        """Seconds a request at ``level`` may wait; 0: no limit. A request may only shorten it."""
        policy = self.levels[level]
        if requested_us < 0:
            raise invalid(f"timeout must be >= 0 microseconds, got {requested_us}")
        if requested_us and policy.allow_override:
            asked = requested_us / 1e6
            return min(asked, policy.timeout_s) if policy.timeout_s else asked
        return policy.timeout_s


def _level(policy: mc.ModelQueuePolicy, ceiling: int) -> LevelPolicy:
    size = min(ceiling, policy.max_queue_size) if policy.max_queue_size > 0 else ceiling
    return LevelPolicy(
        max_size=int(size),
        timeout_s=policy.default_timeout_microseconds / 1e6,
        delay=policy.timeout_action == mc.ModelQueuePolicy.DELAY,
        allow_override=policy.allow_timeout_override,
    )


class RequestQueue:
    """One FIFO per priority level (+ the delayed requests of each), bounded per level. The
    batchers ``await get()`` a request, ``take()`` one if any is waiting now, and take ``STOP``
    (``put_stop``) only once every request is answered."""

    def __init__(self, policy: QueuePolicy) -> None:
        self.policy = policy
        self._waiting: list[deque[WorkItem]] = [deque() for _ in policy.levels]
        self._delayed: list[deque[WorkItem]] = [deque() for _ in policy.levels]
        self._size = 0
        self._stops = 0
        self._getters: deque[asyncio.Future] = deque()

    @property
    def maxsize(self) -> int:
        return sum(level.max_size for level in self.policy.levels)

    def qsize(self) -> int:
        return self._size

    def empty(self) -> bool:
        return self._size == 0 and self._stops == 0

    def submit(
        self,
        inputs: np.ndarray,
        deadline: float | None = None,
        what: str = "input",
        priority: int = 0,
        timeout_us: int = 0,
        trace: RequestTrace | None = None,
    ) -> asyncio.Future:
        """Enqueue one request; its future gets the list of per-output slices ``[(n, ...), ...]``.

        Raises RESOURCE_EXHAUSTED at once when its level is full: under overload the caller learns
        it immediately instead of piling up (memory stays bounded by the queue sizes).
        """
        level = self.policy.level_of(priority)
        timeout_s = self.policy.timeout_of(level, timeout_us)
        waiting = self._waiting[level]
        if len(waiting) + len(self._delayed[level]) >= self.policy.levels[level].max_size:
            where = f" at priority {level + 1}" if self.policy.prioritized else ""
            raise overloaded(
                f"server overloaded: {self.policy.levels[level].max_size} requests already waiting{where} "
                "for this model; retry with backoff"
            )
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        now = loop.time()
        item = WorkItem(inputs, fut, int(inputs.shape[0]), now, deadline, what, level, trace=trace)
        if timeout_s:
            item.expiry = loop.call_at(now + timeout_s, self._expire, item)
        if trace is not None:
            trace.enqueued()
        waiting.append(item)
        self._size += 1
        self._wake()
        return fut

    def put_stop(self) -> None:
        """One batcher ends once it takes this, after every request queued before or after."""
        self._stops += 1
        self._wake()

    async def get(self) -> WorkItem | object:
        while True:
            item = self.take()
            if item is not None:
                return item
            waiter = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._getters:
                    self._getters.remove(waiter)
                raise

    def take(self) -> WorkItem | object | None:
        """The next request in priority order, or STOP once none is left; None when empty."""
        for waiting, delayed in zip(self._waiting, self._delayed, strict=True):
            for source in (waiting, delayed):
                while source:
                    item = source.popleft()
                    self._size -= 1
                    if item.expiry is not None:
                        item.expiry.cancel()
                        item.expiry = None
                    if not item.future.done():  # else: cancelled by its client while queued
                        return item
        if self._stops:
            self._stops -= 1
            return STOP
        return None

    def leftovers(self) -> list[WorkItem]:
        """Every request still queued (a drain that ran out of time answers them)."""
        out = []
        while (item := self.take()) is not None:
            if item is not STOP:
                assert isinstance(item, WorkItem)
                out.append(item)
        return out

    def _expire(self, item: WorkItem) -> None:
        """The request's queue timeout passed while it was still waiting."""
        item.expiry = None
        level = self.policy.levels[item.level]
        try:
            self._waiting[item.level].remove(item)  # O(queue size), once per expiry
        except ValueError:
            return  # taken already
        if level.delay:
            self._delayed[item.level].append(item)
            return
        self._size -= 1
        if not item.future.done():
            waited = asyncio.get_running_loop().time() - item.enqueued
            item.future.set_exception(
                deadline_exceeded(
                    f"request timed out after {waited * 1e3:.1f} ms in the queue (queue policy REJECT)"
                )
            )

    def _wake(self) -> None:
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
