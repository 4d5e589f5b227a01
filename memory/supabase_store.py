"""The Supabase store: the Store interface over the `supabase` package's async client (PostgREST).

Writes never wait on Supabase. Each one is committed to a local SQLite journal (memory/journal.py; group
commit, as in the SQLite store) and that commit is what the caller awaits. A background flusher sends the
journal to Supabase in batches of up to `batch_size` operations: one upsert of the new rows (ignoring
duplicates), one upsert of their chats, one PATCH per status value (`wa_message_id=in.(...)`), and acks the
batch once Supabase has it. If Supabase is down or slow, the batch is retried with exponential backoff (with
jitter) while the journal keeps taking writes.

Exactly once, in effect: every operation can be replayed. Inserts are keyed on wa_message_id with
ignore-duplicates, so a replay never overwrites a newer status (a merge upsert would); status changes set a
value. The journal is sent strictly in order and only acked after Supabase answered, so after a failure,
a timeout whose request did land, or a crash, the same prefix is sent again and the result is the same.
A batch that Supabase rejects for its data (SQLSTATE class 22 or 23) is sent one operation at a time and the
offending operations are logged and dropped (`poisoned`), so one bad row cannot block the journal.

Reads are layered: memory (the latest rows of recently read chats) -> local (the journal file's mirror of the
latest rows per chat, once a chat was read from Supabase) -> Supabase, with the pending journal replayed on
what Supabase returns (read your writes). When Supabase cannot be reached the store turns `degraded` and reads
are answered from what is local (mirror + journal) until the flusher reaches Supabase again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
from loguru import logger
from postgrest import APIError, CountMethod, ReturnMethod
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from memory.journal import Journal, JournalFull, Op, OpKind, Outcome, replay
from memory.store import (
    RESUME_ALL,
    Direction,
    Flow,
    MessageStatus,
    StoredMessage,
    StoreUnavailable,
    StoreWriteKept,
    apply_pause,
    db_text,
    queue_pause_change,
)

T = TypeVar("T")

JOURNAL_FILE = "supabase-journal.sqlite3"
PAGE = 1000  # Supabase's default max rows per response
JOURNAL_RETRY_S = 2.0  # while the journal file cannot be written (a full disk): how often to try again
MAX_KEPT_FOR_RETRY = 10_000  # operations kept in memory meanwhile; the oldest go first past this
_SELECT = "wa_message_id,chat_id,direction,kind,body,status,created_at"
_MAX_IN_CHARS = 3000  # ids per `in.(...)` filter, so the URL stays far below gateways' 8 KB line limits
_UNREACHABLE = (APIError, httpx.HTTPError)


# -- conversions -------------------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _encode_pauses(changes: dict[str, float | None]) -> list[list[Any]]:
    """Pause changes as JSON (no infinity there): [chat, "inf" | epoch seconds | null (resumed)]."""
    return [
        [chat, "inf" if until is not None and math.isinf(until) else until] for chat, until in changes.items()
    ]


def _decode_pauses(rows: list[list[Any]]) -> dict[str, float | None]:
    return {chat: math.inf if until == "inf" else until for chat, until in rows}


def _us(ts: float) -> float:
    """Round to microseconds, Postgres' precision, so a row reads back the same from every layer."""
    return round(ts * 1_000_000) / 1_000_000


def _normalize(m: StoredMessage) -> StoredMessage:
    return replace(
        m,
        wa_message_id=db_text(m.wa_message_id),
        chat_id=db_text(m.chat_id),
        kind=db_text(m.kind),
        body=db_text(m.body),
        created_at=_us(m.created_at),
    )


def _from_api(d: dict[str, Any]) -> StoredMessage:
    return StoredMessage(
        wa_message_id=d["wa_message_id"],
        chat_id=d["chat_id"],
        direction=Direction(d["direction"]),
        kind=d["kind"],
        body=d["body"],
        status=MessageStatus(d["status"]),
        created_at=_ts(d["created_at"]),
    )


def _to_api(m: StoredMessage) -> dict[str, Any]:
    at = _iso(m.created_at)
    return {
        "wa_message_id": m.wa_message_id,
        "chat_id": m.chat_id,
        "direction": m.direction.value,
        "kind": m.kind,
        "body": m.body,
        "status": m.status.value,
        "created_at": at,
        "updated_at": at,
    }


def _chunks(ids: Sequence[str]) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    size = 0
    for wa_id in ids:
        if chunks[-1] and size + len(wa_id) > _MAX_IN_CHARS:
            chunks.append([])
            size = 0
        chunks[-1].append(wa_id)
        size += len(wa_id) + 3
    return chunks


def _is_permanent(error: BaseException) -> bool:
    """Supabase refused the data itself (data exception, integrity violation): a retry cannot succeed."""
    code = getattr(error, "code", None) if isinstance(error, APIError) else None
    return bool(code) and str(code).startswith(("22", "23"))


# PostgREST and Postgres codes that mean the schema is not there: the migrations were not applied.
_SCHEMA_MISSING = {"42P01", "PGRST205", "42703", "PGRST204"}


def _describe(error: BaseException) -> str:
    """For logs and metrics: the error's type and code, never its message (it may quote a message body)."""
    code = getattr(error, "code", None)
    described = f"{type(error).__name__}({code})" if code else type(error).__name__
    if code in _SCHEMA_MISSING:
        described += ": a table or column is missing; apply supabase/migrations (supabase db push)"
    return described


# -- the memory layer --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    rows: list[StoredMessage]  # the chat's latest rows, oldest first, at most `depth`
    whole: bool  # they are all of the chat's rows


class _Memory:
    """The latest rows of recently read chats, in process, least recently used out."""

    def __init__(self, depth: int, max_chats: int) -> None:
        self.depth = depth
        self.max_chats = max_chats
        self._chats: OrderedDict[str, _Entry] = OrderedDict()
        self._chat_of: dict[str, str] = {}  # wa_message_id -> chat_id, for the rows held

    def get(self, chat_id: str, limit: int) -> list[StoredMessage] | None:
        entry = self._chats.get(chat_id)
        if entry is None or (limit > len(entry.rows) and not entry.whole):
            return None
        self._chats.move_to_end(chat_id)
        return entry.rows[-limit:]

    def put(self, chat_id: str, rows: Sequence[StoredMessage], *, whole: bool) -> None:
        if self.depth <= 0 or self.max_chats <= 0:
            return
        self._forget(chat_id)
        kept = list(rows[-self.depth :])
        self._chats[chat_id] = _Entry(kept, whole and len(kept) == len(rows))
        self._chat_of.update((m.wa_message_id, chat_id) for m in kept)
        while len(self._chats) > self.max_chats:
            self._forget(next(iter(self._chats)))

    def _forget(self, chat_id: str) -> None:
        entry = self._chats.pop(chat_id, None)
        for m in entry.rows if entry else ():
            self._chat_of.pop(m.wa_message_id, None)

    def on_insert(self, m: StoredMessage) -> None:
        entry = self._chats.get(m.chat_id)
        if entry is None or m.wa_message_id in self._chat_of:
            return  # the first write of an id wins, as in the databases
        at = len(entry.rows)
        while at > 0 and entry.rows[at - 1].created_at > m.created_at:
            at -= 1
        entry.rows.insert(at, m)
        self._chat_of[m.wa_message_id] = m.chat_id
        if len(entry.rows) > self.depth:
            self._chat_of.pop(entry.rows.pop(0).wa_message_id, None)
            entry.whole = False

    def on_status(self, wa_message_id: str, status: MessageStatus, body: str | None) -> None:
        entry = self._chats.get(self._chat_of.get(wa_message_id, ""))
        for i, m in enumerate(entry.rows if entry else ()):
            if m.wa_message_id == wa_message_id:
                entry.rows[i] = replace(m, status=status, body=m.body if body is None else body)  # type: ignore[union-attr]

    def on_stale(self, before: float) -> None:
        for entry in self._chats.values():
            entry.rows = [
                replace(m, status=MessageStatus.SKIPPED)
                if m.direction is Direction.IN
                and m.status is MessageStatus.RECEIVED
                and m.created_at < before
                else m
                for m in entry.rows
            ]

    def clear(self) -> None:
        self._chats.clear()
        self._chat_of.clear()


# -- the store ---------------------------------------------------------------------------------------------


class SupabaseStore:
    sends_unsent_pauses_later = True  # note_pause keeps them in the journal file (see pauses())

    def __init__(
        self,
        url: str,
        key: str,
        data_dir: Path,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        request_timeout_s: float = 5.0,
        max_backoff_s: float = 5.0,
        max_journal_rows: int = 100_000,
        hard_max_journal_rows: int | None = None,
        history_depth: int = 20,
        memory_chats: int = 256,
        mirror_chats: int = 5000,
        flows_ttl_s: float = 60.0,
        retention_days: float | None = 30.0,
        retention_interval_s: float = 6 * 3600.0,
        close_timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.key = key
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.request_timeout_s = request_timeout_s
        self.max_backoff_s = max_backoff_s
        self.depth = history_depth
        self.flows_ttl_s = flows_ttl_s
        self.retention_days = retention_days
        self.retention_interval_s = retention_interval_s
        self.close_timeout_s = close_timeout_s
        self.journal = Journal(
            data_dir / JOURNAL_FILE,
            max_rows=max_journal_rows,
            hard_max_rows=hard_max_journal_rows,
            depth=history_depth,
            max_chats=mirror_chats,
        )
        self._memory = _Memory(history_depth, memory_chats)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supabase-journal")
        self._client: AsyncClient | None = None
        self._queue: list[tuple[list[Op], asyncio.Future[None]]] = []
        self._appending: list[Op] = []  # the operations the journal file is taking now
        self._queued = asyncio.Event()
        self._retry_now = asyncio.Event()  # close() does not wait JOURNAL_RETRY_S for a disk with room again
        self._work = asyncio.Event()  # the flusher has something to do
        self._progress = asyncio.Event()  # replaced after each ack; flush() waits on it
        self._tasks: list[asyncio.Task[None]] = []
        self._last_seq = 0  # the last journaled operation
        self._acked_seq = 0  # every operation up to this one is in Supabase
        self._gen = 0  # bumped by every write: a read that raced one does not fill memory
        self._degraded = False
        self._journal_failing: str | None = None  # the journal file's last write error, while failing
        self.dropped = 0  # operations dropped while the journal file could not write (past the bound)
        self._pause_lock = asyncio.Lock()  # pause changes, their journal copies and reads, one at a time
        self._flows: list[Flow] | None = None
        self._flows_at = 0.0
        self.flush_batches = 0
        self.rows_flushed = 0
        self.flush_failures = 0
        self.read_failures = 0
        self.poisoned = 0
        self.purged = 0
        self.last_error: str | None = None
        self.hits = {"memory": 0, "local": 0, "supabase": 0, "fallback": 0}

    # -- lifecycle -------------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._local(self.journal.open)
        first = await self._local(self.journal.first_pending_seq)
        self._last_seq = self.journal.last_seq
        self._acked_seq = first - 1 if first is not None else self._last_seq
        http = httpx.AsyncClient(timeout=httpx.Timeout(self.request_timeout_s))
        options = AsyncClientOptions(httpx_client=http, postgrest_client_retry=False)
        self._client = await acreate_client(self.url, self.key, options=options)
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="supabase-journal-writer"),
            asyncio.create_task(self._flush_loop(), name="supabase-flusher"),
        ]
        if self.retention_days:
            self._tasks.append(asyncio.create_task(self._retention_loop(), name="supabase-retention"))
        if self.journal.size:
            logger.info("supabase journal: {} operations from the last run to send", self.journal.size)
            self._work.set()

    async def close(self) -> None:
        """Send what the journal holds (for up to close_timeout_s; the rest is sent on the next start)."""
        if not self._tasks:
            return
        # Every write made so far into the journal (quick). After a full disk, retried now: the disk may
        # have room again, and the last retry's verdict is up to JOURNAL_RETRY_S old (a reply dropped here
        # left its question unanswered in Supabase, and the next start answered it again).
        self._retry_now.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.close_timeout_s):
                await self._enqueue([])
        if self._journal_failing is not None:  # a full disk still: what it could not take is lost now
            unwritten = sum(len(ops) for ops, _ in self._queue)
            logger.error("supabase store closing with {} operations the journal could not take", unwritten)
        elif not await self.flush(self.close_timeout_s):
            logger.warning(
                "supabase store closing with {} operations in the journal; they are sent on the next start",
                self.journal.size,
            )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for _, future in self._queue:  # writes made while closing
            if not future.done():
                future.set_exception(StoreUnavailable("store closed"))
        if self._client is not None:
            await self._client.postgrest.aclose()  # closes our httpx client too
            self._client = None
        await self._local(self.journal.close)
        self._executor.shutdown(wait=True)

    async def _local(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a journal call on its thread."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        except StoreUnavailable:
            raise
        except Exception as error:
            raise StoreUnavailable(f"journal: {error}") from error

    @property
    def degraded(self) -> bool:
        return self._degraded

    # -- writes: into the journal (group commit) -------------------------------------------------------

    def _enqueue(self, ops: list[Op]) -> asyncio.Future[None]:
        """Queue operations for the journal; the future resolves once they are committed there. While the
        journal file cannot be written (a full disk), they are kept for its retry and the caller learns at
        once (StoreWriteKept), as with the SQLite store."""
        if not self._tasks:
            raise StoreUnavailable("supabase store is not open")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((ops, future))
        self._queued.set()
        if self._journal_failing is not None and ops:  # an empty list is flush() waiting: it waits on
            future.set_exception(StoreWriteKept(f"{self._journal_failing} (kept for a retry)"))
        return future

    def add_message(self, message: StoredMessage) -> asyncio.Future[None]:
        message = _normalize(message)
        self._gen += 1
        self._memory.on_insert(message)
        return self._enqueue([Op.insert(message)])

    async def add_reply(
        self, reply: StoredMessage, answered_id: str, also_answered: Sequence[str] = ()
    ) -> None:
        # One journal transaction: all or nothing, and Supabase gets them in this order.
        reply = _normalize(reply)
        answered = [db_text(message_id) for message_id in (*also_answered, answered_id)]
        self._gen += 1
        self._memory.on_insert(reply)
        for message_id in answered:
            self._memory.on_status(message_id, MessageStatus.ANSWERED, None)
        await self._enqueue(
            [
                Op.insert(reply),
                *(Op.set_status(message_id, MessageStatus.ANSWERED) for message_id in answered),
            ]
        )

    async def set_status(self, wa_message_id: str, status: MessageStatus, body: str | None = None) -> None:
        wa_message_id = db_text(wa_message_id)
        body = db_text(body) if body is not None else None
        self._gen += 1
        self._memory.on_status(wa_message_id, status, body)
        await self._enqueue([Op.set_status(wa_message_id, status, body)])

    async def _write_loop(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            if not self._queue:
                continue
            if self._journal_failing is not None:  # retried every JOURNAL_RETRY_S, not at every write
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(JOURNAL_RETRY_S):
                        await self._retry_now.wait()
                self._retry_now.clear()
            batch, self._queue = self._queue, []
            ops = self._appending = [op for caller_ops, _ in batch for op in caller_ops]
            try:
                outcomes = await self._local(self.journal.append, ops) if ops else []
            except Exception as error:  # a failed commit is kept for a retry; it never ends the loop
                self._keep_for_retry(batch, error)
                continue
            finally:
                self._appending = []
            if self._journal_failing is not None:
                logger.warning("supabase journal writes again")
                self._journal_failing = None
            self._last_seq = self.journal.last_seq
            if Outcome.JOURNALED in outcomes:
                self._work.set()
            if Outcome.REFUSED in outcomes:  # memory already shows those writes: forget it
                self._gen += 1
                self._memory.clear()
            start = 0
            for caller_ops, future in batch:
                mine = outcomes[start : start + len(caller_ops)]
                start += len(caller_ops)
                if future.done():
                    continue
                if Outcome.REFUSED in mine:
                    future.set_exception(JournalFull(f"journal full ({self.journal.size} operations)"))
                else:
                    future.set_result(None)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write made so far is in Supabase; False if `timeout` seconds passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._enqueue([])  # passes the journal commit of everything queued before it
                target = self._last_seq
                while self._acked_seq < target:
                    progress = self._progress
                    self._work.set()
                    await progress.wait()
        except TimeoutError:
            return False
        return True

    # -- the flusher: journal -> Supabase --------------------------------------------------------------

    async def _flush_loop(self) -> None:
        backoff = 0.0
        while True:
            if backoff:
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            else:
                await self._work.wait()
                await asyncio.sleep(self.flush_interval_s)  # let a batch gather
            self._work.clear()
            try:
                await self._drain()
                if self._degraded:
                    await self._probe()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.flush_failures += 1
                self._set_degraded(error)
                if not isinstance(error, _UNREACHABLE):
                    logger.exception("supabase flush failed unexpectedly")
                backoff = min(max(backoff * 2, 0.5), self.max_backoff_s)
                self._pulse()
                continue
            backoff = 0.0
            self._set_ok()

    def _peek(self) -> tuple[list[Op], int]:
        return self.journal.peek(self.batch_size), self.journal.last_seq

    async def _drain(self) -> None:
        """Send the journal, batch by batch, until it is empty."""
        while True:
            ops, last_seq = await self._local(self._peek)
            if not ops:
                self._acked_seq = max(self._acked_seq, last_seq)
                self._pulse()
                return
            # A stale mark applies to every row before it: it ends its batch, so nothing after it
            # reaches Supabase before it does.
            for i, op in enumerate(ops):
                if op.kind is OpKind.STALE:
                    ops = ops[: i + 1]
                    break
            try:
                await self._send(ops)
            except APIError as error:
                if not _is_permanent(error):
                    raise
                await self._send_each(ops)
            await self._local(self.journal.ack, ops[-1].seq)
            self._acked_seq = ops[-1].seq
            self.flush_batches += 1
            self.rows_flushed += len(ops)
            self._set_ok()
            self._pulse()

    async def _send_each(self, ops: Sequence[Op]) -> None:
        """Send a batch Supabase refused one operation at a time, dropping those it refuses."""
        for op in ops:
            try:
                await self._send([op])
            except APIError as error:
                if not _is_permanent(error):
                    raise
                self.poisoned += 1
                logger.error(
                    "supabase refused {} of message {}: {}; dropped from the journal",
                    op.kind.value,
                    op.wa_message_id,
                    _describe(error),
                )

    async def _send(self, ops: Sequence[Op]) -> None:
        """Apply operations to Supabase; replaying them is harmless."""
        inserts: dict[str, StoredMessage] = {}
        statuses: dict[str, tuple[MessageStatus, str | None]] = {}  # the last status, the last body
        stale_before: float | None = None
        for op in ops:
            if op.kind is OpKind.MESSAGE and op.message is not None:
                inserts.setdefault(op.wa_message_id, op.message)
            elif op.kind is OpKind.STATUS and op.status is not None:
                body = op.body if op.body is not None else statuses.get(op.wa_message_id, (None, None))[1]
                statuses[op.wa_message_id] = (op.status, body)
            elif op.kind is OpKind.STALE:
                stale_before = op.before
        if inserts:
            await (
                self._table("chat_history")
                .upsert(
                    [_to_api(m) for m in inserts.values()],
                    on_conflict="wa_message_id",
                    ignore_duplicates=True,
                    returning=ReturnMethod.minimal,
                )
                .execute()
            )
            last: dict[str, float] = {}
            for m in inserts.values():
                last[m.chat_id] = max(m.created_at, last.get(m.chat_id, 0.0))
            # first_seen_at takes Postgres' default (now()) for a new chat.
            await (
                self._table("chats")
                .upsert(
                    [{"chat_id": chat, "last_message_at": _iso(at)} for chat, at in last.items()],
                    on_conflict="chat_id",
                    returning=ReturnMethod.minimal,
                )
                .execute()
            )
        by_status: dict[MessageStatus, list[str]] = {}
        for wa_id, (status, body) in statuses.items():
            if body is None:
                by_status.setdefault(status, []).append(wa_id)
            else:  # a transcript: rare, one request each
                await (
                    self._table("chat_history")
                    .update({"status": status.value, "body": body}, returning=ReturnMethod.minimal)
                    .eq("wa_message_id", wa_id)
                    .execute()
                )
        for status, ids in by_status.items():
            for chunk in _chunks(ids):
                await (
                    self._table("chat_history")
                    .update({"status": status.value}, returning=ReturnMethod.minimal)
                    .in_("wa_message_id", chunk)
                    .execute()
                )
        if stale_before is not None:
            await self._stale_remote(stale_before)

    async def _probe(self) -> None:
        await self._table("chats").select("chat_id").limit(1).execute()

    def _table(self, name: str) -> Any:
        if self._client is None:
            raise StoreUnavailable("supabase store is not open")
        return self._client.table(name)

    def _pulse(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _keep_for_retry(self, batch: list[tuple[list[Op], asyncio.Future[None]]], error: Exception) -> None:
        """Put a batch the journal file could not take back in front of the queue (its operations are
        idempotent), keeping the newest MAX_KEPT_FOR_RETRY; its callers learn now (StoreWriteKept)."""
        if self._journal_failing != str(error):  # one ERROR per outage, not per retry
            logger.error("supabase journal cannot write ({}): operations kept, retried", error)
        self._journal_failing = str(error)
        kept = [entry for entry in batch + self._queue if entry[0] or not entry[1].done()]
        total = sum(len(ops) for ops, _ in kept)
        first = 0
        while total > MAX_KEPT_FOR_RETRY and first < len(kept) - 1:
            ops, future = kept[first]
            first += 1
            total -= len(ops)
            if not future.done():
                future.set_exception(StoreUnavailable(f"journal: {error} (dropped)"))
        if first:
            dropped = sum(len(ops) for ops, _ in kept[:first])
            self.dropped += dropped
            self._gen += 1
            self._memory.clear()  # it shows writes that will never be made
            logger.error("supabase journal: {} unwritten operations dropped (kept the newest)", dropped)
        self._queue = kept[first:]
        for ops, future in batch:
            if ops and not future.done():  # flush() (no operations) waits for the retry instead
                future.set_exception(StoreWriteKept(f"journal: {error} (kept for a retry)"))
        self._queued.set()

    def _set_degraded(self, error: BaseException) -> None:
        self.last_error = _describe(error)
        if not self._degraded:
            self._degraded = True
            logger.warning(
                "supabase unreachable ({}): writes wait in the local journal, reads use local data",
                self.last_error,
            )

    def _set_ok(self) -> None:
        if self._degraded:
            self._degraded = False
            logger.info("supabase reachable again; {} operations in the journal", self.journal.size)
            # Pause changes an earlier run could not send (this run's own are retried by their writer).
            self._tasks = [task for task in self._tasks if not task.done()]
            self._tasks.append(asyncio.create_task(self._send_unsent_when_back(), name="supabase-pauses"))

    async def _send_unsent_when_back(self) -> None:
        async with self._pause_lock:
            await self._send_unsent_pauses()

    # -- reads: memory -> local -> Supabase ------------------------------------------------------------

    async def _fetch(self, run: Callable[[], Awaitable[T]]) -> T | None:
        """A read from Supabase, or None when it cannot be reached (the store then turns degraded and
        the next reads are local until the flusher reaches Supabase again)."""
        if self._degraded:
            return None
        try:
            result = await run()
        except _UNREACHABLE as error:
            self.read_failures += 1
            if getattr(error, "code", None) in _SCHEMA_MISSING:  # Supabase answers: a migration is missing
                logger.error("supabase: {}", _describe(error))
                return None
            self._set_degraded(error)
            self._work.set()  # the flusher probes until Supabase answers
            return None
        self.hits["supabase"] += 1
        return result

    async def _paged(self, build: Callable[[], Any], limit: int | None = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while limit is None or len(rows) < limit:
            want = PAGE if limit is None else min(PAGE, limit - len(rows))
            page = (await build().range(len(rows), len(rows) + want - 1).execute()).data
            rows.extend(page)
            if len(page) < want:
                break
        return rows

    async def recent_messages(self, chat_id: str, limit: int) -> list[StoredMessage]:
        if limit <= 0:
            return []
        cached = self._memory.get(chat_id, limit)
        if cached is not None:
            self.hits["memory"] += 1
            return cached
        gen = self._gen
        rows, complete = await self._local(self.journal.chat_rows, chat_id)
        if complete and (limit <= len(rows) or len(rows) < self.depth):
            self.hits["local"] += 1
            if gen == self._gen:
                self._memory.put(chat_id, rows, whole=len(rows) < self.depth)
            return rows[-limit:]
        wanted = max(limit, self.depth)
        ops = await self._local(self.journal.pending, chat_id=chat_id)

        async def select() -> list[StoredMessage]:
            def build() -> Any:
                return (
                    self._table("chat_history")
                    .select(_SELECT)
                    .eq("chat_id", chat_id)
                    .order("created_at", desc=True)
                    .order("id", desc=True)
                )

            return [_from_api(d) for d in reversed(await self._paged(build, wanted))]

        remote = await self._fetch(select)
        if remote is None:
            self.hits["fallback"] += 1
            return (await self._local(self.journal.view, chat_id=chat_id))[-limit:]
        rows = await self._local(self.journal.view, remote, ops, chat_id=chat_id, remember=True)
        if gen == self._gen:
            self._memory.put(chat_id, rows, whole=len(remote) < wanted)
        return rows[-limit:]

    async def recent_message_ids(self, since: float, limit: int) -> list[str]:
        if limit <= 0:
            return []

        async def select() -> list[tuple[str, float]]:
            def build() -> Any:
                return (
                    self._table("chat_history")
                    .select("wa_message_id,created_at")
                    .gte("created_at", _iso(since))
                    .order("created_at", desc=True)
                    .order("id", desc=True)
                )

            return [(d["wa_message_id"], _ts(d["created_at"])) for d in await self._paged(build, limit)]

        remote = await self._fetch(select)
        if remote is None:
            self.hits["fallback"] += 1
        times = dict(remote or [])
        for wa_id, at in await self._local(self.journal.local_ids, since):
            times.setdefault(wa_id, at)
        return sorted(times, key=times.__getitem__, reverse=True)[:limit]

    async def unanswered_inbound(self, since: float, limit: int | None = None) -> list[StoredMessage]:
        since = _us(since)  # rows are stored at microseconds: a row created at exactly `since` must match
        ops = await self._local(self.journal.pending, since=since)
        if limit is None:  # recovery at start: what is known, Supabase's rows included when reachable
            rows, _ = await self._unanswered(since, ops, None)
            return rows
        want = limit
        while True:
            rows, remote_count = await self._unanswered(since, ops, want)
            if remote_count is None:
                # The local mirror keeps only recent rows per chat: "fewer than limit" would be a guess.
                raise StoreUnavailable("Supabase unreachable: cannot page the unanswered messages now")
            # Pending local writes may answer some of the remote rows: ask for more until `limit` is
            # filled or Supabase has no more.
            if len(rows) >= limit or remote_count < want:
                return rows[:limit]
            want *= 2

    async def _unanswered(
        self, since: float, ops: Any, limit: int | None
    ) -> tuple[list[StoredMessage], int | None]:
        async def select() -> list[StoredMessage]:
            def build() -> Any:
                return (
                    self._table("chat_history")
                    .select(_SELECT)
                    .eq("direction", Direction.IN.value)
                    .eq("status", MessageStatus.RECEIVED.value)
                    .gte("created_at", _iso(since))
                    .order("created_at")
                    .order("id")
                )

            return [_from_api(d) for d in await self._paged(build, limit)]

        remote = await self._fetch(select)
        if remote is None:
            self.hits["fallback"] += 1
        # Read your own writes: those not in the journal yet (queued, or kept in memory while its disk is
        # full) are newer than everything in it, applied last. Taken in the same step as the journal's read
        # is queued on its thread (after any append under way, included here too): none falls in between.
        unjournaled = self._appending + [op for queued, _ in self._queue for op in queued]
        rows = await self._local(self.journal.view, remote or [], ops, since=since)
        if unjournaled:
            by_id = {m.wa_message_id: m for m in rows}
            replay(by_id, unjournaled)
            rows = sorted(by_id.values(), key=lambda r: r.created_at)
        unanswered = [
            m
            for m in rows
            if m.direction is Direction.IN and m.status is MessageStatus.RECEIVED and m.created_at >= since
        ]
        if remote and limit is not None and len(remote) >= limit:
            # Supabase has more rows after the last one fetched, maybe at the same second: a row from
            # elsewhere (the journal, the mirror) comes only if it is strictly older than that last one.
            cutoff = max(m.created_at for m in remote)
            fetched = {m.wa_message_id for m in remote}
            unanswered = [m for m in unanswered if m.wa_message_id in fetched or m.created_at < cutoff]
        return unanswered, None if remote is None else len(remote)

    async def mark_stale(self, before: float) -> int:
        """Mark inbound messages still RECEIVED and created before `before` SKIPPED; returns how many.

        With Supabase reachable: once the journal is sent, one PATCH, and its exact count. Otherwise the
        mark is journaled like any write and the count is of the rows known locally.
        """
        before = _us(before)
        self._gen += 1
        self._memory.on_stale(before)
        if not self._degraded and await self.flush(self.request_timeout_s):
            count = await self._fetch(lambda: self._stale_remote(before))
            if count is not None:
                await self._local(self.journal.mark_stale_locally, before)
                return count
        rows = await self._local(self.journal.view, since=0.0)
        count = sum(
            1
            for m in rows
            if m.direction is Direction.IN and m.status is MessageStatus.RECEIVED and m.created_at < before
        )
        await self._enqueue([Op.stale(before)])
        return count

    async def _stale_remote(self, before: float) -> int:
        response = await (
            self._table("chat_history")
            .update(
                {"status": MessageStatus.SKIPPED.value},
                count=CountMethod.exact,
                returning=ReturnMethod.minimal,
            )
            .eq("direction", Direction.IN.value)
            .eq("status", MessageStatus.RECEIVED.value)
            .lt("created_at", _iso(before))
            .execute()
        )
        return response.count or 0

    async def number_lists(self) -> tuple[frozenset[str], frozenset[str]]:
        """(allowed, blocked) from bot_contacts; raises StoreUnavailable when Supabase cannot answer
        (the caller keeps the lists it had)."""

        async def select() -> list[dict[str, Any]]:
            response = await self._table("bot_contacts").select("number,list").execute()
            return cast(list[dict[str, Any]], response.data)

        data = await self._fetch(select)
        if data is not None:
            await self._local(self.journal.put, "contacts", data)
        else:  # the last lists read, kept in the journal file: a restart in an outage must not lose them
            data = await self._local(self.journal.get, "contacts")
            if data is None:
                raise StoreUnavailable("supabase unreachable: number lists not refreshed")
            self.hits["fallback"] += 1
        return (
            frozenset(row["number"] for row in data if row["list"] == "allow"),
            frozenset(row["number"] for row in data if row["list"] == "block"),
        )

    async def set_pause(self, chat_id: str, until: float | None) -> None:
        """Write one change to Supabase (the caller kept it first with `note_pause`); StoreUnavailable
        when Supabase cannot be reached, and the caller retries."""
        async with self._pause_lock:
            await self._send_pause(chat_id, until)
            await self._forget_unsent_pause(chat_id, until)

    async def _send_pause(self, chat_id: str, until: float | None) -> None:
        table = "bot_pauses"
        try:
            if until is None and chat_id in ("*", RESUME_ALL):
                await self._table(table).delete().neq("chat_id", "").execute()
            elif until is None and chat_id == "!*":
                await self._table(table).delete().like("chat_id", "!%").execute()
            elif until is None:
                await self._table(table).delete().eq("chat_id", chat_id).execute()
            else:
                row = {"chat_id": chat_id, "until": None if math.isinf(until) else _iso(until)}
                await self._table(table).upsert(row, on_conflict="chat_id").execute()
        except _UNREACHABLE as error:
            raise StoreUnavailable(f"supabase: pause not saved ({_describe(error)})") from error

    async def note_pause(self, chat_id: str, until: float | None) -> None:
        """Keep a change in the journal file: applied to the copy a restart during an outage reads, and
        queued as not sent yet, so a restart after the outage sends it before it reads Supabase's rows."""
        async with self._pause_lock:
            local = await self._local(self.journal.get, "pauses") or {}
            local = {chat: end for chat, end in local.items() if end is None or end > time.time()}
            if until is None:
                apply_pause(local, chat_id, None)
            else:  # the copy is JSON: None stands for "until resumed"
                local[chat_id] = None if math.isinf(until) else until
            unsent = await self._unsent_pauses()
            queue_pause_change(unsent, chat_id, until)
            await self._local(self.journal.put, "pauses", local)
            await self._local(self.journal.put, "pauses_unsent", _encode_pauses(unsent))

    async def _unsent_pauses(self) -> dict[str, float | None]:
        return _decode_pauses(await self._local(self.journal.get, "pauses_unsent") or [])

    async def _forget_unsent_pause(self, chat_id: str, until: float | None) -> None:
        unsent = await self._unsent_pauses()
        if chat_id in unsent and unsent[chat_id] == until:
            del unsent[chat_id]
            with contextlib.suppress(Exception):  # sent twice at worst: the same change again
                await self._local(self.journal.put, "pauses_unsent", _encode_pauses(unsent))

    async def _send_unsent_pauses(self) -> bool:
        """Send the changes a stop during an outage left in the journal file; False if Supabase is
        still away (they stay queued)."""
        unsent = await self._unsent_pauses()
        for chat_id, until in unsent.items():
            try:
                await self._send_pause(chat_id, until)
            except StoreUnavailable as error:
                cause = error.__cause__ or error
                logger.warning("supabase: {} pause change(s) made during an outage not sent yet", len(unsent))
                if getattr(cause, "code", None) not in _SCHEMA_MISSING:  # a missing migration: no outage
                    self._set_degraded(cause)
                    self._work.set()  # the flusher probes until Supabase answers
                return False
            await self._forget_unsent_pause(chat_id, until)
        return True

    async def pauses(self, now: float) -> dict[str, float]:
        async with self._pause_lock:
            sent = not self._degraded and await self._send_unsent_pauses()
            if sent:  # rows past their end mean nothing: forget them (best effort)
                with contextlib.suppress(*_UNREACHABLE):
                    await self._table("bot_pauses").delete().lt("until", _iso(now)).execute()

            async def select() -> list[dict[str, Any]]:
                query = (
                    self._table("bot_pauses")
                    .select("chat_id,until")
                    .or_(f"until.is.null,until.gt.{_iso(now)}")
                )
                return cast(list[dict[str, Any]], (await query.execute()).data)

            data = await self._fetch(select) if sent else None
            if data is None:  # during an outage, what this instance last knew (kept in the journal file)
                local = await self._local(self.journal.get, "pauses") or {}
                self.hits["fallback"] += 1
                return {
                    chat: math.inf if end is None else end
                    for chat, end in local.items()
                    if end is None or end > now
                }
            pauses = {row["chat_id"]: math.inf if row["until"] is None else _ts(row["until"]) for row in data}
            local = {chat: None if math.isinf(end) else end for chat, end in pauses.items()}
            try:  # best effort: a local disk that cannot write must not hide what Supabase says
                await self._local(self.journal.put, "pauses", local)
            except Exception as error:
                logger.warning("supabase: pauses not copied to the journal file: {}", error)
            return pauses

    async def flows(self) -> Sequence[Flow]:
        """Enabled bot_flows by priority, refreshed from Supabase every flows_ttl_s seconds; during an
        outage the last ones read (kept in the journal file, so they survive a restart)."""
        now = time.monotonic()
        if self._flows is not None and now - self._flows_at < self.flows_ttl_s:
            self.hits["memory"] += 1
            return self._flows

        async def select() -> list[dict[str, Any]]:
            response = await (
                self._table("bot_flows")
                .select("keywords,answer,enabled")
                .eq("enabled", True)
                .order("priority", desc=True)
                .order("id")
                .execute()
            )
            return cast(list[dict[str, Any]], response.data)

        data = await self._fetch(select)
        if data is not None:
            flows = [Flow(tuple(d["keywords"]), d["answer"], bool(d["enabled"])) for d in data]
            if flows != self._flows:
                await self._local(self.journal.put, "flows", data)
            self._flows, self._flows_at = flows, now
            return flows
        self.hits["fallback"] += 1
        if self._flows is None:
            saved = await self._local(self.journal.get, "flows") or []
            self._flows = [Flow(tuple(d["keywords"]), d["answer"], bool(d["enabled"])) for d in saved]
        return self._flows

    # -- retention -------------------------------------------------------------------------------------

    async def purge_older_than(self, days: float) -> int:
        """Delete chat_history rows created more than `days` days ago, and the chats rows (a customer's
        number with first and last contact) whose last message is that old (Supabase and local); returns how
        many messages Supabase deleted. Raises StoreUnavailable when Supabase cannot be reached."""
        cutoff = time.time() - days * 86400

        async def delete() -> int:
            response = await (
                self._table("chat_history")
                .delete(count=CountMethod.exact, returning=ReturnMethod.minimal)
                .lt("created_at", _iso(cutoff))
                .execute()
            )
            before = _iso(cutoff)
            await (
                self._table("chats")
                .delete(returning=ReturnMethod.minimal)
                .or_(f"last_message_at.lt.{before},and(last_message_at.is.null,first_seen_at.lt.{before})")
                .execute()
            )
            return response.count or 0

        self._gen += 1
        self._memory.clear()
        await self._local(self.journal.purge, cutoff)
        count = await self._fetch(delete)
        if count is None:
            raise StoreUnavailable(f"supabase unreachable ({self.last_error})")
        self.purged += count
        return count

    async def _retention_loop(self) -> None:
        assert self.retention_days
        await asyncio.sleep(min(60.0, self.retention_interval_s))
        while True:
            try:
                count = await self.purge_older_than(self.retention_days)
                if count:
                    logger.info(
                        "retention: {} messages older than {} days deleted", count, self.retention_days
                    )
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("retention run skipped: {}", _describe(error))
            await asyncio.sleep(self.retention_interval_s)

    # -- metrics ---------------------------------------------------------------------------------------

    @property
    def writes_failing(self) -> bool:
        # Messages left in the store can only be read back page by page from Supabase: not during an
        # outage, not once the journal refuses rows, and not while the journal's disk is full (a write is
        # then only kept in memory for the retry, and may be dropped or lost at a stop).
        return (
            self._degraded
            or self._journal_failing is not None
            or self.journal.size >= self.journal.hard_max_rows
        )

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "supabase",
            "state": "degraded" if self._degraded else "ok",
            **self.journal.stats(),
            "flush_batches": self.flush_batches,
            "rows_flushed": self.rows_flushed,
            "flush_failures": self.flush_failures,
            "read_failures": self.read_failures,
            "poisoned": self.poisoned,
            "purged": self.purged,
            "last_error": self.last_error,
            **{f"{layer}_hits": count for layer, count in self.hits.items()},
        }
