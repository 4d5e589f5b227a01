"""The console as a transport: try the bot in a terminal, or script it with JSON lines.

`python -m bot chat` is interactive; `python -m bot chat --jsonl` reads one JSON
object per stdin line ({"from": "<number>", "text": "..."}, {"from": ..., "audio": "<path>"},
{"from": ..., "image": "<path>", "text": "<caption>"} or the same with "video" or "document") and writes one
per outgoing message ({"to": "<number>", "text": "..."}).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from connection.loopback import LoopbackTransport, Sent
from connection.types import ChatId, Inbound, MediaRef, MessageId, MessageKind, document_kind

DEFAULT_NUMBER = "10000000000"


def chat_of(number: str) -> ChatId:
    return ChatId(f"{number}@s.whatsapp.net")


def number_of(chat: str) -> str:
    return chat.split("@", 1)[0]


class BadLine(ValueError):
    """A JSON line that is not a message; the text says what is wrong."""


def parse_jsonl(line: str) -> Inbound:
    try:
        data: Any = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadLine(f"not JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(data, dict):
        raise BadLine('expected an object like {"from": "34600111222", "text": "hola"}')
    sender = data.get("from")
    if not isinstance(sender, str | int) or not str(sender).lstrip("+").isdigit():
        raise BadLine('"from" must be a phone number (digits)')
    number = str(sender).lstrip("+")
    message_id = str(data.get("id") or uuid.uuid4().hex)
    if "audio" in data:
        path = data["audio"]
        if not isinstance(path, str) or not path:
            raise BadLine('"audio" must be a path to an audio file')
        size = Path(path).stat().st_size if Path(path).is_file() else None
        media = MediaRef(mimetype="audio/ogg", size_bytes=size, voice_note=True, handle=path)
        return _inbound(message_id, number, MessageKind.AUDIO, "", media)
    for key, kind, what, default_type in _ATTACHMENTS:  # a photo, a video or a PDF, "text" its caption
        if key in data:
            path, caption = data[key], data.get("text", "")
            if not isinstance(path, str) or not path or not isinstance(caption, str):
                raise BadLine(f'"{key}" must be a path to {what}, and "text" (its caption) a string')
            size = Path(path).stat().st_size if Path(path).is_file() else None
            mimetype = mimetypes.guess_type(path)[0] or default_type
            media = MediaRef(mimetype, size, file_name=Path(path).name, handle=path)
            if kind is MessageKind.DOCUMENT:  # as on WhatsApp (see connection/neonize_adapter.py)
                kind = document_kind(mimetype)
            return _inbound(message_id, number, kind, caption, media)
    text = data.get("text")
    if not isinstance(text, str):
        raise BadLine('expected "text" (a string), "audio", "image", "video" or "document" (a path)')
    return _inbound(message_id, number, MessageKind.TEXT, text, None)


# The attachments a line can carry: its key, the kind of message, what it must be, its type when unknown.
_ATTACHMENTS = (
    ("image", MessageKind.IMAGE, "a photo", "image/jpeg"),
    ("video", MessageKind.VIDEO, "a video", "video/mp4"),
    ("document", MessageKind.DOCUMENT, "a file", "application/octet-stream"),
)


def _inbound(message_id: str, number: str, kind: MessageKind, text: str, media: MediaRef | None) -> Inbound:
    return Inbound(
        id=MessageId(message_id),
        chat=chat_of(number),
        sender=chat_of(number),
        kind=kind,
        text=text,
        timestamp=time.time(),
        media=media,
    )


class ConsoleTransport(LoopbackTransport):
    """Writes sent messages to stdout; reads customer messages from stdin."""

    def __init__(self, *, jsonl: bool, out: TextIO = sys.stdout) -> None:
        super().__init__(record=False)
        self.jsonl = jsonl
        self.out = out
        self.on_send = self._print

    def _print(self, sent: Sent) -> None:
        if self.jsonl:
            out = {
                "to": number_of(sent.chat),
                "text": sent.text,
                **({"file": sent.file} if sent.file else {}),
            }
            line = json.dumps(out, ensure_ascii=False)
        elif sent.file:
            line = f"bot> [{Path(sent.file).name}] {sent.text}".rstrip()
        else:
            line = f"bot> {sent.text}"
        self.out.write(line + "\n")
        self.out.flush()

    async def read_stdin(self, submit: Callable[[Inbound], object], *, stdin: TextIO = sys.stdin) -> int:
        """Feed stdin to `submit` until EOF; returns the number of bad lines.

        Lines are read on a daemon thread: a blocked read must not keep the process alive when it is
        told to stop (asyncio's default executor would wait for it at exit).
        """
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str] = asyncio.Queue()

        def pump() -> None:
            while True:
                line = stdin.readline()
                loop.call_soon_threadsafe(lines.put_nowait, line)
                if not line:
                    return

        threading.Thread(target=pump, name="stdin", daemon=True).start()
        bad = 0
        number = 0  # of the input line, for error messages
        while True:
            line = await lines.get()
            if not line:
                return bad
            number += 1
            line = line.strip()
            if not line:
                continue
            if self.jsonl:
                try:
                    submit(parse_jsonl(line))
                except (BadLine, OSError) as error:
                    bad += 1
                    print(f"error: line {number} ignored: {error}", file=sys.stderr)
            else:
                submit(_inbound(uuid.uuid4().hex, DEFAULT_NUMBER, MessageKind.TEXT, line, None))
