"""Local state of the Supabase store, in one SQLite file (WAL): a write journal and a mirror of recent rows.

The journal holds, in order (`seq`), every write Supabase has not confirmed yet. A write is durable once its
journal transaction commits, so the bot never waits on the network; a flusher `peek`s the oldest
operations, sends them and `ack`s (deletes) them once Supabase has them. Replaying an operation is harmless
(inserts ignore duplicates, status changes set a value), so a batch that failed half-way is simply sent again.

The mirror holds the last `depth` rows of up to `max_chats` chats in their latest state: every write is
applied to it in the transaction that journals it. It answers history reads for chats known complete
locally, and every read while Supabase cannot be reached.

The bound. The journal only grows while Supabase cannot be reached. From `max_rows` pending operations on,
the bot's own replies (outbound rows) are dropped from it: they stay in the mirror, so conversations go on,
but they never reach Supabase. Inbound messages and status changes are still journaled: losing an inbound
message loses what a customer said, and losing an "answered" marker can get a message answered twice after
a restart. From `hard_max_rows` on, even those are refused: the caller gets JournalFull, never a silent loss.
Drops and refusals are logged as warnings and counted in stats().

All methods are blocking and must run on one thread (the store runs them on a single-thread executor).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loguru import logger

from memory.store import (
    Direction,
    MessageStatus,
    StoredMessage,
    StoreUnavailable,
    connect_wal,
    message_from_row,
    transaction,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so seqs grow across restarts
    kind TEXT NOT NULL,
    wa_message_id TEXT,
    chat_id TEXT,  -- known for inserts; for status changes when the message is known locally
    created_at REAL,  -- inserts only
    payload TEXT NOT NULL,
    queued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_chat ON journal (chat_id);
CREATE INDEX IF NOT EXISTS journal_message ON journal (wa_message_id);
CREATE TABLE IF NOT EXISTS mirror (
    wa_message_id TEXT PRIMARY KEY,
    chat_id TEXT NOT NULL,
    direction TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS mirror_chat ON mirror (chat_id, created_at);
CREATE INDEX IF NOT EXISTS mirror_created ON mirror (created_at);
CREATE INDEX IF NOT EXISTS mirror_unanswered ON mirror (chat_id)
    WHERE direction = 'in' AND status = 'received';
CREATE TABLE IF NOT EXISTS mirror_chats (
    chat_id TEXT PRIMARY KEY,
    complete INTEGER NOT NULL DEFAULT 0,  -- the mirror holds the chat's latest rows (loaded from Supabase)
    touched_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS mirror_chats_touched ON mirror_chats (touched_at);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seen (wa_message_id TEXT PRIMARY KEY, created_at REAL NOT NULL);
"""

_COLUMNS = "wa_message_id, chat_id, direction, kind, body, status, created_at"
_ORDER = "ORDER BY created_at DESC, rowid DESC"


class JournalFull(StoreUnavailable):
    """The journal is at its hard bound: the write was refused (and the caller told so)."""


class OpKind(enum.StrEnum):
    MESSAGE = "message"  # insert a row, ignored if its wa_message_id exists
    STATUS = "status"  # set a row's status (and body when given)
    STALE = "stale"  # inbound rows still received and created before `before` become skipped


@dataclass(frozen=True, slots=True)
class Op:
    kind: OpKind
    wa_message_id: str = ""
    message: StoredMessage | None = None
    status: MessageStatus | None = None
    body: str | None = None
    before: float = 0.0
    queued_at: float = 0.0
    seq: int = 0  # given by the journal
    chat_id: str | None = None

    @staticmethod
    def insert(message: StoredMessage) -> Op:
        return Op(OpKind.MESSAGE, message.wa_message_id, message=message, chat_id=message.chat_id)

    @staticmethod
    def set_status(wa_message_id: str, status: MessageStatus, body: str | None = None) -> Op:
        return Op(OpKind.STATUS, wa_message_id, status=status, body=body)

    @staticmethod
    def stale(before: float) -> Op:
        return Op(OpKind.STALE, before=before)


class Outcome(enum.StrEnum):
    JOURNALED = "journaled"
    DROPPED = "dropped"  # applied locally, never sent (outbound row over max_rows)
    REFUSED = "refused"  # nothing written (hard bound)


def replay(rows: dict[str, StoredMessage], ops: Iterable[Op]) -> None:
    """Apply operations, in order, to rows keyed by wa_message_id (the same semantics as in Postgres)."""
    for op in ops:
        if op.kind is OpKind.MESSAGE:
            assert op.message is not None
            rows.setdefault(op.wa_message_id, op.message)
        elif op.kind is OpKind.STATUS:
            row = rows.get(op.wa_message_id)
            if row is not None and op.status is not None:
                rows[op.wa_message_id] = replace(
                    row, status=op.status, body=row.body if op.body is None else op.body
                )
        else:
            for key, row in rows.items():
                if _is_stale(row, op.before):
                    rows[key] = replace(row, status=MessageStatus.SKIPPED)


def _is_stale(row: StoredMessage, before: float) -> bool:
    return row.direction is Direction.IN and row.status is MessageStatus.RECEIVED and row.created_at < before


def _values(m: StoredMessage) -> tuple[Any, ...]:
    return (m.wa_message_id, m.chat_id, m.direction.value, m.kind, m.body, m.status.value, m.created_at)


def _encode(op: Op) -> str:
    if op.kind is OpKind.MESSAGE:
        assert op.message is not None
        return json.dumps(_values(op.message), ensure_ascii=False)
    if op.kind is OpKind.STATUS:
        assert op.status is not None
        return json.dumps([op.status.value, op.body], ensure_ascii=False)
    return json.dumps(op.before)


def _decode(
    seq: int, kind: str, wa_message_id: str | None, chat_id: str | None, payload: str, at: float
) -> Op:
    data = json.loads(payload)
    op_kind = OpKind(kind)
    if op_kind is OpKind.MESSAGE:
        message = message_from_row(data)
        return Op(op_kind, message.wa_message_id, message=message, seq=seq, queued_at=at, chat_id=chat_id)
    if op_kind is OpKind.STATUS:
        status = MessageStatus(data[0])
        return Op(
            op_kind, wa_message_id or "", status=status, body=data[1], seq=seq, queued_at=at, chat_id=chat_id
        )
    return Op(op_kind, before=float(data), seq=seq, queued_at=at)


class Journal:
    def __init__(
        self,
        path: Path,
        *,
        max_rows: int = 100_000,
        hard_max_rows: int | None = None,
        depth: int = 20,
        max_chats: int = 5000,
        max_seen: int = 20_000,
    ) -> None:
        self.path = path
        self.max_seen = max_seen  # ids of the latest messages written, kept past the mirror's trim
        self.max_rows = max_rows
        self.hard_max_rows = max(hard_max_rows or 2 * max_rows, max_rows)
        self.depth = depth
        self.max_chats = max_chats
        self.size = 0
        self.oldest_queued_at: float | None = None
        self.last_seq = 0
        self.dropped = 0
        self.refused = 0
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect_wal(self.path)
        conn.executescript(SCHEMA)
        self._conn = conn
        self.size = conn.execute("SELECT count(*) FROM journal").fetchone()[0]
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'journal'").fetchone()
        self.last_seq = row[0] if row else 0
        self._refresh_oldest()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("journal is not open")
        return self._conn

    def first_pending_seq(self) -> int | None:
        (seq,) = self.conn.execute("SELECT min(seq) FROM journal").fetchone()
        return int(seq) if seq is not None else None

    # -- the journal -------------------------------------------------------------------------------------

    def append(self, ops: Sequence[Op]) -> list[Outcome]:
        """Journal operations (and apply them to the mirror) in one transaction; one outcome per operation."""
        conn = self.conn
        now = time.time()
        outcomes: list[Outcome] = []
        touched: set[str] = set()
        size = self.size
        with transaction(conn, "BEGIN IMMEDIATE"):
            for op in ops:
                outcome = self._admit(op, size)
                outcomes.append(outcome)
                if outcome is Outcome.REFUSED:
                    continue
                if outcome is Outcome.JOURNALED:
                    chat_id = op.chat_id
                    if op.kind is OpKind.STATUS:
                        chat_id = self._chat_of(op.wa_message_id)
                    created_at = op.message.created_at if op.message is not None else None
                    cur = conn.execute(
                        "INSERT INTO journal (kind, wa_message_id, chat_id, created_at, payload, queued_at)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (op.kind.value, op.wa_message_id or None, chat_id, created_at, _encode(op), now),
                    )
                    self.last_seq = cur.lastrowid or self.last_seq
                    size += 1
                touched.update(self._apply_to_mirror(op, now))
            for chat_id in touched:
                self._trim_chat(chat_id)
            self._evict_chats()
            if touched:
                conn.execute(
                    "DELETE FROM seen WHERE rowid <= (SELECT max(rowid) FROM seen) - ?", (self.max_seen,)
                )
        if self.size == 0 and size > 0:
            self.oldest_queued_at = now
        self.size = size
        self._count(outcomes)
        return outcomes

    def _admit(self, op: Op, size: int) -> Outcome:
        if size >= self.hard_max_rows:
            return Outcome.REFUSED
        outbound = op.message is not None and op.message.direction is Direction.OUT
        if size >= self.max_rows and outbound:
            return Outcome.DROPPED
        return Outcome.JOURNALED

    def _count(self, outcomes: list[Outcome]) -> None:
        dropped = outcomes.count(Outcome.DROPPED)
        refused = outcomes.count(Outcome.REFUSED)
        # A warning on the first drop and then on every 1000th, so an outage does not flood the logs.
        if dropped and (self.dropped == 0 or (self.dropped + dropped) // 1000 > self.dropped // 1000):
            logger.warning(
                "supabase journal holds {} operations (max {}): outbound rows are kept locally only"
                " ({} so far)",
                self.size,
                self.max_rows,
                self.dropped + dropped,
            )
        if refused and (self.refused == 0 or (self.refused + refused) // 100 > self.refused // 100):
            logger.warning(
                "supabase journal full ({} operations, hard max {}): writes refused ({} so far)",
                self.size,
                self.hard_max_rows,
                self.refused + refused,
            )
        self.dropped += dropped
        self.refused += refused

    def peek(self, limit: int) -> list[Op]:
        """The oldest `limit` pending operations, in order."""
        rows = self.conn.execute(
            "SELECT seq, kind, wa_message_id, chat_id, payload, queued_at FROM journal ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [_decode(*row) for row in rows]

    def ack(self, upto_seq: int) -> None:
        """Forget every operation up to `upto_seq`: Supabase has them."""
        deleted = self.conn.execute("DELETE FROM journal WHERE seq <= ?", (upto_seq,)).rowcount
        self.size = max(self.size - deleted, 0)
        self._refresh_oldest()

    def pending(self, *, chat_id: str | None = None, since: float | None = None) -> list[Op]:
        """Pending operations that may change the rows a read returns, in order.

        For one chat: its operations, status changes whose chat is unknown, and stale marks. Since a time:
        inserts created since then and every status change and stale mark.
        """
        sql = "SELECT seq, kind, wa_message_id, chat_id, payload, queued_at FROM journal"
        params: tuple[Any, ...] = ()
        if chat_id is not None:
            sql += " WHERE chat_id = ? OR chat_id IS NULL"
            params = (chat_id,)
        elif since is not None:
            sql += " WHERE kind != 'message' OR created_at >= ?"
            params = (since,)
        rows = self.conn.execute(sql + " ORDER BY seq", params).fetchall()
        return [_decode(*row) for row in rows]

    def _refresh_oldest(self) -> None:
        row = self.conn.execute("SELECT queued_at FROM journal ORDER BY seq LIMIT 1").fetchone()
        self.oldest_queued_at = row[0] if row else None

    def _chat_of(self, wa_message_id: str) -> str | None:
        row = self.conn.execute(
            "SELECT chat_id FROM mirror WHERE wa_message_id = ?", (wa_message_id,)
        ).fetchone()
        if row is None:
            row = self.conn.execute(
                "SELECT chat_id FROM journal WHERE wa_message_id = ? AND kind = 'message' LIMIT 1",
                (wa_message_id,),
            ).fetchone()
        return row[0] if row else None

    # -- the mirror --------------------------------------------------------------------------------------

    def _apply_to_mirror(self, op: Op, now: float) -> list[str]:
        """Apply one operation to the mirror; returns the chats whose rows were added."""
        conn = self.conn
        if op.kind is OpKind.MESSAGE:
            assert op.message is not None
            conn.execute(
                f"INSERT OR IGNORE INTO mirror ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", _values(op.message)
            )
            conn.execute(
                "INSERT OR IGNORE INTO seen (wa_message_id, created_at) VALUES (?, ?)",
                (op.wa_message_id, op.message.created_at),
            )
            self._touch(op.message.chat_id, now)
            return [op.message.chat_id]
        if op.kind is OpKind.STATUS:
            assert op.status is not None
            conn.execute(
                "UPDATE mirror SET status = ?, body = coalesce(?, body) WHERE wa_message_id = ?",
                (op.status.value, op.body, op.wa_message_id),
            )
        else:
            self.mark_stale_locally(op.before)
        return []

    def mark_stale_locally(self, before: float) -> int:
        return self.conn.execute(
            "UPDATE mirror SET status = 'skipped'"
            " WHERE direction = 'in' AND status = 'received' AND created_at < ?",
            (before,),
        ).rowcount

    def _touch(self, chat_id: str, now: float, *, complete: bool = False) -> None:
        self.conn.execute(
            "INSERT INTO mirror_chats (chat_id, complete, touched_at) VALUES (?, ?, ?) ON CONFLICT (chat_id)"
            " DO UPDATE SET touched_at = excluded.touched_at, complete = max(complete, excluded.complete)",
            (chat_id, int(complete), now),
        )

    def _trim_chat(self, chat_id: str) -> None:
        """Keep a chat's latest `depth` rows, and its unanswered messages whatever their age: during an
        outage they are what recovery reads (a flood of rate-limited rows pushed them out, and a restart
        then left them unanswered)."""
        self.conn.execute(
            f"DELETE FROM mirror WHERE chat_id = ? AND NOT (direction = 'in' AND status = 'received')"
            f" AND rowid NOT IN (SELECT rowid FROM mirror WHERE chat_id = ? {_ORDER} LIMIT ?)",
            (chat_id, chat_id, self.depth),
        )

    def _evict_chats(self) -> None:
        conn = self.conn
        excess = conn.execute("SELECT count(*) FROM mirror_chats").fetchone()[0] - self.max_chats
        if excess > 0:  # the least recently touched chats go, but not one with unanswered messages
            old = conn.execute(
                "SELECT chat_id FROM mirror_chats c WHERE NOT EXISTS (SELECT 1 FROM mirror m"
                " WHERE m.chat_id = c.chat_id AND m.direction = 'in' AND m.status = 'received')"
                " ORDER BY touched_at LIMIT ?",
                (excess,),
            ).fetchall()
            conn.executemany("DELETE FROM mirror WHERE chat_id = ?", old)
            conn.executemany("DELETE FROM mirror_chats WHERE chat_id = ?", old)

    def chat_rows(self, chat_id: str) -> tuple[list[StoredMessage], bool]:
        """The mirror's rows of a chat (its latest, at most `depth`), oldest first, and whether they are
        known to be the chat's latest rows."""
        conn = self.conn
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM mirror WHERE chat_id = ? {_ORDER} LIMIT ?", (chat_id, self.depth)
        ).fetchall()
        flag = conn.execute("SELECT complete FROM mirror_chats WHERE chat_id = ?", (chat_id,)).fetchone()
        return [message_from_row(r) for r in reversed(rows)], bool(flag and flag[0])

    def view(
        self,
        remote: Sequence[StoredMessage] = (),
        earlier_ops: Sequence[Op] = (),
        *,
        chat_id: str | None = None,
        since: float | None = None,
        remember: bool = False,
    ) -> list[StoredMessage]:
        """Rows as they are with every local write applied, oldest first (ties keep Supabase's order).

        `remote` are Supabase's rows (none during an outage), read after `earlier_ops` were taken from the
        journal. Pending operations, those and the ones journaled since (an operation acked meanwhile may or
        may not be in `remote`; replaying it is harmless), are replayed on them; then the mirror's rows of
        the chat / since the time, always up to date, replace or join them. With `remember`, the result
        becomes the chat's mirror, complete: reads of up to `depth` rows are answered locally from then on.
        """
        ops = {op.seq: op for op in earlier_ops}
        ops.update((op.seq, op) for op in self.pending(chat_id=chat_id, since=since))
        rows = {r.wa_message_id: r for r in remote}
        replay(rows, [ops[seq] for seq in sorted(ops)])
        if chat_id is not None:
            local = self.chat_rows(chat_id)[0]
        else:
            sql = f"SELECT {_COLUMNS} FROM mirror WHERE created_at >= ? ORDER BY created_at, rowid"
            local = [message_from_row(r) for r in self.conn.execute(sql, (since or 0.0,)).fetchall()]
        for row in local:
            rows[row.wa_message_id] = row
        result = sorted(rows.values(), key=lambda r: r.created_at)
        if remember and chat_id is not None:
            self._remember(chat_id, result)
        return result

    def _remember(self, chat_id: str, rows: Sequence[StoredMessage]) -> None:
        conn = self.conn
        with transaction(conn, "BEGIN IMMEDIATE"):
            conn.executemany(
                f"INSERT OR IGNORE INTO mirror ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [_values(r) for r in rows[-self.depth :]],
            )
            self._touch(chat_id, time.time(), complete=True)
            self._trim_chat(chat_id)
            self._evict_chats()

    def local_ids(self, since: float) -> list[tuple[str, float]]:
        """Ids and times of messages created since `since` that are known locally (mirror, journal, and the
        latest `max_seen` written here: the mirror keeps a chat's latest rows only, and during an outage a
        redelivery after a restart of a message a flood pushed out of it was answered again)."""
        return self.conn.execute(
            "SELECT wa_message_id, created_at FROM mirror WHERE created_at >= ?"
            " UNION SELECT wa_message_id, created_at FROM journal WHERE kind = 'message' AND created_at >= ?"
            " UNION SELECT wa_message_id, created_at FROM seen WHERE created_at >= ?",
            (since, since, since),
        ).fetchall()

    def purge(self, before: float) -> int:
        conn = self.conn
        conn.execute("DELETE FROM seen WHERE created_at < ?", (before,))
        removed = conn.execute("DELETE FROM mirror WHERE created_at < ?", (before,)).rowcount
        # A chat with nothing left in the mirror, untouched since: its number goes with its messages.
        conn.execute(
            "DELETE FROM mirror_chats WHERE touched_at < ?"
            " AND NOT EXISTS (SELECT 1 FROM mirror m WHERE m.chat_id = mirror_chats.chat_id)",
            (before,),
        )
        return removed

    # -- small snapshots (flows) -------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: Any) -> None:
        self.conn.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value, ensure_ascii=False)),
        )

    def stats(self) -> dict[str, Any]:
        oldest = self.oldest_queued_at
        return {
            "journal_rows": self.size,
            "journal_max_rows": self.max_rows,
            "journal_hard_max_rows": self.hard_max_rows,
            "journal_oldest_s": round(time.time() - oldest, 3) if oldest is not None else 0.0,
            "journal_dropped": self.dropped,
            "journal_refused": self.refused,
        }
