"""Builds the bot from the settings and runs it: `run` on WhatsApp, `chat` on the console."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from bot.ai import AIError, ChatModel, make_client
from bot.config import Settings, config_error
from bot.flows import FlowMatcher, FlowsFileError, load_flows_file, unusable
from bot.handoff import HandoffPhrases
from bot.limits import CircuitBreaker, SlidingWindowLimiter
from bot.localtime import time_zone
from bot.pipeline import Pipeline, inbound_from_stored
from bot.replies import Language, reply
from bot.responder import Responder
from bot.takeover import Takeover
from connection.background import BackgroundTasks
from connection.lease import SessionLease
from connection.types import ConnectionState, Transport
from media.audio import AudioSettings, VoiceTranscriber
from media.document import PdfReader
from media.image import PhotoReader, PhotoSettings
from media.video import VideoReader
from memory.cache import TTLCache
from memory.history import ChatHistory
from memory.manager import MemoryManager, MemoryState
from memory.sqlite_store import SQLiteStore
from memory.store import (
    BUSY_KIND,
    Direction,
    Flow,
    MessageStatus,
    Store,
    StoredMessage,
    StoreUnavailable,
    apply_pause,
    queue_pause_change,
)


def read_flows_file(settings: Settings) -> list[Flow]:
    if settings.flows_file is None:
        return []
    if not settings.flows_file.exists():
        if "flows_file" in settings.model_fields_set:  # named on purpose: a typo must not go unnoticed
            config_error(f"FLOWS_FILE={settings.flows_file}: no such file")
        logger.warning("flows file {} not found: no keyword flows", settings.flows_file)
        return []
    try:
        flows = load_flows_file(settings.flows_file)
    except FlowsFileError as error:
        config_error(f"FLOWS_FILE: {' '.join(str(error).split())}")  # a YAML error spans lines
    logger.info("{} keyword flows loaded from {}", len(flows), settings.flows_file)
    return flows


def make_store(settings: Settings) -> Store:
    """Supabase when SUPABASE_URL is set (writes journaled locally first), SQLite otherwise."""
    if settings.supabase_url and settings.supabase_key:
        from memory.supabase_store import SupabaseStore  # imported only when used: supabase is heavy

        return SupabaseStore(
            settings.supabase_url,
            settings.supabase_key,
            settings.data_dir,
            retention_days=settings.retention_days,
        )
    return SQLiteStore(settings.store_path, retention_days=settings.retention_days)


_PAGE = 1000  # rows per read when counting what recovery leaves in the store
PROMISE_KEPT_S = 24 * 3600.0  # a chat told "busy, I will answer shortly" is answered at a restart this long


# A new outage this soon after the last one told is not told again: a service failing every few calls
# opens and closes the circuit over and over.
OUTAGE_NOTICE_EVERY_S = 3600.0


class OutageNotices:
    """Tells the owner the model stopped answering (ChatModel.on_outage), and that it is back: once each way
    per outage, and an outage within OUTAGE_NOTICE_EVERY_S of the last one told not at all."""

    def __init__(
        self,
        tell: Callable[[str], None],
        language: Language,
        *,
        every_s: float = OUTAGE_NOTICE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tell = tell
        self._language = language
        self._every_s = every_s
        self._clock = clock
        self._down = False  # the owner was told it is down, and not yet that it is back
        self._told_at: float | None = None

    def __call__(self, error: AIError | None) -> None:
        now = self._clock()
        if error is None:
            if self._down:
                self._down = False
                self._tell(outage_notice(None, self._language))
            return
        if self._down or (self._told_at is not None and now - self._told_at < self._every_s):
            return
        self._down, self._told_at = True, now
        self._tell(outage_notice(error, self._language))


def outage_notice(error: AIError | None, language: Language) -> str:
    """What the owner is told when the model stops answering (`error`: why), or answers again (None)."""
    if error is None:
        return reply("ai_back", language)
    status = error.status
    why = {401: "ai_down_key", 403: "ai_down_key", 429: "ai_down_quota", 404: "ai_down_model"}.get(
        status or 0, "ai_down_service"
    )
    code = f" (HTTP {status})" if status else ""
    return reply("ai_down", language, why=reply(why, language), code=code)


@dataclass
class Bot:
    """Every part of a running bot, wired together; `start` and `stop` in that order."""

    settings: Settings
    transport: Transport
    store: Store
    pipeline: Pipeline
    cache: TTLCache[str, str]
    history: ChatHistory
    model: ChatModel | None
    memory: MemoryManager
    transcriber: VoiceTranscriber
    connection_stats: Callable[[], dict[str, Any]] | None = None
    call_notices: SlidingWindowLimiter | None = None  # `run` with WA_REJECT_CALLS: for the metrics
    lease: SessionLease | None = None
    started_at: float = field(default_factory=time.time)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _background: BackgroundTasks = field(default_factory=lambda: BackgroundTasks("bot"))
    _pause_changes: dict[str, float | None] = field(default_factory=dict)
    _pause_writer: asyncio.Task[None] | None = None
    _pause_notes: deque[tuple[str, float | None]] = field(default_factory=deque)
    _pause_wake: asyncio.Event = field(default_factory=asyncio.Event)
    _saving_pauses: bool = False  # stopping: the pause writer retries quickly
    _pause_notes_failed: bool = False  # a change could not be kept locally either (see save_pauses)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def build(cls, settings: Settings, transport: Transport, *, store: Store | None = None) -> Bot:
        store = store or make_store(settings)
        model = None
        client = None
        if settings.openai_key:
            client = make_client(settings.openai_key, settings.openai_base_url, settings.openai_timeout)
            model = ChatModel(
                client,
                settings.openai_model,
                max_concurrency=settings.openai_max_concurrency,
                max_tokens=settings.openai_max_tokens,
                breaker=CircuitBreaker(settings.ai_circuit_failures, settings.ai_circuit_cooldown_s),
                timeout_s=settings.openai_timeout,
            )
        transcriber = VoiceTranscriber(
            AudioSettings(
                max_mb=settings.audio_max_mb,
                max_duration_s=settings.audio_max_minutes * 60,
                transcribe_model=settings.openai_transcribe_model,
                language=settings.transcription_hint,
                timeout_s=max(60.0, settings.openai_timeout * 2),
                temp_dir=settings.data_dir / "tmp" / "audio",
            ),
            client,
        )
        cache: TTLCache[str, str] = TTLCache(settings.cache_max_entries, settings.cache_ttl_s)
        history = ChatHistory(store, depth=settings.max_chat_history)
        responder = Responder(
            flows=FlowMatcher(read_flows_file(settings)),
            cache=cache,
            model=model,
            system_prompt=settings.system_prompt,
            language=settings.bot_language,
            time_zone=time_zone(settings.bot_timezone) if settings.bot_timezone else None,
            photo_detail=settings.image_detail,
        )
        pipeline = Pipeline(
            store=store,
            history=history,
            responder=responder,
            transport=transport,
            language=settings.bot_language,
            group_policy=settings.reply_to_groups,
            max_reply_chars=settings.max_reply_chars,
            max_inbound_chars=settings.max_inbound_chars,
            transcriber=transcriber,
            photos=PhotoReader(
                PhotoSettings(max_mb=settings.image_max_mb),
                enabled=settings.openai_vision and model is not None,
            ),
            videos=VideoReader(
                max_mb=settings.video_max_mb,
                enabled=settings.openai_vision and model is not None,
                temp_dir=settings.data_dir / "tmp" / "video",
            ),
            documents=PdfReader(max_mb=settings.pdf_max_mb, enabled=settings.read_pdfs and model is not None),
            rate_limiter=SlidingWindowLimiter(
                settings.rate_limit_max_messages, settings.rate_limit_cooldown / 1000
            ),
            takeover=Takeover(pause_s=settings.human_takeover_minutes * 60),
            handoff=(
                (
                    HandoffPhrases(
                        phrases
                    )  # the built-in ones, with their one-word and end-of-clause requests
                    if settings.handoff_phrases is None
                    else HandoffPhrases(phrases, alone=(), ending=())  # the owner's own, exactly
                )
                if (phrases := settings.handoff_phrase_list)
                else None
            ),
            allowed_numbers=settings.allowed,
            blocked_numbers=settings.blocked,
            busy_after_s=settings.busy_reply_after_s,
            max_active_chats=settings.max_active_chats,
            max_waiting=settings.max_waiting_messages,
            stale_after_s=settings.recovery_window_minutes * 60 or None,
        )
        if model is not None:  # the owner hears of an outage from the bot, not from the customers
            model.on_outage = OutageNotices(pipeline.tell_owner, settings.bot_language)
        memory = MemoryManager(
            settings.memory_limit, warning=settings.memory_warning, critical=settings.memory_critical
        )
        bot = cls(settings, transport, store, pipeline, cache, history, model, memory, transcriber)
        memory.on_change(bot._on_memory_state)
        return bot

    def _on_memory_state(self, old: MemoryState, new: MemoryState) -> None:
        """Shed load before the platform kills the process; restore it when memory is back."""
        full = self.settings.openai_max_concurrency
        if new is not MemoryState.CRITICAL:
            # Python seldom returns memory to the system: waiting for NORMAL could wait forever.
            self.pipeline.open_model_gate()
        if new is MemoryState.NORMAL:
            self._resize_model_limit(full)
            logger.info("memory normal: caps restored, waiting messages go to the model")
            return
        fraction = 1.0 if new is MemoryState.CRITICAL else self.settings.memory_shrink_fraction
        dropped = self.cache.shrink(fraction) + self.history.shrink(fraction)
        # Per-chat state that is still live (a rate-limit window, a human's pause) is kept: dropping it
        # would answer chats a human took over. What has ended goes.
        limiter = self.pipeline.rate_limiter
        idle = (
            self.pipeline.takeover.prune()
            + (limiter.prune() if limiter else 0)
            + self.pipeline.media_notices.prune()
            + self.pipeline.flow_files.prune()
            + (self.call_notices.prune() if self.call_notices else 0)
        )
        capped = max(1, round(full * (1 - self.settings.memory_shrink_fraction)))
        self._resize_model_limit(capped)
        if new is MemoryState.CRITICAL:
            self.pipeline.model_gate.clear()
        logger.warning(
            "memory {}: dropped {} cached entries and {} idle chat states, model calls capped at {}",
            new.value,
            dropped,
            idle,
            capped,
        )

    def _resize_model_limit(self, capacity: int) -> None:
        if self.model is not None:
            self._background.spawn(self.model.limit.resize(capacity), "resize-model-limit")

    async def start(self, *, recover: bool = True) -> None:
        """Open the store and start the pipeline; `recover=False` leaves answering what a crash left
        unanswered to the caller (`run_whatsapp` does it once it holds the session lease)."""
        await self.store.open()
        await self._restore_pauses()
        await self.pipeline.start()
        await self._load_number_lists()
        self._warn_missing_tools()
        self.memory.check()  # a start short of memory holds recovered messages back from the first one
        if recover:
            await self.recover()
        self._tasks.append(asyncio.create_task(self.memory.run(self._stop), name="memory-manager"))
        self._tasks.append(asyncio.create_task(self._refresh_number_lists(), name="number-lists"))
        self._tasks.append(asyncio.create_task(self._sweep_temp_files(), name="temp-sweeper"))
        if self.settings.supabase_url:
            self._tasks.append(asyncio.create_task(self._refresh_flows(), name="flows-refresher"))

    async def _restore_pauses(self) -> None:
        """Chats a human took over (and `!bot pause all`) stay paused across a restart or a deploy. Read at
        start and again by `recover`, once this instance holds the session lease: during a deploy the old
        instance keeps answering, and a takeover it saw then must not be missed."""
        takeover = self.pipeline.takeover
        try:
            pauses = await self.store.pauses(time.time())
        except StoreUnavailable as error:
            logger.warning("could not read paused chats: {}", error)
        else:
            for chat, until in self._pause_changes.items():  # newer than the store: not written yet
                apply_pause(pauses, chat, until)
            takeover.restore(pauses, time.time())
            if pauses:
                logger.info("{} paused chat(s) restored", len(pauses))
        takeover.on_change = self._save_pause

    def _save_pause(self, chat: str, until: float | None) -> None:
        """Queue the change for the one task that writes them, in order, the latest per chat (concurrent
        requests to Supabase could land a 'pause all' after the 'resume all' that followed it)."""
        queue_pause_change(self._pause_changes, chat, until)
        self._pause_notes.append((chat, until))
        if self._pause_writer is None or self._pause_writer.done():
            self._pause_writer = self._background.spawn(self._write_pauses(), "save-pauses")

    async def _write_pauses(self) -> None:
        while self._pause_notes or self._pause_changes:
            while self._pause_notes:  # each change kept where a restart finds it, once, in order
                chat, until = self._pause_notes.popleft()
                try:
                    await self.store.note_pause(chat, until)
                except Exception as error:
                    self._pause_notes_failed = True
                    logger.warning("a pause change is not kept locally: {}", error)
            if not self._pause_changes:
                break
            chat, until = next(iter(self._pause_changes.items()))
            try:
                await self.store.set_pause(chat, until)
            except StoreUnavailable as error:
                # Every 5 s; while stopping (save_pauses waits), every 0.25 s: a store that writes again
                # a moment later must still get the changes before the lease goes.
                retry_s = 0.25 if self._saving_pauses else 5.0
                logger.warning("a pause is not saved yet (retrying in {:g} s): {}", retry_s, error)
                if not self._pause_wake.is_set():  # stop() may have asked for a last try already
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(retry_s):
                            await self._pause_wake.wait()
                self._pause_wake.clear()
                continue
            except Exception as error:  # never let one change block the ones after it
                logger.error("a pause could not be saved, dropped: {}", error)
            if self._pause_changes.get(chat, 0.0) == until:  # not changed again meanwhile
                del self._pause_changes[chat]

    async def save_pauses(self, timeout: float = 5.0) -> None:
        """Wait (a bounded time) until every pause change is in the store: before the session lease is
        released, since the next instance reads them as soon as it holds it."""
        writer = self._pause_writer
        if writer is None or writer.done():
            return
        self._saving_pauses = True
        self._pause_wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(writer), timeout)
        if not writer.done():
            kept = getattr(self.store, "sends_unsent_pauses_later", False) and not self._pause_notes_failed
            if kept:  # in the store's journal file: not lost
                logger.warning(
                    "{} pause change(s) not in the database yet; sent at the next start",
                    len(self._pause_changes),
                )
            else:
                logger.error("{} pause change(s) not saved before stopping", len(self._pause_changes))
            writer.cancel()

    def _warn_missing_tools(self) -> None:
        """Said at start, where the owner looks, rather than as a vague apology to each voice note."""
        documents = self.pipeline.media.documents
        if isinstance(documents, PdfReader) and documents.missing_tool:
            logger.warning(
                "pdftotext not found: PDFs get the polite reply until it is installed "
                "(apt-get install poppler-utils)"
            )
        videos = self.pipeline.media.videos
        if not (self.transcriber.enabled or (videos is not None and videos.enabled)):
            return
        for tool in ("ffmpeg", "ffprobe"):
            if shutil.which(tool) is None:
                logger.warning(
                    "{} not found: voice notes and videos get an apology until it is installed "
                    "(apt-get install ffmpeg)",
                    tool,
                )

    async def _refresh_flows(self, every_s: float = 60) -> None:
        """With Supabase, bot_flows is the source of keyword flows (the file only while it is empty)."""
        file_flows = read_flows_file(self.settings)
        seen: list[Flow] | None = None
        while not self._stop.is_set():
            try:
                flows = list(await self.store.flows())
            except Exception as error:
                logger.warning("could not read bot_flows: {}", error)
            else:
                if flows != seen:  # said once per change of the table, not every minute
                    seen = flows
                    if flows and any(flow.file for flow in file_flows):
                        logger.warning(
                            "flows come from bot_flows: the files of the flows file ({}) are not sent",
                            self.settings.flows_file,
                        )
                    for flow in flows:
                        if flow.enabled and (why := unusable(flow)):
                            logger.warning(
                                "bot_flows: the flow with keywords {} is skipped: {}",
                                list(flow.keywords),
                                why,
                            )
                self.pipeline.responder.flows.replace(flows or file_flows)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every_s):
                    await self._stop.wait()

    async def _load_number_lists(self) -> None:
        """Allow and block lists: the settings' plus the bot_contacts table's (kept as they were if the
        database cannot be read)."""
        try:
            allowed, blocked = await self.store.number_lists()
        except Exception as error:
            logger.warning("could not read bot_contacts: {}", error)
            return
        self.pipeline.allowed_numbers = self.settings.allowed | allowed
        self.pipeline.blocked_numbers = self.settings.blocked | blocked

    async def _refresh_number_lists(self, every_s: float = 60) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every_s):
                    await self._stop.wait()
            if not self._stop.is_set():
                await self._load_number_lists()

    async def _sweep_temp_files(self, every_s: float = 600) -> None:
        """Leftover temp files (from a crash mid-transcode) go at start and every ten minutes."""
        while not self._stop.is_set():
            removed = await asyncio.to_thread(self.transcriber.sweep)
            if isinstance(self.pipeline.media.videos, VideoReader):
                removed += await asyncio.to_thread(self.pipeline.media.videos.sweep)
            if removed:
                logger.info("removed {} leftover temp file(s)", removed)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every_s):
                    await self._stop.wait()

    async def recover(self) -> None:
        """Answer what a crash left unanswered, if it is still fresh; mark the rest skipped."""
        await self._restore_pauses()  # first: a message in a chat the owner has is not answered
        window = self.settings.recovery_window_minutes * 60
        fresh_since = time.time() - window if window else 0.0  # 0: no window, as for a live backlog
        promised = await self._promised(fresh_since)  # before the window's cut, which skips them
        try:
            stale = await self.store.mark_stale(fresh_since)
        except StoreUnavailable as error:  # e.g. a full journal during an outage: start all the same
            logger.warning("could not mark old unanswered messages skipped: {}", error)
            stale = 0
        for row in promised:  # not skipped after all: a second crash before the answer finds them again
            with contextlib.suppress(StoreUnavailable):
                await self.store.set_status(row.wa_message_id, MessageStatus.RECEIVED)
        stale = max(0, stale - len(promised))
        # At most what may wait in memory; the rest is read back as the queue empties, like a spill.
        limit = max(0, self.pipeline.max_waiting - len(promised))  # the promised ones wait in memory too
        rest: Counter[str] | None = None  # chats with messages left in the store, and how many each
        try:
            pending = await self.store.unanswered_inbound(fresh_since, limit=limit) if limit else []
        except StoreUnavailable:  # Supabase down: what the local journal knows, in one go
            everything = await self.store.unanswered_inbound(fresh_since)
            pending, rest = everything[:limit], Counter(row.chat_id for row in everything[limit:])
        if len(pending) == limit:
            if rest is None:
                rest = await self._count_the_rest(pending, fresh_since)
            # Known to the pipeline, so a new message of those chats waits behind them even while the
            # store cannot take it (it would be answered first otherwise).
            self.pipeline.resume_rest_from_store(fresh_since, rest)
        resumed = 0
        for stored in [*promised, *pending]:  # the promised ones are older: first
            inbound = inbound_from_stored(stored)
            note_inbound = getattr(self.transport, "note_inbound", None)
            if note_inbound is not None:  # the governor forgot at restart that this chat wrote to us
                note_inbound(inbound)
            resumed += self.pipeline.resume(inbound)
        if stale or resumed:
            logger.warning(
                "recovered after a stop: {} message(s) answered now, {} too old, skipped",
                resumed,
                stale,
            )

    async def _promised(self, fresh_since: float) -> list[StoredMessage]:
        """Unanswered messages older than the recovery window in chats the bot told "busy, I will answer
        shortly" after them (a crash under memory pressure, say): a promise is kept whatever the window,
        up to PROMISE_KEPT_S. Bounded: the oldest MAX_WAITING_MESSAGES, in at most 200 chats."""
        if not fresh_since:
            return []  # no window: every unanswered message is answered anyway
        since, limit = fresh_since - PROMISE_KEPT_S, self.pipeline.max_waiting
        try:
            try:
                old = await self.store.unanswered_inbound(since, limit=limit)
            except StoreUnavailable:  # Supabase down: what the local journal knows, in one go
                old = (await self.store.unanswered_inbound(since))[:limit]
            by_chat: dict[str, list[StoredMessage]] = {}
            for row in old:
                if row.created_at < fresh_since:
                    by_chat.setdefault(row.chat_id, []).append(row)
            kept: list[StoredMessage] = []
            for chat, rows in list(by_chat.items())[:200]:
                history = await self.store.recent_messages(chat, 50)
                told = [m.created_at for m in history if m.direction is Direction.OUT and m.kind == BUSY_KIND]
                if told and max(told) >= rows[0].created_at:
                    kept.extend(rows)
        except StoreUnavailable as error:
            logger.warning("could not look for promised answers: {}", error)
            return []
        return sorted(kept, key=lambda row: row.created_at)

    async def _count_the_rest(self, first: list[StoredMessage], since: float) -> Counter[str]:
        """The chats of the unanswered messages from `since` on after `first` (the oldest of them, maybe
        none), page by page: counted, not held, since there may be more than memory should take."""
        counts: Counter[str] = Counter()
        cursor = first[-1].created_at if first else since
        at_cursor = {row.wa_message_id for row in first if row.created_at == cursor}  # counted already
        size = _PAGE
        try:
            while True:
                page = await self.store.unanswered_inbound(cursor, limit=size)
                new = [row for row in page if row.wa_message_id not in at_cursor]
                counts.update(row.chat_id for row in new)
                at_cursor.update(row.wa_message_id for row in new)
                if len(page) < size:
                    return counts
                if not new:  # a whole page of rows at one instant: read more at once
                    size *= 2
                    continue
                last = page[-1].created_at
                if last != cursor:
                    at_cursor = {row.wa_message_id for row in page if row.created_at == last}
                cursor = last
        except StoreUnavailable as error:
            logger.warning("could not count the messages left in the store: {}", error)
            return counts

    async def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        await self.pipeline.stop(timeout)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.save_pauses()  # a takeover seen while stopping must reach the store
        await self.store.close()
        if self.model is not None:
            await self.model.close()

    def metrics(self) -> dict[str, Any]:
        self.memory.sample()  # a fresh figure; a scrape never changes the state (only the poller does)
        connection = (
            self.connection_stats()
            if self.connection_stats
            else {
                "state": self.transport.state.value,
                "connected": self.transport.state is ConnectionState.CONNECTED,
            }
        )
        ai = (
            self.model.stats()
            if self.model
            else {
                "enabled": False,
                "requests": 0,
                "errors": 0,
                "in_flight": 0,
                "latency_ms": {"p50": 0.0, "p95": 0.0},
                "circuit": "off",
            }
        )
        return {
            "uptime_s": round(time.time() - self.started_at, 1),
            "memory": {**self.memory.stats(), "structures": self._structures()},
            "connection": connection,
            "messages": self.pipeline.stats(),
            "cache": self.cache.stats(),
            "history": self.history.stats(),
            "ai": ai,
            "responses": dict(self.pipeline.responder.by_source),
            "store": self.store.stats(),
            "media": self.transcriber.stats(),
            # `is not None`: a limiter tracking no chat right now has len() 0 and would read as false.
            "rate_limit": self.pipeline.rate_limiter.stats()
            if self.pipeline.rate_limiter is not None
            else {},
            "takeover": self.pipeline.takeover.stats(),
            "lease": self.lease.stats() if self.lease is not None else None,
        }

    def _structures(self) -> dict[str, dict[str, int]]:
        """Each in-memory structure that grows with traffic: its size, its bound and what it evicted."""
        pipeline = self.pipeline
        cache, history = self.cache.stats(), self.history.stats()
        limiter, calls = pipeline.rate_limiter, self.call_notices
        return {
            "response_cache": {
                "size": int(cache["size"]),
                "max": int(cache["max_entries"]),
                "evictions": int(cache["evictions"]),
                "expirations": int(cache["expirations"]),
            },
            "history_chats": {
                "size": history["chats"],
                "max": history["max_chats"],
                "evictions": history["evictions"],
                "chars": history["chars"],
                "max_chars": history["max_chars"],
            },
            "dedup_ids": _bounded(pipeline.dedup, pipeline.dedup.max_ids),
            "rate_limit_windows": _bounded(limiter, limiter.max_keys if limiter is not None else 0),
            "media_notice_chats": _bounded(pipeline.media_notices, pipeline.media_notices.max_keys),
            "flow_file_chats": _bounded(pipeline.flow_files, pipeline.flow_files.max_keys),
            "call_notice_chats": _bounded(calls, calls.max_keys if calls is not None else 0),
            "chats_with_work": {
                "size": pipeline.active_chats,
                "waiting_messages": pipeline.waiting,
                "max_waiting_messages": pipeline.max_waiting,
            },
        }


def _bounded(structure: Any | None, bound: int) -> dict[str, int]:
    """A bounded structure in /v1/metrics: its size, its bound and what the bound evicted (zeros when off)."""
    if structure is None:
        return {"size": 0, "max": 0, "evictions": 0}
    return {"size": len(structure), "max": bound, "evictions": structure.evictions}


async def run_chat(settings: Settings, *, jsonl: bool) -> int:
    """The console: the same pipeline, stdin in and stdout out."""
    from connection.console import ConsoleTransport

    transport = ConsoleTransport(jsonl=jsonl)
    bot = Bot.build(settings, transport)
    # No owner to hand a chat to here: "quiero hablar con una persona" would silence the console for good.
    bot.pipeline.handoff = None
    await bot.start()
    if not jsonl:
        mode = "AI on" if bot.model else "AI off (no OPENAI_API_KEY nor OPENAI_BASE_URL): keyword flows only"
        print(
            f"Chatting with the bot ({mode}). Type a message; Ctrl-D to quit.",
            file=sys.stderr,
        )
    # SIGTERM or SIGINT: stop reading, finish the replies in flight (bounded), flush, exit 0.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reading = asyncio.create_task(transport.read_stdin(bot.pipeline.submit), name="stdin")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if reading.done():
            bad = reading.result()
            if bad:
                print(f"{bad} line(s) could not be read (see the errors above)", file=sys.stderr)
            # Every reply out before exiting, unless a signal says stop (a model that hangs, say).
            draining = asyncio.create_task(bot.pipeline.drain(), name="drain")
            await asyncio.wait({draining, stopping}, return_when=asyncio.FIRST_COMPLETED)
            draining.cancel()
    finally:
        for task in (reading, stopping):
            task.cancel()
        await asyncio.gather(reading, stopping, return_exceptions=True)
        await bot.stop(timeout=8.0)
    return 0
