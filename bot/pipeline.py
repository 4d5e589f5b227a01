"""The message pipeline: cheap filters at intake, then one ordered worker per chat.

`submit` runs synchronously in the transport's callback: it counts, de-duplicates
and filters, then queues the message on its chat. Each chat with queued messages
has one worker task, so a chat's messages are answered in order while chats run
concurrently; the worker ends (and its state is dropped) when the queue is empty.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from loguru import logger

from bot.ai import percentile
from bot.replies import Language, reply
from bot.responder import Answer, Responder, split_message
from connection.types import ChatId, Inbound, MessageId, MessageKind, Transport, TransportError
from memory.history import ChatHistory
from memory.store import Direction, MessageStatus, Store, StoredMessage

GroupPolicy = Literal["never", "mentioned", "always"]
_MEDIA_KINDS = {
    MessageKind.IMAGE,
    MessageKind.VIDEO,
    MessageKind.STICKER,
    MessageKind.DOCUMENT,
}


class VoiceTranscriber(Protocol):
    """What the pipeline needs from media/ (see media.audio.VoiceTranscriber)."""

    @property
    def enabled(self) -> bool: ...

    def check_declared_size(self, size_bytes: int | None) -> None: ...

    async def transcribe(self, data: bytes, mimetype: str = ...) -> str: ...


class AudioFailure(Protocol):
    reason: str
    limit: float | None


@dataclass
class MessageCounters:
    received: int = 0
    answered: int = 0
    failed: int = 0
    duplicates: int = 0
    skipped: int = 0
    rate_limited: int = 0
    queued: int = 0
    transcribed: int = 0


class DedupWindow:
    """The ids seen recently, bounded; seeded from the store so a redelivery after a restart is caught."""

    def __init__(self, max_ids: int) -> None:
        self.max_ids = max_ids
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def seen(self, message_id: str) -> bool:
        """True if the id was seen before; records it otherwise."""
        if message_id in self._ids:
            return True
        self._ids[message_id] = None
        if len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)
        return False

    def seed(self, ids: list[str]) -> None:
        for message_id in reversed(ids):  # newest last, so the newest are evicted last
            self.seen(message_id)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str, max_chars: int) -> tuple[str, bool]:
    """Drop control characters (keeping line breaks and tabs) and trim; returns (text, trimmed).

    Only C0/C1 controls go: format characters such as the zero-width joiner hold emoji together.
    """
    cleaned = _CONTROL.sub("", text).strip()
    if len(cleaned) > max_chars:
        return cleaned[:max_chars], True
    return cleaned, False


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
        group_policy: GroupPolicy = "mentioned",
        max_reply_chars: int = 1500,
        max_inbound_chars: int = 4000,
        max_active_chats: int = 256,
        dedup_window: int = 20000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.history = history
        self.responder = responder
        self.transport = transport
        self.language = language
        self.transcriber = transcriber
        self.group_policy = group_policy
        self.max_reply_chars = max_reply_chars
        self.max_inbound_chars = max_inbound_chars
        self.clock = clock
        self.counters = MessageCounters()
        self.dedup = DedupWindow(dedup_window)
        self._queues: dict[ChatId, deque[Inbound]] = {}
        self._workers: dict[ChatId, asyncio.Task[None]] = {}
        self._active = asyncio.Semaphore(max_active_chats)
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._overhead: deque[float] = deque(maxlen=10000)

    async def start(self, *, dedup_since_s: float = 3 * 86400) -> None:
        ids = await self.store.recent_message_ids(self.clock() - dedup_since_s, self.dedup.max_ids)
        self.dedup.seed(ids)
        logger.info("pipeline ready: {} recent message ids loaded for de-duplication", len(ids))

    # -- intake (synchronous, cheap first) -------------------------------------------------------

    def submit(self, message: Inbound) -> bool:
        """Take one inbound message; returns True if it was queued for an answer."""
        self.counters.received += 1
        if not self._accepting:
            logger.warning("shutting down: message {} not taken", message.id)
            return False
        if not message.id or not message.chat:
            self._skip(message, "malformed (no id or chat)")
            return False
        if self.dedup.seen(message.id):
            self.counters.duplicates += 1
            logger.debug("duplicate message {} ignored", message.id)
            return False
        reason = self._filter(message)
        if reason is not None:
            self._skip(message, reason)
            return False
        queue = self._queues.get(message.chat)
        if queue is None:
            queue = self._queues[message.chat] = deque()
        queue.append(message)
        self.counters.queued += 1
        if message.chat not in self._workers:
            self._idle.clear()
            self._workers[message.chat] = asyncio.create_task(
                self._chat_worker(message.chat),
                name=f"chat-worker-{len(self._workers)}",
            )
        return True

    def resume(self, message: Inbound) -> bool:
        """Queue a message persisted before a restart but never answered (bypasses de-duplication)."""
        self.dedup.seen(message.id)
        return self._enqueue(message)

    def _enqueue(self, message: Inbound) -> bool:
        queue = self._queues.get(message.chat)
        if queue is None:
            queue = self._queues[message.chat] = deque()
        queue.append(message)
        self.counters.queued += 1
        if message.chat not in self._workers:
            self._idle.clear()
            self._workers[message.chat] = asyncio.create_task(
                self._chat_worker(message.chat),
                name=f"chat-worker-{len(self._workers)}",
            )
        return True

    def _filter(self, message: Inbound) -> str | None:
        if message.from_me:
            return "own message"
        if message.is_status:
            return "status broadcast"
        if message.is_group and not (
            self.group_policy == "always" or (self.group_policy == "mentioned" and message.mentions_me)
        ):
            return "group message"
        if message.kind in (MessageKind.REACTION, MessageKind.OTHER):
            return f"{message.kind.value} message"
        return None

    def _skip(self, message: Inbound, reason: str) -> None:
        self.counters.skipped += 1
        logger.debug("skipped message {} in {}: {}", message.id, message.chat, reason)

    # -- per-chat workers -------------------------------------------------------------------------

    async def _chat_worker(self, chat: ChatId) -> None:
        queue = self._queues[chat]
        try:
            while queue:
                message = queue.popleft()
                async with self._active:
                    await self._handle_safely(message)
        finally:
            # No await between the emptiness check above and this cleanup, so nothing is lost.
            del self._queues[chat]
            del self._workers[chat]
            if not self._workers:
                self._idle.set()

    async def _handle_safely(self, message: Inbound) -> None:
        try:
            await self.handle(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters.failed += 1
            logger.exception("failed to handle message {} in {}", message.id, message.chat)
            try:
                await self.store.set_status(message.id, MessageStatus.FAILED)
            except Exception as error:
                logger.error("could not mark message {} failed: {}", message.id, error)

    async def handle(self, message: Inbound) -> None:
        """Persist, understand, answer, send and record one message."""
        started = time.perf_counter()
        inbound = StoredMessage(
            wa_message_id=message.id,
            chat_id=message.chat,
            direction=Direction.IN,
            kind=message.kind.value,
            body=message.text[: self.max_inbound_chars],
            status=MessageStatus.RECEIVED,
            created_at=message.timestamp or self.clock(),
        )
        # The write starts now and runs while the answer is worked out; it is awaited before
        # anything is sent, so a message is always durable before it is answered.
        persisted = self.store.add_message(inbound)
        self.history.append(inbound)
        try:
            await self._mark_read(message)
            model_time = 0.0
            text, canned = await self._understand(message, persisted)
            if canned is not None:
                answer_text, via_model = canned, False
            else:
                answer = self.responder.quick_answer(text)
                via_model = answer is None
                if answer is None:
                    model_started = time.perf_counter()
                    answer = await self._ask_model(message, text)
                    model_time = time.perf_counter() - model_started
                answer_text = answer.text
        finally:
            await persisted
        sent_ids = await self._send(message, answer_text)
        # Overhead as the customer meets it: until the answer is handed to the transport.
        self._overhead.append(time.perf_counter() - started - model_time)
        await self._record_reply(message, sent_ids, answer_text, via_model=via_model)

    async def _understand(self, message: Inbound, persisted: Awaitable[None]) -> tuple[str, str | None]:
        """The text to answer, or a canned reply when there is nothing to hand to the responder."""
        if message.kind is MessageKind.AUDIO:
            await persisted  # the transcript updates the stored row
            return await self._transcribe(message)
        if message.kind in _MEDIA_KINDS:
            return "", reply("media_unsupported", self.language)
        text, trimmed = clean_text(message.text, self.max_inbound_chars)
        if not text:
            return "", reply("empty", self.language)
        if trimmed:
            note = reply("too_long_note", self.language)
            logger.info(
                "message {} trimmed to {} characters",
                message.id,
                self.max_inbound_chars,
            )
            return f"{text}\n\n{note}", None
        return text, None

    async def _transcribe(self, message: Inbound) -> tuple[str, str | None]:
        if self.transcriber is None or not self.transcriber.enabled:
            return "", reply("audio_ai_off", self.language)
        try:
            size = message.media.size_bytes if message.media else None
            self.transcriber.check_declared_size(size)
            data = await self.transport.download_media(message)
            mimetype = message.media.mimetype if message.media else "audio/ogg"
            text = await self.transcriber.transcribe(data, mimetype or "audio/ogg")
        except TransportError as error:
            logger.warning("voice note {} could not be downloaded: {}", message.id, error)
            return "", reply("audio_unreadable", self.language)
        except Exception as error:
            reason = getattr(error, "reason", None)
            if reason is None:
                raise
            logger.info("voice note {} not transcribed: {} ({})", message.id, reason, error)
            return "", self._audio_reply(reason, getattr(error, "limit", None))
        self.counters.transcribed += 1
        await self.store.set_status(message.id, MessageStatus.RECEIVED, body=text)
        return clean_text(text, self.max_inbound_chars)[0], None

    def _audio_reply(self, reason: str, limit: float | None) -> str:
        if reason == "too_large":
            return reply("audio_too_large", self.language, limit=limit or 0)
        if reason == "too_long":
            return reply("audio_too_long", self.language, limit=limit or 0)
        if reason == "empty":
            return reply("audio_empty", self.language)
        if reason == "ai_off":
            return reply("audio_ai_off", self.language)
        if reason in ("transcription_failed", "timeout"):
            return reply("ai_error", self.language)
        return reply("audio_unreadable", self.language)

    async def _ask_model(self, message: Inbound, text: str) -> Answer:
        history = await self.history.recent(message.chat, before=message.id)
        await self._typing(message.chat, True)
        try:
            return await self.responder.model_answer(text, history)
        finally:
            await self._typing(message.chat, False)

    async def _send(self, message: Inbound, text: str) -> list[MessageId]:
        return [
            await self.transport.send_text(message.chat, part)
            for part in split_message(text, self.max_reply_chars)
        ]

    async def _record_reply(
        self, message: Inbound, sent_ids: list[MessageId], text: str, *, via_model: bool
    ) -> None:
        outbound = StoredMessage(
            wa_message_id=sent_ids[0] if sent_ids else f"{message.id}:reply",
            chat_id=message.chat,
            direction=Direction.OUT,
            kind="text",
            body=text,
            status=MessageStatus.SENT,
            created_at=self.clock(),
        )
        # Awaited before the chat's next message, so a crash cannot leave it looking unanswered.
        await self.store.add_reply(outbound, message.id)
        self.history.append(outbound)
        self.counters.answered += 1
        logger.info(
            "answered {} in {} ({} part(s), {})",
            message.id,
            message.chat,
            len(sent_ids),
            "model" if via_model else "canned",
        )

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

    # -- lifecycle --------------------------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued message is handled; False if `timeout` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop taking messages, let in-flight ones finish within `timeout`, cancel the rest."""
        self._accepting = False
        if not await self.drain(timeout):
            logger.warning(
                "{} chat(s) still busy after {:.0f} s; cancelling",
                len(self._workers),
                timeout,
            )
            workers = list(self._workers.values())
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    @property
    def active_chats(self) -> int:
        return len(self._workers)

    def stats(self) -> dict[str, Any]:
        samples = list(self._overhead)
        return {
            **asdict(self.counters),
            "active_chats": len(self._workers),
            "waiting": sum(len(q) for q in self._queues.values()),
            "dedup_window": len(self.dedup),
            "overhead_ms": {
                "p50": round(percentile(samples, 0.5) * 1000, 3),
                "p99": round(percentile(samples, 0.99) * 1000, 3),
            },
        }
