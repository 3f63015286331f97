"""The response cache alone (server/runtime/cache.py): LRU by bytes, eviction counts, the key
(model, version, file fingerprint, input shape, dtype and bytes), entries larger than the cache,
a retired version's entries dropped, and the byte bound against what tracemalloc measures."""

from __future__ import annotations

import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.config import ServerConfig
from server.metrics import ServerMetrics
from server.runtime.cache import ResponseCache, entry_bytes

RNG = np.random.default_rng(0)


class Served(SimpleNamespace):
    """What the cache reads of a ServedVersion; hashed by identity, as ServedVersion is."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def served(name: str = "tiny", version: int = 1, fingerprint: tuple = (11, 22, 33, (), "abc")) -> Served:
    return Served(name=name, version=version, files=SimpleNamespace(fingerprint=fingerprint), accepting=True)


def image(n: int = 1) -> np.ndarray:
    return RNG.random((n, 1, 28, 28), dtype=np.float32)


def outputs(n: int = 1, k: int = 10) -> list[np.ndarray]:
    """The shape of what the batch function returns: logits, probabilities, probs, top-1, its probability."""
    p = RNG.random((n, k), dtype=np.float32)
    return [p, p, p, p.argmax(axis=1), p.max(axis=1)]


def make_cache(capacity: int) -> tuple[ResponseCache, ServerMetrics]:
    metrics = ServerMetrics(CollectorRegistry())
    return ResponseCache(capacity, metrics), metrics


def value(metrics: ServerMetrics, name: str, s: Served | None = None) -> float | None:
    labels = {} if s is None else {"model": s.name, "version": str(s.version)}
    return metrics.registry.get_sample_value(name, labels)


def store(cache: ResponseCache, s: Served, x: np.ndarray, out: list[np.ndarray]) -> bool:
    key, hit = cache.lookup(s, x)
    assert key is not None and hit is None
    return cache.put(s, key, out)


def test_a_stored_answer_is_returned_read_only_and_counted() -> None:
    cache, metrics = make_cache(1 << 20)
    s = served()
    cache.attach(s)
    x, out = image(), outputs()
    assert store(cache, s, x, out)
    out[0][0, 0] = -1.0  # the cache holds copies: later writes to the batch's arrays do not leak in
    key, hit = cache.lookup(s, x.copy())  # equal bytes, another array
    assert key is not None and hit is not None
    assert [h.shape for h in hit] == [o.shape for o in out]
    assert hit[0][0, 0] != -1.0 and np.array_equal(hit[3], out[3])
    assert not any(h.flags.writeable for h in hit)
    with pytest.raises(ValueError):
        hit[1][0, 0] = 0.0
    assert value(metrics, "cnn_cache_hits_total", s) == 1
    assert value(metrics, "cnn_cache_misses_total", s) == 1
    assert value(metrics, "cnn_cache_bytes") == cache.bytes == entry_bytes(out)


def test_the_key_is_the_input_bytes_shape_and_dtype() -> None:
    cache, _ = make_cache(1 << 20)
    s = served()
    cache.attach(s)
    x = image(2)
    assert store(cache, s, x, outputs(2))
    changed = x.copy()
    changed[1, 0, 27, 27] += 1e-6  # one pixel of the second image
    for other in (changed, x[:1], x.reshape(1, 2, 28, 28), x.astype(np.float64)):
        assert cache.lookup(s, other)[1] is None
    assert cache.lookup(s, np.asfortranarray(x))[1] is not None  # same values, another memory layout


def test_the_key_includes_model_version_and_file_fingerprint() -> None:
    cache, metrics = make_cache(1 << 20)
    v1 = served()
    others = [
        served(name="other"),
        served(version=2),
        served(fingerprint=(11, 22, 44, (), "abc")),  # version 1 re-published with new files
    ]
    for s in (v1, *others):
        cache.attach(s)
    x = image()
    assert store(cache, v1, x, outputs())
    for s in others:
        assert cache.lookup(s, x)[1] is None
    assert cache.lookup(v1, x)[1] is not None
    # Counted per model and version: the re-published version 1 shares v1's series.
    assert value(metrics, "cnn_cache_misses_total", v1) == 2
    assert value(metrics, "cnn_cache_hits_total", v1) == 1
    assert value(metrics, "cnn_cache_misses_total", others[0]) == 1


def test_a_version_not_attached_or_no_longer_accepting_is_not_served() -> None:
    cache, _ = make_cache(1 << 20)
    s = served()
    assert cache.lookup(s, image()) == (None, None)  # never attached: its config did not ask
    cache.attach(s)
    x = image()
    key, _ = cache.lookup(s, x)
    assert key is not None
    s.accepting = False  # retiring (a newer version took over): neither answered nor stored
    assert cache.lookup(s, x) == (None, None)
    assert not cache.put(s, key, outputs())
    assert len(cache) == 0


def test_least_recently_used_goes_first_and_evictions_are_counted() -> None:
    out = outputs()
    size = entry_bytes(out)
    cache, metrics = make_cache(3 * size)  # room for exactly three entries
    s = served()
    cache.attach(s)
    xs = [image() for _ in range(5)]
    for x in xs[:3]:
        assert store(cache, s, x, out)
    assert cache.lookup(s, xs[0])[1] is not None  # 0 is now the most recently used: 1 is the oldest
    assert store(cache, s, xs[3], out)
    assert cache.lookup(s, xs[1])[1] is None  # evicted
    assert value(metrics, "cnn_cache_evictions_total", s) == 1
    assert all(cache.lookup(s, x)[1] is not None for x in (xs[0], xs[2], xs[3]))
    assert cache.bytes == 3 * size == value(metrics, "cnn_cache_bytes")
    # A bigger entry (64 images) makes room for itself: as many of the oldest as needed go.
    big = outputs(64)
    cache2, metrics2 = make_cache(entry_bytes(big) + size)
    cache2.attach(s)
    for x in xs[:3]:
        assert store(cache2, s, x, out)
    assert store(cache2, s, image(64), big)
    assert value(metrics2, "cnn_cache_evictions_total", s) == 2  # the two oldest
    assert cache2.lookup(s, xs[2])[1] is not None
    assert cache2.bytes == entry_bytes(big) + size == cache2.capacity_bytes


def test_an_entry_larger_than_the_cache_is_not_stored_and_evicts_nothing() -> None:
    out = outputs()
    cache, metrics = make_cache(entry_bytes(out) + 100)
    s = served()
    cache.attach(s)
    x = image()
    assert store(cache, s, x, out)
    assert not store(cache, s, image(64), outputs(64))
    assert cache.lookup(s, x)[1] is not None
    assert len(cache) == 1 and value(metrics, "cnn_cache_evictions_total", s) == 0


def test_the_same_key_stored_twice_is_counted_once() -> None:
    cache, _ = make_cache(1 << 20)
    s = served()
    cache.attach(s)
    x, out = image(), outputs()
    key, _ = cache.lookup(s, x)
    second, _ = cache.lookup(s, x)  # two identical requests missed at once
    assert key is not None and second == key
    assert cache.put(s, key, out) and cache.put(s, second, outputs())
    assert len(cache) == 1 and cache.bytes == entry_bytes(out)


def test_detach_drops_only_that_versions_entries() -> None:
    cache, metrics = make_cache(1 << 20)
    v1, v2 = served(version=1), served(version=2)
    cache.attach(v1)
    cache.attach(v2)
    x1, x2 = image(), image()
    assert store(cache, v1, x1, outputs()) and store(cache, v1, x2, outputs())
    assert store(cache, v2, x1, outputs())
    cache.detach(v1)
    assert len(cache) == 1 and cache.bytes == entry_bytes(outputs())
    assert value(metrics, "cnn_cache_bytes") == cache.bytes
    assert cache.lookup(v1, x1) == (None, None)
    assert cache.lookup(v2, x1)[1] is not None
    assert value(metrics, "cnn_cache_evictions_total", v1) == 0  # dropped, not evicted
    cache.detach(v1)  # twice (a drain that timed out, then shutdown): nothing more happens


@pytest.mark.parametrize("n, entries", [(1, 3000), (64, 200)])
def test_the_bytes_accounted_cover_the_memory_the_entries_take(n: int, entries: int) -> None:
    """The bound users set with --cache-size-bytes is real: tracemalloc (numpy reports its array
    data to it) sees no more than the cache counts."""
    cache, _ = make_cache(1 << 40)
    s = served()
    cache.attach(s)
    xs = [image(n) for _ in range(entries)]
    out = outputs(n)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for x in xs:
            assert store(cache, s, x, out)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used <= cache.bytes == entries * entry_bytes(out)


def test_cache_size_flag_and_env(tmp_path, capsys) -> None:
    repo = ["--repository", str(tmp_path)]
    assert ServerConfig.from_args(repo, {}).cache_size_bytes == 0  # off unless asked for
    assert ServerConfig.from_args(repo, {"CNN_SERVE_CACHE_SIZE_BYTES": "4096"}).cache_size_bytes == 4096
    env = {"CNN_SERVE_CACHE_SIZE_BYTES": "4096"}
    assert ServerConfig.from_args([*repo, "--cache-size-bytes", "8192"], env).cache_size_bytes == 8192
    with pytest.raises(SystemExit) as info:
        ServerConfig.from_args([*repo, "--cache-size-bytes", "-1"], {})
    assert info.value.code == 2 and "--cache-size-bytes must be >= 0, got -1" in capsys.readouterr().err
