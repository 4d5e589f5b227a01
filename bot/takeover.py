"""Human takeover and owner commands.

When the owner writes in a chat from the phone (a from-me message the bot did not send),
the bot stays silent in that chat for a while. From-me messages starting with `!bot`
are commands: `!bot pause [minutes]`, `!bot resume`, `!bot status`; add `all` to apply
to every chat (`!bot pause all`).
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

COMMAND_PREFIX = "!bot"
# A Spanish keyboard offers "¡" next to "!": "¡bot pausa" is the same command.
_PREFIXES = frozenset({COMMAND_PREFIX, "¡bot"})
_ACTIONS = {
    "pause": "pause",
    "pausa": "pause",
    "resume": "resume",
    "reanuda": "resume",
    "reanudar": "resume",
    "sigue": "resume",
    "status": "status",
    "estado": "status",
    "off": "pause",  # "!bot off": paused until resumed
    "on": "resume",
}
_EVERYWHERE = {"all", "todo", "todos", "todas"}
MAX_PAUSE_MINUTES = 365 * 24 * 60  # a year; longer is a typo (no duration means until resumed)
# In the store, "*" is the pause of every chat and "!<chat>" a chat resumed during it ("!*": all of those).
EXEMPT = "!"
# "30", "1.5", "1,5" (the Spanish decimal comma), "30m", "2h", "45 min", "1 día": minutes unless said.
_MINUTES = ("m", "min", "mins", "minuto", "minutos", "minute", "minutes")
_HOURS = ("h", "hora", "horas", "hour", "hours")
_DAYS = ("d", "dia", "dias", "día", "días", "day", "days")
_UNITS = {*_MINUTES, *_HOURS, *_DAYS}
_DURATION = re.compile(r"(\d+(?:[.,]\d+)?)(" + "|".join(sorted(_UNITS, key=len, reverse=True)) + ")?")


@dataclass(frozen=True, slots=True)
class OwnerCommand:
    action: Literal["pause", "resume", "status", "help"]
    everywhere: bool
    minutes: float | None = None


def parse_command(text: str) -> OwnerCommand | None:
    """`!bot pause 30`, `!bot pausa 1,5 h todos`, `!bot resume all`, `!bot status` -> OwnerCommand.

    A `!bot` line that cannot be read is the "help" command (never a pause of unknown length); any other
    text is None.
    """
    words = text.strip().casefold().split()
    if not words or words[0] not in _PREFIXES:
        return None
    action = _ACTIONS.get(words[1]) if len(words) > 1 else None
    if action is None:
        return OwnerCommand("help", True)
    everywhere, minutes = action == "status", None
    rest = words[2:]
    for index, word in enumerate(rest):
        duration = _DURATION.fullmatch(word)
        if word in _EVERYWHERE:
            everywhere = True
        elif duration is not None and minutes is None and action == "pause":
            minutes = float(duration.group(1).replace(",", "."))
            unit = duration.group(2) or (rest[index + 1] if index + 1 < len(rest) else "")
            minutes *= 60 if unit in _HOURS else 24 * 60 if unit in _DAYS else 1
            if minutes > MAX_PAUSE_MINUTES:
                return OwnerCommand("help", True)
        elif word in _UNITS and index > 0 and _DURATION.fullmatch(rest[index - 1]):
            continue  # "30 min": the unit of the number before
        else:
            return OwnerCommand("help", True)
    return OwnerCommand(action, everywhere, minutes)  # type: ignore[arg-type]


# `!bot estado` names this many paused chats at most, the soonest to end first.
MAX_LISTED_CHATS = 10


def _which(paused: list[tuple[float, str]], now: float) -> str:
    """ " (+34600111222 25 min, +5491122334455 ∞)": the paused chats and what is left of their pause."""
    if not paused:
        return ""
    listed = [f"{_shown(chat)} {_left(until - now)}" for until, chat in paused[:MAX_LISTED_CHATS]]
    more = ", …" if len(paused) > MAX_LISTED_CHATS else ""
    return f" ({', '.join(listed)}{more})"


def _shown(chat: str) -> str:
    user, _, server = chat.partition("@")
    return f"+{user}" if server == "s.whatsapp.net" and user.isdigit() else chat


def _left(seconds: float) -> str:
    if math.isinf(seconds):
        return "∞"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h"


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
        self._exempt: set[str] = set()  # chats resumed one by one during a pause of every chat
        # The bot's "someone will write" replies (set by the pipeline: to a request for a person, to an
        # order): promised before the chat was handed over, they go out even if the outbox held them
        # (disconnected) until after, in this process or the next.
        self.handoff_replies: frozenset[str] = frozenset()
        self.global_until = 0.0
        self.takeovers = 0
        self.handoffs = 0
        # Told of every pause and resume (chat, "*" for every chat, "!chat" for a chat resumed during a
        # pause of all; until in epoch seconds, math.inf without an end, None when it ends) so the store
        # keeps them across restarts.
        self.on_change: Callable[[str, float | None], None] | None = None

    def restore(self, pauses: dict[str, float], now: float) -> None:
        """Replace the pauses with those read back from the store (epoch seconds; `now` is the epoch time),
        at most `max_chats` of them, the latest ending kept."""

        def mono(until: float) -> float:
            return math.inf if math.isinf(until) else self._clock() + until - now

        self.global_until = mono(pauses["*"]) if "*" in pauses else 0.0
        chats = sorted((until, chat) for chat, until in pauses.items() if chat[:1] not in ("*", EXEMPT))
        self._paused = OrderedDict((chat, mono(until)) for until, chat in chats[-self.max_chats :])
        self._exempt = {chat[1:] for chat in pauses if chat.startswith(EXEMPT)} if "*" in pauses else set()

    def _changed(self, chat: str | None, until: float | None) -> None:
        if self.on_change is not None:
            wall = (
                None if until is None else until if math.isinf(until) else time.time() + until - self._clock()
            )
            self.on_change("*" if chat is None else chat, wall)

    def note_sent(self, message_id: str) -> None:
        self._sent[message_id] = None
        if len(self._sent) > self.max_sent_ids:
            self._sent.popitem(last=False)

    def sent_by_bot(self, message_id: str) -> bool:
        return message_id in self._sent

    def owner_wrote(self, chat: str) -> None:
        """The owner answered a customer from the phone: hand the chat over for `pause_s` (a chat resumed
        during a pause of all stays resumed after that)."""
        if self.pause_s <= 0:  # HUMAN_TAKEOVER_MINUTES=0 turns takeover off
            return
        self.takeovers += 1
        self.pause(chat, self.pause_s, keep_exempt=True)

    def hand_over(self, chat: str) -> None:
        """The customer asked for a person: the chat is the owner's for `pause_s`, as if they had written."""
        if self.pause_s <= 0:
            return
        self.handoffs += 1
        self.pause(chat, self.pause_s, keep_exempt=True)

    def holds(self, chat: str, text: str) -> bool:
        """Whether the bot's `text` to `chat` must not go out now (the governor's hold): anything in a chat a
        human has, except the hand-off reply itself."""
        return self.is_paused(chat) and text not in self.handoff_replies

    def pause(self, chat: str | None, seconds: float | None = None, *, keep_exempt: bool = False) -> None:
        until = math.inf if seconds is None else self._clock() + seconds
        if chat is None and self._exempt:  # a new pause of all covers every chat again (said first, so a
            self._exempt.clear()  # crash between the two writes cannot bring old exemptions back)
            self._changed(EXEMPT + "*", None)
        self._changed(chat, until)
        if chat is None:
            self.global_until = until
            return
        if chat in self._exempt and not keep_exempt:
            self._exempt.discard(chat)
            self._changed(EXEMPT + chat, None)
        self._paused[chat] = until
        self._paused.move_to_end(chat)
        while len(self._paused) > self.max_chats:
            self._paused.popitem(last=False)

    def resume(self, chat: str | None) -> None:
        self._changed(chat, None)
        if chat is None:
            self.global_until = 0.0
            self._paused.clear()
            self._exempt.clear()
        else:
            self._paused.pop(chat, None)
            if self._clock() < self.global_until and len(self._exempt) < self.max_chats:
                self._exempt.add(chat)  # `!bot resume` in one chat during `!bot pause all`
                self._changed(EXEMPT + chat, self.global_until)  # kept as long as the pause of all

    def is_paused(self, chat: str) -> bool:
        now = self._clock()
        if now < self.global_until and chat not in self._exempt:
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

    def apply(self, command: OwnerCommand, chat: str | None) -> tuple[str, dict[str, object]]:
        """Carry out an owner command typed in `chat` (None: the owner's own chat, where a command applies to
        every chat); returns the answer as a canned reply key of bot.replies and its values."""
        if command.action == "help":
            return "owner_usage", {}
        target = None if command.everywhere else chat
        scope = "all" if target is None else "chat"
        seconds = command.minutes * 60 if command.minutes is not None else None
        if command.action == "resume" or (command.action == "pause" and seconds == 0):
            self.resume(target)
            return f"owner_resumed_{scope}", {}
        if command.action == "pause":
            self.pause(target, seconds)
            if command.minutes:
                return f"owner_paused_{scope}_for", {"minutes": command.minutes}
            return f"owner_paused_{scope}", {}
        now = self._clock()
        paused = sorted((until, chat) for chat, until in self._paused.items() if until > now)
        state = "paused" if now < self.global_until else "answering"
        return f"owner_status_{state}", {"paused": len(paused), "which": _which(paused, now)}

    def stats(self) -> dict[str, object]:
        now = self._clock()
        return {
            "paused_everywhere": now < self.global_until,
            "paused_chats": sum(1 for until in self._paused.values() if until > now),
            "takeovers": self.takeovers,
            "handoffs": self.handoffs,
        }
