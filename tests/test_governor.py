"""The ban-risk governor on a fake clock, around the loopback transport."""

from __future__ import annotations

import random

import pytest

from bot.governor import GovernedTransport, GovernorLimits
from connection.loopback import LoopbackTransport
from connection.types import ChatId, TransportError
from tests.conftest import inbound


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def governed(**limits: object) -> tuple[GovernedTransport, LoopbackTransport, FakeTime]:
    inner, time = LoopbackTransport(), FakeTime()
    options = {"typing_chars_per_s": 0.0001, "typing_max_s": 0.0, **limits}
    gov = GovernedTransport(
        inner,
        GovernorLimits(**options),  # type: ignore[arg-type]
        canned={"Gracias por tu mensaje.", "La nota es demasiado grande (el máximo es {limit:g} MB)."},
        clock=time.clock,
        sleep=time.sleep,
        rng=random.Random(1),
    )
    return gov, inner, time


def chat(i: int) -> ChatId:
    return ChatId(f"3460000{i:04d}@s.whatsapp.net")


async def test_the_bot_never_starts_a_chat() -> None:
    gov, inner, _ = governed()
    with pytest.raises(TransportError, match="only replies"):
        await gov.send_text(chat(1), "hola, ¿te interesa nuestra oferta?")
    gov.note_inbound(inbound("hola", chat=chat(1)))
    await gov.send_text(chat(1), "¡hola!")
    assert [s.chat for s in inner.sent] == [chat(1)] and gov.counters["refused_unsolicited"] == 1


async def test_a_chat_can_only_be_answered_within_the_reply_window() -> None:
    gov, _, time = governed(reply_window_s=3600)
    gov.note_inbound(inbound("hola", chat=chat(1)))
    time.now += 3601
    with pytest.raises(TransportError):
        await gov.send_text(chat(1), "perdón por la demora")


async def test_the_global_budget_makes_sends_wait_their_turn() -> None:
    gov, inner, time = governed(per_minute=3)
    for i in range(5):
        gov.note_inbound(inbound("hola", chat=chat(i)))
    for i in range(5):
        await gov.send_text(chat(i), f"respuesta {i}")
    assert [s.text for s in inner.sent] == [f"respuesta {i}" for i in range(5)]  # in order, none lost
    assert time.now == pytest.approx(60) and gov.counters["budget_waits"] == 1


async def test_a_typing_pause_proportional_to_length_with_jitter() -> None:
    gov, inner, time = governed(typing_chars_per_s=20, typing_max_s=5, typing_jitter=0.3)
    gov.note_inbound(inbound("hola", chat=chat(1)))
    await gov.send_text(chat(1), "x" * 40)  # 2 s +/- 30 %
    await gov.send_text(chat(1), "x" * 1000)  # capped at 5 s +/- 30 %
    short, long = time.slept
    assert 1.4 <= short <= 2.6 and 3.5 <= long <= 6.5
    assert inner.typing[:1] == [(chat(1), True)]


async def test_the_same_text_to_many_chats_is_spread_out_but_canned_replies_are_not() -> None:
    gov, inner, time = governed(same_text_max_chats=3, same_text_window_s=60)
    for i in range(6):
        gov.note_inbound(inbound("hola", chat=chat(i)))
    for i in range(4):
        await gov.send_text(chat(i), "Gracias por tu mensaje.")  # canned: no wait
        await gov.send_text(chat(i), "La nota es demasiado grande (el máximo es 25 MB).")  # canned, filled in
    assert time.now == 0
    for i in range(4):
        await gov.send_text(chat(i), "Compra ya en www.example.com")
    assert time.now == pytest.approx(60) and gov.counters["same_text_waits"] == 1
    assert len(inner.sent) == 12


async def test_what_it_remembers_is_only_what_its_windows_still_need() -> None:
    gov, inner, time = governed(reply_window_s=3600, same_text_window_s=60, per_minute=10_000)
    for i in range(2_000):  # a day of traffic: a new chat and a new answer every minute
        gov.note_inbound(inbound("hola", chat=chat(i)))
        await gov.send_text(chat(i), f"respuesta número {i}")
        time.now += 60
    stats = gov.stats()
    assert len(inner.sent) == 2_000
    assert stats["reply_chats_tracked"] <= 61  # the last hour of chats, not the 2,000 ever seen
    assert stats["texts_tracked"] <= 2  # the last minute of answers


async def test_a_slot_given_back_is_the_failed_sends_own() -> None:
    """The newest slot was popped: with A failing after B went out, B's slot came back and three messages
    left within one minute under a cap of two."""
    gov, _, time = governed(per_minute=2)
    a = await gov.pace(chat(0), "a")  # taken at 0, then A's send hangs and fails
    time.now = 20
    await gov.pace(chat(1), "b")  # B goes out at 20
    time.now = 30
    gov.unspend(a)
    await gov.pace(chat(2), "c")  # C may go at 30: A's slot is free
    await gov.pace(chat(3), "d")  # D must wait for B's slot to leave the window, at 80
    assert time.now == pytest.approx(80)


async def test_spreading_one_text_warns_once_per_window_not_once_per_chat() -> None:
    """100 chats getting the same cached answer at once printed one WARNING per waiting chat."""
    import asyncio

    from loguru import logger

    class SharedTime(FakeTime):
        async def sleep(self, seconds: float) -> None:  # every waiter wakes on one shared clock
            target = self.now + seconds
            await asyncio.sleep(0)
            self.now = max(self.now, target)

    inner, time = LoopbackTransport(), SharedTime()
    gov = GovernedTransport(
        inner,
        GovernorLimits(typing_chars_per_s=0, same_text_max_chats=5, same_text_window_s=60, per_minute=10_000),
        clock=time.clock,
        sleep=time.sleep,
    )
    warnings: list[str] = []
    sink = logger.add(warnings.append, level="WARNING", filter="bot.governor")
    try:
        for i in range(40):
            gov.note_inbound(inbound("hola", chat=chat(i)))
        await asyncio.gather(*(gov.send_text(chat(i), "Abrimos de 9 a 18 h.") for i in range(40)))
    finally:
        logger.remove(sink)
    assert len(inner.sent) == 40
    assert gov.counters["same_text_waits"] >= 35
    assert 1 <= len(warnings) <= time.now / 60 + 1  # about one per window


async def test_sent_last_minute_falls_to_zero_when_sending_stops() -> None:
    gov, _, time = governed(per_minute=100)
    for i in range(13):
        gov.note_inbound(inbound("hola", chat=chat(i)))
        await gov.send_text(chat(i), f"respuesta {i}")
    assert gov.stats()["sent_last_minute"] == 13
    time.now += 61
    assert gov.stats()["sent_last_minute"] == 0
