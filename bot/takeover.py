"""Human takeover and owner commands.

When the owner writes in a chat from the phone (a from-me message the bot did not send),
the bot stays silent in that chat for a while. From-me messages starting with `!bot`
are commands: `!bot pause [minutes]`, `!bot resume`, `!bot status`; add `all` to apply
to every chat (`!bot pause all`).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

COMMAND_PREFIX = "!bot"


@dataclass(frozen=True, slots=True)
class OwnerCommand:
    action: Literal["pause", "resume", "status"]
    everywhere: bool
    minutes: float | None = None


def parse_command(text: str) -> OwnerCommand | None:
    """`!bot pause 30`, `!bot resume all`, `!bot status` -> OwnerCommand; anything else -> None."""
    words = text.strip().lower().split()
    if len(words) < 2 or words[0] != COMMAND_PREFIX or words[1] not in ("pause", "resume", "status"):
        return None
    rest = words[2:]
    everywhere = "all" in rest or words[1] == "status"
    minutes = next((float(w) for w in rest if w.replace(".", "", 1).isdigit()), None)
    return OwnerCommand(words[1], everywhere, minutes)  # type: ignore[arg-type]


class Takeover:
    """Which chats the bot must leave to a human, bounded in size."""

    def __init__(
        self,
        pause_s: float,
        *,
        max_chats: int = 20000,
        max_sent_ids: int = 5000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pause_s = pause_s
        self.max_chats = max_chats
        self.max_sent_ids = max_sent_ids
        self._clock = clock
        self._paused: OrderedDict[str, float] = OrderedDict()  # chat -> until (monotonic)
        self._sent: OrderedDict[str, None] = OrderedDict()
        self.global_until = 0.0
        self.takeovers = 0

    def note_sent(self, message_id: str) -> None:
        self._sent[message_id] = None
        if len(self._sent) > self.max_sent_ids:
            self._sent.popitem(last=False)

    def sent_by_bot(self, message_id: str) -> bool:
        return message_id in self._sent

    def owner_wrote(self, chat: str) -> None:
        """The owner answered a customer from the phone: hand the chat over for `pause_s`."""
        if self.pause_s <= 0:  # HUMAN_TAKEOVER_MINUTES=0 turns takeover off
            return
        self.takeovers += 1
        self.pause(chat, self.pause_s)

    def pause(self, chat: str | None, seconds: float | None = None) -> None:
        until = math.inf if seconds is None else self._clock() + seconds
        if chat is None:
            self.global_until = until
            return
        self._paused[chat] = until
        self._paused.move_to_end(chat)
        while len(self._paused) > self.max_chats:
            self._paused.popitem(last=False)

    def resume(self, chat: str | None) -> None:
        if chat is None:
            self.global_until = 0.0
            self._paused.clear()
        else:
            self._paused.pop(chat, None)

    def is_paused(self, chat: str) -> bool:
        now = self._clock()
        if now < self.global_until:
            return True
        until = self._paused.get(chat)
        if until is None:
            return False
        if now >= until:
            del self._paused[chat]
            return False
        return True

    def prune(self) -> int:
        """Forget pauses that have ended (memory pressure); returns how many."""
        now = self._clock()
        ended = [chat for chat, until in self._paused.items() if until <= now]
        for chat in ended:
            del self._paused[chat]
        return len(ended)

    def apply(self, command: OwnerCommand, chat: str) -> str:
        """Carry out an owner command; returns a short log-safe summary (no numbers)."""
        target = None if command.everywhere else chat
        seconds = command.minutes * 60 if command.minutes is not None else None
        if command.action == "pause" and seconds == 0:
            self.resume(target)
            return "resumed " + ("all chats" if target is None else "this chat")
        if command.action == "pause":
            self.pause(target, seconds)
            scope = "all chats" if target is None else "this chat"
            return f"paused {scope}" + (f" for {command.minutes:g} min" if command.minutes else "")
        if command.action == "resume":
            self.resume(target)
            return "resumed " + ("all chats" if target is None else "this chat")
        return self.summary()

    def summary(self) -> str:
        now = self._clock()
        paused = sum(1 for until in self._paused.values() if until > now)
        everything = "paused everywhere" if now < self.global_until else "answering"
        return f"bot status: {everything}; {paused} chat(s) paused"

    def stats(self) -> dict[str, object]:
        now = self._clock()
        return {
            "paused_everywhere": now < self.global_until,
            "paused_chats": sum(1 for until in self._paused.values() if until > now),
            "takeovers": self.takeovers,
        }
