"""One contract for every Store: the same tests against SQLiteStore and SupabaseStore (real local stack).

The Supabase stack starts once per session, only when a Supabase case runs; without its binaries those cases
skip locally and fail in CI (tests/supabase_stack.py: start_or_skip). Every Supabase case starts from empty
tables, and every check of what was persisted also reads the database itself (sqlite3 / psql), not only
the store.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import pytest

from memory.sqlite_store import SQLiteStore
from memory.store import RESUME_ALL, Direction, Flow, MessageStatus, Store, StoredMessage
from memory.supabase_store import SupabaseStore
from tests.supabase_stack import SupabaseStack

CHAT = "34600111222@s.whatsapp.net"
OTHER = "34600333444@s.whatsapp.net"
T0 = 1_795_000_000.0


def msg(
    n: int,
    *,
    chat: str = CHAT,
    direction: Direction = Direction.IN,
    status: MessageStatus | None = None,
    at: float | None = None,
    body: str | None = None,
) -> StoredMessage:
    default = MessageStatus.RECEIVED if direction is Direction.IN else MessageStatus.SENT
    return StoredMessage(
        wa_message_id=f"WA{n}",
        chat_id=chat,
        direction=direction,
        kind="text",
        body=f"message {n}" if body is None else body,
        status=status or default,
        created_at=T0 + n if at is None else at,
    )


class Backend(Protocol):
    name: str

    def make(self) -> Store: ...
    async def rows(self, store: Store) -> dict[str, tuple[str, str]]:
        """wa_message_id -> (status, body), read from the database itself once the store flushed."""
        ...

    def seed_flows(self, flows: list[tuple[list[str], str, bool, int]]) -> None: ...

    def seed_contacts(self, contacts: list[tuple[str, str]]) -> None: ...

    def chat_ids(self) -> set[str]:
        """The chats table, read from the database itself."""
        ...

    def seed_chat(self, chat_id: str, first_seen_at: float) -> None:
        """A chats row with no last message time (written by hand, or by an older version)."""
        ...


class SQLiteBackend:
    name = "sqlite"

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "bot.sqlite3"

    def make(self) -> Store:
        return SQLiteStore(self.path, retention_days=None)  # purged when a test says so, as with Supabase

    async def rows(self, store: Store) -> dict[str, tuple[str, str]]:
        assert isinstance(store, SQLiteStore)
        await store.flush()
        with sqlite3.connect(self.path) as conn:
            found = conn.execute("SELECT wa_message_id, status, body FROM chat_history").fetchall()
        return {r[0]: (r[1], r[2]) for r in found}

    def seed_flows(self, flows: list[tuple[list[str], str, bool, int]]) -> None:
        with sqlite3.connect(self.path) as conn:
            conn.executemany(
                "INSERT INTO bot_flows (keywords, answer, enabled, priority, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, 0, 0)",
                [(json.dumps(k), a, int(e), p) for k, a, e, p in flows],
            )

    def seed_contacts(self, contacts: list[tuple[str, str]]) -> None:
        with sqlite3.connect(self.path) as conn:
            conn.executemany("INSERT INTO bot_contacts (number, list, created_at) VALUES (?, ?, 0)", contacts)

    def chat_ids(self) -> set[str]:
        with sqlite3.connect(self.path) as conn:
            return {row[0] for row in conn.execute("SELECT chat_id FROM chats")}

    def seed_chat(self, chat_id: str, first_seen_at: float) -> None:
        with sqlite3.connect(self.path) as conn:
            conn.execute("INSERT INTO chats (chat_id, first_seen_at) VALUES (?, ?)", (chat_id, first_seen_at))


class SupabaseBackend:
    name = "supabase"

    def __init__(self, stack: SupabaseStack, tmp_path: Path) -> None:
        self.stack = stack
        self.data_dir = tmp_path / "data"
        stack.psql("truncate chat_history, chats, bot_flows, bot_contacts, bot_pauses restart identity;")

    def make(self) -> Store:
        return SupabaseStore(
            self.stack.url,
            self.stack.key,
            self.data_dir,
            flush_interval_s=0.01,
            flows_ttl_s=0,
            retention_days=None,
        )

    async def rows(self, store: Store) -> dict[str, tuple[str, str]]:
        assert isinstance(store, SupabaseStore)
        assert await store.flush(10), "journal not flushed"
        found = self.stack.query("select wa_message_id, status, body from chat_history")
        return {r[0]: (r[1], r[2]) for r in found}

    def seed_flows(self, flows: list[tuple[list[str], str, bool, int]]) -> None:
        values = ", ".join(
            "(array[{}]::text[], '{}', {}, {})".format(
                ", ".join(f"'{k}'" for k in keywords), answer, str(enabled).lower(), priority
            )
            for keywords, answer, enabled, priority in flows
        )
        self.stack.psql(f"insert into bot_flows (keywords, answer, enabled, priority) values {values};")

    def seed_contacts(self, contacts: list[tuple[str, str]]) -> None:
        values = ", ".join(f"('{number}', '{kind}')" for number, kind in contacts)
        self.stack.psql(f"insert into bot_contacts (number, list) values {values};")

    def chat_ids(self) -> set[str]:
        return {row[0] for row in self.stack.query("select chat_id from chats")}

    def seed_chat(self, chat_id: str, first_seen_at: float) -> None:
        self.stack.psql(
            f"insert into chats (chat_id, first_seen_at) values ('{chat_id}', to_timestamp({first_seen_at}));"
        )


@pytest.fixture(params=["sqlite", "supabase"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return SQLiteBackend(tmp_path)
    return SupabaseBackend(request.getfixturevalue("stack"), tmp_path)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = backend.make()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_add_message_is_idempotent(backend: Backend, store: Store) -> None:
    await store.add_message(msg(1))
    # A redelivery, even one that differs, changes nothing: the first write of an id wins.
    await store.add_message(msg(1, body="other", status=MessageStatus.FAILED))
    await store.add_message(msg(1))

    recent = await store.recent_messages(CHAT, 10)
    assert [(m.wa_message_id, m.body, m.status) for m in recent] == [
        ("WA1", "message 1", MessageStatus.RECEIVED)
    ]
    assert await backend.rows(store) == {"WA1": ("received", "message 1")}


async def test_add_message_is_queued_at_call_time(store: Store) -> None:
    pending = [store.add_message(msg(n)) for n in range(1, 4)]  # started, not awaited yet
    for write in pending:
        await write
    assert [m.wa_message_id for m in await store.recent_messages(CHAT, 5)] == ["WA1", "WA2", "WA3"]


async def test_add_reply_records_reply_and_answers_inbound(backend: Backend, store: Store) -> None:
    await store.add_message(msg(1))
    await store.add_message(msg(2))

    await store.add_reply(msg(3, direction=Direction.OUT, body="hello!"), answered_id="WA1")

    recent = await store.recent_messages(CHAT, 5)
    assert [(m.wa_message_id, m.direction, m.status) for m in recent] == [
        ("WA1", Direction.IN, MessageStatus.ANSWERED),
        ("WA2", Direction.IN, MessageStatus.RECEIVED),
        ("WA3", Direction.OUT, MessageStatus.SENT),
    ]
    assert [m.wa_message_id for m in await store.unanswered_inbound(0)] == ["WA2"]
    assert await backend.rows(store) == {
        "WA1": ("answered", "message 1"),
        "WA2": ("received", "message 2"),
        "WA3": ("sent", "hello!"),
    }


async def test_add_reply_is_atomic_across_a_restart(backend: Backend) -> None:
    """Both halves of a reply are durable together: right after it returns, a new store sees both."""
    first = backend.make()
    await first.open()
    await first.add_message(msg(1))
    await first.add_reply(msg(2, direction=Direction.OUT), answered_id="WA1")
    await first.close()

    second = backend.make()
    await second.open()
    try:
        assert await second.unanswered_inbound(0) == []
        assert [m.status for m in await second.recent_messages(CHAT, 5)] == [
            MessageStatus.ANSWERED,
            MessageStatus.SENT,
        ]
        assert await backend.rows(second) == {"WA1": ("answered", "message 1"), "WA2": ("sent", "message 2")}
    finally:
        await second.close()


async def test_one_reply_answers_a_burst_across_a_restart(backend: Backend) -> None:
    """ "hola" / "una pregunta" / "¿precio?" answered by one reply: all three are answered, durably, so
    recovery after a restart asks none of them again."""
    first = backend.make()
    await first.open()
    for n in (1, 2, 3, 4):
        await first.add_message(msg(n))
    await first.add_reply(msg(5, direction=Direction.OUT), answered_id="WA3", also_answered=["WA1", "WA2"])
    await first.close()

    second = backend.make()
    await second.open()
    try:
        assert [m.wa_message_id for m in await second.unanswered_inbound(0)] == ["WA4"]
        assert await backend.rows(second) == {
            "WA1": ("answered", "message 1"),
            "WA2": ("answered", "message 2"),
            "WA3": ("answered", "message 3"),
            "WA4": ("received", "message 4"),
            "WA5": ("sent", "message 5"),
        }
    finally:
        await second.close()


async def test_recent_messages_order_and_limit(store: Store) -> None:
    # Written out of time order, across two chats, with a tie on created_at (insertion order breaks it).
    for n in (3, 1, 2, 5, 4):
        direction = Direction.OUT if n % 2 == 0 else Direction.IN
        await store.add_message(msg(n, direction=direction))
    await store.add_message(msg(6, at=T0 + 5))  # same time as WA5, written after it
    await store.add_message(msg(7, chat=OTHER))

    assert [m.wa_message_id for m in await store.recent_messages(CHAT, 3)] == ["WA4", "WA5", "WA6"]
    assert [m.wa_message_id for m in await store.recent_messages(CHAT, 100)] == [
        "WA1",
        "WA2",
        "WA3",
        "WA4",
        "WA5",
        "WA6",
    ]
    assert await store.recent_messages(CHAT, 0) == []
    assert [m.wa_message_id for m in await store.recent_messages(OTHER, 5)] == ["WA7"]
    assert await store.recent_messages("nobody@s.whatsapp.net", 5) == []
    # A message written after a read shows up in the next one (read your writes through every layer).
    await store.add_message(msg(8))
    assert [m.wa_message_id for m in await store.recent_messages(CHAT, 2)] == ["WA6", "WA8"]
    full = (await store.recent_messages(CHAT, 1))[0]
    assert full == msg(8)


async def test_recent_message_ids(store: Store) -> None:
    for n in range(1, 6):
        await store.add_message(msg(n, chat=CHAT if n % 2 else OTHER))

    assert await store.recent_message_ids(T0 + 2, 10) == ["WA5", "WA4", "WA3", "WA2"]
    assert await store.recent_message_ids(T0 + 2, 2) == ["WA5", "WA4"]
    assert await store.recent_message_ids(T0 + 100, 10) == []


async def test_unanswered_inbound(store: Store) -> None:
    for n in range(1, 6):
        await store.add_message(msg(n))
    await store.add_message(msg(6, direction=Direction.OUT))
    await store.add_reply(msg(7, direction=Direction.OUT), answered_id="WA2")
    await store.set_status("WA3", MessageStatus.FAILED)
    await store.set_status("WA4", MessageStatus.SKIPPED)

    assert [m.wa_message_id for m in await store.unanswered_inbound(0)] == ["WA1", "WA5"]
    assert [m.wa_message_id for m in await store.unanswered_inbound(T0 + 2)] == ["WA5"]
    assert (await store.unanswered_inbound(T0 + 5))[0] == msg(5)


async def test_unanswered_inbound_from_exactly_a_message_time(store: Store) -> None:
    at = T0 + 0.1234564  # finer than the microseconds Postgres keeps (and rounds down)
    await store.add_message(msg(1, at=at))
    await store.flush()  # type: ignore[attr-defined]  # read back from the database, not the journal
    assert [m.wa_message_id for m in await store.unanswered_inbound(at, limit=5)] == ["WA1"]
    assert [m.wa_message_id for m in await store.unanswered_inbound(at)] == ["WA1"]


async def test_unanswered_inbound_in_pages(store: Store) -> None:
    for n in range(1, 9):
        await store.add_message(msg(n))
    await store.add_reply(msg(20, direction=Direction.OUT), answered_id="WA2")
    await store.set_status("WA3", MessageStatus.SKIPPED)

    assert [m.wa_message_id for m in await store.unanswered_inbound(0, limit=3)] == ["WA1", "WA4", "WA5"]
    assert [m.wa_message_id for m in await store.unanswered_inbound(T0 + 5, limit=3)] == ["WA5", "WA6", "WA7"]
    # Fewer than the limit only when there are no more.
    assert [m.wa_message_id for m in await store.unanswered_inbound(T0 + 7, limit=3)] == ["WA7", "WA8"]


async def test_mark_stale(backend: Backend, store: Store) -> None:
    for n in range(1, 5):
        await store.add_message(msg(n))
    await store.add_reply(msg(5, direction=Direction.OUT), answered_id="WA1")

    # WA2 and WA3 are unanswered and older than the cut; WA1 was answered, WA4 is recent.
    assert await store.mark_stale(T0 + 4) == 2

    assert [m.wa_message_id for m in await store.unanswered_inbound(0)] == ["WA4"]
    statuses = {m.wa_message_id: m.status for m in await store.recent_messages(CHAT, 10)}
    assert statuses == {
        "WA1": MessageStatus.ANSWERED,
        "WA2": MessageStatus.SKIPPED,
        "WA3": MessageStatus.SKIPPED,
        "WA4": MessageStatus.RECEIVED,
        "WA5": MessageStatus.SENT,
    }
    assert await store.mark_stale(T0 + 4) == 0
    rows = await backend.rows(store)
    assert {k: v[0] for k, v in rows.items()} == {s: v.value for s, v in statuses.items()}


async def test_set_status_with_and_without_body(backend: Backend, store: Store) -> None:
    await store.add_message(msg(1, body=""))  # a voice note: no text until it is transcribed
    await store.add_message(msg(2))

    await store.set_status("WA1", MessageStatus.RECEIVED, body="the transcript")
    await store.set_status("WA2", MessageStatus.FAILED)
    await store.set_status("WA-unknown", MessageStatus.FAILED)  # nothing to change, no error

    recent = {m.wa_message_id: (m.status, m.body) for m in await store.recent_messages(CHAT, 5)}
    assert recent == {
        "WA1": (MessageStatus.RECEIVED, "the transcript"),
        "WA2": (MessageStatus.FAILED, "message 2"),
    }
    assert [m.body for m in await store.unanswered_inbound(0)] == ["the transcript"]
    assert await backend.rows(store) == {
        "WA1": ("received", "the transcript"),
        "WA2": ("failed", "message 2"),
    }


async def test_flows_enabled_by_priority(backend: Backend, store: Store) -> None:
    assert list(await store.flows()) == []
    backend.seed_flows(
        [
            (["horario", "hora"], "Abrimos de 9 a 18.", True, 1),
            (["precio"], "Desde 10 €.", True, 5),
            (["viejo"], "ya no", False, 9),
        ]
    )
    assert list(await store.flows()) == [
        Flow(("precio",), "Desde 10 €."),
        Flow(("horario", "hora"), "Abrimos de 9 a 18."),
    ]


async def test_number_lists(backend: Backend, store: Store) -> None:
    assert await store.number_lists() == (frozenset(), frozenset())
    backend.seed_contacts([("34600111222", "allow"), ("34600333444", "block"), ("5491122334455", "allow")])
    assert await store.number_lists() == (
        frozenset({"34600111222", "5491122334455"}),
        frozenset({"34600333444"}),
    )


async def test_retention_forgets_the_numbers_of_chats_it_emptied(backend: Backend, store: Store) -> None:
    """RETENTION_DAYS deleted the messages only: the chats table kept every customer's number with first and
    last contact for ever."""
    assert isinstance(store, SQLiteStore | SupabaseStore)
    now = time.time()
    old = now - 40 * 86400
    await store.add_message(msg(1, at=old))  # CHAT wrote 40 days ago only
    await store.add_message(msg(2, chat=OTHER, at=old))  # OTHER then, and again a minute ago
    await store.add_message(msg(3, chat=OTHER, at=now - 60))
    await backend.rows(store)  # flushed
    silent = "34600555666@s.whatsapp.net"
    backend.seed_chat(silent, old)
    backend.seed_chat("34600777888@s.whatsapp.net", now - 60)
    assert backend.chat_ids() == {CHAT, OTHER, silent, "34600777888@s.whatsapp.net"}
    assert await store.purge_older_than(30) == 2
    assert set(await backend.rows(store)) == {"WA3"}
    assert backend.chat_ids() == {OTHER, "34600777888@s.whatsapp.net"}
    await store.add_message(msg(4, at=now))  # CHAT writes again: known anew
    await backend.rows(store)
    assert CHAT in backend.chat_ids()


async def test_data_survives_close_and_reopen(backend: Backend) -> None:
    first = backend.make()
    await first.open()
    now = time.time()
    await first.add_message(msg(1, at=now - 3))
    await first.add_reply(msg(2, direction=Direction.OUT, at=now - 2), answered_id="WA1")
    await first.add_message(msg(3, at=now - 1, chat=OTHER))
    await first.set_status("WA3", MessageStatus.RECEIVED, body="transcribed")
    before = (
        await first.recent_messages(CHAT, 5),
        await first.recent_messages(OTHER, 5),
        await first.unanswered_inbound(now - 60),
        await first.recent_message_ids(now - 60, 10),
    )
    await first.close()

    second = backend.make()
    await second.open()
    try:
        after = (
            await second.recent_messages(CHAT, 5),
            await second.recent_messages(OTHER, 5),
            await second.unanswered_inbound(now - 60),
            await second.recent_message_ids(now - 60, 10),
        )
        assert after == before
        assert [m.wa_message_id for m in after[2]] == ["WA3"]
        assert after[3] == ["WA3", "WA2", "WA1"]
        assert set(await backend.rows(second)) == {"WA1", "WA2", "WA3"}
    finally:
        await second.close()


async def test_pauses_survive_a_restart_and_end_when_told(backend: Backend) -> None:
    import math
    import time

    now = time.time()
    store = backend.make()
    await store.open()
    try:
        await store.set_pause("c1@s.whatsapp.net", now + 600)
        await store.set_pause("c2@s.whatsapp.net", now - 1)  # already over
        await store.set_pause("c3@s.whatsapp.net", now + 600)
        await store.set_pause("c3@s.whatsapp.net", None)  # resumed
        await store.set_pause("*", math.inf)  # `!bot pause all`, no end
    finally:
        await store.close()
    again = backend.make()
    await again.open()
    try:
        pauses = await again.pauses(now)
        assert set(pauses) == {"c1@s.whatsapp.net", "*"}
        assert abs(pauses["c1@s.whatsapp.net"] - (now + 600)) < 0.01 and pauses["*"] == math.inf
        await again.set_pause("!c4@s.whatsapp.net", math.inf)  # resumed during the pause of all
        await again.set_pause("!c5@s.whatsapp.net", math.inf)
        assert {"!c4@s.whatsapp.net", "!c5@s.whatsapp.net"} <= set(await again.pauses(now))
        await again.set_pause("!*", None)  # a new pause of all ends every exemption, and only those
        assert set(await again.pauses(now)) == {"c1@s.whatsapp.net", "*"}
        await again.set_pause("*", None)  # `!bot resume all` ends every pause
        assert await again.pauses(now) == {}
        await again.set_pause("c6@s.whatsapp.net", math.inf)
        await again.set_pause(RESUME_ALL, None)  # a resume of all queued before a pause of all: the same
        assert await again.pauses(now) == {}
    finally:
        await again.close()
