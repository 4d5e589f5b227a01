"""A Map-style cache: TTL per entry, bounded by entries, least-recently-used eviction."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """get/set/has/delete like a JavaScript Map, with expiry and a size bound.

    `clock` is injectable so tests can move time without sleeping.
    """

    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        item = self._data.get(key)
        if item is None:
            self.misses += 1
            return None
        expires_at, value = item
        if expires_at <= self._clock():
            del self._data[key]
            self.expirations += 1
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def has(self, key: K) -> bool:
        item = self._data.get(key)
        return item is not None and item[0] > self._clock()

    def set(self, key: K, value: V, ttl_s: float | None = None) -> None:
        if self.max_entries <= 0:
            return
        ttl = self.ttl_s if ttl_s is None else ttl_s
        self._data[key] = (self._clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.evictions += 1

    def delete(self, key: K) -> bool:
        return self._data.pop(key, None) is not None

    def clear(self) -> None:
        self._data.clear()

    def shrink(self, fraction: float) -> int:
        """Drop the least recently used `fraction` of entries (memory pressure); returns how many."""
        drop = int(len(self._data) * fraction)
        for _ in range(drop):
            self._data.popitem(last=False)
        self.evictions += drop
        return drop

    def stats(self) -> dict[str, float | int]:
        lookups = self.hits + self.misses
        return {
            "size": len(self._data),
            "max_entries": self.max_entries,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "hit_rate": round(self.hits / lookups, 4) if lookups else 0.0,
        }
