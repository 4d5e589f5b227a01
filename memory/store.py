"""The store interface: one async API, SQLite (embedded default) and Supabase behind it.

Rows mirror the tables in supabase/migrations: chats, chat_history, bot_flows.
"""

from __future__ import annotations

import contextlib
import enum
import re
import sqlite3
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class Direction(enum.StrEnum):
    IN = "in"
    OUT = "out"


class MessageStatus(enum.StrEnum):
    RECEIVED = "received"  # inbound, persisted, not answered yet
    ANSWERED = "answered"  # inbound that got its reply
    SKIPPED = "skipped"  # inbound deliberately not answered (filtered, stale after a crash)
    FAILED = "failed"  # inbound whose handling failed
    SENT = "sent"  # outbound, delivered to the transport


# The kind of an outbound row that is the "busy, I will answer shortly" notice: a promise recovery keeps
# (bot.app.Bot.recover), and not a turn of the conversation the model is shown.
BUSY_KIND = "busy"
# The kind of an inbound row that is an order from the catalog's cart (its body: the customer's words, then
# "🛒 " and the order's details): handed to the owner, also when it is answered from the store.
ORDER_KIND = "order"
ORDER_MARK = "\n\n🛒 "


@dataclass(frozen=True, slots=True)
class StoredMessage:
    wa_message_id: str
    chat_id: str
    direction: Direction
    kind: str
    body: str
    status: MessageStatus
    created_at: float  # unix seconds


def connect_wal(path: Path) -> sqlite3.Connection:
    """A SQLite connection in WAL mode with autocommit off the table (BEGIN/COMMIT by hand), usable from the
    store's writer thread. Shared by the SQLite store and the Supabase journal."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives a process crash; only an OS crash can lose the last commits.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[sqlite3.Connection]:
    """BEGIN ... COMMIT on a `connect_wal` connection, ROLLBACK on any exception (cancellation included).

    SQLite itself rolls back on some errors (a full disk, an I/O error); an explicit ROLLBACK then fails
    with "no transaction is active" and would hide the error that matters.
    """
    conn.execute(begin)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


_SURROGATES = re.compile("[\ud800-\udfff]")


def db_text(text: str) -> str:
    """Text every database and codec takes: no NUL characters, no lone surrogates (half an emoji, or a
    byte that was not UTF-8, which Python keeps as a surrogate), each surrogate becoming U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATES.sub("\ufffd", text)
    return text


def message_from_row(row: Sequence[Any]) -> StoredMessage:
    """A StoredMessage from (wa_message_id, chat_id, direction, kind, body, status, created_at)."""
    return StoredMessage(
        wa_message_id=row[0],
        chat_id=row[1],
        direction=Direction(row[2]),
        kind=row[3],
        body=row[4],
        status=MessageStatus(row[5]),
        created_at=row[6],
    )


@dataclass(frozen=True, slots=True)
class Flow:
    keywords: tuple[str, ...]
    answer: str
    enabled: bool = True
    file: str | None = None  # a photo or document sent with the answer (flows file only: a checked path)


# A `resume all` still queued when a `pause all` follows (both are the chat "*", of which the queue keeps
# the latest): as "*" with None, it ends every pause, and is written before the pause of all.
RESUME_ALL = "-*"


def apply_pause(pauses: dict[str, Any], chat_id: str, until: Any) -> None:
    """Apply one pause change (as `Store.set_pause` takes it) to a map of running pauses: a value sets
    the chat's pause, None ends it, "*" (or RESUME_ALL) with None ends every pause, "!*" with None every
    exemption."""
    if until is not None:
        pauses[chat_id] = until
    elif chat_id in ("*", RESUME_ALL):
        pauses.clear()
    elif chat_id == "!*":
        for exempt in [chat for chat in pauses if chat.startswith("!")]:
            del pauses[exempt]
    else:
        pauses.pop(chat_id, None)


def queue_pause_change(changes: dict[str, float | None], chat_id: str, until: float | None) -> None:
    """Add a change to those not written yet, keeping what writing them in order must do: the latest
    change per chat, ordered by when it was made. "*" with None (resume all) supersedes every change
    before it, "!*" with None every exemption before it. A pause of all does not supersede a resume of
    all before it, which must still end each chat's pause: that one is kept as RESUME_ALL."""
    if chat_id == "*" and until is not None and "*" in changes and changes["*"] is None:
        renamed = [(RESUME_ALL if chat == "*" else chat, end) for chat, end in changes.items()]
        changes.clear()
        changes.update(renamed)
    changes.pop(chat_id, None)
    if until is None and chat_id in ("*", "!*"):
        apply_pause(changes, chat_id, None)
    changes[chat_id] = until


class StoreUnavailable(Exception):
    """The database cannot be reached; callers fall back or retry."""


class StoreWriteKept(StoreUnavailable):
    """The database cannot write now; the write is kept and the store retries it (it logs the outage)."""


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None:
        """Flush pending writes and release the connection."""
        ...

    def add_message(self, message: StoredMessage) -> Awaitable[None]:
        """Persist a message (idempotent on wa_message_id); durable once the result is awaited.

        The write is queued when this is called, so a caller can start it, do other work,
        and await it later.
        """
        ...

    def add_reply(
        self, reply: StoredMessage, answered_id: str, also_answered: Sequence[str] = ()
    ) -> Awaitable[None]:
        """Persist an outbound reply and mark the inbound message it answers ANSWERED, atomically;
        durable once the result is awaited (a coroutine function satisfies this too). `also_answered`:
        the earlier messages of a burst answered by the same reply, marked ANSWERED in the same commit."""
        ...

    async def set_status(self, wa_message_id: str, status: MessageStatus, body: str | None = None) -> None:
        """Change a message's status (and its body, e.g. a voice note's transcript)."""
        ...

    async def mark_stale(self, before: float) -> int:
        """Mark inbound messages still RECEIVED and older than `before` as SKIPPED; returns how many."""
        ...

    async def recent_messages(self, chat_id: str, limit: int) -> list[StoredMessage]:
        """The last `limit` messages of a chat, oldest first."""
        ...

    async def recent_message_ids(self, since: float, limit: int) -> list[str]:
        """Ids of messages created at or after `since` (seeds de-duplication after a restart)."""
        ...

    async def unanswered_inbound(self, since: float, limit: int | None = None) -> list[StoredMessage]:
        """Inbound messages still RECEIVED, created at or after `since`, oldest first; at most `limit`,
        and fewer than `limit` only when there are no more (StoreUnavailable when that cannot be known)."""
        ...

    async def flows(self) -> Sequence[Flow]: ...

    async def set_pause(self, chat_id: str, until: float | None) -> None:
        """Keep a human takeover across restarts: `chat_id` ("*": every chat; "!<chat>": a chat exempt from
        that) is paused until `until` (epoch seconds, math.inf until resumed); None ends it ("*" or RESUME_ALL
        with None ends every pause, "!*" with None every exemption)."""
        ...

    async def note_pause(self, chat_id: str, until: float | None) -> None:
        """Keep a pause change (as `set_pause`) where a restart finds it even while the database is away;
        nothing to do where the database is local."""
        ...

    async def pauses(self, now: float) -> dict[str, float]:
        """The pauses still running at `now` (epoch seconds), math.inf for those without an end."""
        ...

    async def number_lists(self) -> tuple[frozenset[str], frozenset[str]]:
        """(allowed, blocked) numbers from the bot_contacts table."""
        ...

    async def purge_older_than(self, days: float) -> int:
        """Retention: delete messages older than `days` days; returns how many.

        Each store also runs it periodically with its configured retention.
        """
        ...

    @property
    def writes_failing(self) -> bool:
        """True while the database cannot write (new writes are kept for a retry): the pipeline then keeps
        waiting messages in memory rather than leaving them in a store it cannot read them back from."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for /v1/metrics (no message text, no numbers)."""
        ...
