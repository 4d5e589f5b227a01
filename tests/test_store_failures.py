"""The SQLite store when a row is bad or the disk is full: customers are still answered, nothing is lost."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from memory.store import MessageStatus
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI
from tests.test_voice_notes import note, voice_note  # noqa: F401 (the fixture)

CHAT = "34600111222@s.whatsapp.net"


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("memory.sqlite_store.RETRY_AFTER_S", 0.1)


async def full_disk(store) -> None:
    """Let the database file grow no more: every write that needs a page fails with SQLITE_FULL."""
    pages = await store._run(lambda: store._conn.execute("PRAGMA page_count").fetchone()[0])
    await store._run(lambda: store._conn.execute(f"PRAGMA max_page_count = {pages}"))


async def room_again(store) -> None:
    await store._run(lambda: store._conn.execute("PRAGMA max_page_count = 1073741823"))


def rows(path: str) -> dict[str, tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        found = conn.execute("SELECT wa_message_id, body, status FROM chat_history WHERE direction = 'in'")
        return {wa_id: (body, status) for wa_id, body, status in found}


async def test_a_broken_character_costs_nobody_an_answer(harness, fake_openai: FakeOpenAI) -> None:
    """Half an emoji (a lone surrogate, as a byte that was not UTF-8 also becomes) used to fail the
    whole group commit: every customer whose message shared the batch went unanswered."""
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        good = [inbound(f"hola {i}", chat=f"3460000{i:04d}@s.whatsapp.net", id=f"OK{i}") for i in range(3)]
        bad = inbound("quiero \ud83d una talla M", chat="34611111111@s.whatsapp.net", id="BROKEN")
        sent = await h.say(good[0], bad, *good[1:])
        path = str(h.settings.data_dir / "bot.sqlite3")
    assert sorted(sent) == sorted(
        ["echo: hola 0", "echo: hola 1", "echo: hola 2", "echo: quiero \ufffd una talla M"]
    )
    stored = rows(path)
    assert stored["BROKEN"] == ("quiero \ufffd una talla M", MessageStatus.ANSWERED.value)
    assert all(stored[f"OK{i}"][1] == MessageStatus.ANSWERED.value for i in range(3))


async def test_a_model_answer_with_a_broken_character_is_sent_and_stored_cleaned(
    harness, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda messages: "Claro \ud83d, abrimos a las 9."  # JSON's \ud83d: half an emoji
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        assert await h.say(inbound("hola", id="Q")) == ["Claro \ufffd, abrimos a las 9."]
        stored = await h.bot.store.recent_messages(inbound("x").chat, 5)
    assert stored[-1].body == "Claro \ufffd, abrimos a las 9."


async def test_a_full_disk_still_answers_and_writes_everything_once_there_is_room(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        store = h.bot.store
        await h.say(inbound("primero", id="FIRST"))
        await full_disk(store)  # the database file may not grow any more: writes fail with SQLITE_FULL
        messages = [
            inbound(f"pedido {i} " + "x" * 2000, chat=f"3460000{i:04d}@s.whatsapp.net", id=f"FULL{i}")
            for i in range(5)
        ]
        await h.say(*messages)
        for message in messages:
            assert h.transport.texts_to(message.chat), "a customer went unanswered while the disk was full"
        assert store.stats()["pending"] > 0  # kept for a retry, not dropped
        await room_again(store)  # the kept writes land with the next retry
        await store.flush()
        path = str(h.settings.data_dir / "bot.sqlite3")
    stored = rows(path)
    for i in range(5):
        assert stored[f"FULL{i}"][1] == MessageStatus.ANSWERED.value


async def test_the_real_error_of_a_full_disk_is_the_one_reported(tmp_path) -> None:
    """SQLite rolls the transaction back itself on SQLITE_FULL; a second ROLLBACK used to fail with
    "no transaction is active" and hide the cause from the log."""
    from memory.sqlite_store import SQLiteStore
    from memory.store import Direction, StoredMessage, StoreUnavailable

    store = SQLiteStore(tmp_path / "s.sqlite3", retention_days=None)
    await store.open()
    try:
        await full_disk(store)
        row = StoredMessage(
            "A", "c@s.whatsapp.net", Direction.IN, "text", "x" * 50_000, MessageStatus.RECEIVED, 1.0
        )
        with pytest.raises(StoreUnavailable, match="database or disk is full"):
            await store.add_message(row)
    finally:
        await room_again(store)
        await store.close()


async def test_a_row_the_database_refuses_costs_its_batch_nothing(tmp_path) -> None:
    from memory.sqlite_store import SQLiteStore
    from memory.store import Direction, StoredMessage

    def row(wa_id: str, kind: str | None) -> StoredMessage:
        return StoredMessage(
            wa_id, "c@s.whatsapp.net", Direction.IN, kind, "hola", MessageStatus.RECEIVED, 1.0
        )  # type: ignore[arg-type]

    store = SQLiteStore(tmp_path / "s.sqlite3", retention_days=None)
    await store.open()
    try:
        writes = [
            store.add_message(row("A", "text")),
            store.add_message(row("BAD", None)),
            store.add_message(row("B", "text")),
        ]
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        assert outcomes == [None, None, None]  # the rows around it were written: their callers are not failed
        stored = [m.wa_message_id for m in await store.recent_messages("c@s.whatsapp.net", 10)]
        assert stored == ["A", "B"]
        assert store.stats()["refused"] == 1 and store.stats()["pending"] == 0  # counted, not retried forever
    finally:
        await store.close()


async def test_a_flood_on_a_full_disk_keeps_answering_new_customers(harness, fake_openai: FakeOpenAI) -> None:
    """Messages past MAX_WAITING_MESSAGES wait in the database; on a full disk they could not be read back,
    and every later message went there too: the bot fell silent for everyone until the disk was freed."""
    chats = [f"3460088{i:04d}@s.whatsapp.net" for i in range(10)]
    async with harness(
        openai_api_key="k", openai_base_url=fake_openai.base_url, max_waiting_messages=10
    ) as h:
        await h.say(inbound("primero", id="FIRST"))
        await full_disk(h.bot.store)
        for n in range(40):
            h.bot.pipeline.submit(inbound(f"m{n} " + "x" * 500, chat=chats[n % 10], id=f"M{n}"))
        await asyncio.sleep(0.5)
        h.bot.pipeline.submit(inbound("hola", chat="34699999999@s.whatsapp.net", id="NEW"))
        for _ in range(50):  # not h.say: the flood's tail cannot be read back until there is room
            if h.transport.texts_to("34699999999@s.whatsapp.net"):
                break
            await asyncio.sleep(0.1)
        assert h.transport.texts_to("34699999999@s.whatsapp.net") == ["echo: hola"]
        await room_again(h.bot.store)
        assert await h.bot.pipeline.drain(10)
        for n in range(40):  # and the flood is answered, every message once, once there is room
            assert sum(t.startswith(f"echo: m{n} ") for t in h.transport.texts_to(chats[n % 10])) == 1


async def test_a_voice_note_on_a_full_disk_gets_its_answer(
    harness,
    fake_openai: FakeOpenAI,
    voice_note: Path,  # noqa: F811
) -> None:
    """Saving the transcript failed into the apology path: texts were answered, voice notes apologised."""
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        await h.say(inbound("primero", id="FIRST"))
        await full_disk(h.bot.store)
        await h.say(
            inbound("texto " + "x" * 3000, chat="34600000001@s.whatsapp.net")
        )  # its row waits for room
        assert await h.say(note(voice_note)) == [f"echo: {fake_openai.transcript}"]
        await room_again(h.bot.store)


async def test_closing_on_a_failing_disk_leaves_no_caller_waiting(tmp_path) -> None:
    from memory.sqlite_store import SQLiteStore
    from memory.store import Direction, StoredMessage, StoreUnavailable

    def row(i: int) -> StoredMessage:
        return StoredMessage(
            f"M{i}", "c@s.whatsapp.net", Direction.IN, "text", "x" * 5000, MessageStatus.RECEIVED, 1.0
        )

    store = SQLiteStore(tmp_path / "s.sqlite3", retention_days=None)
    await store.open()
    await full_disk(store)
    first = store.add_message(row(1))
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0.05)
    late = store.add_message(row(2))  # a reply recorded while the bot shuts down
    await closing
    for write in (first, late, store.add_message(row(3))):
        outcome = await asyncio.wait_for(asyncio.gather(write, return_exceptions=True), 2)
        assert isinstance(outcome[0], StoreUnavailable)


async def test_a_database_deleted_while_running_is_opened_anew_and_nothing_after_is_lost(
    harness, fake_openai: FakeOpenAI
) -> None:
    """SQLite kept writing into the unlinked file: after a restart the history was gone and a redelivered
    message was answered a second time."""
    settings = {"openai_api_key": "k", "openai_base_url": fake_openai.base_url}
    async with harness(**settings) as h:
        await h.say(inbound("antes", id="BEFORE"))
        for suffix in ("", "-wal", "-shm"):
            (h.settings.data_dir / f"bot.sqlite3{suffix}").unlink(missing_ok=True)
        await h.say(inbound("después", id="AFTER"))
        assert h.bot.store.stats()["reopened"] == 1
    async with harness(**settings) as h:
        assert await h.say(inbound("después", id="AFTER")) == []  # the redelivery is still caught


async def test_a_reopen_that_fails_keeps_the_old_connection_for_reads(tmp_path) -> None:
    import os

    from memory.sqlite_store import SQLiteStore
    from memory.store import Direction, StoredMessage, StoreUnavailable

    path = tmp_path / "s.sqlite3"
    store = SQLiteStore(path, retention_days=None)
    await store.open()
    try:
        await store.add_message(
            StoredMessage("A", "c@s.whatsapp.net", Direction.IN, "text", "hola", MessageStatus.RECEIVED, 1.0)
        )
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"s.sqlite3{suffix}").unlink(missing_ok=True)
        os.mkdir(path)  # something SQLite cannot open where the file was
        late = StoredMessage(
            "B", "c@s.whatsapp.net", Direction.IN, "text", "hola", MessageStatus.RECEIVED, 2.0
        )
        outcome = await asyncio.gather(store.add_message(late), return_exceptions=True)
        assert isinstance(outcome[0], StoreUnavailable)
        # Reads go on from the connection still open (it used to be closed first: every read then failed).
        assert [m.wa_message_id for m in await store.recent_messages("c@s.whatsapp.net", 5)] == ["A"]
        os.rmdir(path)
    finally:
        await store.close()


async def test_a_write_after_close_fails_at_once(tmp_path) -> None:
    """A reply recorded after the store closed waited for ever (a shutdown that never ends)."""
    from memory.sqlite_store import SQLiteStore
    from memory.store import Direction, StoredMessage, StoreUnavailable

    store = SQLiteStore(tmp_path / "s.sqlite3", retention_days=None)
    await store.open()
    await store.close()
    late = StoredMessage("L", "c@s.whatsapp.net", Direction.OUT, "text", "hola", MessageStatus.SENT, 1.0)
    with pytest.raises(StoreUnavailable, match="closed"):
        await asyncio.wait_for(store.add_message(late), 2)


async def test_a_full_disk_costs_answers_no_time(harness, fake_openai: FakeOpenAI, monkeypatch) -> None:
    """While the database cannot write, a customer's answer does not wait for the next retry (2 s)."""
    monkeypatch.setattr("memory.sqlite_store.RETRY_AFTER_S", 2.0)
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        await h.say(inbound("primero", id="FIRST"))
        await full_disk(h.bot.store)
        await h.say(inbound("x" * 3000, chat="34600000001@s.whatsapp.net"))  # the outage starts
        loop = asyncio.get_running_loop()
        for i in range(5):
            started = loop.time()
            answer = await h.say(inbound(f"pregunta {i}", chat=f"3460000100{i}@s.whatsapp.net"))
            assert answer == [f"echo: pregunta {i}"] and loop.time() - started < 1.0
        await room_again(h.bot.store)


async def test_an_outage_is_one_error_line_however_many_retries(harness, fake_openai: FakeOpenAI) -> None:
    """A busy bot on a full disk used to retry and log at every new write, some 80 lines a second."""
    from loguru import logger

    lines: list[str] = []
    errors: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    error_sink = logger.add(lambda m: errors.append(m.record["message"]), level="ERROR")
    try:
        async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
            await h.say(inbound("primero", id="FIRST"))
            await full_disk(h.bot.store)
            for i in range(10):  # a second of traffic: ten retries at 0.1 s
                await h.say(inbound(f"pregunta {i} " + "x" * 2000, chat=f"3460000100{i}@s.whatsapp.net"))
                await asyncio.sleep(0.1)
            await room_again(h.bot.store)
            await h.bot.store.flush()
    finally:
        logger.remove(sink)
        logger.remove(error_sink)
    assert len([line for line in lines if line.startswith("sqlite cannot write")]) == 1
    assert len([line for line in lines if line.startswith("sqlite writes again")]) == 1
    # Not one more ERROR per reply kept for the retry ("a reply was sent but could not be recorded").
    assert [line for line in errors if not line.startswith("sqlite cannot write")] == []


async def test_running_pauses_are_read_even_when_the_database_cannot_write(tmp_path) -> None:
    """Forgetting ended pauses is a write; when it failed, reading them failed too and a restart lost
    every takeover."""
    import math

    from memory.sqlite_store import SQLiteStore

    store = SQLiteStore(tmp_path / "s.sqlite3", retention_days=None)
    await store.open()
    try:
        await store.set_pause("*", math.inf)
        with sqlite3.connect(tmp_path / "s.sqlite3", timeout=0) as other:
            other.execute("BEGIN IMMEDIATE")  # another writer holds the lock (as a stuck disk would)
            assert await store.pauses(0.0) == {"*": math.inf}
            other.rollback()
    finally:
        await store.close()


async def test_a_chat_with_messages_in_the_store_keeps_its_order_when_writes_start_failing(
    harness, fake_openai: FakeOpenAI
) -> None:
    """While writes fail new messages wait in memory; one of a chat whose earlier messages wait in the
    store overtook them."""
    async with harness(
        openai_api_key="k", openai_base_url=fake_openai.base_url, max_waiting_messages=10
    ) as h:
        await h.say(inbound("primero", id="FIRST", chat="34600000009@s.whatsapp.net"))
        fake_openai.delay_s = 0.3
        for n in range(12):  # 10 in memory, 2 of CHAT in the store
            h.bot.pipeline.submit(
                inbound(f"q{n}", chat=f"346000020{n:02d}@s.whatsapp.net" if n < 10 else CHAT)
            )
        await asyncio.sleep(0.05)
        await full_disk(h.bot.store)
        h.bot.pipeline.submit(inbound("x" * 3000, chat="34600000001@s.whatsapp.net"))  # the outage starts
        await asyncio.sleep(0.3)
        h.bot.pipeline.submit(inbound("q12", chat=CHAT))
        await asyncio.sleep(1.0)
        await room_again(h.bot.store)
        assert await h.bot.pipeline.drain(20)
    assert h.transport.texts_to(CHAT) == ["echo: q10", "echo: q11", "echo: q12"]


async def test_pause_changes_made_while_the_disk_was_full_are_saved_at_a_stop_soon_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pause writer retried every 5 s: a stop less than that after the disk had room again gave up
    on the changes, and after the restart the bot answered every chat the owner had paused."""
    import time

    from bot.app import Bot
    from bot.config import Settings
    from connection.loopback import LoopbackTransport
    from connection.types import ChatId
    from memory.store import Direction, StoredMessage
    from tests.fake_openai import InstantModel

    monkeypatch.setattr("memory.sqlite_store.RETRY_AFTER_S", 1.0)
    me, other = "34699999999@s.whatsapp.net", "34600333444@s.whatsapp.net"
    settings = Settings(_env_file=None, data_dir=tmp_path, flows_file=None)  # type: ignore[call-arg]
    bot = Bot.build(settings, LoopbackTransport(owner_chat=ChatId(me)))
    await bot.start()
    await full_disk(bot.store)
    big = StoredMessage("BIG", other, Direction.IN, "text", "x" * 200_000, MessageStatus.SKIPPED, time.time())
    bot.store.add_message(big)  # needs a page: the store is now failing
    await asyncio.sleep(0.1)
    bot.pipeline.submit(inbound("ya te atiendo yo", chat=CHAT, from_me=True))  # the owner takes A over
    bot.pipeline.submit(inbound("!bot pause", chat=me, from_me=True, is_self_chat=True))  # and every chat
    await asyncio.sleep(0.3)
    await room_again(bot.store)
    await asyncio.sleep(0.2)  # the store's own retry has not come yet: a SIGTERM now
    await bot.stop()

    transport = LoopbackTransport(owner_chat=ChatId(me))
    bot = Bot.build(settings, transport)
    bot.model = bot.pipeline.responder.model = InstantModel()
    await bot.start()
    try:
        bot.pipeline.submit(inbound("hola", chat=other))
        assert await bot.pipeline.drain(5)
        assert transport.texts_to(other) == [], "the bot talked in a chat the owner had paused"
    finally:
        await bot.stop()


@pytest.mark.parametrize("page", [1000, 2])  # 2: the count of the rest goes page by page, ties included
async def test_after_a_large_recovery_a_new_message_waits_behind_its_chats_older_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page: int
) -> None:
    """Recovery left the messages past MAX_WAITING_MESSAGES in the store without telling which chats they
    belong to: with the store unable to write, a new message of such a chat was answered before them."""
    import time

    from bot import app
    from bot.app import Bot
    from bot.config import Settings
    from connection.loopback import LoopbackTransport
    from memory.sqlite_store import SQLiteStore
    from memory.store import Direction, StoredMessage
    from tests.fake_openai import InstantModel

    monkeypatch.setattr(app, "_PAGE", page)
    monkeypatch.setattr("memory.sqlite_store.RETRY_AFTER_S", 1.0)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path, flows_file=None, max_waiting_messages=10
    )
    store = SQLiteStore(settings.store_path)
    await store.open()
    now = time.time()
    for i in range(15):  # what a crash left: 15 unanswered messages of one chat, two by two in a second
        at = now - 60 + i // 2
        await store.add_message(
            StoredMessage(f"OLD{i:02d}", CHAT, Direction.IN, "text", f"old {i}", MessageStatus.RECEIVED, at)
        )
    await store.close()

    transport = LoopbackTransport()
    bot = Bot.build(settings, transport)
    gate = asyncio.Event()
    bot.model = bot.pipeline.responder.model = InstantModel(gate)
    await bot.start()  # recovery: 10 wait in memory, 5 in the store
    await full_disk(bot.store)
    big = StoredMessage(
        "BIG", "x@s.whatsapp.net", Direction.IN, "text", "x" * 200_000, MessageStatus.SKIPPED, now
    )
    bot.store.add_message(big)
    await asyncio.sleep(0.1)
    assert bot.store.writes_failing
    bot.pipeline.submit(inbound("new", chat=CHAT))
    await room_again(bot.store)
    gate.set()
    assert await bot.pipeline.drain(15)
    await bot.stop()
    assert transport.texts_to(CHAT) == [f"ok: old {i}" for i in range(15)] + ["ok: new"]


async def test_promised_and_fresh_messages_together_keep_to_the_waiting_bound(tmp_path: Path) -> None:
    """Recovery took up to MAX_WAITING_MESSAGES promised messages and as many fresh ones: twice the bound
    in memory. The fresh ones past it wait in the store, their chat known to the pipeline."""
    import time

    from bot.app import Bot
    from bot.config import Settings
    from connection.loopback import LoopbackTransport
    from memory.sqlite_store import SQLiteStore
    from memory.store import BUSY_KIND, Direction, StoredMessage

    store = SQLiteStore(tmp_path / "bot.sqlite3", retention_days=None)
    await store.open()
    now, told, fresh = time.time(), "34600000001@s.whatsapp.net", "34600000002@s.whatsapp.net"
    for i in range(10):  # two hours old, and told "busy" after them
        store.add_message(
            StoredMessage(f"A{i}", told, Direction.IN, "text", "q", MessageStatus.RECEIVED, now - 7200 + i)
        )
    store.add_message(
        StoredMessage("BUSY", told, Direction.OUT, BUSY_KIND, "…", MessageStatus.SENT, now - 7000)
    )
    for i in range(25):
        store.add_message(
            StoredMessage(f"B{i}", fresh, Direction.IN, "text", "q", MessageStatus.RECEIVED, now - 60 + i)
        )
    await store.close()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        flows_file=None,
        max_waiting_messages=10,
        recovery_window_minutes=60,
    )
    bot = Bot.build(settings, LoopbackTransport())
    bot.pipeline.model_gate.clear()  # nothing is answered meanwhile
    await bot.start(recover=False)
    try:
        await bot.recover()
        assert bot.pipeline.waiting == 10
        assert bot.pipeline._spilled_chats[fresh][1] == 25  # all of them wait in the store, chat known
    finally:
        await bot.stop(1)
