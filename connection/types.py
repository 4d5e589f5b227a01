"""The types every other package sees instead of neonize's.

The WhatsApp adapter turns neonize's protobuf events into `Inbound` values and
implements `Transport`; the console and the test transports implement the same
protocol, so bot/ never knows which one it talks to.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal, NewType, Protocol, runtime_checkable

ChatId = NewType("ChatId", str)
"""A chat key: `<user>@s.whatsapp.net` for people, `<id>@g.us` for groups."""

MessageId = NewType("MessageId", str)
"""WhatsApp's message id (unique per sender; we treat it as globally unique)."""

QuoteSource = Literal["customer", "bot", "ad", "product", "other_product", "order"]
"""Who wrote what a message quotes: the customer, the bot (our own number), or the ad the customer tapped;
or what the customer sent from the business's catalog (a product, an order), its details as the quote."""


class MessageKind(enum.StrEnum):
    TEXT = "text"
    AUDIO = "audio"
    IMAGE = "image"
    VIDEO = "video"
    STICKER = "sticker"
    DOCUMENT = "document"
    REACTION = "reaction"
    EDIT = "edit"  # the sender changed an earlier message (`target`): `text` is its new text
    REVOKE = "revoke"  # the sender deleted an earlier message (`target`) for everyone
    UNSUPPORTED = "unsupported"  # content a customer expects an answer to: a location, a contact, a poll
    OTHER = "other"  # protocol traffic (edits, deletes, keys): never answered


# What photos the model is shown when sent as documents (to keep their quality); see document_kind.
PHOTO_MIMETYPES = frozenset({"image/jpeg", "image/png", "image/webp"})


def document_kind(mimetype: str) -> MessageKind:
    """A file sent as a document: a photo or a video sent so (to keep its quality) is still one."""
    base = mimetype.split(";")[0].strip().lower()
    if base in PHOTO_MIMETYPES:
        return MessageKind.IMAGE
    if base.startswith("video/"):
        return MessageKind.VIDEO
    return MessageKind.DOCUMENT


class ConnectionState(enum.StrEnum):
    STARTING = "starting"
    PAIRING = "pairing"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    LOGGED_OUT = "logged_out"
    REPLACED = "replaced"
    BANNED = "banned"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class MediaRef:
    """What is known about an attachment before it is downloaded.

    `handle` is opaque to everyone but the transport that made it (for neonize,
    the protobuf Message to download from; for the console, a file path).
    """

    mimetype: str = ""
    size_bytes: int | None = None
    duration_s: int | None = None
    voice_note: bool = False
    file_name: str = ""  # a document's, as the sender named it ("factura.pdf")
    handle: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Inbound:
    """One incoming message, normalised."""

    id: MessageId
    chat: ChatId
    sender: str
    kind: MessageKind
    text: str = ""
    timestamp: float = 0.0
    from_me: bool = False
    is_group: bool = False
    is_status: bool = False
    mentions_me: bool = False
    is_self_chat: bool = False  # the owner's "message yourself" chat
    push_name: str = ""
    media: MediaRef | None = None
    # What this message replies to (WhatsApp's swipe-to-reply, or the ad a customer came from), as text:
    # the model needs it to know what "¿y este?" under one plan of a list, or "más info" from an ad, is about.
    quoted: str = ""
    quoted_from: QuoteSource = "customer"
    quoted_kind: MessageKind = MessageKind.TEXT  # a photo replied to: the model is told it cannot see it
    # A photo replied to, as WhatsApp quotes it (with what it takes to download it): shown to the model
    # with the message ("¿precio de este?" under one of the products the owner sent).
    quoted_media: MediaRef | None = None
    # When the bot took it (set by the pipeline; WhatsApp's `timestamp` is the sender's, in whole seconds):
    # what orders a chat's history, next to replies dated by this host's clock.
    received_at: float = 0.0
    target: MessageId | None = None  # an edit's or a revoke's: the message it changes


# A photo or document the bot sends (a flow's file) is read into memory whole: at most this many bytes.
# A photo is decoded whole for its preview (by neonize, with Pillow): at most this many pixels (a menu
# scanned at 300 dpi is 9 MP; a 600 dpi poster took 130 MB to preview).
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_PHOTO_PIXELS = 16_000_000
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


class TransportError(Exception):
    """A send or download failed at the transport; the message may be retried."""


class SendWithheld(TransportError):
    """Held back just before it went out: the chat was handed to a human while the answer waited."""


@runtime_checkable
class Transport(Protocol):
    """What the bot needs from a messaging connection."""

    async def send_text(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
        """Send `text` to `chat`; return the id of the sent message. With `file` (the path of a photo or a
        document) the file is sent, `text` as its caption (may be empty)."""
        ...

    async def set_typing(self, chat: ChatId, typing: bool) -> None: ...

    async def mark_read(self, message: Inbound) -> None: ...

    async def download_media(self, message: Inbound) -> bytes: ...

    @property
    def state(self) -> ConnectionState: ...
