"""An in-process transport: records what the bot sends; tests, benchmarks and the console use it."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from connection.types import ChatId, ConnectionState, Inbound, MessageId, TransportError


@dataclass(frozen=True, slots=True)
class Sent:
    chat: ChatId
    text: str
    id: MessageId
    file: str | None = None  # a photo or document sent, `text` its caption


@dataclass
class LoopbackTransport:
    """Implements the Transport protocol without a network.

    `on_send` (if set) is called for every sent message; `fail_sends` makes the next
    N sends raise TransportError; media handles are file paths or bytes.
    """

    on_send: Callable[[Sent], None] | None = None
    fail_sends: int = 0
    send_delay_s: float = 0.0
    sent: list[Sent] = field(default_factory=list)
    typing: list[tuple[ChatId, bool]] = field(default_factory=list)
    read: list[MessageId] = field(default_factory=list)
    record: bool = True
    owner_chat: ChatId | None = None  # the owner's "message yourself" chat, where owner commands are answered
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # Unique per run: the replies of an earlier console session are in the same database, under their ids.
    _run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def state(self) -> ConnectionState:
        return ConnectionState.CONNECTED

    async def send_text(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
        if self.send_delay_s:
            await asyncio.sleep(self.send_delay_s)
        if self.fail_sends > 0:
            self.fail_sends -= 1
            raise TransportError("loopback: scripted send failure")
        sent = Sent(chat, text, MessageId(f"out-{self._run}-{next(self._ids)}"), file)
        if self.record:
            self.sent.append(sent)
        if self.on_send is not None:
            self.on_send(sent)
        return sent.id

    async def set_typing(self, chat: ChatId, typing: bool) -> None:
        if self.record:
            self.typing.append((chat, typing))

    async def mark_read(self, message: Inbound) -> None:
        if self.record:
            self.read.append(message.id)

    async def download_media(self, message: Inbound) -> bytes:
        handle = message.media.handle if message.media else None
        if isinstance(handle, bytes):
            return handle
        if isinstance(handle, str | Path):
            try:
                return await asyncio.to_thread(Path(handle).read_bytes)
            except OSError as error:
                raise TransportError(f"cannot read {handle}: {error.strerror}") from error
        raise TransportError("message has no media to download")

    def texts_to(self, chat: str) -> list[str]:
        return [s.text for s in self.sent if s.chat == chat]
