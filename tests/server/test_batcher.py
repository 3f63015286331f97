"""The batcher on a bare request queue with a fake model: batch formation, max delay, idle fast
path, error isolation, backpressure, deadline and cancellation drops, draining on STOP."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from server.errors import ServeError
from server.runtime.batcher import Batcher
from server.runtime.queue import QueuePolicy, RequestQueue


class FakeModel:
    """run(x) -> [x * 2, x.sum per row]; records batch sizes; optional delay; -1 pixels make it fail."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.threads: list[int] = []
        self.started = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray):
        with self.lock:
            self.batches.append(int(x.shape[0]))
            self.threads.append(threading.get_ident())
        self.started.set()
        if self.delay_s:
            time.sleep(self.delay_s)
        if (x == -1).any():
            raise RuntimeError("bad pixel value -1")
        return [x * 2, x.reshape(x.shape[0], -1).sum(axis=1)]


def image(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 1, 2, 2), value, dtype=np.float32)  # (n, C, H, W)


def new_queue(maxsize: int = 10_000) -> RequestQueue:
    return RequestQueue(QueuePolicy.simple(maxsize))


def submit(
    q: RequestQueue, x: np.ndarray, deadline: float | None = None, what: str = "input"
) -> asyncio.Future:
    return q.submit(x, deadline, what)


def run(coro, timeout: float = 20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def start(
    model: FakeModel, queue: RequestQueue, **kw
) -> tuple[Batcher, asyncio.Task, ThreadPoolExecutor]:
    ex = ThreadPoolExecutor(1)
    kw.setdefault("max_batch_size", 4)
    kw.setdefault("max_delay_s", 0.05)
    b = Batcher(queue, model, ex, **kw)
    return b, asyncio.create_task(b.run()), ex


async def stop(queue: RequestQueue, task: asyncio.Task, ex: ThreadPoolExecutor) -> None:
    queue.put_stop()
    await asyncio.wait_for(task, 10)
    ex.shutdown()


def test_batches_fill_to_max_images_and_each_request_gets_its_own_slice() -> None:
    async def main():
        q = new_queue()
        model = FakeModel()
        futs = [submit(q, image(i)) for i in range(10)]  # queued before the batcher starts
        b, task, ex = await start(model, q, max_batch_size=4)
        results = await asyncio.gather(*futs)
        await stop(q, task, ex)
        return model, results

    model, results = run(main())
    assert model.batches == [4, 4, 2]
    for i, (doubled, sums) in enumerate(results):
        assert doubled.shape == (1, 1, 2, 2) and np.all(doubled == 2 * i)
        assert sums.tolist() == [4.0 * i]


def test_a_batch_holds_each_request_s_pixels_whatever_the_layout_of_its_array() -> None:
    """A batch is assembled from C-contiguous float32 bytes: a transposed view or float64 array
    from some caller is converted, never read as raw memory of another layout or type."""
    plain = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    transposed = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2).transpose(0, 1, 3, 2)
    wide = np.full((1, 1, 2, 2), 7.0, dtype=np.float64)

    async def main():
        q = new_queue()
        model = FakeModel()
        futs = [submit(q, x) for x in (plain, transposed, wide)]  # queued before: one batch
        b, task, ex = await start(model, q, max_batch_size=8)
        results = await asyncio.gather(*futs)
        await stop(q, task, ex)
        return model, results

    model, results = run(main())
    assert model.batches == [4]
    for x, (doubled, _) in zip((plain, transposed, wide), results, strict=True):
        np.testing.assert_array_equal(doubled, 2 * x)


def test_requests_are_never_split_across_batches() -> None:
    async def main():
        q = new_queue()
        model = FakeModel()
        futs = [submit(q, image(v, n)) for v, n in ((1, 3), (2, 3), (3, 1), (4, 2))]
        b, task, ex = await start(model, q, max_batch_size=4)
        results = await asyncio.gather(*futs)
        await stop(q, task, ex)
        return model, results

    model, results = run(main())
    assert model.batches == [3, 4, 2]  # 3 | 3+1 | 2: the 3-image request never straddles a batch
    assert [r[0].shape[0] for r in results] == [3, 3, 1, 2]
    assert [float(r[0][0, 0, 0, 0]) for r in results] == [2, 4, 6, 8]


def test_under_load_a_batch_waits_for_more_until_the_oldest_waited_max_delay() -> None:
    async def main():
        q = new_queue()
        model = FakeModel()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        futs = [submit(q, image(1)), submit(q, image(2))]  # two waiting: not idle
        b, task, ex = await start(model, q, max_batch_size=8, max_delay_s=0.3)
        await asyncio.sleep(0.1)
        futs.append(submit(q, image(3)))  # arrives within the delay: joins the batch
        await asyncio.gather(*futs)
        elapsed = loop.time() - t0
        await stop(q, task, ex)
        return model, elapsed

    model, elapsed = run(main())
    # One batch of three, run once the oldest had waited the delay (a batch that waited for ever
    # would hang the test; a busy machine only makes the wait longer, so only the lower bound).
    assert model.batches == [3]
    assert elapsed >= 0.28


def test_a_full_batch_runs_without_waiting_for_the_delay() -> None:
    async def main():
        q = new_queue()
        model = FakeModel()
        loop = asyncio.get_running_loop()
        futs = [submit(q, image(i)) for i in range(4)]
        t0 = loop.time()
        b, task, ex = await start(model, q, max_batch_size=4, max_delay_s=120.0)
        await asyncio.gather(*futs)
        elapsed = loop.time() - t0
        await stop(q, task, ex)
        return model, elapsed

    model, elapsed = run(main(), timeout=100)
    assert model.batches == [4] and elapsed < 60  # far from the 120 s delay, however busy the machine


def test_idle_fast_path_runs_a_lone_request_at_once() -> None:
    async def main():
        q = new_queue()
        model = FakeModel()
        b, task, ex = await start(model, q, max_batch_size=8, max_delay_s=2.0)
        loop = asyncio.get_running_loop()
        latencies = []
        for i in range(3):  # concurrency 1: each request alone in an idle queue
            t0 = loop.time()
            await submit(q, image(i))
            latencies.append(loop.time() - t0)
        await stop(q, task, ex)
        return model, latencies

    model, latencies = run(main())
    assert model.batches == [1, 1, 1]
    assert max(latencies) < 0.5  # far below the 2 s max delay


def test_one_bad_request_fails_alone_and_its_batch_mates_succeed() -> None:
    async def main():
        q = new_queue()
        model = FakeModel()
        futs = [submit(q, image(1)), submit(q, image(-1)), submit(q, image(3))]
        b, task, ex = await start(model, q, max_batch_size=8)
        results = await asyncio.gather(*futs, return_exceptions=True)
        # The instance keeps serving after the failure.
        after = await submit(q, image(5))
        await stop(q, task, ex)
        return model, results, after

    model, results, after = run(main())
    assert model.batches[0] == 3  # first tried together, then one by one
    assert float(results[0][0][0, 0, 0, 0]) == 2.0 and float(results[2][0][0, 0, 0, 0]) == 6.0
    assert isinstance(results[1], ServeError) and results[1].code == grpc.StatusCode.INTERNAL
    assert "bad pixel value" in results[1].message
    assert float(after[0][0, 0, 0, 0]) == 10.0


def test_nan_or_inf_images_fail_their_own_request_before_the_model_sees_them() -> None:
    async def main():
        q = new_queue()
        model = FakeModel()
        bad = image(2, n=2)
        bad[1, 0, 1, 0] = np.nan  # second image of a 2-image request
        inf = image(4)
        inf[0, 0, 0, 1] = np.inf
        huge = image(5e37, n=4)  # finite, but their sum (8e38) would overflow in float32
        futs = [
            submit(q, image(1)),
            submit(q, bad, what="image"),
            submit(q, image(3)),
            submit(q, inf, what="input 'input'"),
            submit(q, huge),
        ]
        b, task, ex = await start(model, q, max_batch_size=16)
        results = await asyncio.gather(*futs, return_exceptions=True)
        await stop(q, task, ex)
        return model, results

    model, results = run(main())
    assert model.batches == [6]  # only the finite requests reached the model, together
    assert float(results[0][0][0, 0, 0, 0]) == 2.0 and float(results[2][0][0, 0, 0, 0]) == 6.0
    for err in results[1], results[3]:
        assert isinstance(err, ServeError) and err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1 contains NaN or Inf (first at index [0, 1, 0])" in results[1].message
    assert "input 'input' contains NaN or Inf (first at index [0, 0, 0, 1])" in results[3].message
    assert results[4][0].shape == (4, 1, 2, 2) and float(results[4][0][3, 0, 1, 1]) == float(
        np.float32(5e37) * 2
    )


def test_full_queue_rejects_at_once_with_resource_exhausted() -> None:
    async def main():
        q = new_queue(2)
        submit(q, image(1))
        submit(q, image(2))
        with pytest.raises(ServeError) as info:
            submit(q, image(3))  # synchronous: the caller learns it without waiting for the queue
        return info.value, q.qsize()

    err, depth = run(main())
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in err.message
    assert depth == 2  # nothing queued beyond the bound


def test_expired_and_cancelled_requests_are_dropped_before_inference() -> None:
    async def main():
        q = new_queue()
        model = FakeModel(delay_s=0.3)
        loop = asyncio.get_running_loop()
        b, task, ex = await start(model, q, max_batch_size=8, max_delay_s=0.0)
        first = submit(q, image(1))
        await loop.run_in_executor(None, model.started.wait, 5)  # the instance is busy for 0.3 s
        late = submit(q, image(2), deadline=loop.time() + 0.05)
        cancelled = submit(q, image(3))
        ok = submit(q, image(4))
        cancelled.cancel()
        results = await asyncio.gather(first, late, ok, return_exceptions=True)
        await stop(q, task, ex)
        return model, results

    model, (first, late, ok) = run(main())
    assert isinstance(late, ServeError) and late.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert float(first[0][0, 0, 0, 0]) == 2.0 and float(ok[0][0, 0, 0, 0]) == 8.0
    assert model.batches == [1, 1]  # the expired and the cancelled request never reached the model


def test_stop_answers_everything_queued_before_it() -> None:
    async def main():
        q = new_queue()
        model = FakeModel(delay_s=0.01)
        futs = [submit(q, image(i)) for i in range(7)]
        q.put_stop()
        b, task, ex = await start(model, q, max_batch_size=2)
        await asyncio.wait_for(task, 10)
        ex.shutdown()
        return model, [f.done() and not f.cancelled() and f.exception() is None for f in futs]

    model, answered = run(main())
    assert all(answered) and sum(model.batches) == 7


def test_only_idle_lone_requests_cheaper_than_a_thread_hop_run_inline() -> None:
    async def main():
        q = new_queue()
        model = FakeModel()
        b, task, ex = await start(model, q, max_batch_size=8, max_delay_s=0.0, inline_max_images=2)
        await submit(q, image(1, n=2))  # idle, within the limit: inline
        await submit(q, image(1, n=3))  # idle, over the limit: thread
        await asyncio.gather(submit(q, image(2)), submit(q, image(3)))  # under load: thread
        await stop(q, task, ex)
        return model, threading.get_ident()

    model, loop_thread = run(main())
    assert model.batches == [2, 3, 2]
    on_loop = [t == loop_thread for t in model.threads]
    assert on_loop == [True, False, False]


def test_inline_runs_use_their_own_batch_function() -> None:
    """The server gives inline runs a single-threaded onnxruntime session; the thread the others."""

    async def main():
        q = new_queue()
        threaded, solo = FakeModel(), FakeModel()
        b, task, ex = await start(
            threaded, q, max_batch_size=8, max_delay_s=0.0, inline_max_images=1, run_solo=solo
        )
        inline = await submit(q, image(4))  # idle and small: inline
        queued = await submit(q, image(5, n=2))  # over the inline limit: the thread
        await stop(q, task, ex)
        return threaded, solo, inline, queued

    threaded, solo, inline, queued = run(main())
    assert solo.batches == [1] and threaded.batches == [2]
    assert float(inline[0][0, 0, 0, 0]) == 8.0 and float(queued[0][1, 0, 0, 0]) == 10.0


def test_batches_within_the_solo_limit_use_the_single_threaded_session() -> None:
    """On the thread (inline off), batches up to solo_max_images go to the solo batch function,
    on the idle path and under load alike; larger ones to the pooled one. Each request still gets
    its own slice."""

    async def main():
        q = new_queue()
        pooled, solo = FakeModel(), FakeModel()
        b, task, ex = await start(
            pooled, q, max_batch_size=8, max_delay_s=0.0, solo_max_images=4, run_solo=solo
        )
        answers = [
            await submit(q, image(3, n=2)),  # idle path, within the limit: solo
            await submit(q, image(4, n=5)),  # idle path, over it: the pool
            *await asyncio.gather(submit(q, image(5, n=2)), submit(q, image(6, n=2))),  # load, 4: solo
            *await asyncio.gather(submit(q, image(7, n=3)), submit(q, image(8, n=2))),  # load, 5: pool
        ]
        await stop(q, task, ex)
        return pooled, solo, answers, threading.get_ident()

    pooled, solo, answers, loop_thread = run(main())
    assert solo.batches == [2, 4] and pooled.batches == [5, 5]
    assert all(t != loop_thread for t in solo.threads + pooled.threads)  # inline is off: the thread
    assert [a[0].shape[0] for a in answers] == [2, 5, 2, 2, 3, 2]
    assert [float(a[0][-1, 0, 0, 0]) for a in answers] == [6.0, 8.0, 10.0, 12.0, 14.0, 16.0]


def test_solo_limit_is_where_the_single_thread_stops_winning() -> None:
    from server.runtime.solo import solo_limit

    def timings(per_image_solo: float, pool_fixed: float, per_image_pool: float):
        asked = []

        def timed(b: int) -> tuple[float, float]:
            asked.append(b)
            return 5e-6 + per_image_solo * b, pool_fixed + per_image_pool * b

        return timed, asked

    lenet_like, asked = timings(10e-6, 60e-6, 6e-6)  # the pool not a quarter faster up to b=16
    assert solo_limit(lenet_like, 64) == 16 and asked == [1, 2, 4, 8, 16, 32]  # stops at the first loss
    big, asked = timings(5e-3, 100e-6, 2.6e-3)  # a large model: the pool wins at once
    assert solo_limit(big, 64) == 0 and asked == [1]
    close, _ = timings(10e-6, 5e-6, 9e-6)  # the pool a little faster everywhere: not worth its threads
    assert solo_limit(close, 64) == 64
    tiny, asked = timings(1e-6, 60e-6, 1e-6)  # the pool never wins
    assert solo_limit(tiny, 48) == 48 and asked == [1, 2, 4, 8, 16, 32, 48]
    assert solo_limit(tiny, 1) == 1


def test_inline_limit_from_load_time_measurements() -> None:
    from server.runtime.loader import _inline_limit

    lenet = {1: 20e-6, 64: 800e-6}  # ~12.4 us per extra image
    assert _inline_limit(lenet, 64, 100e-6) == 7
    assert _inline_limit(lenet, 64, 0.0) == 0  # disabled
    assert _inline_limit({1: 5e-3, 64: 0.4}, 64, 100e-6) == 0  # ResNet-18: always the thread
    assert _inline_limit({1: 10e-6, 64: 10e-6}, 64, 100e-6) == 64


def test_top_k_orders_by_probability_on_every_path() -> None:
    from server.runtime.postprocess import top_k

    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=np.float32)
    assert top_k(probs[:1], 1) == ([[1]], [[pytest.approx(0.6)]])
    idx, vals = top_k(probs, 1)
    assert idx == [[1], [0]] and vals == [[pytest.approx(0.6)], [pytest.approx(0.5)]]
    idx, vals = top_k(probs, 3)
    assert idx == [[1, 2, 0], [0, 2, 1]]
    assert vals[1] == [pytest.approx(0.5), pytest.approx(0.3), pytest.approx(0.2)]
