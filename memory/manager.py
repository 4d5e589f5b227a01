"""Watches the process's memory against the plan's limit and tells the bot when to shed load.

The limit is MEMORY_LIMIT (MB), else the container's cgroup limit, else 512 MB.
States: normal, warning (>= 80 %), critical (>= 90 %). On a change of state the
registered callbacks run, so caches can shrink and intake can slow down. A state is entered at the first
reading over its threshold and left after three readings in a row under it (15 s by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from loguru import logger

DEFAULT_LIMIT_MB = 512
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 reports "no limit" as a huge number; anything above 1 TiB means unlimited.
_UNLIMITED = 1 << 40


class MemoryState(enum.StrEnum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


_RANK = {MemoryState.NORMAL: 0, MemoryState.WARNING: 1, MemoryState.CRITICAL: 2}


def cgroup_limit_files(root: Path = _CGROUP_ROOT, proc_cgroup: Path = _PROC_CGROUP) -> list[Path]:
    """The memory limit files of this process's cgroup and of every ancestor, v2 then v1.

    In a container with its own cgroup namespace that is just the root's file; a systemd service with
    MemoryMax= or a nested container has its limit further down, and any ancestor's limit applies too.
    """
    own_v2 = own_v1 = "/"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        if hierarchy == "0" and not controllers:
            own_v2 = path
        elif "memory" in controllers.split(","):
            own_v1 = path

    def up(base: Path, path: str) -> list[Path]:
        parts = [part for part in path.split("/") if part and part != ".."]
        return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]

    return [d / "memory.max" for d in up(root, own_v2)] + [
        d / "memory.limit_in_bytes" for d in up(root / "memory", own_v1)
    ]


def cgroup_limit_mb(files: list[Path] | None = None) -> int | None:
    """The tightest limit among the cgroup files that exist, in MB; None when there is none."""
    limits = []
    for path in cgroup_limit_files() if files is None else files:
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < _UNLIMITED:  # "max" (v2) or a huge number (v1): unlimited
            limits.append(int(raw) // (1024 * 1024))
    return min(limits) if limits else None


def resolve_limit_mb(configured: int | None) -> tuple[int, str]:
    if configured:
        return configured, "MEMORY_LIMIT"
    from_cgroup = cgroup_limit_mb()
    if from_cgroup:
        return from_cgroup, "cgroup"
    return DEFAULT_LIMIT_MB, "default"


def rss_mb() -> float:
    rss: int = psutil.Process().memory_info().rss
    return rss / (1024 * 1024)


class MemoryManager:
    def __init__(
        self,
        limit_mb: int | None = None,
        *,
        warning: float = 0.8,
        critical: float = 0.9,
        interval_s: float = 5.0,
        settle_readings: int = 3,
        read_rss_mb: Callable[[], float] = rss_mb,
    ) -> None:
        self.limit_mb, self.limit_source = resolve_limit_mb(limit_mb)
        self.warning = warning
        self.critical = critical
        self.interval_s = interval_s
        # Readings in a row that a lower state needs before the bot moves down to it: a reading that
        # hovers at a threshold must not shrink the caches again and run the collector at every crossing.
        self.settle_readings = max(1, settle_readings)
        self._lower_readings = 0
        self._read = read_rss_mb
        self.state = MemoryState.NORMAL
        self.rss_mb = 0.0
        self.peak_rss_mb = 0.0
        self.since = time.time()
        self.transitions = 0
        self._listeners: list[Callable[[MemoryState, MemoryState], None]] = []

    def on_change(self, listener: Callable[[MemoryState, MemoryState], None]) -> None:
        self._listeners.append(listener)

    def sample(self) -> float:
        """Read RSS (for the metrics) without acting on it: only the poller's `check` changes the state."""
        self.rss_mb = self._read()
        self.peak_rss_mb = max(self.peak_rss_mb, self.rss_mb)
        return self.rss_mb

    def check(self) -> MemoryState:
        """Read RSS once and move to the matching state: up at once, down after `settle_readings` in a row."""
        ratio = self.sample() / self.limit_mb
        new = (
            MemoryState.CRITICAL
            if ratio >= self.critical
            else MemoryState.WARNING
            if ratio >= self.warning
            else MemoryState.NORMAL
        )
        if _RANK[new] < _RANK[self.state]:
            self._lower_readings += 1
            if self._lower_readings < self.settle_readings:
                return self.state
        self._lower_readings = 0
        if new is not self.state:
            old, self.state, self.since = self.state, new, time.time()
            self.transitions += 1
            log = logger.warning if new is not MemoryState.NORMAL else logger.info
            log(
                "memory {} -> {}: {:.0f} of {} MB",
                old.value,
                new.value,
                self.rss_mb,
                self.limit_mb,
            )
            if new is not MemoryState.NORMAL:
                gc.collect()
            for listener in self._listeners:
                try:
                    listener(old, new)
                except Exception:
                    logger.exception("memory listener failed")
        return new

    async def run(self, stop: asyncio.Event) -> None:
        state = self.check()
        if state is not MemoryState.NORMAL:  # a limit the bot cannot work well under: say why at once
            effect = "holds messages back" if state is MemoryState.CRITICAL else "keeps its caches small"
            log = logger.error if state is MemoryState.CRITICAL else logger.warning
            log(
                "memory: {:.0f} of {} MB ({}) in use already at start: the bot {} from the start; give it "
                "more memory (MEMORY_LIMIT, or the service's memory limit)",
                self.rss_mb,
                self.limit_mb,
                self.limit_source,
                effect,
            )
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await stop.wait()
            if not stop.is_set():
                self.check()

    def stats(self) -> dict[str, Any]:
        return {
            "rss_mb": round(self.rss_mb, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "limit_mb": self.limit_mb,
            "limit_source": self.limit_source,
            "percent": round(100 * self.rss_mb / self.limit_mb, 1),
            "state": self.state.value,
            "since": round(self.since, 3),
            "transitions": self.transitions,
        }
