"""The owner at the phone: commands, taking a chat over, and what arrives while the bot shuts down;
through the real pipeline on the loopback transport."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.app import Bot
from bot.config import Settings
from bot.takeover import parse_command
from connection.types import ChatId, Inbound, MessageKind
from memory.store import apply_pause, queue_pause_change
from tests.conftest import BotHarness, inbound
from tests.fake_openai import FakeOpenAI

CHAT = "34600111222@s.whatsapp.net"
OTHER = "5491122334455@s.whatsapp.net"
ME = "34699999999@s.whatsapp.net"


def ai(fake: FakeOpenAI, **extra: object) -> dict[str, object]:
    return {"openai_api_key": "k", "openai_base_url": fake.base_url, **extra}


def from_owner(text: str, chat: str = ME) -> Inbound:
    return inbound(text, chat=chat, from_me=True, is_self_chat=chat == ME)


@contextlib.asynccontextmanager
async def governed_bot(settings: Settings, typing_chars_per_s: float = 0) -> AsyncIterator[tuple[Bot, Any]]:
    """A bot behind the ban-risk governor, wired as bot.whatsapp wires it (the takeover holds sends)."""
    from bot.governor import GovernedTransport, GovernorLimits
    from connection.loopback import LoopbackTransport

    limits = GovernorLimits(typing_chars_per_s=typing_chars_per_s, typing_jitter=0)
    governed = GovernedTransport(LoopbackTransport(owner_chat=ChatId(ME)), limits)
    bot = Bot.build(settings, governed)
    governed.hold = bot.pipeline.takeover.holds
    await bot.start()
    try:
        yield bot, governed
    finally:
        await bot.stop()


async def while_stopping(settings: Settings, fake: FakeOpenAI, *messages: Inbound) -> None:
    """Run a bot, begin stopping it while a slow answer is in flight, and deliver `messages` meanwhile
    (whatsmeow keeps delivering while the bot drains at SIGTERM)."""
    fake.delay_s = 0.5
    async with BotHarness(settings) as h:
        h.bot.pipeline.submit(inbound("pregunta lenta", chat="34600999999@s.whatsapp.net"))
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(h.bot.pipeline.stop(timeout=8))
        await asyncio.sleep(0.05)
        for message in messages:
            h.bot.pipeline.submit(message)
        await stopping
    fake.delay_s = 0


async def test_a_pause_sent_from_the_owners_own_chat_pauses_every_chat(
    harness, fake_openai: FakeOpenAI
) -> None:
    """It paused only the owner's own chat, while the owner was told "paused this chat for 60 min"."""
    async with harness(**ai(fake_openai)) as h:
        await h.say(from_owner("!bot pause 60"))
        assert h.transport.texts_to(ME) == ["Bot en pausa en todos los chats durante 1 h."]
        assert await h.say("hola", inbound("hola", chat=OTHER)) == []


async def test_resume_in_one_chat_during_a_pause_of_all(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        await h.say(from_owner("!bot pause all"))
        await h.say(from_owner("!bot resume", chat=CHAT))  # typed in the customer's chat
        assert await h.say("hola") == ["echo: hola"]
        assert await h.say(inbound("hola", chat=OTHER)) == []  # the others stay paused


async def test_command_answers_go_to_the_owners_chat_never_to_the_customer(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(**ai(fake_openai)) as h:
        h.transport.owner_chat = ChatId(ME)
        await h.say(from_owner("!bot status", chat=CHAT))
        await h.say(from_owner("!bot pausa nunca", chat=CHAT))
        assert h.transport.texts_to(CHAT) == []
        status, usage = h.transport.texts_to(ME)
        assert status == "Estado del bot: respondiendo; chats en pausa: 0."
        assert usage.startswith("Uso: !bot pausa [30 | 2h | 1 día]")


async def test_a_pause_in_a_customers_chat_names_the_customer_and_the_length_as_written(
    harness, fake_openai: FakeOpenAI
) -> None:
    """ "Bot en pausa en ese chat durante 1440 min": several in a row could not be told apart."""
    async with harness(**ai(fake_openai)) as h:
        h.transport.owner_chat = ChatId(ME)
        await h.say(from_owner("!bot pausa 1 día", chat=CHAT))
        await h.say(from_owner("!bot pausa 90", chat=OTHER))
        await h.say(from_owner("!bot reanuda", chat=OTHER))
        told = h.transport.texts_to(ME)
    number, other = CHAT.split("@")[0], OTHER.split("@")[0]
    assert told == [
        f"Bot en pausa en el chat de +{number} durante 1 día.",
        f"Bot en pausa en el chat de +{other} durante 1,5 h.",
        f"El bot vuelve a responder en el chat de +{other}.",
    ]


async def test_a_pause_in_a_chat_known_by_no_number_reads_that_chat(harness, fake_openai: FakeOpenAI) -> None:
    """A LID-keyed chat read "el chat de Un cliente"."""
    async with harness(**ai(fake_openai)) as h:
        h.transport.owner_chat = ChatId(ME)
        await h.say(from_owner("!bot pausa 30", chat="123456789012345@lid"))
    assert h.transport.texts_to(ME) == ["Bot en pausa en ese chat durante 30 min."]


async def test_status_names_the_paused_chats_and_what_is_left(harness, fake_openai: FakeOpenAI) -> None:
    """ "chats en pausa: 2" left the owner guessing which."""
    async with harness(**ai(fake_openai)) as h:
        h.transport.owner_chat = ChatId(ME)
        await h.say(from_owner("!bot pausa 30", chat=CHAT))
        await h.say(from_owner("!bot pausa", chat=OTHER))
        await h.say(from_owner("!bot estado"))
        status = h.transport.texts_to(ME)[-1]
    number, other = CHAT.split("@")[0], OTHER.split("@")[0]
    assert status == f"Estado del bot: respondiendo; chats en pausa: 2 (+{number} 30 min, +{other} ∞)."


async def test_command_answers_follow_the_language_setting(harness) -> None:
    async with harness(bot_language="en") as h:
        await h.say(from_owner("!bot pause all 30"))
        assert h.transport.texts_to(ME) == ["Bot paused in every chat for 30 min."]


@pytest.mark.parametrize(
    ("text", "minutes", "everywhere"),
    [
        ("!bot pause 30", 30, False),
        ("!bot pause 30min", 30, False),
        ("!bot pause 45 min", 45, False),
        ("!bot pause 1,5", 1.5, False),  # the Spanish decimal comma
        ("!bot pausa 2 h todos", 120, True),
        ("!bot  PAUSE   ALL", None, True),
        ("!bot pausa 1 día", 24 * 60, False),
        ("!bot pausa 2dias todos", 2 * 24 * 60, True),
        ("!bot off", None, False),
        ("!bot off todos", None, True),
        ("¡bot pausa 30", 30, False),  # the "¡" a Spanish keyboard offers
    ],
)
def test_durations_are_read_as_an_owner_writes_them(
    text: str, minutes: float | None, everywhere: bool
) -> None:
    command = parse_command(text)
    assert command is not None and command.action == "pause"
    assert command.minutes == minutes and command.everywhere is everywhere


@pytest.mark.parametrize(
    "text", ["!bot pause -5", "!bot pause ²", "!bot pause 1e2", "!bot pausar", "!bot", "!bot pausa 2 semanas"]
)
def test_a_command_that_cannot_be_read_is_answered_with_usage_never_an_endless_pause(text: str) -> None:
    """`30min`, `1,5` and `-5` used to parse as "no minutes", a pause with no end; `²` raised in intake."""
    command = parse_command(text)
    assert command is not None and command.action == "help"


async def test_an_answer_being_prepared_is_not_sent_once_the_owner_wrote(
    harness, fake_openai: FakeOpenAI
) -> None:
    fake_openai.delay_s = 0.6
    async with harness(**ai(fake_openai)) as h:
        h.bot.pipeline.submit(inbound("¿cuánto cuesta?"))
        await asyncio.sleep(0.2)  # the model is thinking; the owner answers from the phone
        h.bot.pipeline.submit(inbound("Son 20 euros, soy Marta", from_me=True))
        assert await h.bot.pipeline.drain(10)
        assert h.transport.texts_to(CHAT) == []


async def test_what_arrives_during_shutdown_is_filtered_before_it_is_kept(
    make_settings, fake_openai: FakeOpenAI
) -> None:
    """It was saved unfiltered and answered at the next start: a group, a reaction, a blocked number and a
    status broadcast all got replies."""
    settings = make_settings(**ai(fake_openai, blocked_numbers="34611111111"))
    await while_stopping(
        settings,
        fake_openai,
        inbound("hola grupo", chat="120363000000000000@g.us", is_group=True),
        inbound("", kind=MessageKind.REACTION, chat=CHAT),
        inbound("spam", chat="34611111111@s.whatsapp.net"),
        inbound("mira mi estado", chat="status@broadcast", is_status=True),
        inbound("¿abren mañana?", chat=OTHER, id="KEPT"),
    )
    async with BotHarness(settings) as again:  # the next start answers what was kept
        assert await again.bot.pipeline.drain(10)
        assert [(s.chat, s.text) for s in again.transport.sent] == [(OTHER, "echo: ¿abren mañana?")]


async def test_a_takeover_and_a_pause_of_all_survive_a_restart(
    make_settings, fake_openai: FakeOpenAI
) -> None:
    """They lived in memory only: after a deploy the bot talked over the human who had the chat."""
    settings = make_settings(**ai(fake_openai))
    async with BotHarness(settings) as h:
        assert await h.say("hola") == ["echo: hola"]
        await h.say(inbound("Hola, soy Marta, te atiendo yo", from_me=True))
        await h.say(from_owner("!bot pause all 30"))
    async with BotHarness(settings) as again:
        assert await again.say("¿me confirmas el precio?") == []
        assert await again.say(inbound("hola", chat=OTHER)) == []
        await again.say(from_owner("!bot resume all"))
    async with BotHarness(settings) as third:  # and a resume is kept too
        assert await third.say(inbound("hola", chat=OTHER)) == ["echo: hola"]


async def test_the_owner_writing_while_the_bot_types_stops_the_answer(
    make_settings, fake_openai: FakeOpenAI
) -> None:
    """The check came before the governor's typing pause (up to 6 s), exactly when an owner replies."""
    async with governed_bot(make_settings(**ai(fake_openai)), typing_chars_per_s=10) as (bot, governed):
        question = inbound("¿cuánto cuesta?")
        governed.note_inbound(question)
        bot.pipeline.submit(question)
        await asyncio.sleep(0.5)  # the answer is ready; the bot "types" it for about 2 s
        bot.pipeline.submit(inbound("Son 20 euros, soy Marta", from_me=True))
        assert await bot.pipeline.drain(10)
        assert governed.inner.texts_to(CHAT) == []
        assert governed.stats()["withheld"] == 1
        # and no "typing…" left showing right after the owner's message
        assert [typing for chat, typing in governed.inner.typing if chat == CHAT][-1] is False


async def test_a_takeover_seen_by_the_old_instance_during_a_deploy_holds(
    make_settings, fake_openai: FakeOpenAI
) -> None:
    """The new instance read the pauses before it held the session lease, while the old one still answered."""
    from connection.loopback import LoopbackTransport

    settings = make_settings(**ai(fake_openai))
    old_transport, new_transport = LoopbackTransport(), LoopbackTransport()
    old = Bot.build(settings, old_transport)
    await old.start()
    new = Bot.build(settings, new_transport)
    await new.start(recover=False)  # up, waiting for the lease (bot.whatsapp recovers once it holds it)
    old.pipeline.submit(inbound("Hola, soy Marta, te atiendo yo", from_me=True))
    await old.stop()
    await new.recover()
    try:
        new.pipeline.submit(inbound("¿me confirmas?"))
        assert await new.pipeline.drain(10)
        assert new_transport.texts_to(CHAT) == []
    finally:
        await new.stop()


async def test_the_owner_answering_while_the_bot_stops_is_kept(
    make_settings, fake_openai: FakeOpenAI
) -> None:
    settings = make_settings(**ai(fake_openai))
    await while_stopping(
        settings,
        fake_openai,
        inbound("¿precio?", id="Q1"),
        from_owner("Son 20 euros, soy Marta", chat=CHAT),
        inbound("¿y el envío?", id="AFTER-MARTA"),  # kept for the history, unanswered
    )
    async with BotHarness(settings) as again:
        assert await again.bot.pipeline.drain(10)
        assert again.transport.texts_to(CHAT) == []
        history = [m.body for m in await again.bot.store.recent_messages(CHAT, 10)]
    assert "¿y el envío?" in history and "Son 20 euros, soy Marta" in history


async def test_pause_and_resume_land_in_the_order_given(make_settings, fake_openai: FakeOpenAI) -> None:
    """One task per change: with requests of different speeds (Supabase), a resume could land first."""
    settings = make_settings(**ai(fake_openai))
    async with BotHarness(settings) as h:
        store, real = h.bot.store, h.bot.store.set_pause

        async def slow_upserts(chat: str, until: float | None) -> None:
            await asyncio.sleep(0.05 if until is not None else 0.01)
            await real(chat, until)

        store.set_pause = slow_upserts  # type: ignore[method-assign]
        await h.say(from_owner("!bot pause all"))
        await h.say(from_owner("!bot resume all"))
        await asyncio.sleep(0.2)  # both writes land
    async with BotHarness(settings) as again:
        assert await again.say("hola") == ["echo: hola"]


async def test_pauses_that_ended_leave_no_rows(make_settings, fake_openai: FakeOpenAI) -> None:
    import sqlite3

    settings = make_settings(**ai(fake_openai, human_takeover_minutes=0.001))
    async with BotHarness(settings) as h:
        for i in range(20):
            await h.say(inbound("te atiendo yo", chat=f"3460000{i:04d}@s.whatsapp.net", from_me=True))
        await asyncio.sleep(0.1)
    async with BotHarness(settings):
        pass
    with sqlite3.connect(settings.data_dir / "bot.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM bot_pauses").fetchone()[0] == 0


async def test_owner_commands_are_answered_during_a_pause_of_all(
    make_settings, fake_openai: FakeOpenAI
) -> None:
    """The governor held every chat during `!bot pause all`, the owner's own included: no answer came."""
    async with governed_bot(make_settings(**ai(fake_openai))) as (bot, governed):
        for text in ("!bot pause all", "!bot status"):
            bot.pipeline.submit(from_owner(text))
            assert await bot.pipeline.drain(10)
            await asyncio.sleep(0.05)  # notices are sent in the background
        assert len(governed.inner.texts_to(ME)) == 2


async def test_a_pause_not_saved_at_first_is_saved_by_the_stop(
    make_settings, fake_openai: FakeOpenAI
) -> None:
    """The writer slept 5 s after a failure and stop waited exactly as long: the takeover was lost."""
    from memory.store import StoreUnavailable

    settings = make_settings(**ai(fake_openai))
    async with BotHarness(settings) as h:
        store, real, failures = h.bot.store, h.bot.store.set_pause, [1]

        async def blip_then_slow(chat: str, until: float | None) -> None:
            if failures:
                failures.pop()
                raise StoreUnavailable("a blip")
            await asyncio.sleep(0.1)  # a Supabase round trip
            await real(chat, until)

        store.set_pause = blip_then_slow  # type: ignore[method-assign]
        await h.say(inbound("Hola, soy Marta", from_me=True))
        await asyncio.sleep(0.1)
    async with BotHarness(settings) as again:
        assert await again.say("hola") == []


async def test_one_change_that_cannot_be_saved_does_not_block_the_others(
    make_settings, fake_openai: FakeOpenAI
) -> None:
    settings = make_settings(**ai(fake_openai))
    async with BotHarness(settings) as h:
        store, real = h.bot.store, h.bot.store.set_pause

        async def one_bug(chat: str, until: float | None) -> None:
            if chat == OTHER:
                raise OverflowError("a date past year 9999")
            await real(chat, until)

        store.set_pause = one_bug  # type: ignore[method-assign]
        await h.say(from_owner("te atiendo yo", chat=OTHER))
        await h.say(from_owner("Hola, soy Marta", chat=CHAT))
    async with BotHarness(settings) as again:
        assert await again.say("hola") == []  # CHAT's takeover was saved after OTHER's failed


def test_a_pause_of_all_after_a_resume_of_all_not_written_yet_still_ends_each_chats_pause() -> None:
    """Changes not written yet keep the latest per chat, and 'pause all' replaced the 'resume all' before it
    (both are the chat "*"): the chats paused in the database stayed paused there."""
    changes: dict[str, float | None] = {}
    queue_pause_change(changes, "*", None)  # `!bot resume all`, Supabase away
    queue_pause_change(changes, OTHER, math.inf)  # a takeover after it stays
    queue_pause_change(changes, "*", 100.0)  # `!bot pause 30` from the owner's own chat
    written: dict[str, float] = {CHAT: math.inf}  # paused before, in the database
    for chat, until in changes.items():  # as the writer sends them, in order
        apply_pause(written, chat, until)
    assert written == {OTHER: math.inf, "*": 100.0}


def test_a_pause_longer_than_a_year_is_read_as_a_typo() -> None:
    command = parse_command("!bot pausa 99999999999999999 h")
    assert command is not None and command.action == "help"


async def test_a_chat_resumed_during_a_pause_of_all_stays_resumed_after_a_restart(
    make_settings, fake_openai: FakeOpenAI
) -> None:
    settings = make_settings(**ai(fake_openai))
    async with BotHarness(settings) as h:
        await h.say(from_owner("!bot pause all"))
        await h.say(from_owner("!bot resume", chat=CHAT))
    async with BotHarness(settings) as again:
        assert await again.say("hola") == ["echo: hola"]
        assert await again.say(inbound("hola", chat=OTHER)) == []
        await again.say(from_owner("!bot pause all"))  # a new pause of all covers that chat again
    async with BotHarness(settings) as third:
        assert await third.say("¿hola?") == []


async def test_the_owner_writing_in_a_resumed_chat_hands_it_back_after_the_takeover(
    harness, fake_openai: FakeOpenAI
) -> None:
    """During `!bot pause all`, a chat given back with `!bot resume` lost that when the owner wrote in it:
    silent until `resume all` instead of after the takeover's minutes."""
    async with harness(**ai(fake_openai, human_takeover_minutes=0.002)) as h:
        await h.say(from_owner("!bot pause all"))
        await h.say(from_owner("!bot resume", chat=CHAT))
        await h.say(from_owner("Hola, soy Marta", chat=CHAT))
        assert await h.say("¿y ahora?") == []  # the takeover
        await asyncio.sleep(0.2)
        assert await h.say("¿hola?") == ["echo: ¿hola?"]  # over: the chat is the bot's again
