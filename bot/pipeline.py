"""The message pipeline: cheap filters at intake, then one ordered worker per chat.

`submit` runs synchronously in the transport's callback: it counts, de-duplicates
and filters, then queues the message on its chat. Each chat with queued messages
has one worker task, so a chat's messages are answered in order while chats run
concurrently; the worker ends (and its state is dropped) when the queue is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

from loguru import logger

from bot.ai import percentile
from bot.attachments import (
    NO_REPLY,
    PHOTO_KINDS,
    Attached,
    DocumentReader,
    MediaReader,
    PhotoPreparer,
    VideoWatcher,
    VoiceTranscriber,
)
from bot.counters import MessageCounters
from bot.handoff import HandoffPhrases, customer_label, quote_for_owner
from bot.limits import OncePerWindow, SlidingWindowLimiter
from bot.replies import Language, duration, pause_length, reply
from bot.responder import Answer, PhotoRefused, Responder, Source, split_message
from bot.takeover import Takeover, parse_command
from bot.text import clean_text, joined
from connection.background import BackgroundTasks
from connection.types import (
    ChatId,
    Inbound,
    MediaRef,
    MessageId,
    MessageKind,
    SendWithheld,
    Transport,
    TransportError,
)
from memory.history import ChatHistory
from memory.store import (
    BUSY_KIND,
    ORDER_KIND,
    ORDER_MARK,
    Direction,
    MessageStatus,
    Store,
    StoredMessage,
    StoreUnavailable,
    StoreWriteKept,
    db_text,
)

GroupPolicy = Literal["never", "mentioned", "always"]
# WhatsApp messages one answer may take (15,000 characters with the default MAX_REPLY_CHARS).
MAX_REPLY_PARTS = 10
# The longest caption a flow's answer goes in under its file; a longer answer follows the file as text.
MAX_CAPTION_CHARS = 1024
# Of the message a customer replied to, what the model is told: enough to say which one it was.
MAX_QUOTE_CHARS = 300
# A hand-off notice waits this long for the owner's own chat to be known (the session loading at start).
OWNER_CHAT_WAIT_S = 300.0
OWNER_CHAT_POLL_S = 1.0
MAX_WAITING_OWNER_NOTICES = 50
# A burst ("hola" / "una pregunta" / "¿precio del plan pro?") is answered as one message: at most this many
# texts, and the quiet the bot waits for (WA_GATHER_S) at most this many times over, so a customer who keeps
# writing is still answered.
MAX_BURST_MESSAGES = 20
MAX_GATHER_ROUNDS = 4
# A photo, video or PDF without words is most often followed by its question, typed after it: the quiet
# waited for after one is this many times WA_GATHER_S (within MAX_GATHER_ROUNDS times it in all).
WORDLESS_MEDIA_ROUNDS = 3
_SHOWN_KINDS = {MessageKind.IMAGE, MessageKind.VIDEO, MessageKind.DOCUMENT}
# Photos shown to the model in one turn (an album of ten is two turns): a photo costs gpt-4o-mini 25,000 to
# 37,000 input tokens at high detail (gpt-4o ~800 to 1,200), $0.004 to $0.006 either way.
MAX_BURST_PHOTOS = 5
# PDFs read in one turn: each is up to 12,000 characters of text (media.document.MAX_CHARS).
MAX_BURST_DOCUMENTS = 3
# Voice notes heard in one turn ("hola" / a voice note / another one): each is a transcription.
MAX_BURST_VOICE_NOTES = 5
# A flow's file goes with the model's answers to a chat once in this long (asked for by the flow's own
# question, it is always sent): "¿la carta tiene opciones veganas?" after the menu came needs no second copy.
FLOW_FILE_EVERY_S = 3600.0
# "I can only read text and voice notes" goes to a chat once in this long: four photos in a row get it once.
MEDIA_NOTICE_EVERY_S = 300.0
# "I couldn't see your photo, send it again": a photo failing again this long after it (sent again as asked,
# not the rest of an album) gets a second, different notice ("write it to me"), once; then silence.
AGAIN_AFTER_S = 10.0
_MEDIA_KINDS = {
    MessageKind.IMAGE,
    MessageKind.VIDEO,
    MessageKind.STICKER,
    MessageKind.DOCUMENT,
    MessageKind.UNSUPPORTED,
}
_CAPTIONED_KINDS = {MessageKind.IMAGE, MessageKind.VIDEO, MessageKind.DOCUMENT}
# What a message can reply to that the model cannot see (each has a `label_<kind>` reply).
_QUOTED_MEDIA = {*_CAPTIONED_KINDS, MessageKind.STICKER}


_HANDED_OVER = "chat handed to a human"
_STALE = "too old to answer (offline backlog)"
_RATE_LIMITED = "over the chat's rate limit"
# A "👍" the model cannot be shown (photos off, an animated Lottie sticker, a group's chatter) needs no "I can
# only read text".
_UNSEEN_STICKER = "a sticker the model cannot be shown"
_KEPT_UNANSWERED = (
    _HANDED_OVER,
    _STALE,
    _RATE_LIMITED,
    _UNSEEN_STICKER,
)  # stored as SKIPPED: part of the chat's history


async def _all_of(writes: Sequence[Awaitable[None]]) -> None:
    """The writes of a burst's rows as one: every outcome is retrieved, the first error raised. Shielded:
    a write's future can be the store's whole batch, which a cancelled wait must not cancel for others."""
    for outcome in await asyncio.gather(*map(asyncio.shield, writes), return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


# A message waiting in its chat's queue, with the pending write of its row (None: already in the store).
Queued = tuple[Inbound, Awaitable[None] | None]


def _images_of(message: Inbound) -> int:
    """The images a message shows the model at least: a photo, a sticker, a video (two videos share the
    turn's images: see MediaReader.read_attachments)."""
    return int(message.kind in PHOTO_KINDS or message.kind is MessageKind.VIDEO)


def _done() -> asyncio.Future[None]:
    """An intake write that is already durable: a future, so it can be awaited more than once (a voice
    note awaits it before transcribing and again before sending)."""
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


def inbound_from_stored(stored: StoredMessage, media: MediaRef | None = None) -> Inbound:
    """A persisted, unanswered message as the pipeline takes it: after a restart, or back from the spill.

    A voice note already transcribed is answered from its transcript. One not transcribed needs `media`
    to be downloaded; without it (after a restart) the customer is asked to send it again.
    """
    if stored.kind == ORDER_KIND:  # an order from the catalog: handed over, with its details for the owner
        words, mark, details = stored.body.partition(ORDER_MARK)
        as_text = inbound_from_stored(replace(stored, kind="text", body=words if mark else stored.body))
        return replace(as_text, quoted=details if mark else stored.body, quoted_from="order")
    try:
        kind = MessageKind(stored.kind)
    except ValueError:
        kind = MessageKind.OTHER
    if kind is MessageKind.AUDIO and stored.body:
        kind = MessageKind.TEXT
    return Inbound(
        id=MessageId(stored.wa_message_id),
        chat=ChatId(stored.chat_id),
        sender=stored.chat_id,
        kind=kind,
        text=stored.body,
        timestamp=stored.created_at,
        is_group=stored.chat_id.endswith("@g.us"),
        media=media,
        received_at=stored.created_at,
    )


def with_extras(message: Inbound, kept: Inbound | None) -> Inbound:
    """A message back from the store with what the store does not keep: its media (to download) and what it
    replies to, when the pipeline kept them (see Pipeline._spill)."""
    if kept is None:
        return message
    message = replace(message, media=kept.media, quoted_media=kept.quoted_media)
    if message.quoted_from == "order":  # read back from its row already
        return message
    return replace(message, quoted=kept.quoted, quoted_from=kept.quoted_from, quoted_kind=kept.quoted_kind)


class DedupWindow:
    """The ids seen recently, bounded; seeded from the store so a redelivery after a restart is caught."""

    def __init__(self, max_ids: int) -> None:
        self.max_ids = max_ids
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._ids)

    def seen(self, message_id: str) -> bool:
        """True if the id was seen before; records it otherwise."""
        if message_id in self._ids:
            return True
        self._ids[message_id] = None
        if len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)
            self.evictions += 1
        return False

    def seed(self, ids: list[str]) -> None:
        for message_id in reversed(ids):  # newest last, so the newest are evicted last
            self.seen(message_id)


def quote_note(message: Inbound, language: Language, *, photo_shown: bool = False) -> str:
    """What the message replies to, told to the model before the customer's words: "¿y este?" under one
    plan of a list, or under an answer from yesterday no longer in the history, says which one. With
    `photo_shown` the photo replied to goes with the message: the note says it is "this photo"."""
    quoted, cut = clean_text(message.quoted, MAX_QUOTE_CHARS)
    quoted += "…" if cut else ""
    whose = reply("whose_bot" if message.quoted_from == "bot" else "whose_customer", language)
    if message.quoted_kind is MessageKind.AUDIO:  # its transcript, if the customer's, is in the history
        return reply("quote_audio_note", language, whose=whose)
    if photo_shown:
        if not quoted:
            return reply("quote_photo_note", language, whose=whose)
        return reply("quote_photo_caption_note", language, whose=whose, quoted=quoted)
    if message.quoted_kind in _QUOTED_MEDIA:  # a photo the business sent, and "¿precio?" under it
        what = reply(f"label_{message.quoted_kind.value}", language)
        if not quoted:
            return reply("quote_media_note", language, what=what, whose=whose)
        return reply("quote_media_caption_note", language, what=what, whose=whose, quoted=quoted)
    if not quoted:
        return ""
    key = {
        "bot": "quote_of_bot_note",
        "ad": "ad_note",
        "product": "product_note",
        "other_product": "other_product_note",
        "order": "order_note",
    }.get(message.quoted_from, "quote_note")
    return reply(key, language).format(quoted=quoted)


class Pipeline:
    def __init__(
        self,
        *,
        store: Store,
        history: ChatHistory,
        responder: Responder,
        transport: Transport,
        language: Language = "es",
        transcriber: VoiceTranscriber | None = None,
        photos: PhotoPreparer | None = None,
        documents: DocumentReader | None = None,
        videos: VideoWatcher | None = None,
        group_policy: GroupPolicy = "never",
        max_reply_chars: int = 1500,
        max_inbound_chars: int = 4000,
        max_active_chats: int = 1024,
        max_waiting: int = 10_000,
        dedup_window: int = 20000,
        rate_limiter: SlidingWindowLimiter | None = None,
        takeover: Takeover | None = None,
        handoff: HandoffPhrases | None = None,
        allowed_numbers: frozenset[str] = frozenset(),
        blocked_numbers: frozenset[str] = frozenset(),
        busy_after_s: float = 30.0,
        stale_after_s: float | None = None,
        gather_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.history = history
        self.responder = responder
        self.transport = transport
        self.language = language
        self.group_policy = group_policy
        self.max_reply_chars = max_reply_chars
        self.max_inbound_chars = max_inbound_chars
        self.rate_limiter = rate_limiter
        self.media_notices = OncePerWindow(MEDIA_NOTICE_EVERY_S)  # bounded: see limits.py
        self.flow_files = OncePerWindow(FLOW_FILE_EVERY_S)  # chat and file, when a flow's file went out
        self.late_replies = OncePerWindow(3600.0)  # chats whose reply waited too long: the owner told once
        self.takeover = takeover or Takeover(pause_s=1800)
        self.handoff = handoff  # None: a customer asking for a person is answered like any message
        self.takeover.handoff_replies = frozenset(
            {reply("handoff", language), reply("order_handoff", language)}
        )
        self.allowed_numbers = allowed_numbers
        self.blocked_numbers = blocked_numbers
        self.busy_after_s = busy_after_s
        self.stale_after_s = stale_after_s
        # A chat's texts are answered once it has been quiet this long, together (0: each on its own).
        self.gather_s = gather_s
        self.clock = clock
        self.counters = MessageCounters()
        self.media = MediaReader(
            transport=transport,
            store=store,
            history=history,
            counters=self.counters,
            language=language,
            max_inbound_chars=max_inbound_chars,
            transcriber=transcriber,
            photos=photos,
            documents=documents,
            videos=videos,
        )
        self.dedup = DedupWindow(dedup_window)
        # Set while the model may take new work; the memory manager clears it under pressure.
        self.model_gate = asyncio.Event()
        self.model_gate.set()
        self._queues: dict[ChatId, deque[Queued]] = {}
        # Messages held in memory are bounded: past `max_waiting` new ones are only persisted ("spilled")
        # and taken back from the store, oldest first, once the queues have halved.
        self.max_waiting = max_waiting
        self.max_active_chats = max_active_chats
        self._waiting = 0
        self._in_memory: set[str] = set()  # ids queued or being handled
        self._spilled = False
        self._spill_since = 0.0
        self._spill_seq = 0
        # What the store does not keep of a spilled message, kept for its refill (bounded): the download
        # handle of its media, and what it replies to ("¿precio de este?" under a product photo).
        self._spilled_extras: OrderedDict[str, Inbound] = OrderedDict()
        self._refilling: asyncio.Task[None] | None = None
        # Answered (or failed) but the store could not record it: still RECEIVED there, never refill it.
        self._unrecorded: OrderedDict[str, None] = OrderedDict()
        self._workers: dict[ChatId, asyncio.Task[None]] = {}
        # When each chat with work got its first unanswered message (monotonic), for the "busy" notice.
        self._busy_since: dict[ChatId, float] = {}
        self._spilled_chats: dict[ChatId, tuple[float, int]] = {}
        self._told_busy: set[ChatId] = set()
        self._answering: set[ChatId] = set()  # chats whose message is past the model gate: no "busy" now
        self._to_tell: deque[ChatId] = deque()  # told "busy" next, one at a time (see _tell_busy)
        self._telling: asyncio.Task[None] | None = None
        self._busy_watch: asyncio.Task[None] | None = None
        # Hand-off notices waiting for the owner's own chat to be known (see tell_owner); bounded.
        self._owner_notices: deque[tuple[float, str]] = deque(maxlen=MAX_WAITING_OWNER_NOTICES)
        self._owner_waiter: asyncio.Task[None] | None = None
        self._notice_only: set[str] = set()
        self._background = BackgroundTasks("pipeline")
        self._summaries: asyncio.Task[None] | None = None
        self._reply_writes: set[asyncio.Future[None]] = set()
        self._active = asyncio.Semaphore(max_active_chats)
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._stopping = asyncio.Event()  # wakes the workers waiting for a chat to be quiet
        self._overhead: deque[float] = deque(maxlen=10000)
        self._reply_of: OrderedDict[MessageId, MessageId] = OrderedDict()  # part id -> its reply's row id
        # Set by `run`: told the parts of each reply of several, so the outbox can name the reply when a
        # later part is dropped after a restart (when `_reply_of` is gone).
        self.on_reply_parts: Callable[[MessageId, list[MessageId]], None] | None = None
        self._dropped_early: OrderedDict[MessageId, None] = OrderedDict()  # dropped before being recorded

    async def start(self, *, dedup_since_s: float = 3 * 86400) -> None:
        ids = await self.store.recent_message_ids(self.clock() - dedup_since_s, self.dedup.max_ids)
        self.dedup.seed(ids)
        logger.info("pipeline ready: {} recent message ids loaded for de-duplication", len(ids))
        self._summaries = asyncio.create_task(self._log_summaries(), name="pipeline-summaries")
        self._busy_watch = asyncio.create_task(self._watch_busy(), name="busy-notices")

    async def _log_summaries(self, every_s: float = 60.0) -> None:
        """An INFO line a minute while there is traffic: what was received, answered, skipped, failed."""
        last = asdict(self.counters)
        while self._accepting:
            await asyncio.sleep(every_s)
            now = asdict(self.counters)
            delta = {key: now[key] - last[key] for key in now}
            if delta["received"]:
                logger.info(
                    "last {:.0f} s: {received} received, {answered} answered ({merged} more with them),"
                    " {skipped} skipped, {duplicates} duplicates, {rate_limited} rate limited,"
                    " {failed} failed",
                    every_s,
                    **delta,
                )
            last = now

    # -- intake (synchronous, cheap first) -------------------------------------------------------

    def submit(self, message: Inbound) -> bool:
        """Take one inbound message; returns True if it was queued for an answer."""
        self.counters.received += 1
        text = db_text(message.text)  # half an emoji or a byte that was not UTF-8: no codec takes it
        message = replace(message, text=text, received_at=message.received_at or self.clock())
        if not self._accepting:
            # Saved unanswered: WhatsApp already acknowledged it, and recovery answers it at the next start.
            # Filtered first, like any message: recovery must not answer a group, a reaction, a blocked one.
            if message.id and message.chat and message.from_me and not self.dedup.seen(message.id):
                self._from_owner(message)  # the owner taking a chat over is kept for the next start too
            elif message.id and message.chat and not self.dedup.seen(message.id):
                reason = self._filter(message)
                if reason is None and self._rate_verdict(message) != "ok":
                    self.counters.rate_limited += 1  # a flood while draining, as at any other time
                    reason = _RATE_LIMITED
                if reason is None:
                    self._spawn(self._remember(self._inbound_row(message)))
                    logger.warning("shutting down: message {} saved for the next start", message.id)
                elif reason in _KEPT_UNANSWERED:  # kept, unanswered, for the history, as at any time
                    self._keep_unanswered(message)
            return False
        if not message.id or not message.chat:
            self._skip(message, "malformed (no id or chat)")
            return False
        if self.dedup.seen(message.id):
            self.counters.duplicates += 1
            logger.debug("duplicate message {} ignored", message.id)
            return False
        if message.from_me:
            self._from_owner(message)
            return False
        if message.kind in (MessageKind.EDIT, MessageKind.REVOKE):
            self._change(message)
            return False
        reason = self._filter(message)
        if reason is not None:
            self._skip(message, reason)
            if reason in _KEPT_UNANSWERED:
                self._keep_unanswered(message)
            return False
        if self.rate_limiter is not None:
            verdict = self._rate_verdict(message)
            if verdict != "ok":
                self.counters.rate_limited += 1
                # Kept, unanswered, in the database (lost before): the owner finds it there. Not in the
                # history in memory, where it would sit before the answers to the messages still queued.
                self._keep_unanswered(message, in_history=False)
                if verdict == "silent":
                    logger.debug("rate limited: message {} in {} not answered", message.id, message.chat)
                    return False
                logger.info("rate limit reached in {}: one notice, then silence", message.chat)
                if self._spilled or self._waiting >= self.max_waiting:
                    return False  # the notice is a courtesy: not worth memory now
                self._notice_only.add(message.id)
                return self._enqueue(message, None)
        # Persisted at intake (the write is queued now and committed with its batch), so a
        # message waiting behind others in its chat is already safe from a crash.
        row = self._inbound_row(message)
        persisted = self.store.add_message(row)
        # Past the waiting bound, or while memory keeps the model shut, a message waits in the store only.
        # Not while the database cannot write (it could not give the message back), unless this chat already
        # has messages there: a new one must not overtake them.
        if self._waiting < self.max_waiting and self._flow_question(message):
            return self._enqueue(message, persisted)  # answered without the model, whatever memory says
        full = self._waiting >= self.max_waiting or not self.model_gate.is_set()
        if (self._spilled or full) and (not self.store.writes_failing or message.chat in self._spilled_chats):
            self._spill(message, row, persisted)
            return True
        return self._enqueue(message, persisted)

    def _rate_verdict(self, message: Inbound) -> str:
        """The rate limiter's verdict on the message ("ok" without a limiter). A request for a person always
        goes through (a flood is often a customer getting nowhere), and so does an order."""
        if self.rate_limiter is None:
            return "ok"
        verdict = self.rate_limiter.check(message.chat)
        if verdict != "ok" and self._order_in([message]) is not None:
            return "ok"  # an order is the owner's to see, however much the customer wrote before it
        if verdict != "ok" and self._asks_for_a_person(message, clean_text(message.text, 1000)[0]):
            return "ok"
        return verdict

    def _flow_question(self, message: Inbound) -> bool:
        """A keyword flow's question, from a chat with nothing waiting in the store: answered at once while
        memory keeps the model shut (it needs neither the model nor memory to speak of)."""
        return message.chat not in self._spilled_chats and self._is_flow_question(message)

    def _is_flow_question(self, message: Inbound) -> bool:
        """While memory keeps the model shut: a text a keyword flow answers on its own."""
        if self.model_gate.is_set() or message.kind is not MessageKind.TEXT:
            return False
        if message.id in self._notice_only:  # over the rate limit: a notice, not a flow's answer
            return False
        text = clean_text(message.text, self.max_inbound_chars)[0]
        if self._order_in([message]) is not None:  # handed over: no model either
            return True
        return self.responder.flows.match(text) is not None or self._asks_for_a_person(message, text)

    def _spill(self, message: Inbound, row: StoredMessage, persisted: Awaitable[None]) -> None:
        """Leave the message in the store only; `_refill` takes it back in order. Everything after it
        is spilled too until then, so no chat's messages overtake each other."""
        if not self._spilled:
            self._spilled, self._spill_since = True, row.created_at
            if self.model_gate.is_set():
                logger.warning(
                    "{} messages waiting in memory: new ones wait in the store until half are answered",
                    self._waiting,
                )
            else:
                logger.warning("memory is critical: new messages wait in the store until it is back")
        self._spill_since = min(self._spill_since, row.created_at)
        self._spill_seq += 1
        self.counters.spilled += 1
        if message.media is not None or message.quoted or message.quoted_media is not None:
            # Small: the text is in the store, and a quote is told the model 300 characters at most.
            kept = replace(message, text="", quoted=message.quoted[: MAX_QUOTE_CHARS + 1])
            self._spilled_extras[message.id] = kept
            while len(self._spilled_extras) > 1000:
                self._spilled_extras.popitem(last=False)
        # Per chat, when its first message went to the store and how many wait there: for the "busy"
        # notice. Bounded: past 50,000 chats a chat waits without the notice.
        since, count = self._spilled_chats.get(message.chat, (time.monotonic(), 0))
        if count or len(self._spilled_chats) < 50_000:
            self._spilled_chats[message.chat] = (since, count + 1)
        asyncio.ensure_future(persisted).add_done_callback(self._spill_written)

    def _spill_written(self, write: asyncio.Future[None]) -> None:
        if not write.cancelled() and (error := write.exception()) is not None:
            if isinstance(error, StoreWriteKept):  # the store retries it, and logs the outage once
                logger.debug("a waiting message is saved later: {}", error)
            else:
                logger.error("a waiting message could not be saved: {}", error)

    def open_model_gate(self) -> None:
        """Memory allows the model again: what waits in the store comes back now, not at the next check."""
        self.model_gate.set()
        self._maybe_refill()

    def _maybe_refill(self) -> None:
        if (
            self._spilled
            and self._refilling is None
            and self._accepting
            and self.model_gate.is_set()
            and self._waiting < self.max_waiting // 2
        ):
            self._refilling = asyncio.create_task(self._refill(), name="refill-from-store")
            self._refilling.add_done_callback(self._refill_done)

    def _refill_done(self, task: asyncio.Task[None]) -> None:
        self._refilling = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("could not take waiting messages back from the store: {}", task.exception())

    async def _refill(self) -> None:
        while self._spilled and self._accepting and self.model_gate.is_set():
            room = self.max_waiting - self._waiting
            if room <= self.max_waiting // 2:
                return  # the queues are still more than half full: a later finish triggers the next page
            seq = self._spill_seq
            in_memory = set(self._in_memory)
            # Replies sent before this point must be committed, or their question still reads RECEIVED.
            await asyncio.gather(*list(self._reply_writes), return_exceptions=True)
            limit = len(in_memory) + room
            try:
                rows = await self.store.unanswered_inbound(self._spill_since, limit=limit)
            except Exception as error:
                logger.warning("could not read waiting messages back from the store: {}", error)
                await asyncio.sleep(1.0)  # the next finished message or drain tries again
                return
            if not self._accepting:
                return  # stopping: what is left stays persisted for recovery at the next start
            note_inbound = getattr(self.transport, "note_inbound", None)  # the governor, after a restart
            taken = 0
            for row in rows:
                known = row.wa_message_id in in_memory or row.wa_message_id in self._in_memory
                if known or row.wa_message_id in self._unrecorded:
                    continue
                if taken == room:
                    break
                message = with_extras(
                    inbound_from_stored(row), self._spilled_extras.pop(row.wa_message_id, None)
                )
                self._unspill_chat(message.chat)
                if self.refuses_number(message.sender):  # blocked while it waited
                    self._skip_stored(message, "number not allowed")
                    continue
                if note_inbound is not None:
                    note_inbound(message)
                self._enqueue(message, None)
                taken += 1
            if len(rows) < limit and taken < room and seq == self._spill_seq:
                self._spilled = False
                self._spilled_extras.clear()
                self._spilled_chats.clear()
                logger.info("every waiting message is back from the store")
                return
            if taken == 0:
                return

    def resume(self, message: Inbound) -> bool:
        """Queue a message persisted before a restart but never answered (bypasses de-duplication)."""
        self.dedup.seen(message.id)
        if self.refuses_number(message.sender):  # blocked since: the owner's list holds at recovery too
            self._skip_stored(message, "number not allowed")
            return False
        return self._enqueue(message, None)

    def refuses_number(self, sender: str) -> bool:
        """A blocked number, or one not allowed (BLOCKED_NUMBERS, ALLOWED_NUMBERS, bot_contacts as last read):
        its messages get no answer, and its calls and undecryptable messages no notice."""
        number = sender.split("@", 1)[0].split(":", 1)[0]
        if number in self.blocked_numbers:
            return True
        return bool(self.allowed_numbers) and number not in self.allowed_numbers

    def _skip_stored(self, message: Inbound, reason: str) -> None:
        """Skip a message already in the store, and say so there (else every restart finds it again)."""
        self._skip(message, reason)
        self._spawn(self._mark([message.id], MessageStatus.SKIPPED))

    def resume_rest_from_store(self, since: float, chats: Mapping[str, int] | None = None) -> None:
        """Recovery found more unanswered messages than may wait in memory: the rest, from `since` on,
        are read back like spilled ones as the queue empties. `chats`: how many of them each chat has."""
        self._spilled, self._spill_since = True, since
        self._spill_seq += 1
        now = time.monotonic()
        for chat, count in (chats or {}).items():
            waited, before = self._spilled_chats.get(ChatId(chat), (now, 0))
            if before or len(self._spilled_chats) < 50_000:  # the bound _spill keeps
                self._spilled_chats[ChatId(chat)] = (waited, before + count)

    def _unspill_chat(self, chat: ChatId) -> None:
        since, count = self._spilled_chats.pop(chat, (0.0, 0))
        if count > 1:
            self._spilled_chats[chat] = (since, count - 1)
        elif count == 1 and chat not in self._busy_since:
            self._busy_since[chat] = since  # its wait goes on in memory: keep when it started

    def _note_unrecorded(self, message_id: str) -> None:
        self._unrecorded[message_id] = None
        while len(self._unrecorded) > 10_000:
            self._unrecorded.popitem(last=False)

    def _inbound_row(self, message: Inbound) -> StoredMessage:
        kind, body = message.kind.value, message.text
        if message.quoted_from == "order":  # kept as one: handed over when it comes back from the store too
            kind = ORDER_KIND
            body = body if message.quoted in body else f"{body}{ORDER_MARK}{message.quoted}".strip()
        return StoredMessage(
            wa_message_id=message.id,
            chat_id=message.chat,
            direction=Direction.IN,
            kind=kind,
            body=body[: self.max_inbound_chars],
            status=MessageStatus.RECEIVED,
            created_at=message.received_at or message.timestamp or self.clock(),
        )

    def _enqueue(self, message: Inbound, persisted: Awaitable[None] | None) -> bool:
        queue = self._queues.get(message.chat)
        if queue is None:
            queue = self._queues[message.chat] = deque()
        queue.append((message, persisted))
        self._waiting += 1
        self._in_memory.add(message.id)
        self.counters.queued += 1
        if message.chat not in self._workers:
            self._idle.clear()
            self._busy_since.setdefault(message.chat, time.monotonic())
            self._workers[message.chat] = asyncio.create_task(
                self._chat_worker(message.chat), name="chat-worker"
            )
        return True

    def _from_owner(self, message: Inbound) -> None:
        """A from-me message: our own echo, an owner command, or the owner taking over a chat."""
        if self.takeover.sent_by_bot(message.id):
            self._skip(message, "own message")
            return
        command = parse_command(message.text) if message.kind is MessageKind.TEXT else None
        if command is not None:
            # From the owner's own chat a command applies to every chat; the answer goes there, never to
            # a customer's chat the command was typed in.
            key, values = self.takeover.apply(command, None if message.is_self_chat else message.chat)
            # "el chat de +34600111222"; one known by no number (a LID, a group) is "ese chat"
            number = customer_label("", message.chat, "en") if "@s.whatsapp.net" in message.chat else ""
            where = reply("chat_with", self.language, number=number) if number else ""
            values["where"] = where or reply("that_chat", self.language)
            if isinstance(minutes := values.pop("minutes", None), int | float):
                values["length"] = pause_length(minutes, self.language)
            logger.warning("owner command: {}", reply(key, "en", **values))
            # The linked number's own chat when the transport knows it (the self-chat may arrive keyed by
            # its LID), else the chat the command came from if that is the owner's own.
            owner_chat = getattr(self.transport, "owner_chat", None) or (
                message.chat if message.is_self_chat else None
            )
            if owner_chat:
                self._spawn(self._send_notice(ChatId(owner_chat), reply(key, self.language, **values)))
            return
        if not message.is_self_chat:
            self.takeover.owner_wrote(message.chat)
            logger.info("owner wrote in {}: the bot stays silent there for a while", message.chat)
            # Kept in the chat's history, so the model knows what the human said when it takes over again.
            row = replace(self._inbound_row(message), direction=Direction.OUT, status=MessageStatus.SENT)
            self._spawn(self._remember(row))
        self._skip(message, "own message")

    async def _remember(self, row: StoredMessage, *, in_history: bool = True) -> None:
        try:
            await self.store.add_message(row)
        except Exception as error:
            logger.warning("could not store message {}: {}", row.wa_message_id, error)
            return
        if in_history:
            self.history.append(row)

    def _filter(self, message: Inbound) -> str | None:
        if message.is_status:
            return "status broadcast"
        if self.stale_after_s and message.timestamp and self.clock() - message.timestamp > self.stale_after_s:
            # A backlog delivered after a long disconnection: answering hours late does more harm than good.
            return _STALE
        if message.is_group and not (
            self.group_policy == "always" or (self.group_policy == "mentioned" and message.mentions_me)
        ):
            return "group message"
        if message.kind in (MessageKind.REACTION, MessageKind.OTHER, MessageKind.EDIT, MessageKind.REVOKE):
            return f"{message.kind.value} message"
        if self.refuses_number(message.sender):
            return "number not allowed"
        if self.takeover.is_paused(message.chat):
            return _HANDED_OVER
        if message.kind is MessageKind.STICKER and not self.media.shows_photo(message):
            return _UNSEEN_STICKER  # kept, unanswered: never queued, spilled or promised an answer
        return None

    def _change(self, change: Inbound) -> None:
        """A customer edited an earlier message, or deleted it for everyone. One still waiting in its chat's
        queue is answered as edited ("quiero 3 menús" corrected to 2 within the wait), or not at all (a card
        number deleted a second later), and its stored row follows: the new text, or none. One already
        answered, or waiting in the store, is left as it is."""
        queue = self._queues.get(change.chat, deque())
        index = next((i for i, (queued, _) in enumerate(queue) if queued.id == change.target), None)
        if index is None or change.target is None:
            logger.debug(
                "{} of message {} in {}: not waiting, left as it is", change.kind, change.target, change.chat
            )
            return
        queued, persisted = queue[index]
        if change.kind is MessageKind.REVOKE:
            queue[index] = (replace(queued, kind=MessageKind.REVOKE, text="", media=None), persisted)
            self._spawn(self._rewrite(change.target, MessageStatus.SKIPPED, ""))
            logger.info(
                "message {} in {} deleted by the customer before its answer", change.target, change.chat
            )
        elif change.text:
            queue[index] = (replace(queued, text=change.text), persisted)
            self._spawn(self._rewrite(change.target, MessageStatus.RECEIVED, db_text(change.text)))
            logger.debug("message {} in {} edited before its answer", change.target, change.chat)

    async def _rewrite(self, message_id: MessageId, status: MessageStatus, body: str) -> None:
        try:
            await self.store.set_status(message_id, status, body=body)
        except StoreUnavailable as error:  # kept for a retry by the store
            logger.debug("message {} not rewritten yet: {}", message_id, error)

    def _keep_unanswered(self, message: Inbound, *, in_history: bool = True) -> None:
        row = replace(self._inbound_row(message), status=MessageStatus.SKIPPED)
        self._spawn(self._remember(row, in_history=in_history))

    def _skip(self, message: Inbound, reason: str) -> None:
        self.counters.skipped += 1
        logger.debug("skipped message {} in {}: {}", message.id, message.chat, reason)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self._background.spawn(coroutine, "pipeline-side-work")

    async def _promise(self, chat: ChatId) -> None:
        """Tell a waiting chat its answer is coming, and keep the promise in its history (kind BUSY_KIND,
        left out of the model's context): recovery answers what it promised whatever the window."""
        if await self._promise_stands(chat) or not self._still_waiting(chat):
            self._told_busy.discard(chat)  # a later wait may tell it
            return
        text = reply("busy", self.language)
        try:
            sent_id = await self.transport.send_text(chat, text)
        except Exception as error:
            logger.warning("could not send a notice: {}", error)
            return
        self.takeover.note_sent(sent_id)
        row = StoredMessage(sent_id, chat, Direction.OUT, BUSY_KIND, text, MessageStatus.SENT, self.clock())
        try:
            await self.store.add_message(row)  # not in the history in memory: the model never sees it
        except StoreUnavailable as error:
            logger.debug("busy notice to {} not saved yet: {}", chat, error)

    def _still_waiting(self, chat: ChatId) -> bool:
        """Memory still keeps the model shut and the chat's message waits for it (it is not being answered:
        a notice then would come after the answer, or between its parts)."""
        if self.model_gate.is_set() or chat in self._answering:
            return False
        return chat in self._busy_since or chat in self._spilled_chats

    async def _promise_stands(self, chat: ChatId) -> bool:
        """The chat was told "busy" and has had no answer since (told before a restart, say): once is
        enough. So is a notice told after a message that still waits, whatever went out after it (one notice
        a wait, as within a run): the owner's own message, say, written while the notice waited in the
        outbox (disconnected), reached the customer before it but is stored after it. Unknown when the store
        cannot say: then it is told again rather than not at all."""
        try:
            rows = await self.store.recent_messages(chat, 20)
        except Exception:
            return False
        rows = [row for row in rows if row.status is not MessageStatus.FAILED]  # a notice dropped: never told
        last_out = next((row for row in reversed(rows) if row.direction is Direction.OUT), None)
        if last_out is not None and last_out.kind == BUSY_KIND:
            return True
        told = [row.created_at for row in rows if row.direction is Direction.OUT and row.kind == BUSY_KIND]
        waiting = [
            row.created_at
            for row in rows
            if row.direction is Direction.IN and row.status is MessageStatus.RECEIVED
        ]
        return bool(told and waiting) and max(told) >= min(waiting)

    def _asks_for_a_person(self, message: Inbound, text: str) -> bool:
        """A customer's request for a person; never in a group, where one member would silence the rest."""
        if self.handoff is None or message.is_group:
            return False
        # "quiero hablar" / "con una persona" in a burst (or one message over two lines) asks too.
        return self.handoff.asked_over_lines(text)

    def _order_in(self, messages: Sequence[Inbound]) -> Inbound | None:
        """An order from the business's catalog (the cart): a person confirms stock, payment and delivery, so
        the chat is handed over like a request for a person (when hand-offs are on; never in a group)."""
        if self.handoff is None:
            return None
        return next((m for m in messages if m.quoted_from == "order" and not m.is_group), None)

    def _hand_over(self, message: Inbound, text: str, *, order: bool = False) -> None:
        """The customer was told a person will write: the chat is left to the owner, who is told so in their
        own chat (the only place the customer's number and words are shown)."""
        self.takeover.hand_over(message.chat)
        what = "sent an order" if order else "asked for a person"
        logger.warning("a customer in {} {}: the chat is left to the owner", message.chat, what)
        self.tell_owner(
            reply(
                "order_owner_notice" if order else "handoff_owner_notice",
                self.language,
                who=customer_label(message.push_name, message.sender, self.language),
                # the caption, or the order's title, total and items: not the note for the model
                text=quote_for_owner(message.quoted if order else message.text or text),
                duration=duration(self.takeover.pause_s / 60, self.language),
            )
        )

    def tell_owner(self, notice: str) -> None:
        """Send `notice` to the owner's own chat ("message yourself"), once it is known."""
        owner_chat = getattr(self.transport, "owner_chat", None)
        if owner_chat:
            self._spawn(self._send_notice(ChatId(owner_chat), notice))
            return
        if not self._accepting:  # stopping: a waiter started now would outlive the pipeline
            logger.warning("a notice for the owner not sent: the bot is stopping")
            return
        self._owner_notices.append((time.monotonic() + OWNER_CHAT_WAIT_S, notice))
        if self._owner_waiter is None or self._owner_waiter.done():
            self._owner_waiter = asyncio.create_task(self._tell_owner_when_known(), name="owner-notices")

    async def _tell_owner_when_known(self) -> None:
        """The owner's own chat is known once the session is loaded: a hand-off recovered at start, answered
        before the connection, waits for it (not in the background tasks `drain` waits for)."""
        while self._owner_notices:
            owner_chat = getattr(self.transport, "owner_chat", None)
            if owner_chat:
                while self._owner_notices:
                    await self._send_notice(ChatId(owner_chat), self._owner_notices.popleft()[1])
                return
            while self._owner_notices and self._owner_notices[0][0] <= time.monotonic():
                self._owner_notices.popleft()
                logger.warning("a notice for the owner not sent: their chat is not known")
            await asyncio.sleep(OWNER_CHAT_POLL_S)

    async def _send_notice(self, chat: ChatId, text: str) -> None:
        try:
            self.takeover.note_sent(await self.transport.send_text(chat, text))
        except Exception as error:
            logger.warning("could not send a notice: {}", error)

    # -- per-chat workers -------------------------------------------------------------------------

    async def _chat_worker(self, chat: ChatId) -> None:
        queue = self._queues[chat]
        try:
            while queue:
                if self.gather_s and self._joins_burst(queue[0][0]):
                    await self._wait_for_quiet(queue)
                if self._is_flow_question(queue[0][0]):  # no model: not behind the chats waiting for memory
                    burst = [queue.popleft()]
                    self._waiting -= 1
                    await self._handle_safely(burst)
                else:
                    async with self._active:
                        # Taken off the queue only with a slot: a message waiting for one is still counted
                        # in `waiting`, so the bound (and the spill to the store past it) holds.
                        burst = self._take_burst(queue)
                        self._waiting -= len(burst)
                        await self._handle_safely(burst)
                self._answering.discard(chat)
                self._in_memory.difference_update(message.id for message, _ in burst)
                self._maybe_refill()
        finally:
            # No await between the emptiness check above and this cleanup, so nothing is lost.
            self._waiting -= len(queue)  # only when cancelled at stop: they stay persisted, unanswered
            for _, persisted in queue:  # their writes' outcome is still said (not "never retrieved")
                if persisted is not None:
                    asyncio.ensure_future(persisted).add_done_callback(self._spill_written)
            del self._queues[chat]
            del self._workers[chat]
            del self._busy_since[chat]
            self._answering.discard(chat)
            if not self._workers:
                self._idle.set()

    def _joins_burst(self, message: Inbound) -> bool:
        """A text a customer may have split over several messages, or a photo the model is shown (a photo,
        then "¿lo tenéis en azul?"); not in a group, where the messages in a row are often different
        members'."""
        group = message.is_group or message.chat.endswith("@g.us")
        has_media = message.media is not None and message.media.handle is not None
        readable = (
            message.kind is MessageKind.TEXT
            or (message.kind is MessageKind.AUDIO and self.media.hears_voice_notes and has_media)
            or self.media.gives(message)
        )
        return readable and not group and message.id not in self._notice_only

    async def _wait_for_quiet(self, queue: deque[Queued]) -> None:
        """Wait until the chat's last message is `gather_s` old (a photo without words: WORDLESS_MEDIA_ROUNDS
        times that), and at most MAX_GATHER_ROUNDS times `gather_s` in all: "hola", then "quería saber",
        then "¿precio del plan pro?" get one answer, not three.
        A message recovered after a restart is old already: no wait. Stopping ends the wait."""
        deadline = time.monotonic() + self.gather_s * MAX_GATHER_ROUNDS
        while self._accepting:
            last = queue[-1][0]
            arrived = last.received_at or last.timestamp or 0.0
            rounds = WORDLESS_MEDIA_ROUNDS if self._shown_without_words(last) else 1
            left = min(arrived + self.gather_s * rounds - self.clock(), deadline - time.monotonic())
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._stopping.wait()

    def _shown_without_words(self, message: Inbound) -> bool:
        """A photo, video or PDF the model will be shown (not a sticker), sent without words: its question is
        being typed."""
        return self.media.gives(message) and message.kind in _SHOWN_KINDS and not message.text.strip()

    def _take_burst(self, queue: deque[Queued]) -> list[Queued]:
        """The next message, with the texts right behind it when gathering: bounded by MAX_BURST_MESSAGES
        and by MAX_INBOUND_CHARS in all (what is left is the next burst). At most one of them may reply to
        an earlier message (swipe to reply), so the model is told unambiguously what "¿y este?" is."""
        burst = [queue.popleft()]
        first = burst[0][0]
        if not self.gather_s or not self._joins_burst(first):
            return burst
        chars = len(first.text)
        quotes = bool(quote_note(first, self.language))
        photos = _images_of(first)
        documents = int(first.kind is MessageKind.DOCUMENT)
        voice_notes = int(first.kind is MessageKind.AUDIO)
        while queue and len(burst) < MAX_BURST_MESSAGES:
            message = queue[0][0]
            chars += len(message.text) + 1
            if chars > self.max_inbound_chars or message.sender != first.sender:
                break
            quotes_too = bool(quote_note(message, self.language))
            if not self._joins_burst(message) or (quotes and quotes_too):
                break
            photos += _images_of(message)
            documents += message.kind is MessageKind.DOCUMENT
            voice_notes += message.kind is MessageKind.AUDIO
            if (
                photos > MAX_BURST_PHOTOS
                or documents > MAX_BURST_DOCUMENTS
                or voice_notes > MAX_BURST_VOICE_NOTES
            ):
                break
            quotes = quotes or quotes_too
            burst.append(queue.popleft())
        return burst

    async def _handle_safely(self, burst: list[Queued]) -> None:
        message, persisted = burst[-1]
        try:
            await self.handle(message, persisted, earlier=burst[:-1])
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters.failed += 1
            logger.exception("failed to handle message {} in {}", message.id, message.chat)
            for failed, _ in burst:
                try:
                    await self.store.set_status(failed.id, MessageStatus.FAILED)
                except Exception as error:
                    self._note_unrecorded(failed.id)
                    logger.error("could not mark message {} failed: {}", failed.id, error)

    async def handle(
        self,
        message: Inbound,
        persisted: Awaitable[None] | None = None,
        earlier: Sequence[Queued] = (),
    ) -> None:
        """Understand, answer, send and record one message, or a burst: `earlier` are the texts the
        customer sent right before `message`, answered with it by one reply.

        `persisted` is the pending write of the inbound row started at intake (None when
        the row is already in the store); it is awaited before anything is sent.
        """
        if message.id in self._notice_only:
            self._notice_only.discard(message.id)
            await self._send_notice(message.chat, reply("rate_limited", self.language))
            return
        if message.kind is MessageKind.REVOKE:  # deleted by the customer while it waited: never answered
            await self._saved(message, persisted or _done())
            self._skip(message, "deleted by the customer")
            return
        started = time.perf_counter()
        burst = [m for m, _ in earlier]  # the burst's messages before this one
        ids = [*(m.id for m in burst), message.id]
        inbound = self._inbound_row(message)  # each message is stored, and kept in the history, as sent
        # What the message replies to; in a burst, the one message of it that replies to one (_take_burst).
        context = next((note for m in [*burst, message] if (note := quote_note(m, self.language))), "")
        before_burst: list[StoredMessage] | None = None
        if persisted is None:
            persisted = _done()
        if burst:  # their rows written first: the chat's history, when read from the store, has them
            await self._saved(message, _all_of([persisted, *(p for _, p in earlier if p is not None)]))
            persisted = _done()
        if self.takeover.is_paused(message.chat):  # the owner took over while it waited
            await self._saved(message, persisted)
            await self._mark(ids, MessageStatus.SKIPPED)
            self.counters.skipped += len(ids)
            return
        last_text = message.text  # its own words, before a burst's are joined
        if burst:
            # The model gets the MAX_CHAT_HISTORY messages before the burst, and the burst as one turn. From
            # here on `message` is that turn: the burst's texts, under the last one's id.
            try:
                before_burst = await self.history.recent(self._inbound_row(burst[0]))
            except Exception as error:  # a store that cannot read: the burst is answered without history
                logger.warning(
                    "the history of {} could not be read ({}): answered without it", message.chat, error
                )
                before_burst = []
            message = replace(message, text="\n".join(m.text for m in [*burst, message] if m.text))
        for earlier_message in burst:
            self.history.append(self._inbound_row(earlier_message))
        self.history.append(inbound)
        model_time = 0.0  # the model's and the transcription's time: not the pipeline's overhead
        canned: str | None = None
        handing_over: str | None = None
        order: Inbound | None = None  # an order from the catalog, handed over
        file: str | None = None  # a flow's photo or document
        photos = [m for m in [*burst, message] if self.media.shows_photo(m)]
        pdfs = [m for m in [*burst, message] if self.media.reads_pdf(m)]
        videos = [m for m in [*burst, message] if self.media.shows_video(m)]
        read = Attached()  # for the model only: the flows read the customer's words
        # A photo the turn replies to is shown too, when the turn has none of its own ("this photo" is then
        # unambiguous); a turn has at most one reply (see _take_burst).
        # While memory is critical a flow's question is answered at once by the flow, under a photo too.
        quoting = None
        # A sticker of its own leaves "this photo" clear; a photo of its own would not.
        own_photos = any(m.kind is MessageKind.IMAGE for m in photos) or bool(videos)
        if self.media.reads_photos and not own_photos and not self._is_flow_question(message):
            quoting = next((m for m in [*burst, message] if m.quoted_media is not None), None)
        shown: list[str] = []  # the photos as the model gets them (data: URLs)
        # What the model is asked if it refuses the photos: text, context, and the reply when no text is left.
        without_photos: tuple[str, str, str] | None = None
        try:
            for earlier_message in burst:
                await self._mark_read(earlier_message)
            await self._mark_read(message)
            understood = time.perf_counter()
            if burst and any(m.kind is MessageKind.AUDIO for m in [*burst, message]):
                # Voice notes in a row ("hola" / a voice note / another): each heard, the burst one turn.
                await self._past_gate(message.chat)  # as for a voice note alone
                words, unheard = await self.media.hear(burst, message, last_text)
                model_time += time.perf_counter() - understood
                if message.kind is MessageKind.AUDIO:  # its words are the turn's text from here on
                    message = replace(message, kind=MessageKind.TEXT)
                message = replace(message, text=words)
                text, canned = self.media.heard(
                    words, unheard, media=bool(photos or pdfs or videos), notes=len(ids)
                )
            else:
                text, canned = await self._understand(message, persisted)
            if message.kind is MessageKind.AUDIO:
                model_time += time.perf_counter() - understood
                if canned is None:  # the transcript is this turn's text, in the history read below too
                    inbound = replace(inbound, body=text)
            # An order first: with "quiero hablar con una persona" in its burst, the owner hears of the order.
            if canned is None and (order := self._order_in([*burst, message])) is not None:
                canned = handing_over = reply("order_handoff", self.language)
            elif canned is None and self._asks_for_a_person(message, text):
                canned = handing_over = reply("handoff", self.language)
            if canned is None and (pdfs or videos):  # a receipt's text, a video's frames
                reading = time.perf_counter()
                # A scan's pages and a video's frames are images of the turn: with its photos,
                # MAX_BURST_PHOTOS at most.
                room = max(0, MAX_BURST_PHOTOS - len(photos))
                if videos:  # what a video says updates its stored row, as a voice note's transcript does
                    await self._saved(message, persisted)
                await self._past_gate(message.chat)  # a download, pdftotext and ffmpeg take memory
                read = await self.media.read_attachments(pdfs, videos, room)
                model_time += time.perf_counter() - reading
                shown = list(read.pages)
                if read.speech:  # what is said in a video is the customer's words, as in a voice note
                    text = joined(text, read.speech)
                    if message.kind is MessageKind.VIDEO and not burst:  # the history read below has it too
                        inbound = replace(inbound, body=self.media.heard_body(message.text, read.speech))
                    if self._asks_for_a_person(message, text):
                        canned = handing_over = reply("handoff", self.language)
                if canned is None and read.unread and not (read.texts or shown or text or photos):
                    canned = self.media.unread_reply(read.unread[0])  # nothing else to answer
                elif canned is None and read.missed and (read.texts or shown or text):
                    text = self.media.unread_noted(text, read)  # for the customer to be told why
                if shown:  # a scan, a video: if the model reads no images, the customer is asked to write
                    write_it = (
                        reply("pdf_no_text", self.language)
                        if read.scanned
                        else self.media.unsupported(photos=False)
                    )
                    without_photos = (self.media.noted(text) if text else "", context, write_it)
                    quoting = None  # its pages are images of the turn's own: "this photo" would be ambiguous
            if canned is None and photos:
                looking = time.perf_counter()
                await self._past_gate(message.chat)  # a download and a decode take memory
                looked, text, canned = await self.media.look(photos, text, more=bool(read.texts or shown))
                shown = [*shown, *looked]
                model_time += time.perf_counter() - looking
                if read.unread and canned == NO_REPLY:  # an unreadable sticker and an unread PDF
                    canned = self.media.unread_reply(read.unread[0])
                elif read.missed and canned is None:
                    text = self.media.unread_noted(text, read)
                if any(photo.kind is MessageKind.IMAGE for photo in photos):  # told a photo came with it
                    # Without "photos" (refused), or a scan's "write it to me".
                    plain_reply = (
                        without_photos[2] if without_photos else self.media.unsupported(photos=False)
                    )
                    without_photos = (self.media.noted(text) if text else text, context, plain_reply)
                elif without_photos is None:  # stickers only: the words alone, nothing for a sticker alone
                    without_photos = (text, context, NO_REPLY)
            if canned is None and quoting is not None:  # "¿precio de este?" under a product's photo
                looking = time.perf_counter()
                await self._past_gate(message.chat)
                if seen := await self.media.look_at_quote(quoting):
                    alone = without_photos[2] if without_photos else self.media.unsupported(photos=False)
                    shown = [seen, *shown]  # the photo replied to first
                    without_photos = (text, context, alone)
                    context = quote_note(quoting, self.language, photo_shown=True)
                model_time += time.perf_counter() - looking
            if canned is not None:
                answer_text, via_model = canned, False
            else:
                # A photo's words are about the photo ("¿precio?" under a shoe): the model answers them,
                # told what the flows know, rather than a flow answering them blind.
                # A PDF's question too ("¿está bien?" under a receipt).
                answer = None if shown or read.texts else self.responder.quick_answer(text)
                via_model = answer is None
                if answer is None:
                    model_started = time.perf_counter()
                    answer = await self._ask_model(
                        message,
                        inbound,
                        text,
                        context,
                        before_burst,
                        shown,
                        without_photos,
                        read=read,
                    )
                    model_time += time.perf_counter() - model_started
                answer_text, file = answer.text, answer.file
                from_model = answer.source is not Source.FLOW  # the flow's own question always gets it
                if file and from_model and self.flow_files.told_recently(f"{message.chat}\n{file}"):
                    file = None  # the chat has just had this file
        except Exception:  # a bug or an odd input must cost the customer an apology, never the answer
            self.counters.failed += 1
            logger.exception(
                "could not answer message {} in {}; sending an apology", message.id, message.chat
            )
            answer_text, via_model = reply("ai_error", self.language), False
        finally:
            await self._saved(message, persisted)
        if answer_text == NO_REPLY:  # a sticker the model could not be shown: kept, unanswered
            self.counters.skipped += len(ids) - 1
            self._skip(message, _UNSEEN_STICKER)
            await self._mark(ids, MessageStatus.SKIPPED)
            return
        answer_text = db_text(answer_text)  # a model can answer half an emoji too; no protobuf takes it
        if self.takeover.is_paused(message.chat):  # the owner wrote while the answer was being prepared
            logger.info("owner took over {} while its answer was prepared: not sent", message.chat)
            self.counters.skipped += len(ids)
            await self._mark(ids, MessageStatus.SKIPPED)
            return
        # "I can only read text..." and "I couldn't see your photo" each go to a chat once in a while, apart:
        # a video's notice must not silence the news that a photo was not seen.
        notice_key = {
            self.media.media_unsupported: f"{message.chat}\nmedia",
            reply("photo_unreadable", self.language): f"{message.chat}\nphoto",
            reply("video_unreadable", self.language): f"{message.chat}\nvideo",
        }.get(canned or "")
        if notice_key is not None and (again := self._again(canned, notice_key)) is not None:
            answer_text = again
        elif notice_key is not None and self.media_notices.told_recently(notice_key):
            # A photo after photos: the customer has just been told. Saved, unanswered, like any skip (an
            # album's every photo).
            self.counters.skipped += len(ids) - 1
            self._skip(message, "media notice given a moment ago")
            await self._mark(ids, MessageStatus.SKIPPED)
            return
        # Overhead as the customer meets it, until the answer is ready to send: what follows (the governor's
        # typing pause, the outbox) is on purpose, not overhead.
        self._overhead.append(time.perf_counter() - started - model_time)
        went_out: list[tuple[MessageId, str]] = []  # the parts sent so far, filled by _send
        try:
            sent_ids, answer_text = await self._send(message, answer_text, went_out, file)
        except SendWithheld:  # a human has the chat now
            logger.info("owner took over {} while its answer was typed: not sent", message.chat)
            self.counters.skipped += len(ids)
            await self._mark(ids, MessageStatus.SKIPPED)
            return
        except asyncio.CancelledError:
            if went_out:  # stopped between the parts of an answer: without this a restart sends another one
                partial = "\n".join(part for _, part in went_out)
                await self._record_reply(message, [i for i, _ in went_out], partial, via_model, ids[:-1])
            raise
        if notice_key is not None:
            self.media_notices.note(notice_key)
        if handing_over is not None and answer_text == handing_over:
            if order is not None:
                self._hand_over(order, text, order=True)
            else:
                self._hand_over(message, text)
        await self._record_reply(message, sent_ids, answer_text, via_model, ids[:-1])
        self.counters.merged += len(burst)

    async def _mark(self, ids: Sequence[str], status: MessageStatus) -> None:
        """Set the status of a message, or of every message of a burst; a store that cannot write keeps each
        change for a retry."""
        for message_id in ids:
            with contextlib.suppress(StoreUnavailable):
                await self.store.set_status(message_id, status)

    async def _saved(self, message: Inbound, persisted: Awaitable[None]) -> None:
        """Wait for the inbound row's write. A store that cannot write (a full disk, say) is logged and the
        customer is answered all the same: the store keeps the row and retries it."""
        try:
            await persisted
        except StoreUnavailable as error:  # the store logs the outage itself, once
            logger.debug("message {} not saved yet, answering anyway: {}", message.id, error)

    async def _understand(self, message: Inbound, persisted: Awaitable[None]) -> tuple[str, str | None]:
        """The text to answer, or a canned reply when there is nothing to hand to the responder."""
        if message.kind is MessageKind.AUDIO:
            await self._saved(message, persisted)  # the transcript updates the stored row
            await self._past_gate(message.chat)  # downloading, converting and transcribing take memory
            return await self.media.transcribe(message)
        text, trimmed = clean_text(message.text, self.max_inbound_chars)
        if self.media.gives(message):
            return text, None  # downloaded with its words: MediaReader.look, read_attachments
        if message.kind is MessageKind.STICKER:
            return "", NO_REPLY  # a "👍" needs no "I can only read text": kept, unanswered
        if message.kind is MessageKind.IMAGE and self.media.reads_photos:
            self.counters.photos_unseen += 1  # its download handle is gone (a restart)
            if not text:  # asked for it again
                return "", reply("photo_unreadable", self.language)
        handle = message.media.handle if message.media else None
        if message.kind is MessageKind.VIDEO and self.media.shows_videos and handle is None:
            self.counters.videos_unseen += 1  # its download handle is gone (a restart)
            if not text:  # asked for it again
                return "", reply("video_unreadable", self.language)
        if message.kind is MessageKind.DOCUMENT and self.media.reads_pdfs and handle is None:
            # Its download handle is gone (a restart), and with it its name and type: it may have been a PDF,
            # so not "I can read PDFs, type it". Asked for it again.
            self.counters.documents_unread += 1
            if not text:
                return "", reply("document_unreadable", self.language)
        if message.kind in _MEDIA_KINDS:
            if not text or message.kind not in _CAPTIONED_KINDS:
                return "", self.media.media_unsupported
            # A photo with "¿lo tenéis en azul?": the caption is answered, the model told what it misses.
            return f"{text}\n\n{reply('attachment_note', self.language)}", None
        if not text:
            return "", reply("empty", self.language)
        if trimmed:
            note = reply("too_long_note", self.language)
            logger.debug("message {} trimmed to {} characters", message.id, self.max_inbound_chars)
            return f"{text}\n\n{note}", None
        return text, None

    def _again(self, canned: str | None, notice_key: str) -> str | None:
        """The second notice for a photo or video that failed again after "send it again" (see AGAIN_AFTER_S),
        or None: silence was the customer's answer for doing as asked."""
        again_key = f"{notice_key}\nagain"
        age = self.media_notices.age(notice_key)
        if notice_key.endswith("\nmedia") or age is None or age < AGAIN_AFTER_S:
            return None
        if self.media_notices.age(again_key) is not None:
            return None
        self.media_notices.note(again_key)
        kind = "video" if canned == reply("video_unreadable", self.language) else "photo"
        return reply(f"{kind}_unreadable_again", self.language)

    async def _past_gate(self, chat: ChatId) -> None:
        """Wait while memory is critical (the gate is shut): the message is persisted and waits, in order
        (_watch_busy tells the customer once if that lasts). Past it the chat is being answered: no "busy"."""
        await self.model_gate.wait()
        self._answering.add(chat)

    async def _ask_model(
        self,
        message: Inbound,
        inbound: StoredMessage,
        text: str,
        context: str,
        before_burst: list[StoredMessage] | None = None,
        photos: Sequence[str] = (),
        without_photos: tuple[str, str, str] | None = None,
        read: Attached | None = None,
    ) -> Answer:
        """The model's answer to `text` (and `photos`), told `context` (what the message replies to),
        `read` (the PDFs' texts, and the notes on scans shown as photos) and the chat's history before
        it (`before_burst` for a burst). A model that refuses the photos is asked `without_photos` instead
        (text, context, and the reply when there is nothing left: the polite reply to a photo alone, none to
        a sticker)."""
        await self._past_gate(message.chat)
        history = before_burst if before_burst is not None else await self.history.recent(inbound)
        await self._typing(message.chat, True)
        read = read or Attached()
        real_photos = len(photos) - len(read.pages)  # a scan's pages and a video's frames are not photos
        try:
            try:
                told = joined(read.scans, read.texts, context)  # "a video: you see..." before its words
                answer = await self.responder.model_answer(text, history, told, photos)
            except PhotoRefused as error:
                self.media.warn_photos_refused(error)
                self.counters.photos_unseen += real_photos
                self.counters.documents_unread += read.scanned
                self.counters.videos_unseen += read.videos
                plain_text, plain_context, alone = without_photos or (
                    text,
                    context,
                    self.media.unsupported(photos=False),
                )
                if plain_text or read.texts:
                    return await self.responder.model_answer(
                        plain_text, history, joined(read.texts, plain_context)
                    )
                return Answer(alone, Source.AI_OFF)
            if answer.source is Source.MODEL:  # not an apology: the model saw them
                self.counters.photos += real_photos
                self.counters.documents += read.scanned
                self.counters.videos += read.videos
            return answer
        finally:
            await self._typing(message.chat, False)

    async def _send(
        self, message: Inbound, text: str, went_out: list[tuple[MessageId, str]], file: str | None = None
    ) -> tuple[list[MessageId], str]:
        """Send the answer in parts (after `file`, a flow's photo or document, with the answer as its caption
        when it fits); returns their ids and the text sent (shorter if it was cut, with the file named).
        `went_out` gets each part as it is sent, so a caller cancelled halfway knows what the customer has."""
        parts = split_message(text, self.max_reply_chars)
        if (
            len(parts) > MAX_REPLY_PARTS
        ):  # a runaway answer: a wall of messages reads as spam, and risks a ban
            logger.warning("answer to {} cut from {} to {} messages", message.id, len(parts), MAX_REPLY_PARTS)
            parts = self._cut(parts)
            text = "\n".join(parts)  # the history holds what the customer got, note included
        sent: list[MessageId] = []
        attached = ""  # the history says which file went out (the model is told so in later turns)
        if file is not None and not self.model_gate.is_set():  # reading and previewing it takes memory
            logger.info("memory is critical: a flow's answer to {} goes without its file", message.chat)
            file = None
        if file is not None:
            caption = parts[0] if len(parts) == 1 and len(parts[0]) <= MAX_CAPTION_CHARS else ""
            sent_id = await self._send_file(message.chat, file, caption)
            if sent_id is not None:
                self.flow_files.note(f"{message.chat}\n{file}")
                self.takeover.note_sent(sent_id)
                sent.append(sent_id)
                attached = f"\n(📎 {Path(file).name})"
                went_out.append((sent_id, (caption + attached).strip()))
                if caption:
                    return sent, text + attached
        for number, part in enumerate(parts):
            try:
                sent_id = await self.transport.send_text(message.chat, part)
            except SendWithheld:  # the owner wrote while the bot was "typing": the rest is theirs
                if not sent:
                    raise
                logger.info("owner took over {} while its answer went out: the rest not sent", message.chat)
                return sent, ("\n".join(parts[:number]) + attached).strip()
            self.takeover.note_sent(sent_id)
            sent.append(sent_id)
            went_out.append((sent_id, part))
        return sent, text + attached

    async def _send_file(self, chat: ChatId, file: str, caption: str) -> MessageId | None:
        """A flow's file with `caption` under it; None when it cannot go (deleted since the start, an upload
        refused): the answer then goes as text, and the owner is told in the log."""
        if not await asyncio.to_thread(os.path.isfile, file):
            logger.error("the file of a flow is gone ({}): its answer goes without it", file)
            return None
        try:
            return await self.transport.send_text(chat, caption, file)
        except SendWithheld:
            raise
        except TransportError as error:
            logger.warning("the file of a flow could not be sent ({}): its answer goes without it", error)
            return None

    def _cut(self, parts: list[str]) -> list[str]:
        """The first MAX_REPLY_PARTS parts, the last ending in "…" and a note that the answer was shortened:
        cut at a sentence's end, the answer would read as complete."""
        suffix = f"…\n\n{reply('answer_cut_note', self.language)}"
        last = parts[MAX_REPLY_PARTS - 1]
        room = self.max_reply_chars - len(suffix)
        if len(last) > room:  # the note must fit in the part (a word cut in half only if it has no space)
            last = last[:room]
            if " " in last.strip():
                last = last[: last.rstrip().rfind(" ")]
        return [*parts[: MAX_REPLY_PARTS - 1], last.rstrip().rstrip(".,;:") + suffix]

    async def _record_reply(
        self,
        message: Inbound,
        sent_ids: list[MessageId],
        text: str,
        via_model: bool,
        also_answered: Sequence[str] = (),
    ) -> None:
        row_id = sent_ids[0] if sent_ids else MessageId(f"{message.id}:reply")
        if len(sent_ids) > 1 and self.on_reply_parts is not None:
            try:  # best effort (the outbox file on a full disk, say): the reply is recorded all the same
                self.on_reply_parts(row_id, sent_ids)
            except Exception as error:
                logger.warning("the parts of a queued reply could not be grouped: {}", error)
        dropped = False
        for part_id in sent_ids:  # a queued part can still be dropped from the outbox: see reply_dropped
            if part_id in self._dropped_early:
                del self._dropped_early[part_id]
                dropped = True
            self._reply_of[part_id] = row_id
            while len(self._reply_of) > 10_000:
                self._reply_of.popitem(last=False)
        outbound = StoredMessage(
            wa_message_id=row_id,
            chat_id=message.chat,
            direction=Direction.OUT,
            kind="text",
            body=text,
            status=MessageStatus.FAILED if dropped else MessageStatus.SENT,
            created_at=self.clock(),
        )
        # Not awaited: the chat's next message can start while this commits (its history is in memory
        # already). A crash before the commit looks like a crash just before the send: the message is
        # answered again after a restart, within the freshness window.
        write = asyncio.ensure_future(self.store.add_reply(outbound, message.id, also_answered))
        self._reply_writes.add(write)
        answered = [*also_answered, message.id]
        write.add_done_callback(lambda done: self._reply_written(done, answered))
        if not dropped:
            self.history.append(outbound)
        self.counters.answered += 1
        # One line per message at DEBUG; INFO gets a summary a minute (Railway drops logs past 500 lines/s).
        logger.debug(
            "answered {} in {} ({} part(s), {})",
            message.id,
            message.chat,
            len(sent_ids),
            "model" if via_model else "canned",
        )

    def reply_dropped(self, part_id: MessageId, chat: ChatId, late: bool = False) -> None:
        """A queued part of a reply will never go out (dropped from the outbox: the owner took the chat
        over meanwhile, or it waited too long). The reply leaves the history and is marked failed in the
        store, all of it even if parts before this one went out: the model is never told of an answer the
        customer did not get. A drop can come before the reply is recorded (a later part still waiting
        for room in the outbox): then it is recorded failed. After a restart the outbox names the reply
        (its first part's id, the row's) for any of its parts: see `on_reply_parts`."""
        reply_id = self._reply_of.pop(part_id, None)
        if reply_id is None:
            # Not a reply this process recorded: one it records later (recorded failed then), or one queued
            # by an earlier process (a stop while disconnected), whose row id is its first part's id.
            self._dropped_early[part_id] = None
            while len(self._dropped_early) > 1_000:
                self._dropped_early.popitem(last=False)
            reply_id = part_id
        self.history.forget(chat, reply_id)
        self._spawn(self._mark([reply_id], MessageStatus.FAILED))
        if late and not self.late_replies.told_recently(chat):  # one notice a chat, whatever its parts
            # The customer's question stays answered in the store (recovery would answer it later still): the
            # owner is the one who can write now.
            self.late_replies.note(chat)
            number = customer_label("", chat, "en") if chat.endswith("@s.whatsapp.net") else ""
            self.tell_owner(
                reply("reply_too_late", self.language, who=number or reply("a_customer_lower", self.language))
            )

    def _reply_written(self, write: asyncio.Future[None], answered: list[str]) -> None:
        self._reply_writes.discard(write)
        if not write.cancelled() and (error := write.exception()) is not None:
            for answered_id in answered:  # still RECEIVED in the store: never taken back and answered again
                self._note_unrecorded(answered_id)
            if isinstance(error, StoreWriteKept):  # the store retries it, and logs the outage once
                logger.debug("a reply is recorded later: {}", error)
            else:
                logger.error("a reply was sent but could not be recorded: {}", error)

    async def _typing(self, chat: ChatId, on: bool) -> None:
        try:
            await self.transport.set_typing(chat, on)
        except Exception as error:  # a typing indicator is never worth failing a reply
            logger.debug("typing indicator failed: {}", error)

    async def _mark_read(self, message: Inbound) -> None:
        try:
            await self.transport.mark_read(message)
        except Exception as error:
            logger.debug("mark read failed: {}", error)

    async def _watch_busy(self) -> None:
        """While memory keeps the model shut, tell each chat that has waited `busy_after_s` once that the
        answer is coming, whether it holds a worker slot or is still queued for one."""
        every_s = min(1.0, self.busy_after_s / 4)
        while self._accepting:
            await asyncio.sleep(every_s)
            if self.model_gate.is_set():
                # Forget only chats whose wait is over: memory going back and forth between warning and
                # critical must not tell a chat that is still waiting a second time.
                if self._told_busy:
                    self._told_busy &= self._busy_since.keys() | self._spilled_chats.keys()
                self._maybe_refill()  # also retries a refill that failed on the store
                continue
            bound = time.monotonic() - self.busy_after_s
            waiting = [
                *self._busy_since.items(),
                *((c, since) for c, (since, _) in self._spilled_chats.items()),
            ]
            for chat, since in waiting:
                if since <= bound and chat not in self._told_busy and chat not in self._answering:
                    self._told_busy.add(chat)
                    self._to_tell.append(chat)
            if self._to_tell and (self._telling is None or self._telling.done()):
                self._telling = self._background.spawn(self._tell_busy(), "busy-notices")

    async def _tell_busy(self) -> None:
        """The notices go one at a time, and only while memory still keeps the model shut: they share the
        send budget with the answers, and once the answers flow again a notice would only delay them."""
        while self._to_tell and self._accepting and not self.model_gate.is_set():
            await self._promise(self._to_tell.popleft())
        if self.model_gate.is_set():  # never told: a later wait may tell them
            self._told_busy.difference_update(self._to_tell)
            self._to_tell.clear()

    # -- lifecycle --------------------------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued message is handled and recorded; False if `timeout` ran out first."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self._idle.wait()
                    if self._refilling is not None:
                        await asyncio.wait({self._refilling})
                    elif self._spilled and self._accepting:
                        await self.model_gate.wait()
                        self._maybe_refill()
                        if self._refilling is None:
                            await asyncio.sleep(0.05)  # never spin on the loop
                    else:
                        break
                await self._background.wait_all()  # notices and side writes
                await asyncio.gather(*self._reply_writes, return_exceptions=True)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, let in-flight ones finish within `timeout`, cancel the rest."""
        self._accepting = False
        self._stopping.set()
        for task in (self._summaries, self._busy_watch, self._owner_waiter):
            if task is not None:
                task.cancel()
        # What is still spilled stays persisted and unanswered: recovery takes it at the next start.
        # The last part of `timeout` (at most 2 s) is kept for the writes that follow a cancellation.
        grace = min(2.0, timeout / 4)
        started = time.monotonic()
        if not await self.drain(timeout - grace):
            logger.warning(
                "{} chat(s) still busy after {:.0f} s; cancelling",
                len(self._workers),
                timeout - grace,
            )
            workers = list(self._workers.values())
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            left = max(0.1, timeout - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):  # answers cut short are recorded (see _handle)
                async with asyncio.timeout(left):
                    await asyncio.gather(*self._reply_writes, return_exceptions=True)
                    await self._background.wait_all()  # side writes; a notice can wait for the outbox
            await self._background.cancel_all()
        if self._refilling is not None:
            self._refilling.cancel()

    @property
    def active_chats(self) -> int:
        return len(self._workers)

    @property
    def waiting(self) -> int:
        """Messages waiting in memory (those spilled to the store are not counted)."""
        return self._waiting

    def stats(self) -> dict[str, Any]:
        samples = list(self._overhead)
        return {
            **asdict(self.counters),
            "active_chats": len(self._workers),
            "waiting": self.waiting,
            "waiting_for_memory": not self.model_gate.is_set(),
            "waiting_in_store": self._spilled,
            "dedup_window": len(self.dedup),
            "overhead_ms": {
                "p50": round(percentile(samples, 0.5) * 1000, 3),
                "p99": round(percentile(samples, 0.99) * 1000, 3),
            },
        }
