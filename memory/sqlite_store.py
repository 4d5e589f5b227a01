"""The embedded store: one SQLite file under DATA_DIR, WAL mode, group commit.

Every call runs on one dedicated thread that owns the connection. Writes are
queued and committed in batches: whoever awaits a write waits for the commit of
the batch that holds it, so durability is per call while the cost of a commit is
shared by everything that arrived in the meantime.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

from memory.store import (
    RESUME_ALL,
    Flow,
    MessageStatus,
    StoredMessage,
    StoreUnavailable,
    StoreWriteKept,
    connect_wal,
    db_text,
    message_from_row,
    transaction,
)

T = TypeVar("T")

RETRY_AFTER_S = 2.0  # a batch the database could not write is tried again after this, or with the next one
MAX_KEPT_FOR_RETRY = 10_000  # operations (about 5,000 messages) kept while the database cannot write

SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    chat_id TEXT PRIMARY KEY,
    first_seen_at REAL NOT NULL,
    last_message_at REAL
);
CREATE TABLE IF NOT EXISTS chat_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    wa_message_id TEXT NOT NULL UNIQUE,
    chat_id TEXT NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    kind TEXT NOT NULL DEFAULT 'text',
    body TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL CHECK (status IN ('received', 'answered', 'skipped', 'failed', 'sent')),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS chat_history_chat_created ON chat_history (chat_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS chat_history_created ON chat_history (created_at);
CREATE INDEX IF NOT EXISTS chat_history_unanswered ON chat_history (created_at)
    WHERE direction = 'in' AND status = 'received';
CREATE TABLE IF NOT EXISTS bot_contacts (
    number TEXT PRIMARY KEY,
    list TEXT NOT NULL CHECK (list IN ('allow', 'block')),
    note TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bot_pauses (
    chat_id TEXT PRIMARY KEY,  -- '*': every chat
    until REAL  -- epoch seconds; NULL: until resumed
);
CREATE TABLE IF NOT EXISTS bot_flows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    keywords TEXT NOT NULL,  -- JSON array of strings (text[] in Postgres)
    answer TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    priority INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""

_INSERT_MESSAGE = """
INSERT INTO chat_history (wa_message_id, chat_id, direction, kind, body, status, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (wa_message_id) DO NOTHING
"""
_UPSERT_CHAT = """
INSERT INTO chats (chat_id, first_seen_at, last_message_at) VALUES (?, ?, ?)
ON CONFLICT (chat_id) DO UPDATE
SET last_message_at = max(coalesce(last_message_at, 0), excluded.last_message_at)
"""
_DELETE_OLD_CHATS = "DELETE FROM chats WHERE coalesce(last_message_at, first_seen_at) < ?"
_SET_STATUS = (
    "UPDATE chat_history SET status = ?, body = coalesce(?, body), updated_at = ? WHERE wa_message_id = ?"
)
_COLUMNS = "wa_message_id, chat_id, direction, kind, body, status, created_at"
_UPSERT_PAUSE = """
INSERT INTO bot_pauses (chat_id, until) VALUES (?, ?)
ON CONFLICT (chat_id) DO UPDATE SET until = excluded.until
"""


class SQLiteStore:
    def __init__(
        self, path: Path, *, retention_days: float | None = 30.0, retention_every_s: float = 6 * 3600
    ):
        self.path = path
        self.retention_days = retention_days
        self.retention_every_s = retention_every_s
        self._retention: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        self._batch_done: asyncio.Future[None] | None = None
        self._writing = False
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.commits = 0
        self.rows_written = 0
        self.dropped = 0
        self.reopened = 0
        self._inode = 0
        self._closed = False
        self.refused = 0
        self._failing_since: float | None = None  # monotonic time of the first failed write, while failing
        self._last_failure = ""
        self._last_attempt = 0.0

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._run(self._connect)
        self._writer = asyncio.create_task(self._write_loop(), name="sqlite-writer")
        if self.retention_days:
            self._retention = asyncio.create_task(self._retention_loop(), name="sqlite-retention")

    async def _retention_loop(self) -> None:
        assert self.retention_days
        while True:
            try:
                removed = await self.purge_older_than(self.retention_days)
                if removed:
                    logger.info(
                        "retention: removed {} message(s) older than {:g} days", removed, self.retention_days
                    )
            except StoreUnavailable as error:
                logger.warning("retention job failed: {}", error)
            await asyncio.sleep(self.retention_every_s)

    async def purge_older_than(self, days: float) -> int:
        """Delete messages created more than `days` days ago, and the chats (a customer's number with first
        and last contact) whose last message is that old; returns how many messages."""
        await self.flush()
        assert self._conn is not None
        conn = self._conn
        cutoff = time.time() - days * 86400
        await self._forget_ended_pauses(time.time())

        def purge() -> int:
            with transaction(conn):
                removed = conn.execute("DELETE FROM chat_history WHERE created_at < ?", (cutoff,)).rowcount
                conn.execute(_DELETE_OLD_CHATS, (cutoff,))
            return removed

        return await self._run(purge)

    def _connect(self) -> None:
        conn = connect_wal(self.path)
        # SQLite's own checkpoint every 1,000 pages keeps the WAL near 4 MB. It runs in the commit that
        # crosses the mark, so that commit waits for an fsync (the tail in bench/pipeline.py at a steady
        # 1,000 messages/s); checkpointing from another thread instead lets the WAL grow without bound
        # under sustained writes, which is worse.
        conn.executescript(SCHEMA)
        self._conn = conn
        self._inode = os.stat(self.path).st_ino

    def _reopen_if_replaced(self) -> None:
        """Reopen when the file under the connection was deleted or replaced (an operator's `rm`, a volume
        remounted): SQLite would go on writing into an unlinked file and lose it all at the next start."""
        try:
            same = os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            same = False
        if same:
            return
        logger.error("sqlite: {} was deleted or replaced while open; opening it anew", self.path)
        old = self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connect()  # if this fails, the old connection stays and the next batch tries again
        if old is not None:
            with contextlib.suppress(sqlite3.Error):
                old.close()
        self.reopened += 1

    async def close(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
            await asyncio.gather(self._retention, return_exceptions=True)
            self._retention = None
        if self._writer is not None:
            try:
                await self.flush()
            except StoreUnavailable as error:
                logger.error("sqlite: closing with writes that failed: {}", error)
            self._closed = True
            # After a failed flush the writer is pausing before its next retry, never mid-batch; a batch it
            # was writing anyway is put back and failed by _write_loop.
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
            if self._pending:
                logger.error("sqlite: {} operations could not be written before closing", len(self._pending))
            _fail(self._batch_done, StoreUnavailable("sqlite store closed"))
        if self._conn is not None:
            conn = self._conn
            with contextlib.suppress(StoreUnavailable):
                await self._run(lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
            await self._run(conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"sqlite: {error}") from error

    # -- writes (group commit) -----------------------------------------------------------------

    @property
    def writes_failing(self) -> bool:
        return self._failing_since is not None

    def _enqueue(
        self, op: str, params: tuple[Any, ...], *, wait_for_retry: bool = False
    ) -> asyncio.Future[None]:
        """Queue one write; the returned future (shared by its batch) resolves on the batch's commit.

        A caller cancelled while awaiting it cancels the shared future (asyncio does that); callers
        after that get a fresh one, so a cancelled shutdown wait never poisons the final flush.
        While the database cannot write, the operation is kept for the next retry and the caller learns
        at once, instead of waiting for that retry (a customer's answer waits on it).
        """
        if self._closed:
            closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            _fail(closed, StoreUnavailable("sqlite store closed"))
            return closed
        self._pending.append((op, params))
        self._wakeup.set()
        if self._failing_since is not None and not wait_for_retry:
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            _fail(failed, StoreWriteKept(f"{self._last_failure} (kept for a retry)"))
            return failed
        if self._batch_done is None or self._batch_done.done():
            self._batch_done = asyncio.get_running_loop().create_future()
        return self._batch_done

    def add_message(self, message: StoredMessage) -> asyncio.Future[None]:
        return self._enqueue("message", _message_params(message))

    def add_reply(
        self, reply: StoredMessage, answered_id: str, also_answered: Sequence[str] = ()
    ) -> asyncio.Future[None]:
        # All land in the same batch, so in the same transaction: a reply is never recorded
        # without its questions being marked answered, or the other way round.
        self._enqueue("message", _message_params(reply))
        for earlier in also_answered:
            self._enqueue("status", (MessageStatus.ANSWERED.value, None, reply.created_at, db_text(earlier)))
        return self._enqueue(
            "status", (MessageStatus.ANSWERED.value, None, reply.created_at, db_text(answered_id))
        )

    async def set_pause(self, chat_id: str, until: float | None) -> None:
        await self._enqueue(
            "pause", (chat_id, None if until is None or math.isinf(until) else until, until is None)
        )

    async def note_pause(self, chat_id: str, until: float | None) -> None:
        return None  # set_pause is already local: queued and committed here

    async def pauses(self, now: float) -> dict[str, float]:
        await self._forget_ended_pauses(now)
        rows = await self._query(
            "SELECT chat_id, until FROM bot_pauses WHERE until IS NULL OR until > ?", (now,), flush=False
        )
        return {chat: math.inf if until is None else until for chat, until in rows}

    async def _forget_ended_pauses(self, now: float) -> None:
        """Rows past their end mean nothing; without this the table keeps one per chat ever taken over.
        Best effort: a database that cannot write still answers which pauses are running."""
        assert self._conn is not None
        conn = self._conn
        with contextlib.suppress(StoreUnavailable):
            await self.flush()
            await self._run(lambda: conn.execute("DELETE FROM bot_pauses WHERE until <= ?", (now,)))

    async def set_status(self, wa_message_id: str, status: MessageStatus, body: str | None = None) -> None:
        body = db_text(body) if body is not None else None
        await self._enqueue("status", (status.value, body, time.time(), db_text(wa_message_id)))

    async def flush(self) -> None:
        """Wait until everything queued so far is committed, the batch being written included (while the
        database cannot write: until the next retry, which raises if it fails again)."""
        if self._pending or self._writing:
            await self._enqueue("noop", (), wait_for_retry=True)

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                continue
            if self._failing_since is not None:
                # The database could not write: try again every RETRY_AFTER_S, not at every new write (a
                # busy bot on a full disk would spin, and log, hundreds of times a second).
                await asyncio.sleep(max(0.0, self._last_attempt + RETRY_AFTER_S - time.monotonic()))
            # Whatever queued up while the previous batch was being written is the next batch.
            batch, self._pending = self._pending, []
            done, self._batch_done = self._batch_done, None
            self._writing = True
            self._last_attempt = time.monotonic()
            try:
                refused = await self._run(self._write_batch, batch)
            except asyncio.CancelledError:
                self._pending = batch + self._pending  # counted as unwritten by close()
                _fail(done, StoreUnavailable("sqlite store closed"))
                raise
            except Exception as error:  # a failed batch fails its callers, never the loop
                dropped_before = self.dropped
                kept = self._keep_for_retry(batch)
                if self._failing_since is None or str(error) != self._last_failure:
                    logger.error(
                        "sqlite cannot write ({}): {} operations kept, retried every {:g} s",
                        error,
                        kept,
                        RETRY_AFTER_S,
                    )
                self._failing_since = self._failing_since or time.monotonic()
                self._last_failure = str(error)
                dropped_any = self.dropped != dropped_before
                _fail(done, (StoreUnavailable if dropped_any else StoreWriteKept)(str(error)))
                self._wakeup.set()  # the kept operations are tried again after the pause above
                continue
            finally:
                self._writing = False
            if self._failing_since is not None:
                logger.warning("sqlite writes again after {:.0f} s", time.monotonic() - self._failing_since)
                self._failing_since = None
            # A refused row is logged and counted; its batch resolves, since the rows around it are
            # written (the batch shares one future, so its callers cannot be told apart).
            for (op, params), refusal in refused:
                self.refused += 1
                logger.error(
                    "sqlite refused a {} write for message {}: {}",
                    op,
                    params[-1 if op == "status" else 0],
                    refusal,
                )
            if done is not None and not done.done():
                done.set_result(None)

    def _keep_for_retry(self, batch: list[tuple[str, tuple[Any, ...]]]) -> int:
        """Put a batch the database could not write back in front of the queue, in order (every operation is
        idempotent), keeping the newest MAX_KEPT_FOR_RETRY; returns how many are kept."""
        kept = [op for op in batch if op[0] != "noop"] + self._pending
        if len(kept) > MAX_KEPT_FOR_RETRY:
            self.dropped += len(kept) - MAX_KEPT_FOR_RETRY
            logger.error(
                "sqlite: {} unwritten operations dropped (kept the newest)", len(kept) - MAX_KEPT_FOR_RETRY
            )
            kept = kept[-MAX_KEPT_FOR_RETRY:]
        self._pending = kept
        return len(kept)

    def _write_batch(
        self, ops: list[tuple[str, tuple[Any, ...]]]
    ) -> list[tuple[tuple[str, tuple[Any, ...]], Exception]]:
        """Commit the batch in one transaction; returns the operations the database refused.

        When the database cannot write at all (full disk, locked, I/O error), that error is raised and
        the batch is retried later. When it refuses a row, the others are written one by one, so one bad
        row never costs the rest of its batch.
        """
        self._reopen_if_replaced()
        try:
            self._commit(ops)
            return []
        except sqlite3.OperationalError:
            raise
        except Exception:
            refused = []
            for op in ops:
                try:
                    self._commit([op])
                except sqlite3.OperationalError:
                    raise
                except Exception as error:
                    refused.append((op, error))
            return refused

    def _commit(self, ops: list[tuple[str, tuple[Any, ...]]]) -> None:
        assert self._conn is not None
        messages = [params for op, params in ops if op == "message"]
        statuses = [params for op, params in ops if op == "status"]
        last_seen: dict[str, float] = {}
        for m in messages:
            last_seen[m[1]] = max(m[6], last_seen.get(m[1], 0.0))
        conn = self._conn
        with transaction(conn):
            if messages:
                conn.executemany(_INSERT_MESSAGE, messages)
                conn.executemany(_UPSERT_CHAT, [(chat, ts, ts) for chat, ts in last_seen.items()])
            if statuses:
                conn.executemany(_SET_STATUS, statuses)
            for chat_id, until, ended in (params for op, params in ops if op == "pause"):  # in order
                if ended and chat_id in ("*", RESUME_ALL):
                    conn.execute("DELETE FROM bot_pauses")
                elif ended and chat_id == "!*":
                    conn.execute("DELETE FROM bot_pauses WHERE chat_id LIKE '!%'")
                elif ended:
                    conn.execute("DELETE FROM bot_pauses WHERE chat_id = ?", (chat_id,))
                else:
                    conn.execute(_UPSERT_PAUSE, (chat_id, until))
        self.commits += 1
        self.rows_written += len(messages) + len(statuses)

    # -- reads ---------------------------------------------------------------------------------

    async def _query(self, sql: str, params: tuple[Any, ...], *, flush: bool = True) -> list[tuple[Any, ...]]:
        if flush:
            await self.flush()  # read your own writes
        assert self._conn is not None
        conn = self._conn
        return await self._run(lambda: conn.execute(sql, params).fetchall())

    async def recent_messages(self, chat_id: str, limit: int) -> list[StoredMessage]:
        if limit <= 0:
            return []
        # While the database cannot write, what is kept for a retry is not waited for: the history reads
        # what is committed (the chat's newest turns are in memory anyway).
        if self._failing_since is None:
            with contextlib.suppress(StoreUnavailable):
                await self.flush()
        rows = await self._query(
            f"SELECT {_COLUMNS} FROM chat_history WHERE chat_id = ?"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            (chat_id, limit),
            flush=False,
        )
        return [message_from_row(row) for row in reversed(rows)]

    async def recent_message_ids(self, since: float, limit: int) -> list[str]:
        rows = await self._query(
            "SELECT wa_message_id FROM chat_history WHERE created_at >= ? ORDER BY created_at DESC LIMIT ?",
            (since, limit),
        )
        return [row[0] for row in rows]

    async def unanswered_inbound(self, since: float, limit: int | None = None) -> list[StoredMessage]:
        rows = await self._query(
            f"SELECT {_COLUMNS} FROM chat_history WHERE direction = 'in' AND status = 'received'"
            " AND created_at >= ? ORDER BY created_at, id LIMIT ?",
            (since, -1 if limit is None else limit),
        )
        return [message_from_row(row) for row in rows]

    async def mark_stale(self, before: float) -> int:
        """Mark inbound messages still unanswered and older than `before` as skipped; returns how many."""
        await self.flush()
        assert self._conn is not None
        conn = self._conn
        sql = (
            "UPDATE chat_history SET status = 'skipped', updated_at = ?"
            " WHERE direction = 'in' AND status = 'received' AND created_at < ?"
        )
        return await self._run(lambda: conn.execute(sql, (time.time(), before)).rowcount)

    async def flows(self) -> Sequence[Flow]:
        rows = await self._query(
            "SELECT keywords, answer, enabled FROM bot_flows WHERE enabled = 1 ORDER BY priority DESC, id",
            (),
        )
        return [Flow(tuple(json.loads(row[0])), row[1], bool(row[2])) for row in rows]

    async def number_lists(self) -> tuple[frozenset[str], frozenset[str]]:
        rows = await self._query("SELECT number, list FROM bot_contacts", ())
        return (
            frozenset(number for number, kind in rows if kind == "allow"),
            frozenset(number for number, kind in rows if kind == "block"),
        )

    def stats(self) -> dict[str, int]:
        return {
            "commits": self.commits,
            "rows_written": self.rows_written,
            "pending": len(self._pending),
            "dropped": self.dropped,
            "reopened": self.reopened,
            "refused": self.refused,
        }


def _fail(done: asyncio.Future[None] | None, error: Exception) -> None:
    if done is not None and not done.done():
        done.set_exception(error)
        done.exception()  # marked retrieved: a caller that did not wait is no error


def _message_params(m: StoredMessage) -> tuple[Any, ...]:
    return (
        db_text(m.wa_message_id),
        db_text(m.chat_id),
        m.direction.value,
        m.kind,
        db_text(m.body),
        m.status.value,
        m.created_at,
        m.created_at,
    )
