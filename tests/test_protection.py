"""Protection: rate limits, human takeover and owner commands, allow/block lists, the circuit
breaker, memory throttling, and a fuzz of malformed input; through the real pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import string
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bot import whatsapp
from bot.app import Bot
from bot.config import Settings
from bot.limits import CircuitBreaker, SlidingWindowLimiter
from bot.replies import reply
from bot.takeover import Takeover
from connection import neonize_adapter
from connection.loopback import LoopbackTransport
from connection.types import ChatId, Inbound, MessageId, MessageKind
from memory.manager import MemoryManager, MemoryState
from memory.store import Direction, MessageStatus
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI, InstantModel
from tests.test_http import get
from tests.test_shutdown import FakeNeonize, free_port

CHAT = "34600111222@s.whatsapp.net"
OTHER = "5491122334455@s.whatsapp.net"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ai(fake: FakeOpenAI, **extra: object) -> dict[str, object]:
    return {"openai_api_key": "k", "openai_base_url": fake.base_url, **extra}


def inject_rss(bot: Bot) -> tuple[MemoryManager, list[float]]:
    """Give the bot a memory manager (500 MB limit) that reads RSS from the returned list, 100 MB first;
    it moves down a state at the first reading under the threshold (settling is tested in test_memory)."""
    rss = [100.0]
    manager = MemoryManager(500, settle_readings=1, read_rss_mb=lambda: rss[0])
    manager.on_change(bot._on_memory_state)
    bot.memory = manager
    return manager, rss


def critical_memory(bot: Bot) -> tuple[MemoryManager, list[float]]:
    """`inject_rss`, with RSS at 92 % of the limit: memory critical."""
    manager, rss = inject_rss(bot)
    rss[0] = 460
    assert manager.check() is MemoryState.CRITICAL
    return manager, rss


async def test_rate_limit_gives_one_notice_then_silence_until_the_window_frees(
    harness, fake_openai: FakeOpenAI
) -> None:
    clock = Clock()
    async with harness(**ai(fake_openai)) as h:
        h.bot.pipeline.rate_limiter = SlidingWindowLimiter(3, 60, clock=clock)
        replies = await h.say(*[f"m{i}" for i in range(6)])
        assert replies[:3] == ["echo: m0", "echo: m1", "echo: m2"]
        assert len(replies) == 4 and "muchos mensajes" in replies[3]
        assert await h.say(inbound("hola", chat=OTHER)) == ["echo: hola"]  # other chats are not limited
        clock.now += 61
        assert await h.say("ya puedo?") == ["echo: ya puedo?"]
        assert h.bot.metrics()["messages"]["rate_limited"] == 3


async def test_messages_over_the_rate_limit_are_kept_and_the_notice_promises_nothing(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Over the limit, the customer was told "give me a moment and I'll answer", and the messages were
    neither answered nor stored: gone, even for the owner looking at the chat in the database."""
    clock = Clock()
    async with harness(**ai(fake_openai)) as h:
        h.bot.pipeline.rate_limiter = SlidingWindowLimiter(3, 60, clock=clock)
        assert await h.say("m0") == ["echo: m0"]
        replies = await h.say(*[f"m{i}" for i in range(1, 6)])  # a burst: m3 on are over the limit
        assert replies[2] == reply("rate_limited", "es") and "te respondo" not in replies[2]
        rows = [r for r in await h.bot.store.recent_messages(CHAT, 20) if r.direction is Direction.IN]
        assert [(r.body, r.status) for r in rows][3:] == [
            ("m3", MessageStatus.SKIPPED),
            ("m4", MessageStatus.SKIPPED),
            ("m5", MessageStatus.SKIPPED),
        ]
        m2_call = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
        assert m2_call[-1] == "m2" and "m3" not in m2_call  # kept at once, yet not shown as said before m2
        clock.now += 61
        assert await h.say("¿y ahora?") == ["echo: ¿y ahora?"]


async def test_the_owner_writing_from_the_phone_silences_the_bot_in_that_chat(
    harness, fake_openai: FakeOpenAI
) -> None:
    clock = Clock()
    async with harness(**ai(fake_openai)) as h:
        h.bot.pipeline.takeover = Takeover(pause_s=600, clock=clock)
        [first] = await h.say("hola")
        own_echo = inbound(first, id=h.transport.sent[-1].id, from_me=True)
        assert await h.say(own_echo, "sigo aquí") == ["echo: sigo aquí"]  # our own echo is not the owner
        await h.say(inbound("Hola, soy Marta, te atiendo yo", from_me=True))
        assert await h.say("gracias Marta") == []
        assert await h.say(inbound("hola", chat=OTHER)) == ["echo: hola"]
        clock.now += 601
        assert await h.say("¿sigues ahí?") == ["echo: ¿sigues ahí?"]
        rows = await h.bot.store.recent_messages(CHAT, 10)
    # What the human and the customer said meanwhile stays in the history the model sees next.
    assert [(r.direction.value, r.status.value, r.body) for r in rows if "Marta" in r.body] == [
        ("out", "sent", "Hola, soy Marta, te atiendo yo"),
        ("in", "skipped", "gracias Marta"),
    ]
    assert "gracias Marta" in str(fake_openai.chat_requests[-1]["messages"])


async def test_owner_commands_pause_resume_and_status(harness, fake_openai: FakeOpenAI) -> None:
    me = "34699999999@s.whatsapp.net"
    async with harness(**ai(fake_openai)) as h:
        await h.say(inbound("!bot pause all", chat=me, from_me=True, is_self_chat=True))
        assert h.transport.texts_to(me) == [reply("owner_paused_all", "es")]
        assert await h.say("hola", inbound("hola", chat=OTHER)) == []
        await h.say(inbound("!bot status", chat=me, from_me=True, is_self_chat=True))
        assert h.transport.texts_to(me)[-1] == reply("owner_status_paused", "es", paused=0, which="")
        await h.say(inbound("!bot resume all", chat=me, from_me=True, is_self_chat=True))
        assert await h.say("otra vez") == ["echo: otra vez"]
        await h.say(inbound("!bot pause", from_me=True))  # typed inside the customer's chat
        assert await h.say("¿hola?") == []
        assert await h.say(inbound("hola", chat=OTHER)) == ["echo: hola"]


async def test_allow_and_block_lists(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai, blocked_numbers="34600111222")) as h:
        assert await h.say("hola") == []
        assert await h.say(inbound("hola", chat=OTHER)) == ["echo: hola"]
    async with harness(**ai(fake_openai, allowed_numbers="+34600111222, 34600000000")) as h:
        assert await h.say("hola") == ["echo: hola"]
        assert await h.say(inbound("hola", chat=OTHER)) == []


async def test_the_circuit_opens_after_repeated_failures_and_closes_after_a_cool_down(
    harness, fake_openai: FakeOpenAI
) -> None:
    clock = Clock()
    async with harness(**ai(fake_openai)) as h:
        h.bot.model.breaker = CircuitBreaker(threshold=3, cooldown_s=30, clock=clock)
        fake_openai.fail_next.extend([500] * 6)  # the SDK tries twice per message
        for i in range(3):
            [apology] = await h.say(f"m{i}")
            assert "Lo siento" in apology
        assert h.bot.metrics()["ai"]["circuit"] == "open"
        calls = fake_openai.chat_count
        [fallback] = await h.say("m3")
        assert "Lo siento" in fallback and fake_openai.chat_count == calls  # no call while open
        clock.now += 31
        assert await h.say("m4") == ["echo: m4"]  # the trial call succeeds and closes it
        assert h.bot.metrics()["ai"]["circuit"] == "closed"


async def test_memory_pressure_throttles_and_recovers_without_losing_or_repeating(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(**ai(fake_openai, busy_reply_after_s=0.2)) as h:
        manager, rss = inject_rss(h.bot)
        await h.say("antes")
        h.bot.cache.set("x", "y")
        rss[0] = 420  # 84 %: warning
        assert manager.check() is MemoryState.WARNING
        await asyncio.sleep(0)
        assert h.bot.model.limit.capacity == 4 and len(h.bot.cache) <= 1
        rss[0] = 460  # 92 %: critical
        assert manager.check() is MemoryState.CRITICAL
        assert len(h.bot.cache) == 0
        for text in ("uno", "dos", "tres"):
            h.bot.pipeline.submit(inbound(text))
        await asyncio.sleep(0.6)
        waiting = h.transport.texts_to(CHAT)[1:]
        assert len(waiting) == 1 and "en breve" in waiting[0]  # one busy notice, nothing else
        rows = await h.bot.store.recent_messages(CHAT, 10)
        # All three wait already persisted, so a crash now would lose none of them.
        assert [r.body for r in rows if r.status is MessageStatus.RECEIVED] == ["uno", "dos", "tres"]
        assert h.bot.metrics()["messages"]["waiting_for_memory"] is True
        rss[0] = 200
        assert manager.check() is MemoryState.NORMAL
        assert await h.bot.pipeline.drain(5)
        answers = [t for t in h.transport.texts_to(CHAT) if t.startswith("echo")]
        assert answers == ["echo: antes", "echo: uno", "echo: dos", "echo: tres"]
        assert h.bot.model.limit.capacity == 8


async def test_every_waiting_chat_is_told_once_also_those_queued_beyond_the_worker_slots(
    harness, fake_openai: FakeOpenAI
) -> None:
    settings = ai(fake_openai, busy_reply_after_s=0.2, max_active_chats=2, bot_language="en")
    async with harness(**settings) as h:
        manager, rss = critical_memory(h.bot)
        chats = [f"3460022{i:04d}@s.whatsapp.net" for i in range(6)]  # three times the two slots
        for chat in chats:
            for text in ("one", "two"):
                h.bot.pipeline.submit(inbound(text, chat=chat))
        await asyncio.sleep(1.0)
        busy = reply("busy", "en")
        assert [h.transport.texts_to(chat) for chat in chats] == [[busy]] * 6
        assert fake_openai.chat_count == 0
        rss[0] = 200
        assert manager.check() is MemoryState.NORMAL
        assert await h.bot.pipeline.drain(5)
        assert [h.transport.texts_to(chat) for chat in chats] == [[busy, "echo: one", "echo: two"]] * 6


async def test_a_chat_told_busy_is_answered_after_a_restart_however_long_it_waited(
    harness, fake_openai: FakeOpenAI
) -> None:
    """A chat told "busy, I will answer shortly" under critical memory, then a crash (the platform's OOM
    kill, say): past RECOVERY_WINDOW_MINUTES its message was skipped, and the promise broken."""
    settings = ai(fake_openai, busy_reply_after_s=0.2, recovery_window_minutes=0.01)  # a 0.6 s window
    async with harness(**settings) as h:
        critical_memory(h.bot)
        h.bot.pipeline.submit(inbound("¿tenéis cita hoy?", chat=CHAT))
        await asyncio.sleep(0.5)
        assert h.transport.texts_to(CHAT) == [reply("busy", "es")]
        h.bot.pipeline.submit(inbound("hola", chat=OTHER))  # not waited long enough to be told
        await h.bot.pipeline.stop(timeout=0)  # the crash
    await asyncio.sleep(1.0)  # a restart past the window
    async with harness(**ai(fake_openai, recovery_window_minutes=0.01)) as h:
        assert await h.bot.pipeline.drain(5)
        assert h.transport.texts_to(CHAT) == ["echo: ¿tenéis cita hoy?"], "the promise was broken"
        history = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
        assert history == ["¿tenéis cita hoy?"]  # the notice is not a turn the model is shown
        [row] = [r for r in await h.bot.store.recent_messages(OTHER, 5) if r.direction.value == "in"]
        assert row.status is MessageStatus.SKIPPED  # told nothing, too old: skipped as before


async def test_a_keyword_flows_question_is_answered_while_memory_is_critical(
    harness, fake_openai: FakeOpenAI, tmp_path
) -> None:
    """Critical memory sent every new message to the store: "¿horario?", which needs no model, got "busy,
    I will answer shortly" and its answer only when memory came back."""
    flows = tmp_path / "flows.yaml"
    flows.write_text('- keywords: [horario]\n  answer: "Abrimos de 9 a 18."\n', encoding="utf-8")
    async with harness(**ai(fake_openai, flows_file=flows, busy_reply_after_s=0.2)) as h:
        critical_memory(h.bot)
        h.bot.pipeline.submit(inbound("hola, ¿me ayudas con un pedido?", chat=OTHER))  # needs the model
        h.bot.pipeline.submit(inbound("¿horario?", chat=CHAT))
        await asyncio.sleep(0.6)
        assert h.transport.texts_to(CHAT) == ["Abrimos de 9 a 18."]
        assert h.transport.texts_to(OTHER) == [reply("busy", "es")]


async def test_a_keyword_flows_question_does_not_wait_behind_chats_holding_every_slot(
    harness, fake_openai: FakeOpenAI, tmp_path
) -> None:
    """The chats waiting for memory held every worker slot: a flow question from another chat waited for
    one until memory was back, and was told "busy" meanwhile."""
    flows = tmp_path / "flows.yaml"
    flows.write_text('- keywords: [horario]\n  answer: "Abrimos de 9 a 18."\n', encoding="utf-8")
    settings = ai(fake_openai, flows_file=flows, busy_reply_after_s=0.2, max_active_chats=2)
    async with harness(**settings) as h:
        for n in range(2):  # they take both slots, then wait at the model for memory
            h.bot.pipeline.submit(inbound(f"una pregunta larga {n}", chat=f"3460012{n:04d}@s.whatsapp.net"))
        critical_memory(h.bot)
        await asyncio.sleep(0.05)
        assert h.bot.pipeline.active_chats == 2 and fake_openai.chat_count == 0
        h.bot.pipeline.submit(inbound("¿horario?", chat=CHAT))
        await asyncio.sleep(0.6)
        assert h.transport.texts_to(CHAT) == ["Abrimos de 9 a 18."]


async def test_no_busy_notice_once_the_chats_answer_is_on_its_way(harness, fake_openai: FakeOpenAI) -> None:
    """A chat queued for the notice while its answer was already past the model (memory went critical
    meanwhile) was told "busy, I will answer shortly" after the answer, or between its parts."""
    fake_openai.delay_s = 0.5
    async with harness(**ai(fake_openai, busy_reply_after_s=0.2)) as h:
        manager, rss = inject_rss(h.bot)
        h.bot.pipeline.submit(inbound("una pregunta para el modelo", chat=CHAT))
        await asyncio.sleep(0.1)  # at the model
        rss[0] = 460
        assert manager.check() is MemoryState.CRITICAL
        await asyncio.sleep(1.0)  # past BUSY_REPLY_AFTER_S, and the answer has gone out
        assert h.transport.texts_to(CHAT) == ["echo: una pregunta para el modelo"]


async def test_a_start_short_of_memory_holds_recovered_messages_back(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Recovery ran before the first memory reading: the messages a crash left could reach the model
    although memory was already critical."""
    async with harness(**ai(fake_openai)) as h:
        critical_memory(h.bot)
        for n in range(3):
            h.bot.pipeline.submit(inbound(f"pregunta {n}", chat=f"3460013{n:04d}@s.whatsapp.net"))
        await asyncio.sleep(0.1)
        await h.bot.pipeline.stop(timeout=0)  # the crash
    h = harness(**ai(fake_openai))
    rss = [460.0]
    h.bot.memory = MemoryManager(500, read_rss_mb=lambda: rss[0])
    h.bot.memory.on_change(h.bot._on_memory_state)
    async with h:  # start() recovers the three
        assert not h.bot.pipeline.model_gate.is_set(), "recovered messages were handed out with the gate open"
        await asyncio.sleep(0.3)
        assert fake_openai.chat_count == 0
        rss[0] = 100
        for _ in range(3):
            h.bot.memory.check()
        assert await h.bot.pipeline.drain(5)
        assert fake_openai.chat_count == 3


async def test_a_chat_told_busy_before_a_restart_is_not_told_again(harness, fake_openai: FakeOpenAI) -> None:
    """The chats told "busy" were only remembered in memory: still short of memory after a restart, the
    customer was told a second time for the same wait."""
    settings = ai(fake_openai, busy_reply_after_s=0.2)
    busy = reply("busy", "es")
    async with harness(**settings) as h:
        manager, rss = critical_memory(h.bot)
        h.bot.pipeline.submit(inbound("¿tenéis cita hoy?", chat=CHAT))
        await asyncio.sleep(0.5)
        assert h.transport.texts_to(CHAT) == [busy]
        await h.bot.pipeline.stop(timeout=0)  # the crash
    h = harness(**settings)
    manager, rss = critical_memory(h.bot)  # still short of memory when it starts again
    async with h:
        h.bot.pipeline.submit(inbound("hola", chat=OTHER))  # a chat never told: it is
        await asyncio.sleep(0.6)
        assert h.transport.texts_to(CHAT) == [] and h.transport.texts_to(OTHER) == [busy]
        rss[0] = 100
        assert manager.check() is MemoryState.NORMAL
        assert await h.bot.pipeline.drain(5)
        assert h.transport.texts_to(CHAT) == ["echo: ¿tenéis cita hoy?"]


async def test_a_busy_notice_the_outbox_delivered_after_the_owners_message_is_not_repeated(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Takeover off, WhatsApp disconnected: the "busy" notice waited in the outbox while the owner wrote in
    the chat from the phone. The customer got the owner's message, then the notice at the reconnect; the
    store has them the other way round (the notice at the time it was queued), so after a restart the
    owner's message read as an answer since the notice, and the customer was told "busy" a second time."""
    settings = ai(fake_openai, busy_reply_after_s=0.2, human_takeover_minutes=0)
    busy = reply("busy", "es")
    async with harness(**settings) as h:
        critical_memory(h.bot)
        queued: list[str] = []
        h.transport.record = False  # disconnected: what the bot sends waits in the outbox
        h.transport.on_send = lambda sent: queued.append(sent.text)
        h.bot.pipeline.submit(inbound("¿tenéis cita hoy?", chat=CHAT))
        await asyncio.sleep(0.5)
        assert queued == [busy]
        h.bot.pipeline.submit(inbound("Gracias por escribir", chat=CHAT, from_me=True))  # the owner
        await asyncio.sleep(0.05)
        queued.clear()  # the reconnect: the outbox delivers the notice, after the owner's message
        await h.bot.pipeline.stop(timeout=0)  # the crash
    h = harness(**settings)
    manager, rss = critical_memory(h.bot)  # still short of memory when it starts again
    async with h:
        await asyncio.sleep(0.6)
        assert h.transport.texts_to(CHAT) == [], "told busy twice for one wait"
        rss[0] = 100
        assert manager.check() is MemoryState.NORMAL
        assert await h.bot.pipeline.drain(5)
        assert h.transport.texts_to(CHAT) == ["echo: ¿tenéis cita hoy?"]


async def test_busy_notices_not_sent_when_answering_resumes_are_not_sent_at_all(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Every waiting chat's notice was queued for the send budget at once: after memory came back they
    still went out, telling customers "I will answer shortly" after the wait, ahead of their answers."""
    busy = reply("busy", "es")
    release = asyncio.Event()

    class SlowSends(LoopbackTransport):  # as the send budget paces them: one notice takes a while
        async def send_text(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
            if text == busy:
                await release.wait()
            return await super().send_text(chat, text)

    h = harness(**ai(fake_openai, busy_reply_after_s=0.2))
    h.transport = SlowSends()
    h.bot = Bot.build(h.settings, h.transport)
    async with h:
        manager, rss = critical_memory(h.bot)
        chats = [f"3460099{i:04d}@s.whatsapp.net" for i in range(5)]
        for chat in chats:
            h.bot.pipeline.submit(inbound("hola", chat=chat))
        await asyncio.sleep(0.6)
        rss[0] = 100
        assert manager.check() is MemoryState.NORMAL
        release.set()
        assert await h.bot.pipeline.drain(5)
        notices = [chat for chat in chats if busy in h.transport.texts_to(chat)]
        assert len(notices) == 1  # the one already on its way
        assert all(h.transport.texts_to(chat)[-1] == "echo: hola" for chat in chats)


async def test_past_the_waiting_bound_messages_wait_in_the_store_and_are_answered_once_in_order(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(**ai(fake_openai, busy_reply_after_s=0.2, max_waiting_messages=20)) as h:
        manager, rss = inject_rss(h.bot)
        peak = [0]
        h.transport.on_send = lambda _: peak.__setitem__(0, max(peak[0], h.bot.pipeline.waiting))
        rss[0] = 460
        assert manager.check() is MemoryState.CRITICAL
        chats = [f"3460055{i:04d}@s.whatsapp.net" for i in range(25)]
        for n in range(4):
            for chat in chats:
                h.bot.pipeline.submit(inbound(f"m{n}", chat=chat))
        # While memory keeps the model shut, new work waits in the store only, not in memory.
        assert h.bot.pipeline.waiting == 0
        messages = h.bot.metrics()["messages"]
        assert messages["waiting_in_store"] is True and messages["spilled"] == 100
        await asyncio.sleep(1.0)
        busy = reply("busy", "es")
        # Chats whose messages all wait in the store are told too.
        assert [h.transport.texts_to(chat) for chat in chats] == [[busy]] * 25
        stored = [await h.bot.store.recent_messages(chat, 10) for chat in chats]
        assert sum(r.status is MessageStatus.RECEIVED for rows in stored for r in rows) == 100
        rss[0] = 200
        assert manager.check() is MemoryState.NORMAL
        assert await h.bot.pipeline.drain(20)
        expected = [busy, "echo: m0", "echo: m1", "echo: m2", "echo: m3"]
        assert [h.transport.texts_to(chat) for chat in chats] == [expected] * 25
        assert h.bot.pipeline.counters.answered == 100 and peak[0] <= 20
        assert h.bot.metrics()["messages"]["waiting_in_store"] is False


async def test_a_flood_without_memory_pressure_is_also_held_to_the_waiting_bound(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(**ai(fake_openai, max_waiting_messages=20)) as h:
        peak = [0]
        h.transport.on_send = lambda _: peak.__setitem__(0, max(peak[0], h.bot.pipeline.waiting))
        chats = [f"3460066{i:04d}@s.whatsapp.net" for i in range(10)]
        for n in range(20):
            for chat in chats:
                h.bot.pipeline.submit(inbound(f"m{n}", chat=chat))
        assert await h.bot.pipeline.drain(30)
        for chat in chats:
            assert h.transport.texts_to(chat) == [f"echo: m{n}" for n in range(20)]
        assert h.bot.pipeline.counters.spilled > 100 and peak[0] <= 20
        assert h.bot.pipeline.counters.answered == 200


@pytest.mark.parametrize("critical", [False, True])
async def test_messages_arriving_one_by_one_are_held_to_the_waiting_bound(
    harness, fake_openai: FakeOpenAI, critical: bool
) -> None:
    """A real transport delivers one message per loop turn: each chat's worker took its message off the
    count before waiting for a slot (or for memory), so nothing ever spilled and every chat kept a task
    and its message in memory, under critical memory too."""
    async with harness(**ai(fake_openai, max_waiting_messages=20, max_active_chats=4)) as h:
        manager, rss = inject_rss(h.bot)
        slow = asyncio.Event()
        h.bot.pipeline.responder.model = h.bot.model = InstantModel(slow)  # a model that has not answered yet
        if critical:
            rss[0] = 460
            assert manager.check() is MemoryState.CRITICAL
        chats = [f"3460088{i:04d}@s.whatsapp.net" for i in range(200)]
        held = 0
        for n, chat in enumerate(chats):
            h.bot.pipeline.submit(inbound(f"hola {n}", chat=chat))
            await asyncio.sleep(0)
            held = max(held, len(h.bot.pipeline._workers))
        assert h.bot.pipeline.waiting <= 20 and held <= 20 + 4
        assert h.bot.metrics()["messages"]["spilled"] >= 200 - 24
        rss[0] = 100
        manager.check()
        slow.set()
        assert await h.bot.pipeline.drain(30)
        assert [h.transport.texts_to(chat) for chat in chats] == [[f"ok: hola {n}"] for n in range(200)]


async def test_warning_forgets_ended_chat_state_but_keeps_live_pauses_and_windows(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(**ai(fake_openai, rate_limit_cooldown=1000, memory_shrink_fraction=0.75)) as h:
        manager, rss = inject_rss(h.bot)
        takeover, limiter = h.bot.pipeline.takeover, h.bot.pipeline.rate_limiter
        await h.say(*(inbound("hola", chat=f"3460077{i:04d}@s.whatsapp.net") for i in range(5)))
        takeover.pause("34600770000@s.whatsapp.net", 0.01)
        takeover.pause("34600770001@s.whatsapp.net", 3600)  # a human is answering this one
        await asyncio.sleep(1.1)  # the 1 s rate-limit windows are now empty
        await h.say(inbound("otra", chat="34600770009@s.whatsapp.net"))  # one live window
        assert len(limiter) > 1  # idle windows linger (a few go at each check)
        rss[0] = 420
        assert manager.check() is MemoryState.WARNING
        await asyncio.sleep(0)
        assert len(limiter) == 1 and takeover.stats()["paused_chats"] == 1
        assert len(takeover._paused) == 1 and takeover.is_paused("34600770001@s.whatsapp.net")
        assert h.bot.model.limit.capacity == 2  # 8 lowered by MEMORY_SHRINK_FRACTION


def random_inbound(rng: random.Random, index: int) -> tuple[Inbound, bool]:
    """A random event; returns it and whether it is a well-formed customer text to answer."""
    kind = rng.choice(list(MessageKind))
    text = "".join(rng.choice(string.printable + "ñ€😀\x00\x07") for _ in range(rng.randint(0, 300)))
    if rng.random() < 0.05:
        text = "x" * 100_000
    malformed = rng.random() < 0.1
    message = Inbound(
        id=MessageId("" if malformed and rng.random() < 0.5 else f"FZ{index}"),
        chat=ChatId("" if malformed else f"3460{rng.randint(0, 40):07d}@s.whatsapp.net"),
        sender="3460@s.whatsapp.net",
        kind=kind,
        text=text,
        timestamp=time.time() - rng.random() * 60,
        from_me=rng.random() < 0.05,
    )
    not_messages = (MessageKind.REACTION, MessageKind.OTHER, MessageKind.EDIT, MessageKind.REVOKE)
    answerable = not malformed and not message.from_me and kind not in not_messages
    return message, answerable


async def test_fuzz_every_well_formed_message_is_answered_exactly_once(harness) -> None:
    rng = random.Random(7)
    async with harness(rate_limit_max_messages=1_000_000, human_takeover_minutes=0) as h:
        expected: set[str] = set()
        events = [random_inbound(rng, i) for i in range(3000)]
        for message, answerable in events:
            h.bot.pipeline.submit(message)
            if answerable:
                expected.add(message.id)
            if rng.random() < 0.1:  # redeliveries
                h.bot.pipeline.submit(message)
        assert await h.bot.pipeline.drain(60)
        answered: list[str] = []
        withheld: list[str] = []  # a photo right after the chat was told "text and voice only"
        stickers: list[str] = []  # kept, unanswered: no picture the model is shown (AI off)
        for chat in {m.chat for m, ok in events if ok}:
            rows = await h.bot.store.recent_messages(chat, 10_000)
            answered += [r.wa_message_id for r in rows if r.status is MessageStatus.ANSWERED]
            skipped = [r for r in rows if r.status is MessageStatus.SKIPPED]
            withheld += [r.wa_message_id for r in skipped if r.kind != "sticker"]
            stickers += [r.wa_message_id for r in skipped if r.kind == "sticker"]
    assert sorted(answered + withheld + stickers) == sorted(expected)
    assert len(withheld) == h.bot.pipeline.media_notices.withheld > 0
    assert stickers
    assert h.bot.pipeline.counters.failed == 0


async def test_recovery_after_a_restart_goes_through_the_governor(harness, fake_openai: FakeOpenAI) -> None:
    from bot.governor import GovernedTransport, GovernorLimits

    async with harness(**ai(fake_openai)) as h:
        h.bot.pipeline.submit(inbound("hola", id="R1"))
        await h.bot.pipeline.stop(timeout=0)  # "crash": the message is saved, never answered
    settings = h.settings
    loopback = LoopbackTransport()
    governed = GovernedTransport(loopback, GovernorLimits(typing_chars_per_s=0))
    bot = Bot.build(settings, governed)
    await bot.start()  # recovery: the governor never saw this chat write, in this process
    assert await bot.pipeline.drain(10)
    await bot.stop()
    assert loopback.texts_to(CHAT) == ["echo: hola"]


async def test_a_number_blocked_before_a_restart_is_not_answered_by_recovery(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Recovery queued saved messages without the number lists: an abusive number the owner blocked and
    redeployed for was answered all the same, once per message it had left waiting."""
    async with harness(**ai(fake_openai)) as h:
        h.bot.pipeline.submit(inbound("insulto", id="B1"))
        h.bot.pipeline.submit(inbound("hola", id="O1", chat=OTHER))
        await h.bot.pipeline.stop(timeout=0)  # "crash": both saved, never answered
    async with harness(**ai(fake_openai, blocked_numbers="34600111222")) as h:
        assert await h.bot.pipeline.drain(10)
        assert h.transport.texts_to(CHAT) == []
        assert h.transport.texts_to(OTHER) == ["echo: hola"]
        [row] = await h.bot.store.recent_messages(CHAT, 5)
        assert row.status is MessageStatus.SKIPPED  # not found again by every later start


async def test_a_recovery_window_of_zero_means_no_limit_as_it_does_for_a_live_backlog(
    harness, fake_openai: FakeOpenAI
) -> None:
    """0 turned the live filter off (any backlog answered) but made recovery skip every message."""
    async with harness(**ai(fake_openai, recovery_window_minutes=0)) as h:
        assert await h.say(inbound("¿seguís ahí?", timestamp=time.time() - 3600)) == ["echo: ¿seguís ahí?"]
        h.bot.pipeline.submit(inbound("hola", id="Z1"))
        await h.bot.pipeline.stop(timeout=0)  # "crash": saved, never answered
    async with harness(**ai(fake_openai, recovery_window_minutes=0)) as h:
        assert await h.bot.pipeline.drain(10)
        assert h.transport.texts_to(CHAT) == ["echo: hola"]


async def test_a_message_arriving_during_shutdown_is_saved_for_the_next_start(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(**ai(fake_openai)) as h:
        await h.bot.pipeline.stop(timeout=1)
        assert h.bot.pipeline.submit(inbound("¿siguen ahí?", id="LATE")) is False
        await h.bot.pipeline.drain(5)
        [row] = await h.bot.store.recent_messages(CHAT, 5)
    assert (row.wa_message_id, row.status) == ("LATE", MessageStatus.RECEIVED)
    async with harness(**ai(fake_openai)) as h:
        assert await h.bot.pipeline.drain(10)
        assert h.transport.texts_to(CHAT) == ["echo: ¿siguen ahí?"]


async def test_a_flood_during_shutdown_is_rate_limited_like_any_other(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Messages arriving while the bot drained skipped the rate limit: all 40 were saved, and the next
    start answered every one of them."""
    async with harness(**ai(fake_openai, rate_limit_max_messages=5)) as h:
        await h.bot.pipeline.stop(timeout=1)
        for n in range(40):
            h.bot.pipeline.submit(inbound(f"spam {n}", id=f"F{n}"))
        await h.bot.pipeline.drain(5)
    async with harness(**ai(fake_openai)) as h:
        assert await h.bot.pipeline.drain(10)
        assert h.transport.texts_to(CHAT) == [f"echo: spam {n}" for n in range(5)]


async def test_leaving_critical_for_warning_reopens_the_model(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai, busy_reply_after_s=30)) as h:
        manager, rss = inject_rss(h.bot)
        rss[0] = 460
        manager.check()
        assert not h.bot.pipeline.model_gate.is_set()
        rss[0] = 420  # still above 80 %: Python kept the memory, but it is no longer critical
        manager.check()
        assert await h.say("hola") == ["echo: hola"]


async def test_a_half_open_trial_that_fails_oddly_does_not_wedge_the_circuit() -> None:
    from bot.ai import AIError, ChatModel

    class Odd(ChatModel):
        async def _call(self, messages: list[dict[str, object]]) -> str:  # type: ignore[override]
            raise AttributeError("'NoneType' object has no attribute 'content'")

    clock = Clock()
    model = Odd(client=None, model="x", breaker=CircuitBreaker(threshold=1, cooldown_s=10, clock=clock))  # type: ignore[arg-type]
    for _ in range(2):
        with contextlib.suppress(AttributeError, AIError):
            await model.complete([{"role": "user", "content": "hola"}])
        clock.now += 11  # each time the circuit half-opens and lets one trial through
    assert model.breaker.state.value == "half_open" and model.breaker.allow()


def test_pause_for_zero_minutes_means_resume() -> None:
    from bot.takeover import parse_command

    takeover = Takeover(pause_s=60)
    takeover.pause("c", None)
    command = parse_command("!bot pause 0")
    assert command is not None and takeover.apply(command, "c") == ("owner_resumed_chat", {})
    assert not takeover.is_paused("c")


async def test_block_and_allow_lists_from_the_database(harness, fake_openai: FakeOpenAI) -> None:
    import sqlite3

    settings_db = None
    async with harness(**ai(fake_openai)) as h:
        settings_db = h.settings.store_path
    with sqlite3.connect(settings_db) as conn:  # what an owner edits (in Supabase: the bot_contacts table)
        conn.execute("INSERT INTO bot_contacts (number, list, created_at) VALUES ('34600111222', 'block', 0)")
    async with harness(**ai(fake_openai)) as h:
        assert await h.say("hola") == []
        assert await h.say(inbound("hola", chat=OTHER)) == ["echo: hola"]
    with sqlite3.connect(settings_db) as conn:
        conn.execute("UPDATE bot_contacts SET list = 'allow'")
    async with harness(**ai(fake_openai, allowed_numbers="34600000000")) as h:  # merged with the setting
        assert await h.say("hola") == ["echo: hola"]
        assert await h.say(inbound("hola", chat=OTHER)) == []


async def test_the_bots_own_manager_polls_rss_and_drives_the_gate(harness, fake_openai: FakeOpenAI) -> None:
    rss = [100.0]
    h = harness(**ai(fake_openai, memory_limit=500))
    h.bot.memory._read = lambda: rss[0]  # the wiring Bot.build made, with RSS injected
    h.bot.memory.interval_s = 0.05
    async with h:
        rss[0] = 470
        await asyncio.sleep(0.3)
        assert not h.bot.pipeline.model_gate.is_set()  # only the polling loop could have shut it
        assert h.bot.metrics()["memory"]["state"] == "critical"
        h.bot.pipeline.submit(inbound("hola"))
        await asyncio.sleep(0.2)
        assert h.transport.texts_to(CHAT) == []
        rss[0] = 150
        assert await h.bot.pipeline.drain(5)
        assert h.transport.texts_to(CHAT) == ["echo: hola"]
        assert h.bot.memory.stats()["transitions"] == 2


async def test_memory_going_back_and_forth_tells_a_waiting_chat_once(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Each time the gate opened (warning) the set of chats told was cleared: one waiting chat got the
    "busy" notice four times during one wait."""
    fake_openai.delay_s = 0.6
    async with harness(**ai(fake_openai, busy_reply_after_s=0.2)) as h:
        manager, rss = inject_rss(h.bot)
        rss[0] = 460
        manager.check()  # critical
        for text in ("uno", "dos", "tres", "cuatro"):
            h.bot.pipeline.submit(inbound(text))
        await asyncio.sleep(0.5)
        for _ in range(3):  # warning for a moment, then critical again
            rss[0] = 420
            manager.check()
            await asyncio.sleep(0.3)
            rss[0] = 460
            manager.check()
            await asyncio.sleep(0.5)
        rss[0] = 100
        manager.check()
        assert await h.bot.pipeline.drain(20)
        assert h.transport.texts_to(CHAT).count(reply("busy", "es")) == 1


async def test_a_busy_notice_that_never_went_out_does_not_count_as_told(harness) -> None:
    """A notice dropped from the outbox (too old, or withheld) is marked failed: the customer never got it,
    so it is no promise, and the chat is told when it waits again."""
    from memory.store import BUSY_KIND, Direction, MessageStatus, StoredMessage

    async with harness() as h:
        store, now = h.bot.store, time.time()
        rows = [
            StoredMessage("Q1", CHAT, Direction.IN, "text", "¿cita?", MessageStatus.RECEIVED, now - 60),
            StoredMessage(
                "N1", CHAT, Direction.OUT, BUSY_KIND, reply("busy", "es"), MessageStatus.SENT, now - 30
            ),
        ]
        for row in rows:
            await store.add_message(row)
        assert await h.bot.pipeline._promise_stands(ChatId(CHAT))
        await store.set_status("N1", MessageStatus.FAILED)  # dropped from the outbox
        assert not await h.bot.pipeline._promise_stands(ChatId(CHAT))


class CallingNeonize(FakeNeonize):
    """FakeNeonize that keeps the callbacks run_whatsapp gives for calls and undecryptable messages."""

    def __init__(
        self,
        session: str,
        *,
        on_inbound: Any,
        on_call: Callable[[ChatId], Awaitable[None]] | None = None,
        on_undecryptable: Callable[[ChatId], Awaitable[None]] | None = None,
        **_: Any,
    ) -> None:
        super().__init__(session, on_inbound=on_inbound)
        self.on_call, self.on_undecryptable = on_call, on_undecryptable


@pytest.mark.timeout(60)
async def test_calls_tell_each_caller_once_and_refused_numbers_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With WA_REJECT_CALLS every call sent the caller a notice, blocked numbers included: 45 calls from a
    blocked number sent it 40 identical messages and took the whole send budget, so a customer's answer
    waited a minute. The resend request skipped the block list too."""
    monkeypatch.setattr(neonize_adapter, "NeonizeTransport", CallingNeonize)
    blocked, caller = ChatId("34600999888@s.whatsapp.net"), ChatId(OTHER)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        flows_file=None,
        port=free_port(),
        wa_typing_chars_per_s=0,
        wa_reject_calls=True,
        blocked_numbers="34600999888",
    )
    FakeNeonize.instance = None
    run = asyncio.create_task(whatsapp.run_whatsapp(settings))
    try:
        async with asyncio.timeout(20):
            while FakeNeonize.instance is None:
                await asyncio.sleep(0.01)
            transport = FakeNeonize.instance
            assert isinstance(transport, CallingNeonize) and transport.on_call and transport.on_undecryptable
            await asyncio.sleep(0.3)
            for _ in range(45):
                await transport.on_call(blocked)
            await transport.on_undecryptable(blocked)
            for _ in range(3):
                await transport.on_call(caller)
            await transport.on_undecryptable(caller)
            transport.on_inbound(inbound("hola", chat=CHAT))
            while not transport.texts_to(CHAT):  # the send budget is there for the customer's answer
                await asyncio.sleep(0.01)
            status, body = await get(f"http://127.0.0.1:{settings.port}/v1/metrics")
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        await run
    assert transport.texts_to(blocked) == []
    assert transport.texts_to(caller) == [reply("call_rejected", "es"), reply("resend", "es")]
    # The callers remembered for the notice are in the metrics: the caller, not the refused number.
    assert status == 200
    structures = json.loads(body)["memory"]["structures"]
    assert structures["call_notice_chats"] == {"size": 1, "max": whatsapp.CALL_NOTICE_CHATS, "evictions": 0}
