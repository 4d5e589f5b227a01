"""What must not be lost while WhatsApp is unreachable.

- `Outbox`: replies that could not be sent while disconnected wait in a small SQLite file (bounded, survives a
  restart) and go out in their original order after the reconnect. Delivery is at least once: a crash between
  a send and its delete sends that one message again after the restart.
- `ResendRequests`: when a message cannot be decrypted, whatsmeow already asks the sender's phone to retry,
  and most such messages arrive decrypted seconds later. Only after a grace period, and only if the message
  has not arrived meanwhile, the sender is asked once, politely, to send it again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from connection.supervisor import scrub
from connection.types import ChatId, MessageId, SendWithheld, TransportError

__all__ = ["Outbox", "OutboxFull", "Queued", "ResendRequests", "SendDeferred"]

_SCHEMA = """
create table if not exists outbox (
    seq integer primary key autoincrement,
    id text not null,
    chat text not null,
    body text not null,
    created_at real not null,
    tries integer not null default 0,
    reply text,
    file text
)
"""


class OutboxFull(TransportError):
    """Disconnected and the outbox is at its limit: this message cannot be kept."""


class SendDeferred(TransportError):
    """Raised by a flush's send function when the connection is gone: stop, keep the rest, count nothing."""


@dataclass(frozen=True, slots=True)
class Queued:
    seq: int
    id: MessageId
    chat: ChatId
    text: str
    created_at: float
    tries: int
    reply: MessageId | None = None  # the id of the reply this is a part of (its first part's), when grouped
    file: str | None = None  # a photo or document to send, `text` its caption


class Outbox:
    """A bounded FIFO of outgoing texts in SQLite.

    `max_age_s`: a reply older than this is dropped at flush time (an answer hours late confuses more than it
    helps). `max_tries`: a message that fails this many times while connected is dropped, so one bad message
    cannot block the ones behind it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_items: int = 500,
        max_age_s: float = 6 * 3600,
        max_tries: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_items = max_items
        self.max_age_s = max_age_s
        self.max_tries = max_tries
        self._clock = clock
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=normal")
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("pragma table_info(outbox)")}
        if "reply" not in columns:  # a file from before replies were grouped
            self._db.execute("alter table outbox add column reply text")
        if "file" not in columns:  # a file from before flows sent files
            self._db.execute("alter table outbox add column file text")
        self._count = int(self._db.execute("select count(*) from outbox").fetchone()[0])
        self._lock = asyncio.Lock()
        self._room = asyncio.Event()  # set whenever a queued text leaves
        self._waiting: deque[object] = deque()  # put_when_room callers, in arrival order
        # Told when a queued reply will never go out (the id send_text returned for it, or for its first
        # part when grouped): the bot has recorded it as sent, and must not remember, or tell its model, an
        # answer nobody got.
        # Told (reply id, chat, late) of every reply dropped; `late`: it waited past `max_age_s`.
        self.on_drop: Callable[[MessageId, ChatId, bool], None] | None = None
        self.sent = 0
        self.dropped = 0

    def __len__(self) -> int:
        return self._count

    def put(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
        """Queue a text (or a file with its caption); return a provisional id. Raises OutboxFull at the
        limit."""
        if len(self) >= self.max_items:
            raise OutboxFull(f"disconnected and the outbox is full ({self.max_items} messages waiting)")
        message_id = MessageId(f"outbox-{uuid.uuid4().hex[:20]}")
        self._db.execute(
            "insert into outbox (id, chat, body, created_at, file) values (?, ?, ?, ?, ?)",
            (message_id, chat, text, self._clock(), file),
        )
        self._count += 1
        logger.info("outbox: queued a reply for {} ({} waiting)", scrub(chat), len(self))
        return message_id

    def group(self, reply: MessageId, part_ids: list[MessageId]) -> None:
        """Note that these queued texts are the parts of one reply (the first part's id names it): a part
        dropped later, after a restart too, is reported as that reply, so all of it is marked failed."""
        self._db.executemany("update outbox set reply = ? where id = ?", [(reply, part) for part in part_ids])

    def pending(self, limit: int = 1000) -> list[Queued]:
        rows = self._db.execute(
            "select seq, id, chat, body, created_at, tries, reply, file from outbox order by seq limit ?",
            (limit,),
        ).fetchall()
        return [
            Queued(
                r[0], MessageId(r[1]), ChatId(r[2]), r[3], r[4], r[5], MessageId(r[6]) if r[6] else None, r[7]
            )
            for r in rows
        ]

    async def flush(self, send: Callable[[ChatId, str, str | None], Awaitable[Any]]) -> int:
        """Send what waits, oldest first; return how many went out.

        Stops at the first failure (order holds), except that a message failing `max_tries` times is dropped.
        `send` raises `SendDeferred` when the connection is gone: stop without counting a try.
        """
        count = 0
        async with self._lock:
            for item in self.pending():
                if self._clock() - item.created_at > self.max_age_s:
                    self._drop(item, "too old", late=True)
                    continue
                try:
                    await send(item.chat, item.text, item.file)
                except SendDeferred:
                    break
                except SendWithheld:  # the chat was handed to a human while this waited: never sent
                    self._drop(item, "withheld: a human has the chat")
                    continue
                except Exception as exc:
                    tries = item.tries + 1
                    if tries >= self.max_tries:
                        self._drop(item, f"failed {tries} times: {scrub(str(exc))}")
                        continue
                    self._db.execute("update outbox set tries = ? where seq = ?", (tries, item.seq))
                    logger.warning("outbox: send failed ({}); retrying later", scrub(str(exc)))
                    break
                self._delete(item)
                self.sent += 1
                count += 1
        if count:
            logger.info("outbox: sent {} queued message(s), {} still waiting", count, len(self))
        return count

    def _delete(self, item: Queued) -> None:
        self._db.execute("delete from outbox where seq = ?", (item.seq,))
        self._count -= 1
        self._room.set()

    async def put_when_room(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
        """Queue a text, waiting while the outbox is full: the caller (a chat's worker) holds its message
        until there is room, so a long disconnection makes answers wait, not fail. First come, first served:
        a caller arriving while others wait queues behind them, even if a slot is free. Cancel to give up."""
        if not self._waiting and len(self) < self.max_items:
            return self.put(chat, text, file)
        turn = object()
        self._waiting.append(turn)
        try:
            while self._waiting[0] is not turn or len(self) >= self.max_items:
                self._room.clear()
                await self._room.wait()
        finally:
            self._waiting.remove(turn)
            self._room.set()  # the next in line checks for a slot (or takes over a cancelled turn)
        return self.put(chat, text, file)

    def _drop(self, item: Queued, why: str, *, late: bool = False) -> None:
        self._delete(item)
        self.dropped += 1
        logger.warning("outbox: dropped a queued reply for {} ({})", scrub(item.chat), why)
        if self.on_drop is not None:
            try:
                self.on_drop(item.reply or item.id, item.chat, late)
            except Exception:
                logger.opt(exception=True).error("outbox: on_drop failed")

    def stats(self) -> dict[str, int]:
        return {"outbox_pending": len(self), "outbox_sent": self.sent, "outbox_dropped": self.dropped}

    def close(self) -> None:
        self._db.close()


class ResendRequests:
    """One polite "please send that again" per undecryptable message that never arrived decrypted.

    One task serves all pending requests (the grace period is the same for all, so insertion order is due
    order); at most one request per chat every `per_chat_every_s`; both maps are bounded.
    """

    def __init__(
        self,
        ask: Callable[[ChatId], Awaitable[None]],
        *,
        grace_s: float = 30.0,
        per_chat_every_s: float = 600.0,
        max_pending: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._ask = ask
        self.grace_s = grace_s
        self.per_chat_every_s = per_chat_every_s
        self.max_pending = max_pending
        self._clock = clock
        self._sleep = sleep
        self._pending: OrderedDict[str, tuple[ChatId, float]] = OrderedDict()
        self._asked_at: OrderedDict[ChatId, float] = OrderedDict()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.asked = 0
        self.recovered = 0

    def undecryptable(self, message_id: str, chat: ChatId) -> None:
        """A message could not be decrypted: ask after the grace period unless it arrives meanwhile."""
        if message_id in self._pending:
            return  # whatsmeow repeats the event when the retried message fails again
        if len(self._pending) >= self.max_pending:
            self._pending.popitem(last=False)
        self._pending[message_id] = (chat, self._clock() + self.grace_s)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._serve(), name="resend-requests")
            self._task.add_done_callback(_log_crash)

    def arrived(self, message_id: str) -> None:
        """The message arrived decrypted (whatsmeow's retry worked): no request needed."""
        if self._pending.pop(message_id, None) is not None:
            self.recovered += 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pending.clear()

    def stats(self) -> dict[str, int]:
        return {
            "undecryptable_pending": len(self._pending),
            "undecryptable_recovered": self.recovered,
            "resend_requests": self.asked,
        }

    async def _serve(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            message_id, (chat, due) = next(iter(self._pending.items()))
            wait = due - self._clock()
            if wait > 0:
                await self._sleep(wait)
                continue  # the head may have arrived meanwhile
            del self._pending[message_id]
            await self._request(chat)

    async def _request(self, chat: ChatId) -> None:
        now = self._clock()
        last = self._asked_at.get(chat)
        if last is not None and now - last < self.per_chat_every_s:
            return
        self._asked_at[chat] = now
        self._asked_at.move_to_end(chat)
        while len(self._asked_at) > self.max_pending:
            self._asked_at.popitem(last=False)
        try:
            await self._ask(chat)
        except Exception as exc:
            logger.warning("could not ask {} to resend: {}", scrub(chat), scrub(str(exc)))
            return
        self.asked += 1
        logger.info("asked {} to resend a message that could not be decrypted", scrub(chat))


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.opt(exception=task.exception()).error("resend requests task crashed")
