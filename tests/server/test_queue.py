"""The queue policy (Triton's dynamic_batching fields) without a server: the policy read from a
config, requests handed out by priority and in order within a level, each level bounded, queue
timeouts that reject or delay only the expired request, preferred batch sizes that run at once."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from protos.inference import model_config_pb2 as mc
from server.errors import ServeError
from server.runtime.batcher import Batcher
from server.runtime.queue import STOP, QueuePolicy, RequestQueue


def batching(**kw) -> mc.ModelDynamicBatching:
    b = mc.ModelDynamicBatching(**{k: v for k, v in kw.items() if k != "per_level"})
    for level, policy in kw.get("per_level", {}).items():
        b.priority_queue_policy[level].CopyFrom(policy)
    return b


def x(value: float = 0.0, n: int = 1) -> np.ndarray:
    return np.full((n, 1, 1, 1), value, np.float32)  # (n, C, H, W)


def run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_the_policy_comes_from_dynamic_batching_under_the_server_ceiling() -> None:
    policy = QueuePolicy.from_config(
        batching(
            priority_levels=3,
            default_priority_level=2,
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=50, default_timeout_microseconds=2000),
            per_level={1: mc.ModelQueuePolicy(max_queue_size=500, timeout_action=mc.ModelQueuePolicy.DELAY)},
        ),
        max_queue_ceiling=100,
        source="m/config.pbtxt",
    )
    assert [lv.max_size for lv in policy.levels] == [100, 50, 50]  # 500 capped by --max-queue-size
    assert policy.levels[0].delay and not policy.levels[1].delay and policy.levels[1].timeout_s == 0.002
    assert policy.level_of(0) == 1 and policy.level_of(1) == 0 and policy.level_of(3) == 2
    with pytest.raises(ServeError, match="priority must be between 1 .* and 3"):
        policy.level_of(4)
    plain = QueuePolicy.from_config(batching(), 256, "m")
    assert len(plain.levels) == 1 and plain.level_of(7) == 0  # no priority_levels: the parameter is ignored
    with pytest.raises(ValueError, match="default_priority_level 5 is not in"):
        QueuePolicy.from_config(batching(priority_levels=2, default_priority_level=5), 256, "m")
    with pytest.raises(ValueError, match=r"levels \[4\] beyond priority_levels 2"):
        QueuePolicy.from_config(batching(priority_levels=2, per_level={4: mc.ModelQueuePolicy()}), 256, "m")


def test_a_request_may_shorten_its_queue_timeout_never_lengthen_it() -> None:
    fixed = QueuePolicy.from_config(
        batching(default_queue_policy=mc.ModelQueuePolicy(default_timeout_microseconds=5000)), 9, "m"
    )
    assert fixed.timeout_of(0, 1000) == 0.005  # no allow_timeout_override: the request's is ignored
    override = mc.ModelQueuePolicy(default_timeout_microseconds=5000, allow_timeout_override=True)
    open_ = QueuePolicy.from_config(batching(default_queue_policy=override), 9, "m")
    assert (
        open_.timeout_of(0, 1000) == 0.001
        and open_.timeout_of(0, 9000) == 0.005
        and open_.timeout_of(0, 0) == 0.005
    )
    with pytest.raises(ServeError, match="timeout must be >= 0"):
        open_.timeout_of(0, -1)


def two_levels(max_size: int = 10, **level1) -> RequestQueue:
    return RequestQueue(
        QueuePolicy.from_config(
            batching(
                priority_levels=2, default_priority_level=2, per_level={1: mc.ModelQueuePolicy(**level1)}
            ),
            max_size,
            "m",
        )
    )


def test_higher_priority_first_in_order_within_a_level_and_stop_last() -> None:
    async def main():
        q = two_levels()
        q.submit(x(1), priority=2)
        q.submit(x(2))  # the default level, 2
        q.submit(x(3), priority=1)
        q.put_stop()
        q.submit(x(4), priority=1)
        order = []
        while (item := q.take()) is not STOP:
            order.append(float(item.inputs[0, 0, 0, 0]))
        return order, q.take()

    order, after = run(main())
    assert order == [3, 4, 1, 2] and after is None


def test_each_level_is_bounded_on_its_own() -> None:
    async def main():
        q = two_levels(max_size=2)
        q.submit(x(), priority=2)
        q.submit(x(), priority=2)
        with pytest.raises(ServeError) as full:
            q.submit(x(), priority=2)
        q.submit(x(), priority=1)  # level 1 still has room
        return full.value, q.qsize()

    err, size = run(main())
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at priority 2" in err.message and size == 3


def test_reject_answers_the_expired_request_at_once_and_only_it() -> None:
    async def main():
        q = two_levels(default_timeout_microseconds=20_000)  # level 1: 20 ms, REJECT
        late = q.submit(x(1), priority=1)
        other = q.submit(x(2), priority=2)
        await asyncio.sleep(0.1)  # nobody takes: level 1's request times out
        return late, other, q.qsize(), q.take()

    late, other, size, next_item = run(main())
    assert (
        isinstance(late.exception(), ServeError)
        and late.exception().code == grpc.StatusCode.DEADLINE_EXCEEDED
    )
    assert "in the queue" in late.exception().message and not other.done()
    assert size == 1 and next_item.future is other


def test_delay_moves_the_expired_request_behind_its_level_not_behind_lower_ones() -> None:
    async def main():
        q = two_levels(default_timeout_microseconds=20_000, timeout_action=mc.ModelQueuePolicy.DELAY)
        q.submit(x(1), priority=1)  # will time out
        await asyncio.sleep(0.1)
        q.submit(x(2), priority=2)
        q.submit(x(3), priority=1, timeout_us=0)  # no override allowed: it times out too, later
        items = [q.take(), q.take(), q.take()]
        return [float(i.inputs[0, 0, 0, 0]) for i in items]

    assert run(main()) == [3, 1, 2]


class Slow:
    """A model whose batches are recorded by their first pixel values; the first batch waits."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.release = None

    def __call__(self, batch: np.ndarray):
        if not self.batches and self.release is not None:
            self.release.wait(10)
        self.batches.append([float(v) for v in batch[:, 0, 0, 0]])
        return [batch * 2]


def test_a_high_priority_request_overtakes_a_queue_of_low_ones_in_the_batcher() -> None:
    import threading

    async def main():
        q = two_levels(max_size=100)
        model = Slow()
        model.release = threading.Event()
        ex = ThreadPoolExecutor(1)
        batcher = Batcher(q, model, ex, max_batch_size=2, max_delay_s=0.0)
        task = asyncio.create_task(batcher.run())
        first = q.submit(x(0))
        await asyncio.sleep(0.05)  # the first batch is running (held)
        lows = [q.submit(x(10 + i)) for i in range(6)]
        high = q.submit(x(99), priority=1)
        model.release.set()
        await asyncio.gather(first, high, *lows)
        q.put_stop()
        await task
        ex.shutdown()
        return model.batches

    batches = run(main())
    assert batches[0] == [0] and 99 in batches[1]  # the next batch after the running one
    assert [v for b in batches[1:] for v in b if v != 99] == [10, 11, 12, 13, 14, 15]


def test_a_preferred_batch_size_runs_without_waiting_out_the_delay() -> None:
    async def main():
        q = RequestQueue(QueuePolicy.simple(100))
        model = Slow()
        ex = ThreadPoolExecutor(1)
        batcher = Batcher(q, model, ex, max_batch_size=8, max_delay_s=120.0, preferred_batch_sizes=(2,))
        task = asyncio.create_task(batcher.run())
        await asyncio.gather(q.submit(x(1)))  # a lone request: the idle path
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        a, b = q.submit(x(2)), q.submit(x(3))
        await asyncio.gather(a, b)
        waited = loop.time() - t0
        q.put_stop()
        await task
        ex.shutdown()
        return model.batches, waited

    batches, waited = run(main(), timeout=100)
    assert batches == [[1], [2, 3]] and waited < 60  # far from the 120 s delay
