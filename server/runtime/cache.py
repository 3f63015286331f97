"""The response cache: one per server process (``--cache-size-bytes``), shared by the model versions
whose config.pbtxt says ``response_cache { enable: true }``.

A request's key is its model name, version, the version's file fingerprint (inode, mtime and size
of its model file, its export report and its config.pbtxt: a version re-published with new files
never answers with the old files' outputs) and its input: shape, dtype and the xxh3-128 digest of
its bytes, seeded with a random 64-bit value drawn when the process starts. xxh3 is fast, not
cryptographic: with its public default seed, an input could be crafted offline to collide with
another client's (and each be answered with the other's outputs); the secret seed rules out that
offline crafting, though xxh3 promises nothing against chosen inputs the way a cryptographic hash
does. The value is read-only copies of the request's slice of every output the batch function
returns (``server.runtime.postprocess.ranked``), exactly what ``Inference.run`` hands the protocol
adapters on a miss.

Bounded in bytes, least recently used first out: an entry costs the bytes of its arrays plus
``ENTRY_OVERHEAD_BYTES`` + ``ARRAY_OVERHEAD_BYTES`` per array (the key, the bookkeeping and each
array's header, measured with tracemalloc in tests/server/test_cache.py). An entry larger than the
whole cache is not stored. Entries of a version go when it is retired (swapped out, removed,
server shutdown): ``detach`` runs once it has drained, so their memory returns without waiting
for eviction.

Everything here runs on the event loop (lookups, stores, the manager's attach and detach): no lock.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from server.metrics import CacheMetrics, ServerMetrics

if TYPE_CHECKING:
    from server.runtime.version import ServedVersion

# What an entry costs beyond its arrays' data: its key (a tuple holding the model's prefix, the
# shape and a 16-byte digest), its slot in the ordered dict and in its version's key set, the entry
# object and its list; and per array, numpy's object header (with its shape and strides). Above
# what tracemalloc measures (tests/server/test_cache.py checks the bound holds).
ENTRY_OVERHEAD_BYTES = 896
ARRAY_OVERHEAD_BYTES = 160

# (model, version, fingerprint), input shape, input dtype, xxh3-128 digest of the input bytes
Key = tuple[tuple[str, int, tuple], tuple[int, ...], str, bytes]


class _User:
    """One served version that uses the cache: its key prefix, counters and live keys."""

    __slots__ = ("prefix", "counters", "keys")

    def __init__(self, served: ServedVersion, counters: CacheMetrics) -> None:
        self.prefix = (served.name, served.version, served.files.fingerprint)
        self.counters = counters
        self.keys: set[Key] = set()


class _Entry:
    __slots__ = ("outputs", "nbytes", "user")

    def __init__(self, outputs: list[np.ndarray], nbytes: int, user: _User) -> None:
        self.outputs = outputs
        self.nbytes = nbytes
        self.user = user


def entry_bytes(outputs: Sequence[np.ndarray]) -> int:
    """What storing ``outputs`` counts against the bound."""
    return ENTRY_OVERHEAD_BYTES + sum(ARRAY_OVERHEAD_BYTES + a.nbytes for a in outputs)


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only copy that owns its memory (a slice would keep its whole batch's output alive)."""
    c = np.array(a, copy=True, order="C")
    c.flags.writeable = False
    return c


class ResponseCache:
    def __init__(self, capacity_bytes: int, metrics: ServerMetrics) -> None:
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self._metrics = metrics
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # least recently used first
        self._users: dict[ServedVersion, _User] = {}
        self._seed = secrets.randbits(64)  # see the module's doc

    def __len__(self) -> int:
        return len(self._entries)

    # ---- the manager: which versions use it ----

    def attach(self, served: ServedVersion) -> None:
        """``served`` (loaded with ``response_cache { enable: true }``) uses the cache from now on."""
        counters = self._metrics.cache_version(served.name, str(served.version))
        self._users[served] = _User(served, counters)

    def detach(self, served: ServedVersion) -> None:
        """``served`` was retired and has drained: drop its entries (their memory returns now)."""
        user = self._users.pop(served, None)
        if user is None:
            return
        for key in user.keys:
            self.bytes -= self._entries.pop(key).nbytes
        user.keys.clear()
        self._metrics.cache_bytes.set(self.bytes)

    # ---- the data plane ----

    def lookup(self, served: ServedVersion, x: np.ndarray) -> tuple[Key | None, list[np.ndarray] | None]:
        """(key, cached outputs as read-only arrays) of input ``x`` (n, C, H, W) for ``served``,
        counted as a hit or a miss; (None, None) when that version does not use the cache or no
        longer accepts requests (a retiring version's answers are not served from here: the request
        goes on to ``submit``, which sends it to the version that replaced it)."""
        user = self._users.get(served)
        if user is None or not served.accepting:
            return None, None
        x = np.ascontiguousarray(x)
        key = (user.prefix, x.shape, x.dtype.str, xxhash.xxh3_128_digest(x.data, self._seed))
        entry = self._entries.get(key)
        if entry is None:
            user.counters.misses.inc()  # type: ignore[attr-defined]
            return key, None
        self._entries.move_to_end(key)
        user.counters.hits.inc()  # type: ignore[attr-defined]
        return key, entry.outputs

    def put(self, served: ServedVersion, key: Key, outputs: Sequence[np.ndarray]) -> bool:
        """Store copies of ``outputs`` under ``key``, evicting the least recently used entries to make
        room; False (nothing stored) when the version stopped using the cache meanwhile or the entry
        alone is larger than the cache."""
        user = self._users.get(served)
        nbytes = entry_bytes(outputs)
        if user is None or not served.accepting or nbytes > self.capacity_bytes:
            return False
        old = self._entries.pop(key, None)  # two identical misses at once: the later one stays
        if old is not None:
            self._forget(key, old)
        while self.bytes + nbytes > self.capacity_bytes:
            lru_key, lru = self._entries.popitem(last=False)
            self._forget(lru_key, lru)
            lru.user.counters.evictions.inc()  # type: ignore[attr-defined]
        self._entries[key] = _Entry([_frozen(a) for a in outputs], nbytes, user)
        user.keys.add(key)
        self.bytes += nbytes
        self._metrics.cache_bytes.set(self.bytes)
        return True

    def _forget(self, key: Key, entry: _Entry) -> None:
        entry.user.keys.discard(key)
        self.bytes -= entry.nbytes
