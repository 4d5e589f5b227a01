"""Small bounded building blocks the pipeline uses: a per-chat sliding-window rate limiter, a per-chat
"told recently" memory for notices, a resizable concurrency limit and a circuit breaker. Each takes an
injectable clock."""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Literal

Verdict = Literal["ok", "notice", "silent"]


class SlidingWindowLimiter:
    """At most `max_events` per `window_s` per key; the first event over the limit gets a notice.

    Only keys seen within the last window are kept, and never more than `max_keys`
    (least recently active out), so memory does not grow with the number of chats ever seen.
    """

    def __init__(
        self,
        max_events: int,
        window_s: float,
        *,
        max_keys: int = 20000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_events = max_events
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._windows: OrderedDict[str, tuple[deque[float], list[bool]]] = OrderedDict()
        self.limited = 0
        self.notices = 0
        self.evictions = 0  # live windows dropped at the max_keys bound (idle ones are just removed)

    def __len__(self) -> int:
        return len(self._windows)

    def check(self, key: str) -> Verdict:
        now = self._clock()
        entry = self._windows.get(key)
        if entry is None:
            entry = self._windows[key] = (deque(), [False])
        else:
            self._windows.move_to_end(key)
        stamps, noticed = entry
        while stamps and stamps[0] <= now - self.window_s:
            stamps.popleft()
        if len(stamps) < self.max_events:
            stamps.append(now)
            noticed[0] = False
            self._evict(now)
            return "ok"
        self.limited += 1
        if noticed[0]:
            return "silent"
        noticed[0] = True
        self.notices += 1
        return "notice"

    def _evict(self, now: float) -> None:
        while len(self._windows) > self.max_keys:
            self._windows.popitem(last=False)
            self.evictions += 1
        # Drop a few idle windows from the cold end on each call: amortised, no timers.
        for _ in range(2):
            if not self._windows:
                return
            key, (stamps, _) = next(iter(self._windows.items()))
            if stamps and stamps[-1] > now - self.window_s:
                return
            del self._windows[key]

    def prune(self) -> int:
        """Forget the windows with no message inside them any more (memory pressure); returns how many."""
        horizon = self._clock() - self.window_s
        idle = [key for key, (stamps, _) in self._windows.items() if not stamps or stamps[-1] <= horizon]
        for key in idle:
            del self._windows[key]
        return len(idle)

    def stats(self) -> dict[str, int]:
        return {"tracked_chats": len(self._windows), "limited": self.limited, "notices": self.notices}


class OncePerWindow:
    """When each key was last told something, so a notice goes to a chat at most once per `window_s`.

    Entries are kept in the order they were noted, so those older than the window are dropped from the
    cold end as new ones come (no timers); never more than `max_keys` are kept, the oldest out (that chat
    may then be told again sooner, nothing worse).
    """

    def __init__(
        self, window_s: float, *, max_keys: int = 20000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._told: OrderedDict[str, float] = OrderedDict()
        self.withheld = 0
        self.evictions = 0  # live entries dropped at the max_keys bound (expired ones are just removed)

    def __len__(self) -> int:
        return len(self._told)

    def told_recently(self, key: str) -> bool:
        """True (and counted as withheld) if `key` was told less than `window_s` ago."""
        told_at = self._told.get(key)
        if told_at is None or self._clock() - told_at >= self.window_s:
            return False
        self.withheld += 1
        return True

    def age(self, key: str) -> float | None:
        """Seconds since `key` was told, while that is within the window; None otherwise."""
        told_at = self._told.get(key)
        if told_at is None or (age := self._clock() - told_at) >= self.window_s:
            return None
        return age

    def note(self, key: str) -> None:
        """`key` was told now."""
        now = self._clock()
        self._told[key] = now
        self._told.move_to_end(key)
        self._expire(now)
        while len(self._told) > self.max_keys:
            self._told.popitem(last=False)
            self.evictions += 1

    def prune(self) -> int:
        """Forget the entries whose window is over (memory pressure); returns how many."""
        return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        dropped = 0
        while self._told and now - next(iter(self._told.values())) >= self.window_s:
            self._told.popitem(last=False)
            dropped += 1
        return dropped


class ResizableLimit:
    """A semaphore whose capacity can change at run time (the memory manager lowers it)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_use < self.capacity)
            self.in_use += 1

    async def __aexit__(self, *exc: object) -> None:
        async with self._changed:
            self.in_use -= 1
            self._changed.notify()

    async def resize(self, capacity: int) -> None:
        async with self._changed:
            self.capacity = max(1, capacity)
            self._changed.notify_all()


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `threshold` failures in a row; after `cooldown_s` lets one trial call through."""

    def __init__(
        self, threshold: int = 5, cooldown_s: float = 30.0, *, clock: Callable[[], float] = time.monotonic
    ):
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = CircuitState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.rejected = 0
        self.opens = 0
        self._trial_running = False

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._clock() - self.opened_at >= self.cooldown_s:
            self._state = CircuitState.HALF_OPEN
        return self._state

    def allow(self) -> bool:
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._trial_running:
            self._trial_running = True
            return True
        self.rejected += 1
        return False

    def success(self) -> None:
        self.failures = 0
        self._trial_running = False
        self._state = CircuitState.CLOSED

    def failure(self) -> None:
        self.failures += 1
        self._trial_running = False
        if self._state is CircuitState.HALF_OPEN or self.failures >= self.threshold:
            if self._state is not CircuitState.OPEN:
                self.opens += 1
            self._state = CircuitState.OPEN
            self.opened_at = self._clock()

    def stats(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "failures": self.failures,
            "opens": self.opens,
            "rejected": self.rejected,
        }
