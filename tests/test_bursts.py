"""A customer's burst ("hola" / "quería saber" / "¿precio del plan pro?") answered once, together
(WA_GATHER_S): the real pipeline, SQLite store and SDK against the fake OpenAI server, loopback transport."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bot.replies import reply
from connection import neonize_adapter
from connection.types import ChatId, MessageKind
from memory.store import Direction, MessageStatus, StoreUnavailable
from tests.conftest import BotHarness, inbound
from tests.fake_openai import FakeOpenAI
from tests.test_shutdown import FakeNeonize, start_run
from tests.test_store_failures import full_disk, room_again, rows

CHAT = "34600111222@s.whatsapp.net"
OTHERS = [f"3460088{i:04d}@s.whatsapp.net" for i in range(10)]


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("memory.sqlite_store.RETRY_AFTER_S", 0.1)


def ai(fake: FakeOpenAI, **extra: object) -> dict[str, object]:
    return {"openai_api_key": "test-key", "openai_base_url": fake.base_url, **extra}


def gathering(h: BotHarness, seconds: float) -> BotHarness:
    h.bot.pipeline.gather_s = seconds  # as bot.whatsapp sets it from WA_GATHER_S
    return h


async def statuses(h: BotHarness) -> dict[str, MessageStatus]:
    rows = await h.bot.store.recent_messages(CHAT, 50)
    return {row.wa_message_id: row.status for row in rows if row.direction is Direction.IN}


async def test_a_burst_gets_one_answer_with_every_message(harness, fake_openai: FakeOpenAI) -> None:
    """Three answers to three halves of one question read like a robot, and the first two answered
    questions the customer had not finished asking."""
    async with harness(**ai(fake_openai)) as h:
        gathering(h, 0.4)
        await h.say("me llamo Ana")  # an earlier turn, in the history
        sent = await h.say(
            inbound("hola", id="B1"), inbound("quería saber una cosa", id="B2"), inbound("¿precio?", id="B3")
        )
        assert sent == ["echo: hola\nquería saber una cosa\n¿precio?"]
        assert h.bot.pipeline.counters.merged == 2
        # Each message is kept as sent; all three are answered, by one reply.
        assert {k: v for k, v in (await statuses(h)).items() if k.startswith("B")} == {
            "B1": MessageStatus.ANSWERED,
            "B2": MessageStatus.ANSWERED,
            "B3": MessageStatus.ANSWERED,
        }
        await h.say(inbound("gracias", id="B4"))
    burst, after = fake_openai.chat_requests[-2:]
    # The burst is one turn, with the history before it; the next turn sees each message as it was sent.
    assert [m["content"] for m in burst["messages"][1:]] == [
        "me llamo Ana",
        "echo: me llamo Ana",
        "hola\nquería saber una cosa\n¿precio?",
    ]
    assert [m["content"] for m in after["messages"][1:]][-5:] == [
        "hola",
        "quería saber una cosa",
        "¿precio?",
        "echo: hola\nquería saber una cosa\n¿precio?",
        "gracias",
    ]


async def test_a_message_after_the_quiet_is_answered_on_its_own(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        gathering(h, 0.2)
        h.bot.pipeline.submit(inbound("hola"))
        h.bot.pipeline.submit(inbound("¿abren hoy?"))
        await asyncio.sleep(0.8)  # answered meanwhile
        assert await h.say("¿y mañana?") == ["echo: ¿y mañana?"]
        assert h.transport.texts_to(CHAT) == ["echo: hola\n¿abren hoy?", "echo: ¿y mañana?"]


async def test_without_gathering_each_message_is_answered(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        assert await h.say("hola", "¿precio?") == ["echo: hola", "echo: ¿precio?"]
        assert h.bot.pipeline.counters.merged == 0


async def test_a_flow_answers_a_burst_that_is_just_its_question(harness, tmp_path: Path) -> None:
    flows = tmp_path / "flows.yaml"
    flows.write_text("- keywords: [horario]\n  answer: De 9 a 18.\n")
    async with harness(flows_file=flows) as h:
        gathering(h, 0.2)
        assert await h.say("hola", "¿horario?") == ["De 9 a 18."]


async def test_a_customer_who_keeps_writing_is_still_answered(harness, fake_openai: FakeOpenAI) -> None:
    """The wait for quiet is bounded (four times WA_GATHER_S): a message every 0.1 s for 2 s still gets
    answers while it goes on."""
    async with harness(**ai(fake_openai)) as h:
        gathering(h, 0.25)
        for n in range(20):
            h.bot.pipeline.submit(inbound(f"m{n}"))
            await asyncio.sleep(0.1)
        answered_while_writing = len(h.transport.texts_to(CHAT))
        assert await h.bot.pipeline.drain(10)
        answers = h.transport.texts_to(CHAT)
    assert answered_while_writing >= 1
    # Nothing lost, nothing answered twice, in order.
    assert "\n".join(a.removeprefix("echo: ") for a in answers).split("\n") == [f"m{n}" for n in range(20)]


async def test_media_the_model_is_not_shown_and_groups_are_not_merged(
    harness, fake_openai: FakeOpenAI
) -> None:
    group = "120363000000000001@g.us"
    async with harness(**ai(fake_openai, reply_to_groups="always")) as h:
        gathering(h, 0.2)
        sent = await h.say(
            inbound("hola"),
            inbound("", kind=MessageKind.UNSUPPORTED),
            inbound("¿precio?"),
            inbound("uno", chat=group, is_group=True),
            inbound("dos", chat=group, is_group=True),
        )
    notice = reply("media_unsupported_photos_pdf", "es")
    assert h.transport.texts_to(CHAT) == ["echo: hola", notice, "echo: ¿precio?"]
    assert h.transport.texts_to(group) == ["echo: uno", "echo: dos"]
    assert len(sent) == 5


async def test_the_owner_writing_during_the_wait_silences_the_whole_burst(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(**ai(fake_openai)) as h:
        gathering(h, 0.3)
        h.bot.pipeline.submit(inbound("hola", id="O1"))
        h.bot.pipeline.submit(inbound("¿precio?", id="O2"))
        h.bot.pipeline.submit(inbound("Te escribo yo, Ana", id="OWNER", from_me=True))
        assert await h.bot.pipeline.drain(10)
        assert h.transport.texts_to(CHAT) == []
        found = await statuses(h)
        assert (found["O1"], found["O2"]) == (MessageStatus.SKIPPED, MessageStatus.SKIPPED)
    assert fake_openai.chat_count == 0


async def test_a_burst_left_by_a_crash_is_answered_once_after_the_restart(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Recovery takes each unanswered message back: the burst is answered together, at once (its messages
    are old: no wait), and none of them again after another restart."""
    first = harness(**ai(fake_openai))
    await first.bot.start()
    a_minute_ago = time.time() - 60
    for n, text in enumerate(["hola", "¿tienen talla M?"]):
        message = inbound(text, id=f"C{n}", timestamp=a_minute_ago, received_at=a_minute_ago)
        await first.bot.store.add_message(first.bot.pipeline._inbound_row(message))
    await first.bot.store.close()  # a crash: nothing answered
    second = gathering(harness(**ai(fake_openai)), 5.0)
    started = time.monotonic()
    async with second:
        assert await second.bot.pipeline.drain(10)
        assert second.transport.texts_to(CHAT) == ["echo: hola\n¿tienen talla M?"]
        assert time.monotonic() - started < 5.0
    async with gathering(harness(**ai(fake_openai)), 5.0) as third:
        assert await third.bot.pipeline.drain(10)
        assert third.transport.sent == []


async def test_stopping_answers_the_waiting_burst_without_waiting_out_the_quiet(
    harness, fake_openai: FakeOpenAI
) -> None:
    h = gathering(harness(**ai(fake_openai)), 20.0)
    await h.bot.start()
    h.bot.pipeline.submit(inbound("hola"))
    h.bot.pipeline.submit(inbound("¿precio?"))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await h.bot.stop()
    assert time.monotonic() - started < 5.0
    assert h.transport.texts_to(CHAT) == ["echo: hola\n¿precio?"]


@pytest.mark.timeout(60)
async def test_wa_gather_s_sets_the_wait_of_the_whatsapp_bot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_openai: FakeOpenAI
) -> None:
    monkeypatch.setattr(neonize_adapter, "NeonizeTransport", FakeNeonize)
    async with asyncio.timeout(20):
        run, transport = await start_run(tmp_path, wa_gather_s=0.5, **ai(fake_openai))
    try:
        async with asyncio.timeout(20):
            transport.on_inbound(inbound("hola"))
            await asyncio.sleep(0.1)
            transport.on_inbound(inbound("¿hacen envíos?"))
            while not transport.texts_to(CHAT):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        await run
    assert transport.texts_to(ChatId(CHAT)) == ["echo: hola\n¿hacen envíos?"]


def test_wa_gather_s_is_bounded(make_settings: Any) -> None:
    assert make_settings().wa_gather_s == 3.0
    with pytest.raises(ValueError, match="wa_gather_s"):
        make_settings(wa_gather_s=31)


async def test_a_burst_keeps_the_conversation_before_it(harness, fake_openai: FakeOpenAI) -> None:
    """The burst's messages took the history's places and were then left out: six short texts left the
    model with no history at all, and the customer's name and order were forgotten."""
    async with harness(**ai(fake_openai)) as h:
        gathering(h, 0.3)
        await h.say("me llamo Ana, pedido 123")
        await h.say(*[inbound(t) for t in ["hola", "otra", "cosa", "sobre", "mi", "pedido?"]])
    contents = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
    assert contents == [
        "me llamo Ana, pedido 123",
        "echo: me llamo Ana, pedido 123",
        "hola\notra\ncosa\nsobre\nmi\npedido?",
    ]


async def test_a_burst_keeps_the_conversation_read_from_the_store(harness, fake_openai: FakeOpenAI) -> None:
    """After a restart the history is read from the store: the model got replies without their questions."""
    async with harness(**ai(fake_openai)) as h:
        await h.say("me llamo Ana")
        await h.say("quiero el plan pro")
    async with gathering(harness(**ai(fake_openai)), 0.3) as again:
        await again.say(*[inbound(t) for t in ["hola", "una", "pregunta", "más"]])
    contents = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
    assert contents == [
        "me llamo Ana",
        "echo: me llamo Ana",
        "quiero el plan pro",
        "echo: quiero el plan pro",
        "hola\nuna\npregunta\nmás",
    ]


async def test_two_swipe_replies_are_answered_each_with_its_quote(harness, fake_openai: FakeOpenAI) -> None:
    """ "¿precio?" under plan A then "¿y este?" under plan B, told to the model together, could not say which
    question was about which plan: a second swipe reply starts the next burst."""
    async with harness(**ai(fake_openai)) as h:
        gathering(h, 0.3)
        await h.say(
            inbound("hola"),
            inbound("¿precio?", quoted="Plan A: 100 GB", quoted_from="bot"),
            inbound("¿y este?", quoted="Plan B: 500 GB", quoted_from="bot"),
        )
    first, second = (request["messages"][-1]["content"] for request in fake_openai.chat_requests)
    assert "Plan A" in first and first.endswith("hola\n¿precio?") and "Plan B" not in first
    assert "Plan B" in second and second.endswith("¿y este?") and "Plan A" not in second


async def test_a_burst_whose_reply_could_not_be_recorded_is_not_answered_again(
    harness, fake_openai: FakeOpenAI
) -> None:
    """Only the burst's last message was noted as unrecorded: the others, still RECEIVED in the store, were
    taken back from it and answered a second time."""
    async with harness(**ai(fake_openai, max_waiting_messages=10)) as h:
        gathering(h, 0.2)
        store = h.bot.store
        add_reply = store.add_reply

        def failing_for_the_burst(reply: Any, answered_id: str, also_answered: Any = ()) -> Any:
            if answered_id == "B":
                future = asyncio.get_running_loop().create_future()
                future.set_exception(OSError("disk I/O error"))
                return future
            return add_reply(reply, answered_id, also_answered)

        store.add_reply = failing_for_the_burst
        h.bot.pipeline.model_gate.clear()  # memory critical: everything waits in the store
        h.bot.pipeline.submit(inbound("a", id="A"))
        h.bot.pipeline.submit(inbound("b", id="B"))
        for n in range(30):
            h.bot.pipeline.submit(inbound(f"m{n}", chat=OTHERS[n % 10], id=f"M{n}"))
        h.bot.pipeline.open_model_gate()
        assert await h.bot.pipeline.drain(20)
        assert h.transport.texts_to(CHAT) == ["echo: a\nb"]


async def test_a_takeover_on_a_full_disk_skips_every_message_of_the_burst(
    harness, fake_openai: FakeOpenAI
) -> None:
    """The first status the store kept for a retry ended the loop: the burst's other messages stayed
    RECEIVED, and a restart after the takeover answered what the owner had handled."""
    settings = ai(fake_openai, max_inbound_chars=20000, human_takeover_minutes=0.01)  # a 0.6 s takeover
    async with harness(**settings) as h:
        gathering(h, 0.3)
        store = h.bot.store
        await h.say(inbound("primero", id="FIRST"))
        await full_disk(store)
        h.bot.pipeline.submit(inbound("hola " + "x" * 3900, id="S1"))
        h.bot.pipeline.submit(inbound("¿precio? " + "y" * 3900, id="S2"))
        h.bot.pipeline.submit(inbound("Te escribo yo", id="OWNER", from_me=True))
        assert await h.bot.pipeline.drain(10)
        assert h.transport.texts_to(CHAT) == ["echo: primero"]
        await room_again(store)
        await store.flush()
        path = str(h.settings.data_dir / "bot.sqlite3")
    stored = rows(path)
    assert (stored["S1"][1], stored["S2"][1]) == ("skipped", "skipped")
    await asyncio.sleep(1.0)  # the takeover is over
    async with harness(**settings) as again:
        assert await again.bot.pipeline.drain(10)
        assert again.transport.texts_to(CHAT) == []


async def test_group_messages_are_not_merged_after_a_restart(harness, fake_openai: FakeOpenAI) -> None:
    """Recovery rebuilt them from the store as 1:1 messages, so two members' questions got one answer."""
    group = "120363000000000001@g.us"
    first = harness(**ai(fake_openai, reply_to_groups="always"))
    await first.bot.start()
    a_minute_ago = time.time() - 60
    for n, (text, who) in enumerate([("¿abren hoy?", "34600000001"), ("¿y mañana?", "34600000002")]):
        message = inbound(text, chat=group, id=f"G{n}", is_group=True, timestamp=a_minute_ago)
        message = replace(message, sender=f"{who}@s.whatsapp.net", received_at=a_minute_ago)
        await first.bot.store.add_message(first.bot.pipeline._inbound_row(message))
    await first.bot.store.close()  # a crash: nothing answered
    async with gathering(harness(**ai(fake_openai, reply_to_groups="always")), 3.0) as second:
        assert await second.bot.pipeline.drain(10)
        assert second.transport.texts_to(group) == ["echo: ¿abren hoy?", "echo: ¿y mañana?"]


@pytest.mark.parametrize("texts", [["hola", "¿precio?"], ["hola", "quiero hablar con una persona"]])
async def test_a_burst_is_answered_when_its_history_cannot_be_read(
    harness, fake_openai: FakeOpenAI, texts: list[str]
) -> None:
    """The history read failed outside the answer's error handling: the burst got nothing at all, and a
    request for a person in it reached nobody."""

    async def unreadable(chat: str, limit: int) -> list[Any]:
        raise StoreUnavailable("disk I/O error")

    async with harness(**ai(fake_openai)) as h:
        gathering(h, 0.2)
        h.bot.store.recent_messages = unreadable  # the chat is not in memory: its history is read
        sent = await h.say(*texts)
        paused = h.bot.pipeline.takeover.is_paused(CHAT)
    asks_for_a_person = "persona" in texts[1]
    assert paused == asks_for_a_person
    assert sent == ([reply("handoff", "es")] if asks_for_a_person else [f"echo: {texts[0]}\n{texts[1]}"])


async def test_a_request_for_a_person_split_over_a_burst_hands_over(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        gathering(h, 0.2)
        assert await h.say("quiero hablar", "con una persona") == [reply("handoff", "es")]
        assert await h.say("no", "quiero hablar con una persona") == []  # handed over already: silent
        assert h.bot.pipeline.takeover.is_paused(CHAT)
