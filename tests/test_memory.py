"""Memory: the limit comes from MEMORY_LIMIT, the cgroup or a default; and a soak of 200,000
messages from 50,000 chats keeps every in-memory structure bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from bot.limits import OncePerWindow, SlidingWindowLimiter
from connection.types import ChatId, Inbound, MessageId, MessageKind
from memory.manager import MemoryManager, MemoryState, cgroup_limit_files, cgroup_limit_mb
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI, InstantModel


def test_the_limit_comes_from_the_setting_then_the_cgroup_then_a_default(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    assert cgroup_limit_mb([v2, v1]) is None
    v1.write_text(str(256 * 1024 * 1024))
    assert cgroup_limit_mb([v2, v1]) == 256
    v2.write_text("max\n")
    assert cgroup_limit_mb([v2]) is None  # v2 and unlimited
    v2.write_text(str(512 * 1024 * 1024))
    assert cgroup_limit_mb([v2]) == 512
    v1.write_text("9223372036854771712")  # cgroup v1's "no limit"
    assert cgroup_limit_mb([v1]) is None
    assert MemoryManager(300).limit_mb == 300 and MemoryManager(300).limit_source == "MEMORY_LIMIT"


def test_the_cgroup_limit_is_the_tightest_of_the_process_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    service = root / "system.slice" / "bot.service"
    service.mkdir(parents=True)
    (root / "memory.max").write_text("max\n")
    (root / "system.slice" / "memory.max").write_text("max\n")
    (service / "memory.max").write_text(str(300 * 1024 * 1024))
    proc.write_text("0::/system.slice/bot.service\n")
    assert cgroup_limit_mb(cgroup_limit_files(root, proc)) == 300  # a systemd service with MemoryMax=300M
    (root / "system.slice" / "memory.max").write_text(str(200 * 1024 * 1024))
    assert cgroup_limit_mb(cgroup_limit_files(root, proc)) == 200  # the parent's tighter limit applies
    v1 = root / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(128 * 1024 * 1024))
    proc.write_text("12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    (root / "memory.max").unlink()
    for path in (root / "system.slice").rglob("memory.max"):
        path.unlink()
    assert cgroup_limit_mb(cgroup_limit_files(root, proc)) == 128  # cgroup v1 without a namespace
    proc.write_text("0::/\n")
    assert cgroup_limit_mb(cgroup_limit_files(root, proc)) is None


def test_states_follow_rss_with_configurable_thresholds() -> None:
    rss = [0.0]
    seen: list[tuple[str, str]] = []
    manager = MemoryManager(1000, warning=0.5, critical=0.7, read_rss_mb=lambda: rss[0])
    manager.on_change(lambda old, new: seen.append((old.value, new.value)))
    for value, state in [
        (100, "normal"),
        (550, "warning"),  # up at once
        (710, "critical"),
        (600, "critical"),  # down only after three readings in a row under the threshold
        (600, "critical"),
        (600, "warning"),
        (10, "warning"),
        (10, "warning"),
        (10, "normal"),
    ]:
        rss[0] = value
        assert manager.check() is MemoryState(state)
    assert seen == [
        ("normal", "warning"),
        ("warning", "critical"),
        ("critical", "warning"),
        ("warning", "normal"),
    ]
    assert manager.stats()["percent"] == 1.0 and manager.stats()["peak_rss_mb"] == 710


async def test_a_reading_hovering_at_a_threshold_does_not_flap_nor_empty_the_cache(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Every crossing was a transition: warning halved the cache each time (emptying it), ran the
    collector and logged, for RSS moving a megabyte around the threshold."""
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        manager = MemoryManager(500, read_rss_mb=lambda: rss[0])
        manager.on_change(h.bot._on_memory_state)
        for n in range(100):
            h.bot.cache.set(f"question {n}", f"answer {n}")
        rss = [400.5]
        for _ in range(10):
            rss[0] = 400.5
            manager.check()
            rss[0] = 399.5
            manager.check()
        assert manager.transitions == 1 and manager.state is MemoryState.WARNING
        assert len(h.bot.cache) == 50  # halved once (MEMORY_SHRINK_FRACTION), not ten times
        for _ in range(3):
            manager.check()
        assert manager.state is MemoryState.NORMAL


async def test_scraping_the_metrics_never_changes_the_memory_state(harness) -> None:
    """A GET of /v1/metrics ran the state machine: one scrape at high RSS shut the model off."""
    async with harness() as h:
        rss = [460.0]
        manager = MemoryManager(500, read_rss_mb=lambda: rss[0])
        manager.on_change(h.bot._on_memory_state)
        h.bot.memory = manager
        figures = h.bot.metrics()["memory"]
        assert figures["rss_mb"] == 460.0 and figures["percent"] == 92.0
        assert figures["state"] == "normal" and h.bot.pipeline.model_gate.is_set()
        manager.check()  # the poller's reading does act
        assert h.bot.metrics()["memory"]["state"] == "critical"


async def test_a_limit_the_bot_cannot_work_under_is_an_error_at_start() -> None:
    """MEMORY_LIMIT=100 with the bot taking 92 MB idle: critical from the first reading, every customer told
    "busy" and never answered, and nothing in the logs above a WARNING saying why."""
    said: list[tuple[str, str]] = []
    sink = logger.add(lambda m: said.append((m.record["level"].name, m.record["message"])), level="ERROR")
    stop = asyncio.Event()
    try:
        manager = MemoryManager(100, read_rss_mb=lambda: 92.0, interval_s=0.01)
        running = asyncio.create_task(manager.run(stop))
        await asyncio.sleep(0.05)
        stop.set()
        await running
        healthy = MemoryManager(500, read_rss_mb=lambda: 92.0, interval_s=0.01)
        stop.clear()
        running = asyncio.create_task(healthy.run(stop))
        await asyncio.sleep(0.05)
        stop.set()
        await running
    finally:
        logger.remove(sink)
    assert manager.state is MemoryState.CRITICAL
    [(level, text)] = said
    assert level == "ERROR"
    assert "92 of 100 MB" in text and "MEMORY_LIMIT" in text


def structure_sizes(bot: Any) -> dict[str, int]:
    pipeline = bot.pipeline
    return {
        "queues": len(pipeline._queues),
        "workers": len(pipeline._workers),
        "dedup": len(pipeline.dedup),
        "rate_windows": len(pipeline.rate_limiter),
        "media_notices": len(pipeline.media_notices),
        "paused_chats": len(pipeline.takeover._paused),
        "sent_ids": len(pipeline.takeover._sent),
        "history_chats": len(bot.history),
        "cache": len(bot.cache),
        "notices": len(pipeline._notice_only),
        "background": len(pipeline._background),
        "waiting": pipeline.waiting,
        "in_memory_ids": len(pipeline._in_memory),
        "busy_since": len(pipeline._busy_since),
        "spilled_chats": len(pipeline._spilled_chats),
        "store_pending": len(bot.store._pending),
    }


@pytest.mark.timeout(300)
async def test_soak_200k_messages_from_50k_chats_keeps_every_structure_bounded(harness) -> None:
    limits = {
        "dedup": 20000,
        "rate_windows": 20000,
        "media_notices": 20000,
        "paused_chats": 20000,
        "sent_ids": 5000,
        "history_chats": 5000,
        "cache": 1000,
        "notices": 0,
        "background": 0,
        "waiting": 5000,
        "in_memory_ids": 5000,
        "busy_since": 50_000,
        "spilled_chats": 50_000,
    }
    # Half of each 10,000-message burst waits in the store (MAX_WAITING_MESSAGES) and is read back.
    async with harness(human_takeover_minutes=0, rate_limit_max_messages=2, max_waiting_messages=5000) as h:
        h.bot.pipeline.responder.model = h.bot.model = InstantModel()
        h.transport.record = False
        peak: dict[str, int] = {}
        now = time.time()
        total, chats, batch = 200_000, 50_000, 10_000
        for start in range(0, total, batch):
            for i in range(start, start + batch):
                h.bot.pipeline.submit(
                    Inbound(
                        id=MessageId(f"soak-{i}"),
                        chat=ChatId(f"34{i % chats:09d}@s.whatsapp.net"),
                        sender=f"34{i % chats:09d}@s.whatsapp.net",
                        kind=MessageKind.TEXT,
                        text=f"pregunta {i // chats}",
                        timestamp=now,
                    )
                )
            sizes = structure_sizes(h.bot)
            peak = {k: max(v, peak.get(k, 0)) for k, v in sizes.items()}
            assert await h.bot.pipeline.drain(60)
        final = structure_sizes(h.bot)
        counters = h.bot.pipeline.counters
        wal = h.settings.store_path.with_name("bot.sqlite3-wal")
        assert wal.stat().st_size < 64 * 2**20, "the WAL is checkpointed, not left to grow"
    assert counters.received == total and counters.failed == 0
    assert counters.spilled > 50_000  # the store-backed wait was exercised at scale
    assert counters.answered + counters.rate_limited == total  # every message answered or limited
    for name, limit in limits.items():
        assert peak[name] <= limit, f"{name} grew to {peak[name]} (bound {limit})"
    # Intake queues only hold what is waiting: one batch at most, and nothing once drained.
    assert peak["queues"] <= batch and final["queues"] == final["workers"] == 0


async def test_metrics_show_each_structure_its_bound_and_its_evictions(harness) -> None:
    async with harness(cache_max_entries=2) as h:
        h.bot.pipeline.responder.model = h.bot.model = InstantModel()
        for i in range(5):
            await h.say(inbound(f"pregunta {i}", chat=f"3460033{i:04d}@s.whatsapp.net"))
        memory = h.bot.metrics()["memory"]
    assert {"rss_mb", "limit_mb", "percent", "state"} <= set(memory)
    structures = memory["structures"]
    assert structures["response_cache"] == {"size": 2, "max": 2, "evictions": 3, "expirations": 0}
    assert structures["dedup_ids"] == {"size": 5, "max": 20000, "evictions": 0}
    assert structures["history_chats"]["size"] == 5
    assert structures["rate_limit_windows"]["size"] == 5
    assert structures["chats_with_work"] == {"size": 0, "waiting_messages": 0, "max_waiting_messages": 10_000}
    assert structures["call_notice_chats"] == {"size": 0, "max": 0, "evictions": 0}  # no calls on the console


async def test_chats_told_about_media_are_bounded_and_forgotten_under_pressure(harness) -> None:
    """Which chats were told "I can only read text" a moment ago: bounded, evictable, in the metrics."""
    now = [1000.0]
    async with harness() as h:
        h.bot.pipeline.media_notices = OncePerWindow(300, max_keys=3, clock=lambda: now[0])
        videos = [
            inbound("", kind=MessageKind.VIDEO, chat=f"3460055{i:04d}@s.whatsapp.net") for i in range(5)
        ]
        assert len(await h.say(*videos)) == 5  # one notice each: five chats
        structures = h.bot.metrics()["memory"]["structures"]
        assert structures["media_notice_chats"] == {"size": 3, "max": 3, "evictions": 2}
        now[0] += 301
        manager = MemoryManager(500, read_rss_mb=lambda: 410.0)
        manager.on_change(h.bot._on_memory_state)
        assert manager.check() is MemoryState.WARNING
        assert h.bot.metrics()["memory"]["structures"]["media_notice_chats"]["size"] == 0


async def test_callers_told_to_write_are_bounded_and_forgotten_under_pressure(harness) -> None:
    """WA_REJECT_CALLS remembers who was told to write instead of calling: it was bounded, but not shown,
    and kept under memory pressure what the other structures let go."""
    now = [1000.0]
    async with harness() as h:
        h.bot.call_notices = SlidingWindowLimiter(1, 600, max_keys=3, clock=lambda: now[0])
        for i in range(5):
            assert h.bot.call_notices.check(f"3460066{i:04d}@s.whatsapp.net") == "ok"
        structures = h.bot.metrics()["memory"]["structures"]
        now[0] += 601
        manager = MemoryManager(500, read_rss_mb=lambda: 410.0)
        manager.on_change(h.bot._on_memory_state)
        assert manager.check() is MemoryState.WARNING
        after = h.bot.metrics()["memory"]["structures"]["call_notice_chats"]
    assert structures["call_notice_chats"] == {"size": 3, "max": 3, "evictions": 2}
    assert after["size"] == 0


async def test_chat_histories_are_bounded_by_characters_not_only_by_chats(harness) -> None:
    async with harness() as h:
        h.bot.pipeline.responder.model = h.bot.model = InstantModel()
        h.bot.history.max_chars = 50_000
        for i in range(40):  # 40 chats of 4,000-character messages: 320,000 characters with the replies
            await h.say(inbound("x" * 4000, chat=f"3460044{i:04d}@s.whatsapp.net"))
        stats = h.bot.history.stats()
        assert stats["chars"] <= 50_000 and stats["evictions"] >= 30
        # What was evicted is read back from the store when that chat writes again.
        reads = stats["store_reads"]
        assert await h.say(inbound("hola", chat="34600440000@s.whatsapp.net")) == ["ok: hola"]
        assert h.bot.history.stats()["store_reads"] == reads + 1
