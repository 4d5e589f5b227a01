"""Ban-risk governor: what WhatsApp's own ban reasons warn about, enforced on the WhatsApp transport.

- the bot only replies: it never writes to a chat that has not written to it recently;
- a global budget of messages per minute; beyond it, sends wait their turn;
- a typing pause proportional to the answer's length, with jitter, before each send;
- the same text to many chats within a short time is spread out (canned replies excepted).

It wraps any Transport; the console transport is left unwrapped (no pauses, no budgets).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from connection.types import (
    ChatId,
    ConnectionState,
    Inbound,
    MessageId,
    SendWithheld,
    Transport,
    TransportError,
)


@dataclass(frozen=True)
class GovernorLimits:
    per_minute: int = 40  # messages sent per minute, all chats together
    typing_chars_per_s: float = 25.0  # a fast human typist
    typing_max_s: float = 6.0
    typing_jitter: float = 0.3  # +/- this fraction
    same_text_max_chats: int = 5  # the same text to more chats than this within the window waits
    same_text_window_s: float = 60.0
    reply_window_s: float = 24 * 3600  # a chat may be answered this long after its last message
    allow_initiate: bool = False


class GovernedTransport:
    """A Transport wrapper; `note_inbound` must see every inbound message (wire it before the pipeline)."""

    def __init__(
        self,
        inner: Transport,
        limits: GovernorLimits,
        *,
        canned: set[str] | frozenset[str] = frozenset(),
        max_chats: int = 50000,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.inner = inner
        self.limits = limits
        self.canned = frozenset(text for text in canned if "{" not in text)
        # Canned replies with a value in them ("the limit is {limit:g} MB"): matched as patterns.
        self._canned_patterns = [_template_pattern(text) for text in canned if "{" in text]
        self.max_chats = max_chats
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._inbound_at: OrderedDict[str, float] = OrderedDict()
        self._sent_at: deque[float] = deque()
        self._same_text: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()
        self._spread_warned: OrderedDict[str, float] = OrderedDict()  # text -> when it was last warned of
        self._budget_lock = asyncio.Lock()
        self.counters = {
            "sent": 0,
            "refused_unsolicited": 0,
            "budget_waits": 0,
            "same_text_waits": 0,
            "withheld": 0,
        }
        self.hold: Callable[[ChatId, str], bool] | None = None  # set by the app: the takeover's holds
        self.typing_s = 0.0
        # A transport with an outbox paces each message when it really goes out (a reconnect must not
        # send the whole outbox at once); any other is paced here, before the send.
        set_pacer = getattr(inner, "set_pacer", None)
        self._inner_paces = set_pacer is not None
        if set_pacer is not None:
            set_pacer(self.pace, self.unspend)

    # -- bookkeeping --------------------------------------------------------------------------------

    def note_inbound(self, message: Inbound) -> None:
        """Record that a chat wrote to us (the owner's own chat counts: owner commands get an answer)."""
        if (message.from_me and not message.is_self_chat) or not message.chat:
            return
        now = self._clock()
        self._inbound_at[message.chat] = now
        self._inbound_at.move_to_end(message.chat)
        while len(self._inbound_at) > self.max_chats:
            self._inbound_at.popitem(last=False)
        # Oldest first: chats silent for longer than the reply window cannot be written to anyway.
        while next(iter(self._inbound_at.values())) < now - self.limits.reply_window_s:
            self._inbound_at.popitem(last=False)

    @property
    def owner_chat(self) -> ChatId | None:
        return getattr(self.inner, "owner_chat", None)

    def _may_write_to(self, chat: str) -> bool:
        if self.limits.allow_initiate or (chat and chat == self.owner_chat):  # the owner's own chat
            return True
        last = self._inbound_at.get(chat)
        return last is not None and self._clock() - last <= self.limits.reply_window_s

    # -- the Transport protocol ---------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self.inner.state

    async def send_text(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
        if not self._may_write_to(chat):
            self.counters["refused_unsolicited"] += 1
            raise TransportError("refused: the bot only replies to chats that wrote to it")
        await self._spread_same_text(chat, text)
        if not self._inner_paces:
            await self.pace(chat, text)
        sent = await self.inner.send_text(chat, text, file)
        self.counters["sent"] += 1
        return sent

    async def set_typing(self, chat: ChatId, typing: bool) -> None:
        await self.inner.set_typing(chat, typing)

    async def mark_read(self, message: Inbound) -> None:
        await self.inner.mark_read(message)

    async def download_media(self, message: Inbound) -> bytes:
        return await self.inner.download_media(message)

    # -- the limits ---------------------------------------------------------------------------------

    async def pace(self, chat: ChatId, text: str) -> float:
        """The typing pause and the per-minute budget, right before a message goes out; returns the budget
        slot taken (for `unspend`). SendWithheld when `hold` says the chat is no longer the bot's (the owner
        wrote while the bot was "typing")."""
        await self._typing_pause(chat, text)
        await self._check_hold(chat, text)
        slot = await self._take_budget()
        try:
            await self._check_hold(chat, text)
        except SendWithheld:
            self.unspend(slot)
            raise
        return slot

    def unspend(self, slot: float) -> None:
        """Give back the budget slot `pace` took for a message that did not go out after all."""
        with contextlib.suppress(ValueError):  # already out of the window
            self._sent_at.remove(slot)

    async def _check_hold(self, chat: ChatId, text: str) -> None:
        if self.hold is None or chat == self.owner_chat or not self.hold(chat, text):
            return  # the owner's own chat is never held: answers to owner commands go there
        self.counters["withheld"] += 1
        with contextlib.suppress(Exception):  # not "typing…" right after the owner's message
            await self.inner.set_typing(chat, False)
        raise SendWithheld("the chat was handed to a human before this message went out")

    async def _typing_pause(self, chat: ChatId, text: str) -> None:
        if self.limits.typing_chars_per_s <= 0:  # 0 turns the pause off
            return
        base = min(self.limits.typing_max_s, len(text) / self.limits.typing_chars_per_s)
        jitter = 1 + self._rng.uniform(-self.limits.typing_jitter, self.limits.typing_jitter)
        pause = max(0.0, base * jitter)
        if pause <= 0:
            return
        self.typing_s += pause
        try:
            await self.inner.set_typing(chat, True)
        except Exception as error:  # typing is cosmetic
            logger.debug("typing indicator failed: {}", error)
        await self._sleep(pause)

    async def _take_budget(self) -> float:
        """Wait for a slot of the per-minute budget; returns it (the time it was taken)."""
        async with self._budget_lock:  # one waiter at a time keeps the sends in order
            while True:
                now = self._clock()
                while self._sent_at and self._sent_at[0] <= now - 60:
                    self._sent_at.popleft()
                if len(self._sent_at) < self.limits.per_minute:
                    self._sent_at.append(now)
                    return now
                self.counters["budget_waits"] += 1
                await self._sleep(self._sent_at[0] + 60 - now)

    def _is_canned(self, text: str) -> bool:
        return text in self.canned or any(pattern.fullmatch(text) for pattern in self._canned_patterns)

    async def _spread_same_text(self, chat: str, text: str) -> None:
        if not text.strip() or self._is_canned(text):  # no text: a flow's file without its caption
            return
        key = hashlib.blake2b(text.strip().casefold().encode(), digest_size=12).hexdigest()
        window = self.limits.same_text_window_s
        while True:
            now = self._clock()
            sends = self._same_text.get(key)
            if sends is None:
                sends = self._same_text[key] = deque()
            while sends and sends[0][0] <= now - window:
                sends.popleft()
            chats = {c for _, c in sends}
            if chat in chats or len(chats) < self.limits.same_text_max_chats:
                sends.append((now, chat))
                self._same_text.move_to_end(key)
                while len(self._same_text) > self.max_chats:
                    self._same_text.popitem(last=False)
                self._forget_old_texts(now - window)
                return
            self.counters["same_text_waits"] += 1
            warned = self._spread_warned.get(key)
            if warned is None or now - warned > window:  # once per text and window, not once per chat
                self._spread_warned[key] = now
                self._spread_warned.move_to_end(key)
                while len(self._spread_warned) > 1000:
                    self._spread_warned.popitem(last=False)
                logger.warning(
                    "the same answer went to {} chats within {:.0f} s: spreading it out", len(chats), window
                )
            await self._sleep(sends[0][0] + window - now)

    def _forget_old_texts(self, before: float) -> None:
        """Texts last sent before the window are not tracked any more (least recently sent first)."""
        while self._same_text:
            key, sends = next(iter(self._same_text.items()))
            if sends and sends[-1][0] > before:
                return
            del self._same_text[key]

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "typing_pause_s": round(self.typing_s, 1),
            # Counted, not just sized: the deque is only trimmed when the next message goes out.
            "sent_last_minute": sum(1 for at in self._sent_at if at > self._clock() - 60),
            "per_minute_budget": self.limits.per_minute,
            "reply_chats_tracked": len(self._inbound_at),
            "texts_tracked": len(self._same_text),
        }


def _template_pattern(template: str) -> re.Pattern[str]:
    """ "Max {limit:g} MB." -> a pattern matching "Max 25 MB." (each {field} stands for any short value)."""
    parts = re.split(r"\{[^{}]*\}", template)
    return re.compile(".{1,40}?".join(re.escape(part) for part in parts), re.DOTALL)
