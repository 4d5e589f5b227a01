"""The Supabase store when Supabase goes away: PostgREST stopped mid-conversation, PostgreSQL restarted,
responses slower than the client's timeout, a journal at its bound; plus layered reads, retention and a
row Postgres refuses. Everything runs against the real local stack (tests/supabase_stack.py)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from loguru import logger
from multidict import CIMultiDict

from bot.app import Bot
from bot.config import Settings
from connection.loopback import LoopbackTransport
from connection.types import ChatId, Inbound, MessageId, MessageKind
from memory.journal import Journal, JournalFull, Op
from memory.store import Direction, MessageStatus, StoredMessage, StoreUnavailable
from memory.supabase_store import SupabaseStore
from tests.supabase_stack import SupabaseStack, running_stack

CHATS = [f"3460011122{i}@s.whatsapp.net" for i in range(3)]
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def stack() -> Iterator[SupabaseStack]:
    """A stack of this module's own: these tests stop and restart parts of it."""
    yield from running_stack()


@pytest.fixture
def db(stack: SupabaseStack) -> SupabaseStack:
    """The stack with empty tables."""
    stack.psql("truncate chat_history, chats, bot_flows restart identity;")
    return stack


def said(text: str, chat: str, **fields: Any) -> Inbound:
    """A text message in `chat`, with a new id (`from_me=True`: the owner's, from the phone)."""
    return Inbound(
        MessageId(f"S{next(_ids)}"), ChatId(chat), chat, MessageKind.TEXT, text, time.time(), **fields
    )


def make_store(url: str, key: str, data_dir: Path, **overrides: Any) -> SupabaseStore:
    options: dict[str, Any] = {
        "flush_interval_s": 0.02,
        "request_timeout_s": 1.0,
        "max_backoff_s": 0.3,
        "retention_days": None,
        "close_timeout_s": 1.0,
    }
    options.update(overrides)
    return SupabaseStore(url, key, data_dir, **options)


def inbound_row(n: int, chat: str = CHATS[0], at: float | None = None) -> StoredMessage:
    return StoredMessage(
        f"IN{n}", chat, Direction.IN, "text", f"question {n}", MessageStatus.RECEIVED, at or time.time()
    )


def reply_row(n: int, chat: str = CHATS[0]) -> StoredMessage:
    return StoredMessage(
        f"OUT{n}", chat, Direction.OUT, "text", f"answer {n}", MessageStatus.SENT, time.time()
    )


def rows_in_db(stack: SupabaseStack) -> dict[str, tuple[int, str, str]]:
    """wa_message_id -> (how many rows, direction, status), straight from PostgreSQL."""
    found = stack.query(
        "select wa_message_id, count(*), max(direction), max(status) from chat_history group by wa_message_id"
    )
    return {r[0]: (int(r[1]), r[2], r[3]) for r in found}


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def timed(call: Awaitable[Any]) -> float:
    started = time.perf_counter()
    await call
    return time.perf_counter() - started


# -- a bot conversation across a PostgREST outage (and a bot restart in the middle of it) --------------


async def test_postgrest_outage_mid_conversation(db: SupabaseStack, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", flows_file=None)  # type: ignore[call-arg]
    transport = LoopbackTransport()
    submitted: list[str] = []

    async def start_bot() -> Bot:
        bot = Bot.build(settings, transport, store=make_store(db.url, db.key, tmp_path / "data"))
        await bot.start()
        return bot

    async def converse(bot: Bot, count: int) -> None:
        for _ in range(count):
            n = next(_ids)
            chat = CHATS[n % len(CHATS)]
            message = Inbound(
                MessageId(f"IN{n}"), ChatId(chat), chat, MessageKind.TEXT, f"hola {n}", time.time()
            )
            assert bot.pipeline.submit(message)
            submitted.append(message.id)
        assert await bot.pipeline.drain(10), "messages not answered"

    bot = await start_bot()
    await converse(bot, 9)
    await asyncio.to_thread(db.stop_postgrest)
    try:
        started = time.perf_counter()
        await converse(bot, 12)  # answered while Supabase is away
        assert time.perf_counter() - started < 5
        await wait_for(lambda: bot.store.stats()["state"] == "degraded")  # type: ignore[attr-defined]
        assert bot.store.stats()["journal_rows"] > 0  # type: ignore[attr-defined]
        # A restart during the outage: the journal file carries the writes over.
        await bot.stop()
        bot = await start_bot()
        await converse(bot, 6)
    finally:
        await asyncio.to_thread(db.start_postgrest)
    await converse(bot, 6)
    store = bot.store
    assert isinstance(store, SupabaseStore)
    assert await store.flush(15), "journal not drained after PostgREST came back"
    assert store.stats()["state"] == "ok"
    await bot.stop()

    # Every message answered once, every row in PostgreSQL once.
    assert len(transport.sent) == len(submitted) == 33
    rows = rows_in_db(db)
    assert {wa_id: rows[wa_id] for wa_id in submitted} == {
        wa_id: (1, "in", "answered") for wa_id in submitted
    }
    replies = {wa_id: row for wa_id, row in rows.items() if row[1] == "out"}
    assert replies == {s.id: (1, "out", "sent") for s in transport.sent}
    assert len(rows) == 2 * len(submitted)
    chats = db.query("select count(*) from chats")[0][0]
    assert int(chats) == len(CHATS)


# -- PostgreSQL restarted under a steady stream of writes -------------------------------------------------


async def test_postgres_restart_under_writes(db: SupabaseStack, tmp_path: Path) -> None:
    store = make_store(db.url, db.key, tmp_path / "data")
    await store.open()
    written: list[str] = []
    stop = asyncio.Event()
    slowest = 0.0

    async def writer() -> None:
        nonlocal slowest
        while not stop.is_set():
            n = next(_ids)
            chat = CHATS[n % len(CHATS)]
            slowest = max(slowest, await timed(store.add_message(inbound_row(n, chat))))
            slowest = max(slowest, await timed(store.add_reply(reply_row(n, chat), f"IN{n}")))
            written.append(f"IN{n}")
            await asyncio.sleep(0.01)

    task = asyncio.create_task(writer())
    try:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(db.restart_postgres)
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await task
    assert await store.flush(15)
    history = await store.recent_messages(CHATS[0], 4)
    stats = store.stats()
    await store.close()

    assert stats["flush_failures"] + stats["read_failures"] >= 1, "the restart went unnoticed"

    assert slowest < 0.5, f"a write waited {slowest:.2f} s"
    rows = rows_in_db(db)
    assert len(written) > 20
    assert {f"IN{i[2:]}" for i in written} <= set(rows)
    assert all(rows[wa_id] == (1, "in", "answered") for wa_id in written)
    assert all(rows[f"OUT{wa_id[2:]}"] == (1, "out", "sent") for wa_id in written)
    assert len(rows) == 2 * len(written)
    assert [m.direction for m in history] == [Direction.IN, Direction.OUT] * 2


# -- responses slower than the client's timeout ----------------------------------------------------------


class SlowProxy:
    """An HTTP proxy on loopback that forwards each request at once and holds the response for `delay` s:
    the write lands in PostgreSQL, but the client times out and has to send it again."""

    _HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.delay = 0.0
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> SlowProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False, trust_env=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        self.requests += 1
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in self._HOP)
        body = await request.read()
        async with self._session.request(
            request.method, self.upstream + request.raw_path, headers=headers, data=body or None
        ) as upstream:
            payload = await upstream.read()
            out = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in self._HOP)
            status = upstream.status
        await asyncio.sleep(self.delay)
        return web.Response(status=status, body=payload, headers=out)


async def test_responses_slower_than_the_client_timeout(db: SupabaseStack, tmp_path: Path) -> None:
    proxy = await SlowProxy(db.url).start()
    store = make_store(proxy.url, db.key, tmp_path / "data", request_timeout_s=0.4, max_backoff_s=0.2)
    await store.open()
    try:
        await store.add_message(inbound_row(0))
        assert await store.flush(5)
        assert [m.wa_message_id for m in await store.recent_messages(CHATS[0], 5)] == ["IN0"]

        proxy.delay = 1.0
        slowest = 0.0
        for n in range(1, 11):
            slowest = max(slowest, await timed(store.add_message(inbound_row(n, CHATS[1]))))
            slowest = max(slowest, await timed(store.add_reply(reply_row(n, CHATS[1]), f"IN{n}")))
        assert slowest < 0.2, f"a write waited {slowest:.2f} s on a slow Supabase"
        await wait_for(lambda: store.stats()["flush_failures"] >= 2)
        # The timed-out requests did land: what is replayed must not double anything.
        await wait_for(lambda: "IN10" in rows_in_db(db))
        assert store.stats()["state"] == "degraded"
        assert store.stats()["journal_rows"] > 0
        # Reads do not wait on the slow server: what is local answers.
        started = time.perf_counter()
        history = await store.recent_messages(CHATS[1], 4)
        assert time.perf_counter() - started < 0.2
        assert [m.wa_message_id for m in history] == ["IN9", "OUT9", "IN10", "OUT10"]
        assert store.stats()["fallback_hits"] >= 1

        proxy.delay = 0.0
        assert await store.flush(10)
    finally:
        await store.close()
        await proxy.stop()
    rows = rows_in_db(db)
    assert rows == {
        "IN0": (1, "in", "received"),
        **{f"IN{n}": (1, "in", "answered") for n in range(1, 11)},
        **{f"OUT{n}": (1, "out", "sent") for n in range(1, 11)},
    }


# -- the journal's bound ---------------------------------------------------------------------------------


async def test_journal_bound(db: SupabaseStack, tmp_path: Path) -> None:
    """At max rows the bot's replies stay local only; inbound messages and answered marks are still kept;
    at the hard max writes are refused, loudly. Whatever was journaled reaches Supabase afterwards."""
    data = tmp_path / "data"
    unreachable = "http://127.0.0.1:9"  # discard port: connection refused
    store = make_store(unreachable, db.key, data, max_journal_rows=10, hard_max_journal_rows=16)
    await store.open()
    refused: list[str] = []
    try:
        for n in range(8):
            try:
                await store.add_message(inbound_row(n))
                await store.add_reply(reply_row(n), f"IN{n}")
            except JournalFull:
                refused.append(f"IN{n}")
        stats = store.stats()
        assert stats["journal_rows"] == 16 <= stats["journal_hard_max_rows"]
        assert stats["journal_dropped"] == 3  # OUT3, OUT4, OUT5
        assert stats["journal_refused"] == 3  # OUT6 with its answered mark, then IN7
        assert refused == ["IN6", "IN7"]  # the callers were told
        assert stats["journal_oldest_s"] >= 0
        # Locally the conversation is whole, dropped replies included.
        history = await store.recent_messages(CHATS[0], 20)
        assert [m.wa_message_id for m in history] == [f"{d}{n}" for n in range(6) for d in ("IN", "OUT")] + [
            "IN6"
        ]
    finally:
        await store.close()

    store = make_store(db.url, db.key, data)  # Supabase is back
    await store.open()
    try:
        assert await store.flush(10)
    finally:
        await store.close()
    rows = rows_in_db(db)
    assert rows == {
        **{f"IN{n}": (1, "in", "answered") for n in range(6)},
        "IN6": (1, "in", "received"),
        **{f"OUT{n}": (1, "out", "sent") for n in range(3)},
    }


# -- layered reads ---------------------------------------------------------------------------------------


async def test_layered_reads_and_outage_fallback(db: SupabaseStack, tmp_path: Path) -> None:
    store = make_store(db.url, db.key, tmp_path / "a")
    await store.open()
    for n in range(1, 4):
        await store.add_message(inbound_row(n))
        await store.add_reply(reply_row(n), f"IN{n}")
    expected = ["IN2", "OUT2", "IN3", "OUT3"]
    assert [m.wa_message_id for m in await store.recent_messages(CHATS[0], 4)] == expected
    assert [m.wa_message_id for m in await store.recent_messages(CHATS[0], 4)] == expected
    stats = store.stats()
    assert (stats["supabase_hits"], stats["memory_hits"]) == (1, 1)
    await store.close()

    # Same data dir: the mirror knows the chat is complete, no request to Supabase.
    store = make_store(db.url, db.key, tmp_path / "a")
    await store.open()
    assert [m.wa_message_id for m in await store.recent_messages(CHATS[0], 4)] == expected
    assert (store.stats()["local_hits"], store.stats()["supabase_hits"]) == (1, 0)
    await store.close()

    # A new data dir (a redeploy without a volume): Supabase has it all.
    store = make_store(db.url, db.key, tmp_path / "b")
    await store.open()
    try:
        assert [m.wa_message_id for m in await store.recent_messages(CHATS[0], 4)] == expected
        assert store.stats()["supabase_hits"] == 1
        await asyncio.to_thread(db.stop_postgrest)
        try:
            # During the outage: new writes and an unread chat are answered from what is local.
            await store.add_message(inbound_row(4, CHATS[2]))
            await store.set_status("IN4", MessageStatus.RECEIVED, body="transcript")
            got = await store.recent_messages(CHATS[2], 5)
            assert [(m.wa_message_id, m.body) for m in got] == [("IN4", "transcript")]
            assert [m.wa_message_id for m in await store.unanswered_inbound(0)] == ["IN4"]
            with pytest.raises(
                StoreUnavailable
            ):  # a page would be a guess: the mirror keeps recent rows only
                await store.unanswered_inbound(0, limit=10)
            assert (await store.recent_message_ids(0, 2)) == ["IN4", "OUT3"]
            assert store.stats()["state"] == "degraded"
            assert store.stats()["fallback_hits"] >= 3
        finally:
            await asyncio.to_thread(db.start_postgrest)
        assert await store.flush(10)
        assert rows_in_db(db)["IN4"] == (1, "in", "received")
        assert db.query("select body from chat_history where wa_message_id = 'IN4'") == [("transcript",)]
    finally:
        await store.close()


async def test_pages_of_unanswered_keep_the_order_of_equal_timestamps(
    db: SupabaseStack, tmp_path: Path
) -> None:
    """WhatsApp timestamps are whole seconds: a flood has many equal ones. A page may not let a row still in
    the local journal overtake rows that Supabase has but did not return in that page."""
    at = 1_900_000_000.0
    writer = make_store(db.url, db.key, tmp_path / "writer")
    await writer.open()
    for n in range(1, 6):
        await writer.add_message(inbound_row(n, at=at))
    assert await writer.flush(10)
    await writer.close()

    store = make_store(db.url, db.key, tmp_path / "reader", flush_interval_s=60)  # writes stay local
    await store.open()
    try:
        await store.add_message(inbound_row(6, at=at))
        await store.add_reply(reply_row(1), "IN1")
        assert rows_in_db(db)["IN1"] == (1, "in", "received") and "IN6" not in rows_in_db(db)
        page = [m.wa_message_id for m in await store.unanswered_inbound(0, limit=3)]
        assert page == ["IN2", "IN3", "IN4"]
        everything = [m.wa_message_id for m in await store.unanswered_inbound(0)]
        assert everything == ["IN2", "IN3", "IN4", "IN5", "IN6"]
    finally:
        await store.close()


# -- retention -------------------------------------------------------------------------------------------


async def test_retention_job_deletes_old_rows(db: SupabaseStack, tmp_path: Path) -> None:
    old = time.time() - 40 * 86400
    store = make_store(db.url, db.key, tmp_path / "data", retention_days=30, retention_interval_s=0.3)
    await store.open()
    try:
        await store.add_message(inbound_row(1, at=old))
        await store.add_message(inbound_row(2, at=old + 1))
        await store.add_message(inbound_row(3))
        assert await store.flush(5)
        await wait_for(lambda: store.stats()["purged"] == 2, timeout=10)
        assert set(rows_in_db(db)) == {"IN3"}
        assert [m.wa_message_id for m in await store.recent_messages(CHATS[0], 5)] == ["IN3"]
        assert await store.purge_older_than(30) == 0
    finally:
        await store.close()


# -- data PostgreSQL refuses -----------------------------------------------------------------------------


async def test_a_refused_row_does_not_block_the_journal(db: SupabaseStack, tmp_path: Path) -> None:
    store = make_store(db.url, db.key, tmp_path / "data")
    await store.open()
    try:
        # What the store is given is cleaned: NUL and lone surrogates never reach Postgres.
        await store.add_message(
            StoredMessage("IN1", CHATS[0], Direction.IN, "text", "a\x00b\ud800c", MessageStatus.RECEIVED, 1.0)
        )
        # An operation that skipped the cleaning (say, journaled by an older version): Postgres refuses it.
        bad = StoredMessage("IN2", CHATS[0], Direction.IN, "text", "nul\x00", MessageStatus.RECEIVED, 2.0)
        await store._local(store.journal.append, [Op.insert(bad)])
        await store.add_message(inbound_row(3))
        assert await store.flush(10)
        assert store.stats()["poisoned"] == 1
    finally:
        await store.close()
    assert set(rows_in_db(db)) == {"IN1", "IN3"}
    assert db.query("select body from chat_history where wa_message_id = 'IN1'") == [("ab\ufffdc",)]


async def test_missing_tables_are_named_as_unapplied_migrations(db: SupabaseStack, tmp_path: Path) -> None:
    """It read "supabase unreachable (APIError(42P01))", which sends an owner to check the network."""
    db.psql("alter table chat_history rename to chat_history_hidden;")
    store = make_store(db.url, db.key, tmp_path / "data")
    await store.open()
    try:
        await store.add_message(inbound_row(1))
        await store.flush(2)
        assert "apply supabase/migrations" in store.stats()["last_error"]
    finally:
        await store.close()
        db.psql("alter table chat_history_hidden rename to chat_history;")


# -- the journal on its own (no stack needed) ------------------------------------------------------------


def test_the_journals_copy_never_evicts_a_chat_with_unanswered_messages(tmp_path: Path) -> None:
    """Past its bound of chats the local copy dropped the least recently touched ones whole, unanswered
    messages included: recovery during an outage reads them from there."""
    journal = Journal(tmp_path / "journal.sqlite3", max_rows=100, max_chats=2)
    journal.open()
    try:
        waiting = "34600000009@s.whatsapp.net"
        journal.append([Op.insert(inbound_row(0, chat=waiting))])  # unanswered, touched first
        for n in range(1, 4):
            chat = f"3460000000{n}@s.whatsapp.net"
            journal.append(
                [Op.insert(inbound_row(n, chat=chat)), Op.set_status(f"IN{n}", MessageStatus.ANSWERED)]
            )
        assert [row.wa_message_id for row in journal.chat_rows(waiting)[0]] == ["IN0"]
        assert journal.chat_rows("34600000001@s.whatsapp.net")[0] == []  # an answered chat went instead
    finally:
        journal.close()


def test_retention_empties_the_journals_copy_of_old_chats(tmp_path: Path) -> None:
    """The local copy's list of chats kept the number of a chat whose messages retention had deleted."""
    journal = Journal(tmp_path / "journal.sqlite3", max_rows=100)
    journal.open()
    try:
        journal.append([Op.insert(inbound_row(1, chat=CHATS[0], at=1_000.0))])
        journal.append([Op.insert(inbound_row(2, chat=CHATS[1], at=time.time() + 3600))])
        assert journal.purge(time.time() + 1) == 1
        left = {row[0] for row in journal.conn.execute("SELECT chat_id FROM mirror_chats")}
        assert left == {CHATS[1]}
    finally:
        journal.close()


def test_journal_keeps_order_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path, max_rows=100)
    journal.open()
    first = inbound_row(1, at=10.0)
    journal.append([Op.insert(first), Op.set_status("IN1", MessageStatus.RECEIVED, body="transcript")])
    journal.append([Op.insert(reply_row(1)), Op.set_status("IN1", MessageStatus.ANSWERED), Op.stale(5.0)])
    assert journal.size == 5
    assert [op.kind.value for op in journal.peek(10)] == ["message", "status", "message", "status", "stale"]
    journal.ack(journal.peek(2)[-1].seq)
    assert journal.size == 3
    assert journal.stats()["journal_oldest_s"] >= 0
    journal.close()

    journal = Journal(path, max_rows=100)
    journal.open()
    try:
        ops = journal.peek(10)
        assert [(op.kind.value, op.wa_message_id) for op in ops] == [
            ("message", "OUT1"),
            ("status", "IN1"),
            ("stale", ""),
        ]
        assert ops[1].chat_id == CHATS[0]  # known from the mirror: overlays of that chat find it
        assert ops[1].status is MessageStatus.ANSWERED
        journal.append([Op.insert(inbound_row(2))])
        assert journal.peek(10)[-1].seq > ops[-1].seq  # sequence numbers are never reused
        # The mirror holds the latest state of every row written, in order.
        rows, complete = journal.chat_rows(CHATS[0])
        assert [(m.wa_message_id, m.status, m.body) for m in rows] == [
            ("IN1", MessageStatus.ANSWERED, "transcript"),
            ("OUT1", MessageStatus.SENT, "answer 1"),
            ("IN2", MessageStatus.RECEIVED, "question 2"),
        ]
        assert not complete  # never read from Supabase: not known to be the whole chat
    finally:
        journal.close()


async def test_a_restart_during_an_outage_keeps_block_lists_and_takeovers(
    db: SupabaseStack, tmp_path: Path
) -> None:
    """After a restart while PostgREST was down, bot_contacts and bot_pauses could not be read: blocked
    numbers and chats a human had taken over were answered for the whole outage."""
    import math

    settings = Settings(_env_file=None, data_dir=tmp_path / "data", flows_file=None)  # type: ignore[call-arg]
    db.psql(f"insert into bot_contacts (number, list) values ('{CHATS[1].split('@')[0]}', 'block');")
    transport = LoopbackTransport()

    async def start_bot() -> Bot:
        bot = Bot.build(settings, transport, store=make_store(db.url, db.key, tmp_path / "data"))
        await bot.start()
        return bot

    def message(chat: str) -> Inbound:
        n = next(_ids)
        return Inbound(MessageId(f"IN{n}"), ChatId(chat), chat, MessageKind.TEXT, f"hola {n}", time.time())

    try:
        bot = await start_bot()
        await bot.store.note_pause(CHATS[0], math.inf)  # the owner had taken this chat over, as the
        await bot.store.set_pause(CHATS[0], math.inf)  # bot keeps it: locally, then in Supabase
        await bot.stop()
        await asyncio.to_thread(db.stop_postgrest)
        bot = await start_bot()  # a deploy during the outage
        for chat in CHATS[:2]:
            bot.pipeline.submit(message(chat))
        assert await bot.pipeline.drain(10)
        assert transport.texts_to(ChatId(CHATS[0])) == [] and transport.texts_to(ChatId(CHATS[1])) == []
        await bot.stop()
    finally:
        await asyncio.to_thread(db.start_postgrest)
        db.psql("truncate bot_contacts, bot_pauses;")


async def test_takeovers_made_during_an_outage_reach_supabase_after_a_restart(
    db: SupabaseStack, tmp_path: Path
) -> None:
    """The owner took one chat over and gave another back while Supabase was away, and the bot stopped
    before it came back. The next start found Supabase reachable and took its rows over the journal's
    copy: the bot answered the chat the human had, and stayed silent in the one given back."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", flows_file=None)  # type: ignore[call-arg]
    transport = LoopbackTransport()
    taken, given_back = CHATS[0], CHATS[1]

    async def start_bot() -> Bot:
        bot = Bot.build(settings, transport, store=make_store(db.url, db.key, tmp_path / "data"))
        await bot.start()
        return bot

    try:
        bot = await start_bot()
        bot.pipeline.submit(said("te atiendo yo", given_back, from_me=True))  # taken over, saved in Supabase
        await wait_for(lambda: bool(db.query("select chat_id from bot_pauses")))
        await asyncio.to_thread(db.stop_postgrest)
        bot.pipeline.submit(said("!bot resume", given_back, from_me=True))  # during the outage: given back
        bot.pipeline.submit(said("te atiendo yo", taken, from_me=True))  # and another one taken over
        assert await bot.pipeline.drain(10)
        await bot.stop()  # still during the outage: both changes only in the journal file
        await asyncio.to_thread(db.start_postgrest)
        bot = await start_bot()
        await bot.recover()
        for chat in (taken, given_back):
            bot.pipeline.submit(said("hola", chat))
        assert await bot.pipeline.drain(10)
        assert transport.texts_to(ChatId(taken)) == [], "the bot talked over the owner"
        assert transport.texts_to(ChatId(given_back)), "the chat the owner gave back got no answer"
        rows = db.query("select chat_id from bot_pauses")
        assert rows == [(taken,)], f"Supabase did not get the changes: {rows}"
        await bot.stop()
    finally:
        await asyncio.to_thread(db.start_postgrest)
        db.psql("truncate bot_pauses;")


async def test_a_takeover_from_an_earlier_run_reaches_supabase_when_it_is_back(
    db: SupabaseStack, tmp_path: Path
) -> None:
    """A run stopped during an outage left a takeover unsent; the next run started during the outage too.
    When Supabase came back, only that run's own changes were retried: the takeover stayed out of
    Supabase, where the next deploy reads it."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", flows_file=None)  # type: ignore[call-arg]
    transport = LoopbackTransport()
    taken = CHATS[2]

    async def start_bot() -> Bot:
        bot = Bot.build(settings, transport, store=make_store(db.url, db.key, tmp_path / "data"))
        await bot.start()
        await bot.recover()
        return bot

    await asyncio.to_thread(db.stop_postgrest)
    try:
        bot = await start_bot()
        owner = Inbound(
            MessageId("TAKE"), ChatId(taken), taken, MessageKind.TEXT, "yo", time.time(), from_me=True
        )
        bot.pipeline.submit(owner)
        assert await bot.pipeline.drain(10)
        await bot.stop()
        bot = await start_bot()  # still during the outage
        await asyncio.to_thread(db.start_postgrest)
        bot.pipeline.submit(  # a write, so the store notices Supabase is back
            Inbound(MessageId("AFTER"), ChatId(CHATS[0]), CHATS[0], MessageKind.TEXT, "hola", time.time())
        )
        await wait_for(lambda: db.query("select chat_id from bot_pauses") == [(taken,)], timeout=20)
        await bot.stop()
    finally:
        await asyncio.to_thread(db.start_postgrest)
        db.psql("truncate bot_pauses;")


async def test_a_flood_during_an_outage_waits_in_memory_not_in_an_unreadable_store(
    db: SupabaseStack, tmp_path: Path
) -> None:
    """Past MAX_WAITING_MESSAGES messages wait in the store and are read back page by page from Supabase:
    during an outage that read failed, and those messages (and every later one) waited for the outage."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", flows_file=None, max_waiting_messages=10)  # type: ignore[call-arg]
    transport = LoopbackTransport()
    bot = Bot.build(settings, transport, store=make_store(db.url, db.key, tmp_path / "data"))
    await bot.start()
    await asyncio.to_thread(db.stop_postgrest)
    try:
        chat = CHATS[0]
        bot.pipeline.submit(
            Inbound(MessageId("FIRST"), ChatId(chat), chat, MessageKind.TEXT, "hola", time.time())
        )
        await wait_for(lambda: bot.store.stats()["state"] == "degraded")  # type: ignore[attr-defined]
        for n in range(30):
            chat = f"3460077{n:04d}@s.whatsapp.net"
            bot.pipeline.submit(
                Inbound(MessageId(f"F{n}"), ChatId(chat), chat, MessageKind.TEXT, "hola", time.time())
            )
        assert await bot.pipeline.drain(10), "messages waited for the outage to end"
        assert len(transport.sent) == 31
    finally:
        await asyncio.to_thread(db.start_postgrest)
        await bot.stop()


async def test_pause_changes_made_during_an_outage_are_all_kept_for_a_restart(tmp_path: Path) -> None:
    """Only the first change reached the local copy: the writer retried it and the later ones waited, so a
    chat the owner had resumed was paused again after a restart during the outage."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", flows_file=None)  # type: ignore[call-arg]
    transport = LoopbackTransport()
    customer = CHATS[1]

    async def start_bot() -> Bot:
        store = make_store("http://127.0.0.1:9", "unreachable-key", tmp_path / "data")  # Supabase is away
        bot = Bot.build(settings, transport, store=store)
        await bot.start()
        return bot

    bot = await start_bot()
    bot.pipeline.submit(said("te atiendo yo", customer, from_me=True))  # the owner takes the chat over
    await asyncio.sleep(0.2)  # kept locally by the first (failing) write
    bot.pipeline.submit(said("te atiendo yo", CHATS[2], from_me=True))  # then another chat...
    await asyncio.sleep(0.1)
    bot.pipeline.submit(said("!bot resume", customer, from_me=True))  # ...and gives the first one back
    await asyncio.sleep(0.2)
    said_at_stop: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: said_at_stop.append((m.record["level"].name, m.record["message"])), level="WARNING"
    )
    try:
        await bot.stop()
    finally:
        logger.remove(sink)
    about_pauses = [(level, text) for level, text in said_at_stop if "pause change" in text]
    # kept in the journal file and sent at the next start: the owner is told so, not that they are lost
    assert about_pauses and all(level == "WARNING" and "next start" in text for level, text in about_pauses)
    bot = await start_bot()
    try:
        bot.pipeline.submit(said("hola", customer))
        assert await bot.pipeline.drain(10)
        assert transport.texts_to(ChatId(customer)), "the chat the owner gave back is paused again"
    finally:
        await bot.stop()


async def test_a_takeover_after_a_resume_all_during_an_outage_survives_a_restart(tmp_path: Path) -> None:
    """Each retry of the first queued change ('resume all') wiped the local copy again, takeovers queued
    after it included."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", flows_file=None)  # type: ignore[call-arg]
    transport = LoopbackTransport()
    me, customer = "34699999999@s.whatsapp.net", CHATS[1]

    async def start_bot() -> Bot:
        bot = Bot.build(settings, transport, store=make_store("http://127.0.0.1:9", "k", tmp_path / "data"))
        await bot.start()
        return bot

    bot = await start_bot()
    bot.pipeline.submit(said("!bot resume all", me, from_me=True, is_self_chat=True))
    bot.pipeline.submit(said("te atiendo yo", customer, from_me=True))
    await asyncio.sleep(0.3)
    await bot.stop()
    bot = await start_bot()
    try:
        bot.pipeline.submit(said("hola", customer))
        assert await bot.pipeline.drain(10)
        assert transport.texts_to(ChatId(customer)) == []
    finally:
        await bot.stop()


async def fill_the_journal_disk(store: SupabaseStore, full: bool) -> None:
    """Let the journal file grow no more and use up its free pages, also those of the tables a write
    touches: its next write fails with SQLITE_FULL. `full=False` gives the room back."""

    def fill(sql: str, rows: Iterator[tuple[Any, ...]]) -> None:
        for row in rows:
            try:
                store.journal.conn.execute(sql, row)
            except Exception:
                return

    def run() -> None:
        conn = store.journal.conn
        if not full:
            conn.execute("PRAGMA max_page_count = 1073741823")
            conn.execute("DELETE FROM kv WHERE key LIKE 'filler%'")
            conn.execute("DELETE FROM journal WHERE kind = 'stale' AND payload = '0' AND queued_at = 0")
            conn.execute("DELETE FROM mirror WHERE chat_id = 'filler'")
            return
        conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
        n = itertools.count()
        for size in (2000, 300, 20):
            fill("INSERT INTO kv VALUES (?, ?)", ((f"filler{next(n)}", "x" * size) for _ in range(20_000)))
        fill(
            "INSERT INTO journal (kind, payload, queued_at) VALUES ('stale', '0', 0)",
            (() for _ in range(20_000)),
        )
        fill(
            "INSERT INTO mirror VALUES (?, 'filler', 'in', 't', '', 'skipped', 0)",
            ((f"filler{next(n)}",) for _ in range(20_000)),
        )

    await store._local(run)


async def answered_while_the_journal_disk_was_full(
    db: SupabaseStack, tmp_path: Path, message_id: str
) -> tuple[Callable[[], Bot], Bot, LoopbackTransport]:
    """A bot whose question `message_id` ("hola", in Supabase as received) was answered while the journal's
    disk was full, the disk then given room again. Returns (build another bot, the bot, the transport)."""
    from tests.fake_openai import InstantModel

    settings = Settings(_env_file=None, data_dir=tmp_path / "data", flows_file=None)  # type: ignore[call-arg]
    transport = LoopbackTransport()
    gate = asyncio.Event()

    def build() -> Bot:
        bot = Bot.build(settings, transport, store=make_store(db.url, db.key, tmp_path / "data"))
        bot.model = bot.pipeline.responder.model = InstantModel(gate)
        return bot

    bot = build()
    await bot.start()
    chat = CHATS[0]
    bot.pipeline.submit(
        Inbound(MessageId(message_id), ChatId(chat), chat, MessageKind.TEXT, "hola", time.time())
    )
    assert await bot.store.flush(5)  # the question is in Supabase, 'received'
    await fill_the_journal_disk(bot.store, True)
    gate.set()
    assert await bot.pipeline.drain(5)  # answered; its reply cannot be journaled for now
    await fill_the_journal_disk(bot.store, False)
    return build, bot, transport


@pytest.mark.parametrize("stop", ["after the journal's retry", "before the journal's retry"])
async def test_a_full_disk_under_the_journal_keeps_the_reply_for_a_retry(
    db: SupabaseStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """Supabase was up, the volume full for a moment as a reply was recorded: the journal write failed and
    was dropped, Supabase never learnt the message was answered, and the next start answered it again.
    Then close() trusted the last retry's verdict (up to JOURNAL_RETRY_S old): a stop soon after the disk had
    room again dropped the kept reply, with the same result."""
    from memory import supabase_store

    if stop == "after the journal's retry":
        monkeypatch.setattr(supabase_store, "JOURNAL_RETRY_S", 0.1)
    try:
        build, bot, transport = await answered_while_the_journal_disk_was_full(db, tmp_path, "DISK1")
        if stop == "after the journal's retry":
            assert await bot.store.flush(5)
            assert db.query("select status from chat_history where wa_message_id = 'DISK1'") == [
                ("answered",)
            ]
        await bot.stop()
        bot = build()  # a deploy
        await bot.start()
        await bot.recover()
        assert await bot.pipeline.drain(5)
        await bot.stop()
        assert transport.texts_to(ChatId(CHATS[0])) == ["ok: hola"], "answered twice"
        assert db.query("select status from chat_history where wa_message_id = 'DISK1'") == [("answered",)]
    finally:
        db.psql("truncate chat_history;")


async def test_closing_while_the_journal_disk_is_full_does_not_hang(tmp_path: Path) -> None:
    """close() waited for a journal write that only a retry could make: a stop on a full disk never ended."""
    from memory import supabase_store

    store = make_store("http://127.0.0.1:9", "unreachable-key", tmp_path / "data")
    await store.open()
    await fill_the_journal_disk(store, True)
    with pytest.raises(StoreUnavailable):  # kept for a retry that will not come before the stop
        await store.add_message(
            StoredMessage(
                "J1", CHATS[0], Direction.IN, "text", "x" * 5000, MessageStatus.RECEIVED, time.time()
            )
        )
    assert supabase_store.MAX_KEPT_FOR_RETRY > 0
    async with asyncio.timeout(5):
        await store.close()


async def test_a_promise_made_before_a_restart_during_an_outage_is_kept(tmp_path: Path) -> None:
    """During an outage the store cannot page unanswered messages: the promised ones were not looked for,
    and the window's cut skipped them."""
    from memory.store import BUSY_KIND
    from tests.fake_openai import InstantModel

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path / "data", flows_file=None, recovery_window_minutes=1.0
    )
    store = make_store("http://127.0.0.1:9", "unreachable-key", tmp_path / "data")  # Supabase is away
    await store.open()
    now, chat = time.time(), CHATS[0]
    await store.add_message(
        StoredMessage("OLD", chat, Direction.IN, "text", "¿hay cita?", MessageStatus.RECEIVED, now - 600)
    )
    await store.add_message(
        StoredMessage("TOLD", chat, Direction.OUT, BUSY_KIND, "…", MessageStatus.SENT, now - 590)
    )
    await store.close()
    transport = LoopbackTransport()
    bot = Bot.build(settings, transport, store=make_store("http://127.0.0.1:9", "k", tmp_path / "data"))
    bot.model = bot.pipeline.responder.model = InstantModel()
    await bot.start()
    try:
        assert await bot.pipeline.drain(5)
        assert transport.texts_to(ChatId(chat)) == ["ok: ¿hay cita?"]
    finally:
        await bot.stop()


async def test_messages_waiting_before_a_flood_are_recovered_at_a_restart_during_an_outage(
    db: SupabaseStack, tmp_path: Path
) -> None:
    """The journal's local copy keeps a chat's latest 20 rows: a rate-limited flood (saved, unanswered)
    pushed the chat's waiting messages out of it, so a restart during an outage did not find them, and
    nothing read them back when Supabase returned."""
    from memory.manager import MemoryManager
    from tests.fake_openai import InstantModel

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path / "data",
        flows_file=None,
        openai_api_key="k",
        rate_limit_max_messages=3,
        rate_limit_cooldown=600_000,
    )
    chat = CHATS[0]

    def start_bot(rss: list[float]) -> tuple[Bot, LoopbackTransport]:
        transport = LoopbackTransport()
        bot = Bot.build(settings, transport, store=make_store(db.url, db.key, tmp_path / "data"))
        bot.model = bot.pipeline.responder.model = InstantModel()
        bot.memory = MemoryManager(500, settle_readings=1, read_rss_mb=lambda: rss[0])
        bot.memory.on_change(bot._on_memory_state)
        return bot, transport

    bot, _ = start_bot([460.0])  # memory critical: the first three wait in the store
    await bot.start()
    for n in range(28):  # then 25 over the rate limit, saved unanswered
        bot.pipeline.submit(
            Inbound(MessageId(f"FL{n}"), ChatId(chat), chat, MessageKind.TEXT, f"pregunta {n}", time.time())
        )
    await asyncio.sleep(0.3)
    assert await bot.store.flush(5)
    await bot.stop(timeout=2)
    await asyncio.to_thread(db.stop_postgrest)
    try:
        bot, transport = start_bot([100.0])
        await bot.start()  # recovers from the journal's copy: Supabase is away
        assert await bot.pipeline.drain(10)
        assert transport.texts_to(ChatId(chat)) == [f"ok: pregunta {n}" for n in range(3)]
    finally:
        await asyncio.to_thread(db.start_postgrest)
    await bot.stop(timeout=5)
    statuses = dict(db.query("select wa_message_id, status from chat_history where direction = 'in'"))
    assert [statuses[f"FL{n}"] for n in range(3)] == ["answered"] * 3
    assert {statuses[f"FL{n}"] for n in range(3, 28)} == {"skipped"}


async def test_a_bot_flows_row_with_a_blank_answer_is_skipped_and_said(
    db: SupabaseStack, tmp_path: Path
) -> None:
    """bot_flows is edited live in Supabase, past the flows file's checks: a row with a blank answer sent
    the customer nothing at all."""
    from bot.replies import reply

    db.psql(
        "insert into bot_flows (keywords, answer) values"
        " ('{envio}', '  '), ('{¿?}', 'nunca'), ('{horario}', 'Abrimos a las 9.');"
    )
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path / "data", flows_file=None, supabase_url=db.url, supabase_key=db.key
    )
    transport = LoopbackTransport()
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING", filter="bot.app")
    bot = Bot.build(settings, transport, store=make_store(db.url, db.key, tmp_path / "data"))
    await bot.start()
    try:
        await wait_for(lambda: len(bot.pipeline.responder.flows) > 0)
        for n, text in enumerate(["envio", "horario"]):
            message = Inbound(
                MessageId(f"FL{n}"), ChatId(CHATS[n]), CHATS[n], MessageKind.TEXT, text, time.time()
            )
            bot.pipeline.submit(message)
        assert await bot.pipeline.drain(10)
    finally:
        await bot.stop()
        logger.remove(sink)
        db.psql("truncate bot_flows;")
    assert transport.texts_to(ChatId(CHATS[0])) == [reply("ai_off", "es")]  # not silence
    assert transport.texts_to(ChatId(CHATS[1])) == ["Abrimos a las 9."]
    assert warnings == [
        "bot_flows: the flow with keywords ['envio'] is skipped: its answer is empty",
        "bot_flows: the flow with keywords ['¿?'] is skipped: none of its keywords has letters or digits",
    ]


async def waiting_bot(db: SupabaseStack, tmp_path: Path) -> tuple[Bot, LoopbackTransport, asyncio.Event]:
    """A bot whose model waits for the returned gate, MAX_WAITING_MESSAGES 10, one chat answered at a time,
    11 messages of other chats submitted: 10 wait in memory, the 11th waits in the store (past the bound).
    Returns (bot, transport, gate)."""
    from tests.fake_openai import InstantModel

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path / "data",
        flows_file=None,
        max_waiting_messages=10,
        max_active_chats=1,
    )
    transport = LoopbackTransport()
    gate = asyncio.Event()
    bot = Bot.build(settings, transport, store=make_store(db.url, db.key, tmp_path / "data"))
    bot.model = bot.pipeline.responder.model = InstantModel(gate)
    await bot.start()
    for n in range(11):
        say(bot, f"Q{n}", f"3460070{n:04d}@s.whatsapp.net")
    return bot, transport, gate


def say(bot: Bot, message_id: str, chat: str) -> None:
    bot.pipeline.submit(
        Inbound(MessageId(message_id), ChatId(chat), chat, MessageKind.TEXT, message_id, time.time())
    )


def inbound_statuses(db: SupabaseStack, chat: str) -> list[str]:
    return [
        s
        for (s,) in db.query(
            f"select status from chat_history where chat_id = '{chat}' and direction = 'in' order by id"
        )
    ]


async def test_past_the_waiting_bound_on_a_full_journal_disk_a_message_waits_in_memory(
    db: SupabaseStack, tmp_path: Path
) -> None:
    """The journal's disk full, a message past MAX_WAITING_MESSAGES was left in the store, which held it only
    in memory for the journal's retry: the read-back did not find it and said every waiting message was
    back, so the chat's next message was answered and the first one never (until a restart)."""
    bot, transport, gate = await waiting_bot(db, tmp_path)
    try:
        chat = CHATS[1]
        assert await bot.store.flush(5)
        await fill_the_journal_disk(bot.store, True)
        with pytest.raises(StoreUnavailable):  # the journal cannot write: kept for its retry
            await bot.store.set_status("Q0", MessageStatus.RECEIVED)
        assert bot.store.writes_failing  # so a message past the bound waits in memory, not in the store
        waiting = bot.pipeline.waiting
        say(bot, "FIRST", chat)
        assert bot.pipeline.waiting == waiting + 1
        gate.set()
        assert await bot.pipeline.drain(10)
        say(bot, "SECOND", chat)
        assert await bot.pipeline.drain(10)
        assert transport.texts_to(ChatId(chat)) == ["ok: FIRST", "ok: SECOND"]
        await fill_the_journal_disk(bot.store, False)
        assert await bot.store.flush(10)
        assert inbound_statuses(db, chat) == ["answered", "answered"]
    finally:
        await bot.stop()


@pytest.mark.parametrize("before", ["a message of the chat waits in the store", "no failed write yet"])
async def test_a_message_the_journal_has_not_taken_yet_is_read_back_in_order(
    db: SupabaseStack, tmp_path: Path, before: str
) -> None:
    """A message of a chat with messages waiting in the store waits there too (it must not overtake them),
    also once the journal's disk is full; and the first write after the disk filled up does not know yet.
    Such a message was only in the store's memory, waiting for the journal: the read-back missed it and
    said every waiting message was back, so the chat's next message was answered before it, and it was not
    answered until a restart."""
    bot, transport, gate = await waiting_bot(db, tmp_path)
    try:
        chat = CHATS[1]
        sent: list[str] = []
        if before == "a message of the chat waits in the store":
            say(bot, "FIRST", chat)
            sent.append("ok: FIRST")
        assert await bot.store.flush(5)
        await fill_the_journal_disk(bot.store, True)
        say(bot, "SECOND", chat)
        gate.set()
        assert await bot.pipeline.drain(10)
        say(bot, "THIRD", chat)
        assert await bot.pipeline.drain(10)
        assert transport.texts_to(ChatId(chat)) == [*sent, "ok: SECOND", "ok: THIRD"]
        await fill_the_journal_disk(bot.store, False)
        assert await bot.store.flush(10)
        assert inbound_statuses(db, chat) == ["answered"] * len(sent) + ["answered", "answered"]
    finally:
        await bot.stop()


@pytest.mark.parametrize("restart", [False, True])
async def test_a_resume_all_then_a_pause_all_during_an_outage_still_ends_each_chats_pause(
    db: SupabaseStack, tmp_path: Path, restart: bool
) -> None:
    """Pause changes not written yet keep the latest per chat, and 'pause all' replaced the 'resume all'
    queued before it (both are the chat "*"): Supabase never learnt that the chat paused before had been
    given back, and once the pause of all ended, or at the next start, the bot stayed silent in it."""
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", flows_file=None)  # type: ignore[call-arg]
    transport = LoopbackTransport()
    me, customer = "34699999999@s.whatsapp.net", CHATS[1]

    async def start_bot() -> Bot:
        bot = Bot.build(settings, transport, store=make_store(db.url, db.key, tmp_path / "data"))
        await bot.start()
        return bot

    db.psql("truncate bot_pauses;")
    bot = await start_bot()
    try:
        bot.pipeline.submit(said("!bot pause", customer, from_me=True))
        await wait_for(lambda: db.query("select chat_id from bot_pauses") == [(customer,)])
        await asyncio.to_thread(db.stop_postgrest)
        bot.pipeline.submit(said("!bot resume all", me, from_me=True, is_self_chat=True))
        bot.pipeline.submit(said("!bot pause 30", me, from_me=True, is_self_chat=True))
        assert await bot.pipeline.drain(5)
        await asyncio.sleep(0.2)
        if restart:
            await bot.stop()  # the changes wait in the journal file
        await asyncio.to_thread(db.start_postgrest)
        if restart:
            bot = await start_bot()
        await wait_for(lambda: ("*",) in db.query("select chat_id from bot_pauses"), timeout=15)
        # written after the resume of every chat: the chat paused before must be gone by now
        assert db.query("select chat_id from bot_pauses") == [("*",)]
    finally:
        await asyncio.to_thread(db.start_postgrest)
        await bot.stop()
        db.psql("truncate bot_pauses;")


async def test_a_redelivery_after_a_restart_during_an_outage_is_caught_after_a_flood(
    db: SupabaseStack, tmp_path: Path
) -> None:
    """During an outage the de-duplication window is seeded from the journal's local copy, which keeps a
    chat's latest 20 rows: after a flood in that chat an answered message was no longer there, and its
    redelivery after a restart was answered again (and read as unanswered locally from then on)."""
    from tests.fake_openai import InstantModel

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path / "data",
        flows_file=None,
        rate_limit_max_messages=3,
        rate_limit_cooldown=600_000,
    )
    chat = CHATS[0]
    transport = LoopbackTransport()

    async def start_bot() -> Bot:
        bot = Bot.build(settings, transport, store=make_store(db.url, db.key, tmp_path / "data"))
        bot.model = bot.pipeline.responder.model = InstantModel()
        await bot.start()
        return bot

    first = Inbound(MessageId("OLD"), ChatId(chat), chat, MessageKind.TEXT, "hola", time.time())
    bot = await start_bot()
    bot.pipeline.submit(first)
    assert await bot.pipeline.drain(5)
    for n in range(25):  # over the rate limit: saved, unanswered, in the chat's rows
        bot.pipeline.submit(
            Inbound(MessageId(f"FLOOD{n}"), ChatId(chat), chat, MessageKind.TEXT, f"{n}", time.time())
        )
    assert await bot.pipeline.drain(5)
    assert await bot.store.flush(5)
    await bot.stop()
    assert transport.texts_to(ChatId(chat)).count("ok: hola") == 1
    await asyncio.to_thread(db.stop_postgrest)
    try:
        bot = await start_bot()
        bot.pipeline.submit(first)  # WhatsApp delivers it again
        assert await bot.pipeline.drain(5)
        assert transport.texts_to(ChatId(chat)).count("ok: hola") == 1, "answered twice"
        await bot.stop()
    finally:
        await asyncio.to_thread(db.start_postgrest)
