"""The Map-style TTL + LRU cache, on an injected clock."""

from __future__ import annotations

from memory.cache import TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    cache: TTLCache[str, str] = TTLCache(10, ttl_s=60, clock=clock)
    cache.set("a", "1")
    cache.set("b", "2", ttl_s=5)
    clock.now += 10
    assert cache.get("a") == "1" and cache.get("b") is None
    assert not cache.has("b")
    clock.now += 60
    assert cache.get("a") is None
    assert len(cache) == 0


def test_least_recently_used_goes_first_when_full() -> None:
    cache: TTLCache[str, int] = TTLCache(3, ttl_s=60, clock=Clock())
    for key, value in [("a", 1), ("b", 2), ("c", 3)]:
        cache.set(key, value)
    assert cache.get("a") == 1  # a is now the most recently used
    cache.set("d", 4)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("d") == 4
    assert len(cache) == 3 and cache.evictions == 1


def test_map_api_and_stats() -> None:
    cache: TTLCache[str, int] = TTLCache(5, ttl_s=60, clock=Clock())
    cache.set("a", 1)
    assert cache.has("a") and cache.delete("a") and not cache.delete("a")
    cache.get("missing")
    cache.set("b", 2)
    cache.get("b")
    assert cache.stats() == {
        "size": 1,
        "max_entries": 5,
        "hits": 1,
        "misses": 1,
        "evictions": 0,
        "expirations": 0,
        "hit_rate": 0.5,
    }


def test_shrink_drops_the_oldest_fraction_and_zero_size_disables() -> None:
    cache: TTLCache[int, int] = TTLCache(100, ttl_s=60, clock=Clock())
    for i in range(10):
        cache.set(i, i)
    assert cache.shrink(0.5) == 5
    assert cache.get(0) is None and cache.get(9) == 9
    disabled: TTLCache[int, int] = TTLCache(0, ttl_s=60)
    disabled.set(1, 1)
    assert disabled.get(1) is None
