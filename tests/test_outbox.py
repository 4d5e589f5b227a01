"""The outbox (replies kept while disconnected) and the resend requests for undecryptable messages."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from connection.outbox import Outbox, OutboxFull, ResendRequests, SendDeferred
from connection.types import ChatId, ConnectionState, MessageId, SendWithheld, TransportError
from tests.test_supervisor import FakeClock

with warnings.catch_warnings():
    warnings.simplefilter("ignore", ResourceWarning)
    from neonize.proto.Neonize_pb2 import Connected, OfflineSyncCompleted, UndecryptableMessage
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as WAMessage

    from connection import neonize_adapter
    from connection.neonize_adapter import NeonizeTransport
    from tests.test_neonize_adapter import FAST, ME, PHONE, FakeNewAClient, event, jid, wait_state

CHAT = ChatId(f"{PHONE}@s.whatsapp.net")
OTHER = ChatId("34600999888@s.whatsapp.net")


class Recorder:
    def __init__(self, fail_on: set[str] | None = None, defer_on: set[str] | None = None) -> None:
        self.sent: list[tuple[str, str]] = []
        self.files: list[str | None] = []
        self.fail_on = fail_on or set()
        self.defer_on = defer_on or set()

    async def __call__(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
        if text in self.defer_on:
            raise SendDeferred("not connected")
        if text in self.fail_on:
            raise TransportError("send failed: bad request")
        self.sent.append((chat, text))
        self.files.append(file)
        return MessageId(f"sent-{len(self.sent)}")


# ---------------------------------------------------------------- Outbox


async def test_queued_texts_survive_a_restart_and_go_out_in_order(tmp_path: Path) -> None:
    path = tmp_path / "data" / "outbox.sqlite3"
    box = Outbox(path)
    ids = [box.put(CHAT, f"reply {i}") for i in range(3)]
    box.put(OTHER, "other chat")
    assert all(i.startswith("outbox-") for i in ids) and len(set(ids)) == 3
    box.close()

    box = Outbox(path)
    assert len(box) == 4
    send = Recorder()
    assert await box.flush(send) == 4
    assert send.sent == [(CHAT, "reply 0"), (CHAT, "reply 1"), (CHAT, "reply 2"), (OTHER, "other chat")]
    assert len(box) == 0 and box.stats()["outbox_sent"] == 4
    box.close()


async def test_full_outbox_refuses_with_a_transport_error(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_items=2)
    box.put(CHAT, "a")
    box.put(CHAT, "b")
    with pytest.raises(OutboxFull) as full:
        box.put(CHAT, "c")
    assert isinstance(full.value, TransportError)
    box.close()


async def test_answers_waiting_for_room_take_it_first_come_first_served(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_items=1)
    box.put(CHAT, "queued while disconnected")
    first = asyncio.create_task(box.put_when_room(CHAT, "first waiter"))
    second = asyncio.create_task(box.put_when_room(OTHER, "second waiter"))
    third = asyncio.create_task(box.put_when_room(OTHER, "third waiter"))
    await asyncio.sleep(0.01)
    assert not first.done() and not second.done()

    send = Recorder()
    await box.flush(send)  # a slot frees; a caller that runs before the waiters must not take it
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await box.put_when_room(OTHER, "barging in")
    assert first.done() and [q.text for q in box.pending()] == ["first waiter"]

    second.cancel()  # the next in line gives up: its turn passes on
    await box.flush(send)
    await asyncio.sleep(0.01)
    assert third.done()
    await box.flush(send)
    assert [text for _, text in send.sent] == ["queued while disconnected", "first waiter", "third waiter"]
    box.close()


async def test_a_failure_stops_the_flush_and_keeps_the_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_tries=3)
    for text in ("a", "b", "c"):
        box.put(CHAT, text)
    assert await box.flush(Recorder(defer_on={"a"})) == 0  # disconnected again: nothing counted
    assert [q.tries for q in box.pending()] == [0, 0, 0]
    send = Recorder(fail_on={"b"})
    assert await box.flush(send) == 1
    assert send.sent == [(CHAT, "a")]
    assert [(q.text, q.tries) for q in box.pending()] == [("b", 1), ("c", 0)]
    await box.flush(send)
    await box.flush(send)  # third failure of "b": dropped so it cannot block "c"
    assert send.sent == [(CHAT, "a"), (CHAT, "c")]
    assert box.stats() == {"outbox_pending": 0, "outbox_sent": 2, "outbox_dropped": 1}
    box.close()


async def test_a_later_part_dropped_after_a_restart_is_reported_as_its_reply(tmp_path: Path) -> None:
    """After a restart the bot no longer knew which reply a queued later part belonged to: the first part
    went out, the second was dropped, and the whole answer stayed recorded as sent."""
    box = Outbox(tmp_path / "outbox.sqlite3")
    first, second = box.put(CHAT, "primera parte"), box.put(CHAT, "segunda parte")
    box.group(first, [first, second])
    box.close()
    box = Outbox(tmp_path / "outbox.sqlite3")  # the next process
    dropped: list[tuple[str, str]] = []
    box.on_drop = lambda reply, chat, late: dropped.append((reply, chat))

    async def send(chat: ChatId, text: str, file: str | None = None) -> None:
        if text == "segunda parte":
            raise SendWithheld("the owner took the chat over")

    assert await box.flush(send) == 1
    assert dropped == [(first, CHAT)]
    box.close()


@pytest.mark.parametrize("columns", ["", ", reply text"], ids=["before-grouped-replies", "before-files"])
async def test_an_outbox_file_from_an_older_version_still_opens_and_sends(
    tmp_path: Path, columns: str
) -> None:
    path = tmp_path / "outbox.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.execute(
            "create table outbox (seq integer primary key autoincrement, id text not null,"
            " chat text not null, body text not null, created_at real not null,"
            f" tries integer not null default 0{columns})"
        )
        old.execute(
            "insert into outbox (id, chat, body, created_at) values ('o1', ?, 'hola', ?)", (CHAT, time.time())
        )
        old.commit()
    box = Outbox(path)
    recorder = Recorder()
    assert await box.flush(recorder) == 1 and recorder.sent == [(CHAT, "hola")] and recorder.files == [None]
    box.close()


async def test_replies_too_old_are_dropped(tmp_path: Path) -> None:
    now = [1000.0]
    box = Outbox(tmp_path / "o.db", max_age_s=60, clock=lambda: now[0])
    box.put(CHAT, "stale")
    now[0] += 61
    box.put(CHAT, "fresh")
    send = Recorder()
    await box.flush(send)
    assert send.sent == [(CHAT, "fresh")]
    assert box.dropped == 1
    box.close()


# ---------------------------------------------------------------- ResendRequests (fake clock)


async def test_resend_request_waits_for_whatsmeows_retry_and_asks_once() -> None:
    clock = FakeClock()
    asked: list[ChatId] = []

    async def ask(chat: ChatId) -> None:
        asked.append(chat)

    resend = ResendRequests(ask, grace_s=30, per_chat_every_s=600, clock=clock.time, sleep=clock.sleep)
    resend.undecryptable("A", CHAT)
    resend.undecryptable("A", CHAT)  # whatsmeow repeats the event
    await clock.advance(29)
    assert asked == []
    await clock.advance(2)
    assert asked == [CHAT]

    resend.undecryptable("B", OTHER)
    await clock.advance(10)
    resend.arrived("B")  # the retry worked
    await clock.advance(60)
    assert asked == [CHAT]

    resend.undecryptable("C", CHAT)  # same chat again within ten minutes: not asked twice
    await clock.advance(60)
    assert asked == [CHAT]
    assert resend.stats() == {"undecryptable_pending": 0, "undecryptable_recovered": 1, "resend_requests": 1}
    await resend.close()


# ---------------------------------------------------------------- the transport with an outbox


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[FakeNewAClient]:
    FakeNewAClient.script = deque()
    FakeNewAClient.instances = []
    monkeypatch.setattr(neonize_adapter, "NewAClient", FakeNewAClient)
    return FakeNewAClient


def transport(tmp_path: Path, **options: Any) -> NeonizeTransport:
    options.setdefault("on_inbound", lambda _: None)
    return NeonizeTransport(str(tmp_path / "s.db"), outbox_path=tmp_path / "outbox.db", **FAST, **options)


def governed_on_a_fake_clock(inner: NeonizeTransport, per_minute: int) -> tuple[Any, list[float]]:
    """The ban-risk governor over `inner`, on a clock whose sleeps pass at once (returned as [now])."""
    from bot.governor import GovernedTransport, GovernorLimits

    now = [1000.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        await asyncio.sleep(0)

    limits = GovernorLimits(per_minute=per_minute, typing_chars_per_s=0)
    return GovernedTransport(inner, limits, clock=lambda: now[0], sleep=sleep), now


async def test_messages_wait_while_disconnected_and_go_out_in_order(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    fake_client.script.extend(["ok"])
    t = transport(tmp_path)
    await t.start()
    try:
        await wait_state(t, ConnectionState.CONNECTED)
        client = fake_client.instances[0]
        assert (await t.send_text(CHAT, "first")).startswith("3EB0")

        await client.drop()  # whatsmeow reconnects by itself; meanwhile replies are kept
        queued = [await t.send_text(CHAT, f"while down {i}") for i in range(3)]
        assert all(q.startswith("outbox-") for q in queued)
        assert t.stats()["outbox_pending"] == 3

        await client.back()
        async with asyncio.timeout(5):
            while t.stats()["outbox_pending"]:
                await asyncio.sleep(0.01)
        assert await t.send_text(CHAT, "after") != ""
        assert [text for _, text in client.sent] == [
            "first",
            "while down 0",
            "while down 1",
            "while down 2",
            "after",
        ]
    finally:
        await t.stop()


async def test_a_reply_that_waited_over_an_hour_is_dropped_not_sent(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """ "¡Sí, estamos abiertos ahora mismo!" went out 5 h 50 min late: replies waited up to 6 h."""
    async with queued_while_down(fake_client, tmp_path, "¡Sí, estamos abiertos ahora mismo!") as (t, client):
        with sqlite3.connect(tmp_path / "outbox.db") as db:  # as if WhatsApp had been away for 61 minutes
            db.execute("UPDATE outbox SET created_at = created_at - 61 * 60")
        await client.back()
        await sent_or_withheld(t)
        assert client.sent == [] and t.stats()["outbox_dropped"] == 1


async def test_a_send_that_dies_with_the_socket_is_kept(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    fake_client.script.extend(["ok", "ok"])
    t = transport(tmp_path)
    await t.start()
    try:
        await wait_state(t, ConnectionState.CONNECTED)
        client = fake_client.instances[0]
        client.online = False  # no event yet: state still says connected
        message_id = await t.send_text(CHAT, "kept")
        assert message_id.startswith("outbox-")
        await asyncio.sleep(0.05)  # the flush found no socket and waits
        assert client.sent == []
        await client.back()  # whatsmeow reconnected: the queue goes out at once
        async with asyncio.timeout(1):
            while not client.sent:
                await asyncio.sleep(0.01)
        assert client.sent == [(CHAT, "kept")]
    finally:
        await t.stop()


async def test_queued_replies_survive_a_restart(fake_client: type[FakeNewAClient], tmp_path: Path) -> None:
    fake_client.script.extend(["qr"])
    first = transport(tmp_path)
    await first.start()
    await wait_state(first, ConnectionState.PAIRING)
    await first.send_text(CHAT, "queued before the restart")
    await first.stop()

    fake_client.script.extend(["ok"])
    second = transport(tmp_path)
    await second.start()
    try:
        await wait_state(second, ConnectionState.CONNECTED)
        async with asyncio.timeout(5):
            while not fake_client.instances[-1].sent:
                await asyncio.sleep(0.01)
        assert fake_client.instances[-1].sent == [(CHAT, "queued before the restart")]
    finally:
        await second.stop()


def undecryptable(msg_id: str, *, group: bool = False) -> UndecryptableMessage:
    info = event(WAMessage(conversation=""), msg_id=msg_id).Info
    if group:
        info.MessageSource.Chat.CopyFrom(jid("120363000000000000", "g.us"))
        info.MessageSource.IsGroup = True
    return UndecryptableMessage(
        Info=info, IsUnavailable=False, DecryptFailMode=UndecryptableMessage.DECRYPT_FAIL_SHOW
    )


async def test_undecryptable_message_gets_one_polite_request_unless_it_arrives(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    fake_client.script.extend(["ok"])
    text = "No pude leer tu último mensaje. ¿Podrías enviarlo de nuevo?"
    got: list[str] = []
    t = NeonizeTransport(
        str(tmp_path / "s.db"),
        on_inbound=lambda m: got.append(m.id),
        resend_text=text,
        undecryptable_grace_s=0.1,
        **FAST,
    )
    await t.start()
    try:
        await wait_state(t, ConnectionState.CONNECTED)
        client = fake_client.instances[0]
        await client.fire(undecryptable("LOST"))
        await client.fire(undecryptable("GROUP", group=True))  # groups are not asked
        await client.fire(undecryptable("RETRIED"))
        await client.fire(event(WAMessage(conversation="hola"), msg_id="RETRIED"))  # whatsmeow's retry worked
        async with asyncio.timeout(5):
            while not client.sent:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # and nothing more after it
        assert client.sent == [(CHAT, text)]
        assert got == ["RETRIED"]
        stats = t.stats()
        assert stats["resend_requests"] == 1 and stats["undecryptable_recovered"] == 1
    finally:
        await t.stop()


async def test_undecryptable_goes_to_the_callback_when_given(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    fake_client.script.extend(["ok"])
    chats: list[ChatId] = []
    t = NeonizeTransport(
        str(tmp_path / "s.db"),
        on_inbound=lambda _: None,
        on_undecryptable=chats.append,
        undecryptable_grace_s=0.05,
        **FAST,
    )
    await t.start()
    try:
        await wait_state(t, ConnectionState.CONNECTED)
        await fake_client.instances[0].fire(undecryptable("X"))
        async with asyncio.timeout(5):
            while not chats:
                await asyncio.sleep(0.01)
        assert chats == [CHAT]
        assert fake_client.instances[0].sent == []
    finally:
        await t.stop()


async def test_a_reconnect_sends_the_outbox_within_the_per_minute_budget(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """The governor spent its budget when a reply was queued; on reconnect the outbox sent everything in
    one burst (15 messages within a millisecond with a cap of 3 a minute): what the cap exists to avoid."""
    from connection.types import Inbound, MessageId, MessageKind

    fake_client.script.extend(["ok"])
    t = transport(tmp_path)
    governed, now = governed_on_a_fake_clock(t, per_minute=3)
    await t.start()
    try:
        await wait_state(t, ConnectionState.CONNECTED)
        client = fake_client.instances[0]
        await client.drop()
        chats = [ChatId(f"3460000{i:04d}@s.whatsapp.net") for i in range(15)]
        for i, chat in enumerate(chats):
            governed.note_inbound(Inbound(MessageId(f"m{i}"), chat, chat, MessageKind.TEXT))
            await governed.send_text(chat, f"reply {i}")
        sent_at: list[float] = []
        send = client.send_message

        async def timed(jid: Any, message: Any) -> Any:
            sent_at.append(now[0])
            return await send(jid, message)

        client.send_message = timed  # type: ignore[method-assign]
        await client.back()
        async with asyncio.timeout(5):
            while t.stats()["outbox_pending"]:
                await asyncio.sleep(0.01)
        assert len(sent_at) == 15
        assert sent_at[-1] - sent_at[0] >= 4 * 60  # 15 at 3 a minute: the last goes out in the fifth minute
    finally:
        await t.stop()


async def test_a_withheld_reply_is_neither_queued_nor_counted_as_sent(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """The owner took the chat over while the reply was being typed: it must not go out later either."""
    from connection.types import SendWithheld

    async def owner_has_it(chat: ChatId, text: str) -> None:
        raise SendWithheld("the owner has the chat")

    fake_client.script.extend(["ok"])
    t = transport(tmp_path)
    await t.start()
    try:
        await wait_state(t, ConnectionState.CONNECTED)
        client = fake_client.instances[0]
        t.set_pacer(owner_has_it)
        client.online = False  # a blip, no event yet: a failed send would be queued
        with pytest.raises(SendWithheld):
            await t.send_text(CHAT, "answer")
        assert t.stats()["outbox_pending"] == 0
        client.online = True
        t._outbox.put(CHAT, "queued before the owner wrote")  # type: ignore[union-attr]
        await t._outbox.flush(t._send_queued)  # type: ignore[union-attr]
        assert t.stats()["outbox_sent"] == 0 and t.stats()["outbox_dropped"] == 1
        assert client.sent == []
    finally:
        await t.stop()


async def test_a_send_that_fails_gives_its_budget_slot_back(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """Paced, failed on a blip, queued and paced again at the flush: it spent two slots of the per-minute
    budget and made the outbox wait a minute for nothing."""
    from connection.types import Inbound, MessageKind

    fake_client.script.extend(["ok"])
    t = transport(tmp_path)
    governed, now = governed_on_a_fake_clock(t, per_minute=1)
    await t.start()
    try:
        await wait_state(t, ConnectionState.CONNECTED)
        client = fake_client.instances[0]
        governed.note_inbound(Inbound(MessageId("q"), CHAT, CHAT, MessageKind.TEXT))
        client.online = False  # a blip, no event yet: the send fails and is queued
        assert (await governed.send_text(CHAT, "answer")).startswith("outbox-")
        client.online = True
        await t._outbox.flush(t._send_queued)  # type: ignore[union-attr]
        assert [text for _, text in client.sent] == ["answer"]
        assert governed.counters["budget_waits"] == 0 and now[0] == 1000.0
    finally:
        await t.stop()


async def test_a_full_outbox_makes_answers_wait_for_room_instead_of_failing(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """Recovery runs before the connection: past the outbox's bound every answer raised OutboxFull and its
    message was marked failed, never answered, not even after the next start."""
    fake_client.script.extend(["fail", "ok"])  # disconnected at first, then connected
    t = transport(tmp_path, outbox_max=3)
    sends = [asyncio.create_task(t.send_text(CHAT, f"reply {i}")) for i in range(5)]
    await asyncio.sleep(0.1)
    assert sum(task.done() for task in sends) == 3  # queued; the other two wait for room
    assert not any(task.done() and task.exception() for task in sends)
    await t.start()
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*sends)
            while t.stats()["outbox_pending"]:
                await asyncio.sleep(0.01)
        assert fake_client.instances[0].sent == [(CHAT, f"reply {i}") for i in range(5)]
    finally:
        await t.stop()


@contextlib.asynccontextmanager
async def bot_behind_the_outbox(
    tmp_path: Path, fake_openai: Any, *, outbox_max: int = 500, **settings: Any
) -> AsyncIterator[tuple[Any, NeonizeTransport, Any]]:
    """A bot on the real transport (fake neonize client) behind the governor, wired as bot.whatsapp wires
    it; connected. Yields (bot, transport, governed)."""
    from bot.app import Bot
    from bot.config import Settings
    from bot.governor import GovernedTransport, GovernorLimits

    def on_inbound(message: Any) -> None:  # as bot.whatsapp wires it
        governed.note_inbound(message)
        bot.pipeline.submit(message)

    t = transport(tmp_path, outbox_max=outbox_max, on_inbound=on_inbound)
    governed = GovernedTransport(t, GovernorLimits(typing_chars_per_s=0))
    config = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path / "data",
        flows_file=None,
        openai_api_key="k",
        openai_base_url=fake_openai.base_url,
        **settings,
    )
    bot = Bot.build(config, governed)
    governed.hold = bot.pipeline.takeover.holds
    t.on_reply_dropped = bot.pipeline.reply_dropped
    bot.pipeline.on_reply_parts = t.group_parts
    await bot.start()
    await t.start()
    try:
        await wait_state(t, ConnectionState.CONNECTED)
        yield bot, t, governed
    finally:
        await t.stop()
        await bot.stop()


async def assert_not_remembered(bot: Any, governed: Any, fake_openai: Any, answer: str) -> list[str]:
    """The dropped answer (its text starts with `answer`) is recorded failed, and once the owner gives the
    chat back and the customer writes again, the model is not told of it. Returns what the model was shown."""
    from memory.store import Direction, MessageStatus
    from tests.conftest import inbound

    rows = await bot.store.recent_messages(CHAT, 10)
    replies = [r for r in rows if r.direction is Direction.OUT and r.body.startswith("echo:")]
    assert [r.status for r in replies] == [MessageStatus.FAILED]
    bot.pipeline.takeover.resume(CHAT)
    later = inbound("¿y en azul?", chat=CHAT)
    governed.note_inbound(later)
    bot.pipeline.submit(later)
    assert await bot.pipeline.drain(5)
    history = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
    assert not any(text.startswith(answer) for text in history), "the model was told of an answer nobody got"
    return history


async def answer_while_disconnected_then_the_owner_writes(
    bot: Any, t: Any, governed: Any, client: Any
) -> None:
    """WhatsApp drops; a customer asks; the answer is queued in the outbox (recorded as sent); then the
    owner writes in the chat from the phone (a takeover)."""
    from tests.conftest import inbound

    await client.drop()
    question = inbound("¿tenéis talla M?", chat=CHAT)
    governed.note_inbound(question)
    bot.pipeline.submit(question)
    assert await bot.pipeline.drain(5)
    assert t.stats()["outbox_pending"] == 1  # "sent": queued for the reconnect
    bot.pipeline.submit(inbound("te atiendo yo", chat=CHAT, from_me=True))


async def test_a_reply_dropped_from_the_outbox_is_not_remembered_as_sent(
    fake_client: type[FakeNewAClient], tmp_path: Path, fake_openai: Any
) -> None:
    """Queued while disconnected, recorded as sent, then withheld at the reconnect because the owner took
    the chat over: the store and the model's history kept an answer the customer never got."""

    fake_client.script.extend(["ok"])
    async with bot_behind_the_outbox(tmp_path, fake_openai) as (bot, t, governed):
        client = fake_client.instances[0]
        await answer_while_disconnected_then_the_owner_writes(bot, t, governed, client)
        await client.back()
        async with asyncio.timeout(5):
            while t.stats()["outbox_pending"]:
                await asyncio.sleep(0.01)
        assert client.sent == []  # withheld: the owner has the chat
        assert await bot.pipeline.drain(5)
        history = await assert_not_remembered(bot, governed, fake_openai, "echo: ¿tenéis talla M?")
        assert "te atiendo yo" in history  # what the human said is kept


@pytest.mark.parametrize("restart", [False, True], ids=["reconnect", "restart"])
async def test_a_queued_reply_waits_for_what_came_while_away(
    fake_client: type[FakeNewAClient], tmp_path: Path, fake_openai: Any, restart: bool
) -> None:
    """The owner answered the customer from the phone while the bot was disconnected (or down for a
    deploy). WhatsApp delivers that message a moment after the reconnect: the queued answer went out in
    that moment, on top of the owner's. It waits for WhatsApp's word that everything was delivered."""
    from tests.conftest import inbound

    owners = event(
        WAMessage(conversation="te atiendo yo"), sender=jid(ME, device=0), from_me=True, msg_id="3EB0OWNER"
    )
    fake_client.script.extend(["ok"])
    async with bot_behind_the_outbox(tmp_path, fake_openai) as (bot, t, governed):
        client = fake_client.instances[-1]
        await client.drop()
        question = inbound("¿tenéis talla M?", chat=CHAT)
        governed.note_inbound(question)
        bot.pipeline.submit(question)
        assert await bot.pipeline.drain(5)
        assert t.stats()["outbox_pending"] == 1
        if not restart:
            await client.back(offline=[owners])
            await sent_or_withheld(t)
            assert client.sent == []  # the chat is the owner's: the queued answer is withheld
            assert bot.pipeline.takeover.is_paused(CHAT)
    if restart:  # the answer waited in the outbox file; the next start connects and meets the takeover
        fake_client.script.extend([("ok", [owners])])
        async with bot_behind_the_outbox(tmp_path, fake_openai) as (bot, t, governed):
            await sent_or_withheld(t)
            assert fake_client.instances[-1].sent == []
            assert bot.pipeline.takeover.is_paused(CHAT)


async def sent_or_withheld(t: NeonizeTransport) -> None:
    async with asyncio.timeout(5):
        while t.stats()["outbox_pending"]:
            await asyncio.sleep(0.01)


async def test_the_owner_hears_of_a_reply_that_waited_too_long_to_go_out(
    fake_client: type[FakeNewAClient], tmp_path: Path, fake_openai: Any
) -> None:
    """Dropped as too old, the reply left its question answered in the store: the customer got nothing, and
    nobody knew."""
    from types import SimpleNamespace

    from bot.replies import reply
    from tests.conftest import inbound

    fake_client.script.extend(["ok"])
    async with bot_behind_the_outbox(tmp_path, fake_openai) as (bot, t, governed):
        client = fake_client.instances[0]
        client.me = SimpleNamespace(JID=SimpleNamespace(User=ME), LID=SimpleNamespace(User=""))
        await client.drop()
        for n in range(2):  # two replies to one chat: one notice
            question = inbound(f"¿abrís hoy? {n}", chat=CHAT, id=f"Q{n}")
            governed.note_inbound(question)
            bot.pipeline.submit(question)
            assert await bot.pipeline.drain(5)
        with sqlite3.connect(tmp_path / "outbox.db") as db:  # as if WhatsApp had been away for 61 minutes
            db.execute("UPDATE outbox SET created_at = created_at - 61 * 60")
        await client.back()
        await sent_or_withheld(t)
        await asyncio.sleep(0.1)  # the notice goes out in the background
    assert client.sent == [(f"{ME}@s.whatsapp.net", reply("reply_too_late", "es", who=f"+{PHONE}"))]


async def test_a_reply_queued_before_a_restart_and_dropped_after_it_is_not_remembered_as_sent(
    fake_client: type[FakeNewAClient], tmp_path: Path, fake_openai: Any
) -> None:
    """Queued while disconnected, the bot stopped (the outbox is a file: it waits for the next start), and
    the next process dropped it at the reconnect (the owner had taken the chat over): that process did not
    know the reply, so it stayed recorded as sent and the model was told of it."""

    fake_client.script.extend(["ok"])
    async with bot_behind_the_outbox(tmp_path, fake_openai) as (bot, t, governed):
        await answer_while_disconnected_then_the_owner_writes(bot, t, governed, fake_client.instances[0])
        await asyncio.sleep(0.2)
    fake_client.script.extend(["ok"])  # the next start, connected: the queued reply meets the takeover
    async with bot_behind_the_outbox(tmp_path, fake_openai) as (bot, t, governed):
        async with asyncio.timeout(5):
            while t.stats()["outbox_pending"]:
                await asyncio.sleep(0.01)
        assert fake_client.instances[-1].sent == []  # withheld
        assert await bot.pipeline.drain(5)
        await assert_not_remembered(bot, governed, fake_openai, "echo: ¿tenéis talla M?")


@pytest.mark.parametrize("asking", ["a person", "an order"])
async def test_a_hand_off_queued_while_disconnected_still_tells_the_customer(
    fake_client: type[FakeNewAClient], tmp_path: Path, fake_openai: Any, asking: str
) -> None:
    """ "Someone will write" waited in the outbox while the chat was already the owner's: at the reconnect
    the hold dropped it, and the customer met 30 minutes of silence without a word. An order from the
    catalog is handed over the same way, with its own reply."""
    from bot.replies import reply
    from tests.conftest import inbound

    if asking == "a person":
        handing, promise = inbound("quiero hablar con una persona", chat=CHAT), reply("handoff", "es")
    else:
        order = {"quoted": "Pedido · 2 items · 30.00 EUR", "quoted_from": "order"}
        handing, promise = inbound("Hola", chat=CHAT, **order), reply("order_handoff", "es")
    fake_client.script.extend(["ok"])
    async with bot_behind_the_outbox(tmp_path, fake_openai) as (bot, t, governed):
        client = fake_client.instances[0]
        await client.drop()
        for message in (inbound("¿tenéis talla M?", chat=CHAT), handing):
            governed.note_inbound(message)
            bot.pipeline.submit(message)
            assert await bot.pipeline.drain(5)
        assert t.stats()["outbox_pending"] == 2 and bot.pipeline.takeover.is_paused(CHAT)
        await client.back()
        async with asyncio.timeout(5):
            while t.stats()["outbox_pending"]:
                await asyncio.sleep(0.01)
        # The answer queued before it is the owner's to give now, as after any takeover; the promise goes.
        assert [text for _, text in client.sent] == [promise]
        later = inbound("¿hola?", chat=CHAT)
        governed.note_inbound(later)
        bot.pipeline.submit(later)
        assert await bot.pipeline.drain(5)
        assert len(client.sent) == 1  # the chat is the owner's now


async def test_a_hand_off_queued_before_a_restart_still_tells_the_customer(
    fake_client: type[FakeNewAClient], tmp_path: Path, fake_openai: Any
) -> None:
    """The outbox and the pause outlive a deploy: "someone will write" must too."""
    from bot.replies import reply
    from tests.conftest import inbound

    fake_client.script.extend(["ok"])
    async with bot_behind_the_outbox(tmp_path, fake_openai) as (bot, t, governed):
        await fake_client.instances[0].drop()
        message = inbound("quiero hablar con una persona", chat=CHAT)
        governed.note_inbound(message)
        bot.pipeline.submit(message)
        assert await bot.pipeline.drain(5)
        assert t.stats()["outbox_pending"] == 1
    fake_client.script.extend(["ok"])  # the next start, connected
    async with bot_behind_the_outbox(tmp_path, fake_openai) as (bot, t, governed):
        async with asyncio.timeout(5):
            while t.stats()["outbox_pending"]:
                await asyncio.sleep(0.01)
        assert [text for _, text in fake_client.instances[-1].sent] == [reply("handoff", "es")]
        assert bot.pipeline.takeover.is_paused(CHAT)
        # Anything else the bot would say there is the owner's to say now.
        governed.note_inbound(inbound("¿hola?", chat=CHAT))
        with pytest.raises(SendWithheld):
            await governed.send_text(CHAT, "te respondo en breve")


LONG_FIRST = "Primera frase bastante larga para ocupar sitio. " * 4
LONG_SECOND = "Segunda frase que el cliente nunca recibe, la del final."


@pytest.mark.parametrize("when", ["second part dropped", "dropped before the reply is recorded"])
async def test_a_reply_with_a_part_dropped_from_the_outbox_is_not_remembered(
    fake_client: type[FakeNewAClient], tmp_path: Path, fake_openai: Any, when: str
) -> None:
    """Only the first part's id was matched: a dropped second part, or a drop that came before the reply
    was recorded (a part still waiting for room), left the whole answer recorded as sent."""
    from tests.conftest import inbound

    fake_client.script.extend(["ok"])
    async with bot_behind_the_outbox(tmp_path, fake_openai, outbox_max=2, max_reply_chars=200) as (
        bot,
        t,
        governed,
    ):
        client = fake_client.instances[0]
        await client.drop()
        if when == "dropped before the reply is recorded":
            t._outbox.put(OTHER, "an earlier reply to another chat")  # type: ignore[union-attr]
        question = inbound(f"{LONG_FIRST}{LONG_SECOND}", chat=CHAT)
        governed.note_inbound(question)
        bot.pipeline.submit(question)
        if when == "second part dropped":
            assert await bot.pipeline.drain(5)
            send = client.send_message

            async def then_the_owner_writes(jid: Any, message: Any) -> Any:
                result = await send(jid, message)
                bot.pipeline.submit(inbound("te atiendo yo", chat=CHAT, from_me=True))
                return result

            client.send_message = then_the_owner_writes  # type: ignore[method-assign]
        else:
            async with asyncio.timeout(5):
                while t.stats()["outbox_pending"] < 2:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the second part waits for room
            bot.pipeline.submit(inbound("te atiendo yo", chat=CHAT, from_me=True))
        await client.back()
        assert await bot.pipeline.drain(5)
        async with asyncio.timeout(5):
            while t.stats()["outbox_pending"]:
                await asyncio.sleep(0.01)
        assert await bot.pipeline.drain(5)
        assert all(LONG_SECOND not in text for _, text in client.sent)
        await assert_not_remembered(bot, governed, fake_openai, "echo: Primera")


async def test_the_parts_of_a_queued_reply_are_grouped_under_its_first(
    fake_client: type[FakeNewAClient], tmp_path: Path, fake_openai: Any
) -> None:
    from tests.conftest import inbound

    fake_client.script.extend(["ok"])
    async with bot_behind_the_outbox(tmp_path, fake_openai, max_reply_chars=200) as (bot, t, governed):
        await fake_client.instances[0].drop()
        question = inbound(f"{LONG_FIRST}{LONG_SECOND}", chat=CHAT)
        governed.note_inbound(question)
        bot.pipeline.submit(question)
        assert await bot.pipeline.drain(5)
        queued = t._outbox.pending()  # type: ignore[union-attr]
    assert len(queued) == 2 and queued[0].reply == queued[1].reply == queued[0].id


async def test_a_reply_is_recorded_even_when_its_parts_cannot_be_grouped(
    fake_client: type[FakeNewAClient], tmp_path: Path, fake_openai: Any
) -> None:
    """An error grouping the parts (the outbox file on a full disk) aborted the reply's record: the answer
    went out at the reconnect, the question was marked failed and the model never knew what it said."""
    import sqlite3

    from memory.store import Direction, MessageStatus
    from tests.conftest import inbound

    fake_client.script.extend(["ok"])
    async with bot_behind_the_outbox(tmp_path, fake_openai, max_reply_chars=200) as (bot, t, governed):
        await fake_client.instances[0].drop()

        def disk_full(reply: Any, parts: Any) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        t._outbox.group = disk_full  # type: ignore[union-attr,method-assign]
        question = inbound(f"{LONG_FIRST}{LONG_SECOND}", chat=CHAT)
        governed.note_inbound(question)
        bot.pipeline.submit(question)
        assert await bot.pipeline.drain(5)
        await asyncio.sleep(0.2)  # the reply's write commits
        rows = await bot.store.recent_messages(CHAT, 10)
    assert [(r.direction, r.status) for r in rows] == [
        (Direction.IN, MessageStatus.ANSWERED),
        (Direction.OUT, MessageStatus.SENT),
    ]


# ---------------------------------------------------------------- the catch-up after a reconnect


@contextlib.asynccontextmanager
async def queued_while_down(
    fake_client: type[FakeNewAClient],
    tmp_path: Path,
    *texts: str,
    wait_s: float = 15.0,
    pacer: Any = None,
) -> AsyncIterator[tuple[NeonizeTransport, FakeNewAClient]]:
    """A transport whose connection dropped, `texts` queued meanwhile; yields (transport, client)."""
    fake_client.script.extend(["ok"])
    t = transport(tmp_path)
    t.CATCH_UP_WAIT_S = wait_s
    if pacer is not None:
        t.set_pacer(pacer)
    await t.start()
    try:
        await wait_state(t, ConnectionState.CONNECTED)
        client = fake_client.instances[0]
        await client.drop()
        for text in texts:
            await t.send_text(CHAT, text)
        yield t, client
    finally:
        await t.stop()


async def reconnected(client: FakeNewAClient) -> None:
    """whatsmeow connected again; what came while away (and the word that it all came) is still to come."""
    client.online = True
    await client.fire(Connected(status=True))


async def wait_sent(client: FakeNewAClient, n: int, timeout: float = 5.0) -> float:
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while len(client.sent) < n:
            await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_queued_replies_go_out_when_whatsapp_never_says_it_caught_up(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """The wait for what came while away is bounded: without WhatsApp's word, the queue goes out anyway."""
    async with queued_while_down(fake_client, tmp_path, "queued", wait_s=0.5) as (t, client):
        await reconnected(client)  # the word never comes
        await asyncio.sleep(0.1)
        assert client.sent == []  # waiting for it
        fresh = await t.send_text(CHAT, "fresh")  # behind the queue, in order
        assert fresh.startswith("outbox-")
        await sent_or_withheld(t)
        assert [text for _, text in client.sent] == ["queued", "fresh"]


async def test_offline_sync_announced_before_connected_does_not_delay_the_queue(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """whatsmeow sends Connected after two round trips on one goroutine and the offline marker from
    another: nothing orders the two. A marker first must not leave the queue waiting for another."""
    async with queued_while_down(fake_client, tmp_path, "queued", wait_s=3.0) as (_, client):
        client.online = True
        await client.fire(OfflineSyncCompleted(Count=0))  # nothing came while away...
        await reconnected(client)  # ...and Connected's goroutine lost the race
        took = await wait_sent(client, 1)
        assert took < 1.0, f"the queued reply waited {took:.1f} s for a sync that had already completed"


async def test_first_reply_after_a_start_is_not_held_when_sync_came_before_connected(
    fake_client: type[FakeNewAClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def back(self: FakeNewAClient, offline: Sequence[Any] = ()) -> None:
        self.online = True
        await self.fire(OfflineSyncCompleted(Count=0))
        await self.fire(Connected(status=True))

    monkeypatch.setattr(FakeNewAClient, "back", back)
    fake_client.script.extend(["ok"])
    t = transport(tmp_path)
    t.CATCH_UP_WAIT_S = 3.0
    await t.start()
    try:
        await wait_state(t, ConnectionState.CONNECTED)
        client = fake_client.instances[0]
        sent = await t.send_text(CHAT, "hola")  # an ordinary answer, nothing queued, empty backlog
        took = await wait_sent(client, 1)
        assert took < 1.0, f"an ordinary reply waited {took:.1f} s (sent as {sent})"
    finally:
        await t.stop()


async def test_a_flush_under_way_does_not_send_on_a_new_connection_before_its_catch_up(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """A reconnect while a queued reply waits in its typing pause: the new connection's backlog (maybe the
    owner's answer) comes first, for that reply and the ones behind it."""
    gate = asyncio.Event()
    paced: list[str] = []

    async def pacer(chat: Any, text: str) -> None:  # the governor's typing pause / budget wait
        paced.append(text)
        await gate.wait()

    async with queued_while_down(fake_client, tmp_path, "first", "second", pacer=pacer) as (_, client):
        await client.back()  # caught up: the flush starts, "first" is in its typing pause
        async with asyncio.timeout(2):
            while not paced:
                await asyncio.sleep(0.01)
        await client.drop()  # a blip during the pause; whatsmeow reconnects at once
        await reconnected(client)
        gate.set()
        await asyncio.sleep(0.3)
        assert client.sent == [], f"sent before the new connection caught up: {client.sent}"


async def test_a_drop_outlasting_the_catch_up_wait_does_not_skip_the_next_connections_catch_up(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """The wait ran out while disconnected and marked the connection caught up: the next one then sent
    before its backlog (maybe the owner's answer) arrived."""
    async with queued_while_down(fake_client, tmp_path, "queued", wait_s=1.0) as (_, client):
        await reconnected(client)
        await asyncio.sleep(0.2)
        await client.drop()  # down again, longer than what was left of the wait
        await asyncio.sleep(1.2)
        await reconnected(client)
        await asyncio.sleep(0.5)
        assert client.sent == [], f"sent before the new connection caught up: {client.sent}"


async def test_the_catch_up_wait_starts_over_at_a_reconnect(
    fake_client: type[FakeNewAClient], tmp_path: Path
) -> None:
    """The wait is each connection's own: a reconnect during it does not inherit what was left of it."""
    async with queued_while_down(fake_client, tmp_path, "queued", wait_s=1.0) as (_, client):
        await reconnected(client)
        await asyncio.sleep(0.7)
        await client.drop()
        await reconnected(client)  # a new connection: its own backlog, its own wait
        started = time.monotonic()
        await wait_sent(client, 1)
        waited = time.monotonic() - started
        assert waited >= 0.9, f"sent {waited:.2f} s after the reconnect; its own wait is 1 s"
