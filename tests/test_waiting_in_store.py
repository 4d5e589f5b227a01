"""Past MAX_WAITING_MESSAGES, messages wait in the store only: stop, restart and store faults around it.

The store is the real SQLite store; faults are injected by wrapping one of its methods on the instance.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from memory.store import MessageStatus
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI
from tests.supabase_stack import SupabaseStack

CHATS = [f"3460088{i:04d}@s.whatsapp.net" for i in range(10)]


def ai(fake: FakeOpenAI, **extra: object) -> dict[str, object]:
    return {"openai_api_key": "k", "openai_base_url": fake.base_url, "max_waiting_messages": 10, **extra}


def flood(h: Any, count: int, prefix: str = "m") -> None:
    for n in range(count):
        h.bot.pipeline.submit(inbound(f"{prefix}{n}", chat=CHATS[n % len(CHATS)], id=f"{prefix.upper()}{n}"))


async def test_a_stop_during_a_slow_read_back_leaves_the_rest_for_the_next_start(
    harness, fake_openai: FakeOpenAI
) -> None:
    h = harness(**ai(fake_openai))
    await h.bot.start()
    store = h.bot.store
    read = store.unanswered_inbound

    async def slow(since: float, limit: int | None = None) -> list[Any]:
        await asyncio.sleep(1.5)  # a database that answers slowly
        return await read(since, limit=limit)

    store.unanswered_inbound = slow
    flood(h, 40)
    await asyncio.sleep(1.0)  # the first ten are answered, the read-back is in flight
    await h.bot.pipeline.stop(0.2)
    sent_at_stop = len(h.transport.sent)
    await asyncio.sleep(2.0)
    assert len(h.transport.sent) == sent_at_stop, "nothing is answered after stop"
    await h.bot.stop(1)

    again = harness(**ai(fake_openai))  # same data directory: the next start recovers the rest
    async with again:
        assert await again.bot.pipeline.drain(20)
    answers = Counter(s.text for s in h.transport.sent + again.transport.sent)
    assert answers == Counter(f"echo: m{n}" for n in range(40)), "every message answered exactly once"


async def test_a_reply_the_store_could_not_record_is_not_read_back_and_answered_again(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(**ai(fake_openai)) as h:
        store = h.bot.store
        add_reply = store.add_reply

        def failing_once(reply: Any, answered_id: str, also_answered: Any = ()) -> Any:
            if answered_id == "M15":
                future = asyncio.get_running_loop().create_future()
                future.set_exception(OSError("disk I/O error"))
                return future
            return add_reply(reply, answered_id, also_answered)

        store.add_reply = failing_once
        flood(h, 50)
        assert await h.bot.pipeline.drain(20)
        answers = Counter(s.text for s in h.transport.sent)
        failed = h.bot.pipeline.counters.failed
    assert answers == Counter(f"echo: m{n}" for n in range(50))
    assert failed == 0  # only the record of one reply failed, not the handling of any message


async def test_recovery_after_a_restart_also_keeps_to_the_waiting_bound(
    harness, fake_openai: FakeOpenAI
) -> None:
    h = harness(**ai(fake_openai))
    await h.bot.start()
    h.bot.pipeline.model_gate.clear()  # nothing gets answered before the stop
    flood(h, 60)
    rows = [r for chat in CHATS for r in await h.bot.store.recent_messages(chat, 20)]
    assert sum(r.status is MessageStatus.RECEIVED for r in rows) == 60
    await h.bot.stop(0.2)

    again = harness(**ai(fake_openai))
    peak = [0]
    again.transport.on_send = lambda _: peak.__setitem__(0, max(peak[0], again.bot.pipeline.waiting))
    async with again:
        assert again.bot.pipeline.waiting <= 10
        assert await again.bot.pipeline.drain(20)
    assert Counter(s.text for s in again.transport.sent) == Counter(f"echo: m{n}" for n in range(60))
    assert peak[0] <= 10


async def test_waiting_in_supabase_answers_every_message_once_in_order(
    harness, fake_openai: FakeOpenAI, stack: SupabaseStack
) -> None:
    stack.psql("truncate chat_history, chats restart identity;")
    async with harness(**ai(fake_openai, supabase_url=stack.url, supabase_key=stack.key)) as h:
        flood(h, 60, prefix="s")
        assert h.bot.pipeline.counters.spilled == 50
        assert await h.bot.pipeline.drain(30)
        for i, chat in enumerate(CHATS):
            assert h.transport.texts_to(chat) == [f"echo: s{n}" for n in range(i, 60, len(CHATS))]
