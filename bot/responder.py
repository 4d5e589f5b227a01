"""Turns a customer's text into the bot's answer: keyword flows, then the cache, then the model."""

from __future__ import annotations

import enum
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from zoneinfo import ZoneInfo

from loguru import logger

from bot.ai import AIError, ChatModel
from bot.flows import FlowMatcher
from bot.formatting import for_whatsapp
from bot.localtime import local_time_line
from bot.replies import Language, reply
from memory.cache import TTLCache
from memory.store import BUSY_KIND, Direction, MessageStatus, StoredMessage

# How a photo shows in the history the model reads: the photo itself is shown only with its own turn.
PHOTO_MARK = "(📷)"
STICKER_MARK = "(sticker)"
DOCUMENT_MARK = "(📄)"
VIDEO_MARK = "(🎬)"


class Source(enum.StrEnum):
    FLOW = "flow"
    CACHE = "cache"
    MODEL = "model"
    AI_OFF = "ai_off"
    AI_ERROR = "ai_error"


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    source: Source
    file: str | None = None  # a flow's photo or document, sent with the text

    @property
    def canned(self) -> bool:
        return self.source is not Source.MODEL and self.source is not Source.CACHE


class PhotoRefused(Exception):
    """The model refused a request for its photos (one that reads no images): ask it again without them."""


def build_messages(system_prompt: str, history: Sequence[StoredMessage], text: str) -> list[dict[str, Any]]:
    """System prompt, the chat's recent turns (user and bot alike), then the new message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}]
    for turn in history:
        never_got = turn.status is MessageStatus.FAILED  # dropped from the outbox
        if turn.direction is Direction.OUT and (never_got or turn.kind == BUSY_KIND):
            continue  # not a turn of the conversation: a reply the customer never got, or a busy notice
        role = "user" if turn.direction is Direction.IN else "assistant"
        body = turn.body
        if turn.kind == "image" and turn.direction is Direction.IN:  # "¿y en azul?" was about a photo
            body = f"{PHOTO_MARK} {body}".rstrip()
        elif turn.kind == "sticker" and turn.direction is Direction.IN:
            body = STICKER_MARK
        elif turn.kind == "video" and turn.direction is Direction.IN:
            body = f"{VIDEO_MARK} {body}".rstrip()
        elif turn.kind == "document" and turn.direction is Direction.IN:  # its text: in its own turn only
            body = f"{DOCUMENT_MARK} {body}".rstrip()
        if body:
            messages.append({"role": role, "content": body})
    messages.append({"role": "user", "content": text})
    return messages


def with_photos(text: str, photos: Sequence[str], detail: str = "auto") -> list[dict[str, Any]]:
    """A user turn's content with its photos (data: URLs) after the words, in the chat completions format.
    `detail` is OpenAI's (low, high, auto); other servers ignore it."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts.extend({"type": "image_url", "image_url": {"url": url, "detail": detail}} for url in photos)
    return parts


def with_facts(system_prompt: str, facts: Sequence[str]) -> str:
    """The system prompt plus the answers of the flows a message matched, when a flow did not answer it
    alone ("¿horario del sábado? y quiero cancelar el pedido 123"): the model then gives the business's own
    hours and answers the rest."""
    if not facts:
        return system_prompt
    listed = "\n".join(f"- {fact}" for fact in facts)
    return (
        f"{system_prompt}\n\nFacts from the business that bear on the customer's message; where they apply, "
        f"use them as they are and do not contradict them:\n{listed}"
    )


def cache_key(model: str, messages: list[dict[str, Any]]) -> str:
    """The whole context is the key, so an answer is only reused for an identical conversation.

    Two chats share a cached answer only when their system prompt, history and new
    message are all the same (typically a first question like "¿horario?"), never
    when the answer depended on anything one of them said before.
    """
    # Each part carries its length, so no two different conversations give the same bytes.
    blob = "\x1e".join([model, *(f"{m['role']}:{len(m['content'])}:{m['content']}" for m in messages)])
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


# A message of this many words at most, or with a question mark, asks for what its keywords name: when the
# model fails, the flows' answers go out for it ("la carta, porfa"); a longer one may be a complaint.
MAX_WORDS_ASKING = 8


def _asks(text: str) -> bool:
    return "?" in text or "¿" in text or len(text.split()) <= MAX_WORDS_ASKING


class Responder:
    def __init__(
        self,
        *,
        flows: FlowMatcher,
        cache: TTLCache[str, str],
        model: ChatModel | None,
        system_prompt: str,
        language: Language,
        time_zone: ZoneInfo | None = None,
        clock: Callable[[], float] = time.time,
        photo_detail: str = "auto",
    ) -> None:
        self.flows = flows
        self.cache = cache
        self.model = model
        self.system_prompt = system_prompt
        self.language = language
        self.time_zone = time_zone  # the model is told the local date and time (BOT_TIMEZONE)
        self.clock = clock
        self.photo_detail = photo_detail  # IMAGE_DETAIL
        self.by_source: dict[str, int] = {source.value: 0 for source in Source}

    def quick_answer(self, text: str) -> Answer | None:
        """A flow answer, or None when the text needs the history and the model (no flow matches, or the
        message asks more than a flow's question: see FlowMatcher.match)."""
        flow = self.flows.find(text)
        if flow is None:
            return None
        self.by_source[Source.FLOW.value] += 1
        return Answer(flow.answer, Source.FLOW, flow.file)

    async def answer(self, text: str, history: Sequence[StoredMessage]) -> Answer:
        """The whole chain: flows, then the cache, then the model."""
        return self.quick_answer(text) or await self.model_answer(text, history)

    async def model_answer(
        self, text: str, history: Sequence[StoredMessage], context: str = "", photos: Sequence[str] = ()
    ) -> Answer:
        """The cache, then the model, told the answers of the flows the text matched (or the polite reply
        when AI is off, after those answers, or an apology on failure). `context` goes before the text for
        the model only (what the message replies to): the flows read the customer's own words. `photos`
        (data: URLs) are shown with the text, and their answer is not cached; a model that refuses them
        raises PhotoRefused."""
        result = await self._from_model(text, history, context, photos)
        self.by_source[result.source.value] += 1
        if result.source in (Source.MODEL, Source.CACHE):  # "**Horario:**" would reach WhatsApp as written
            result = replace(result, text=for_whatsapp(result.text))
        if result.source is not Source.AI_ERROR and (file := self.flows.file_for(text)):
            result = replace(result, file=file)  # the file of a flow the message matched
        return result

    async def _from_model(
        self, text: str, history: Sequence[StoredMessage], context: str, photos: Sequence[str]
    ) -> Answer:
        facts = self.flows.facts(text)
        if self.model is None:  # what the flows know of a message that asks, and that someone will answer
            told = facts if _asks(text) else []  # "el precio me parece un abuso" is no question about prices
            return Answer("\n\n".join([*told, reply("ai_off", self.language)]), Source.AI_OFF)
        asked = f"{context}\n\n{text}" if context and text else context or text  # a PDF alone: its text
        prompt = self.system_prompt
        if self.time_zone is not None:  # to the minute, so a cached answer is reused within that minute only
            prompt = f"{prompt}\n\n{local_time_line(self.time_zone, self.language, self.clock())}"
        messages = build_messages(with_facts(prompt, facts), history, asked)
        key = None
        if photos:  # a photo is seldom sent twice: not worth a key over its bytes
            messages[-1]["content"] = with_photos(asked, photos, self.photo_detail)
        else:  # the facts are in the key (the system prompt): an answer is reused only with the same facts
            key = cache_key(self.model.model, messages)
            cached = self.cache.get(key)
            if cached is not None:
                return Answer(cached, Source.CACHE)
        try:
            completion = await self.model.complete(messages)
        except AIError as error:
            if photos and error.about_images:
                raise PhotoRefused(str(error)) from error
            if not (error.context_too_long and len(messages) > 2):
                logger.error("model failed, sending an apology: {}", error)
                return self._apology(text, facts)
            # The history (long messages) no longer fits the model: answer the message on its own.
            logger.warning("conversation too long for the model; answering without its history")
            try:
                return Answer((await self.model.complete([messages[0], messages[-1]])).text, Source.MODEL)
            except AIError as second:
                logger.error("model failed, sending an apology: {}", second)
                return self._apology(text, facts)
        if completion.whole and key is not None:  # an answer cut at the token limit is not for everyone
            self.cache.set(key, completion.text)
        return Answer(completion.text, Source.MODEL)

    def _apology(self, text: str, facts: list[str]) -> Answer:
        """A model that failed: the apology, after what the flows know of a message that asks ("¿me pasas la
        carta?" still gets the menu and its file; "la paella de la carta llegó fría..." does not)."""
        if not facts or not _asks(text):
            return Answer(reply("ai_error", self.language), Source.AI_ERROR)
        said = "\n\n".join([*facts, reply("ai_error_after_facts", self.language)])
        return Answer(said, Source.AI_ERROR, self.flows.file_for(text))


_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?…])(?=\s)|(?<=\n)")


def split_message(text: str, limit: int) -> list[str]:
    """Split a long answer into chunks of at most `limit` characters at sentence boundaries.

    Line breaks inside a chunk are kept (lists stay lists); a sentence longer than
    the limit is cut at word boundaries, and a word longer than it is cut hard.
    """
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    chunks: list[str] = []
    current = ""
    for segment in _SENTENCE_BOUNDARY.split(text):
        for piece in _fit(segment, limit):
            if len((current + piece).strip()) <= limit:
                current += piece
            else:
                if current.strip():
                    chunks.append(current.strip())
                current = piece.lstrip()
    if current.strip():
        chunks.append(current.strip())
    return chunks


def _fit(segment: str, limit: int) -> list[str]:
    if len(segment.strip()) <= limit:
        return [segment]
    pieces: list[str] = []
    current = ""
    for word in segment.split():
        while len(word) > limit:  # cut hard, filling the piece begun (no lone "Mira:" before a long URL)
            room = limit - len(current) - 1 if current else limit
            if room < 1:  # the piece begun is full already
                pieces.append(current)
                current = ""
                continue
            pieces.append(f"{current} {word[:room]}" if current else word[:room])
            current, word = "", word[room:]
        candidate = f"{current} {word}" if current else word
        if len(candidate) <= limit:
            current = candidate
        else:
            pieces.append(current)
            current = word
    if current:
        pieces.append(current)
    return [f" {piece}" for piece in pieces]
