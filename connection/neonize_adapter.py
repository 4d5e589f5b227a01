"""WhatsApp over neonize (whatsmeow in a shared library): the only module that imports neonize.

- `translate_message`: a pure function from neonize's `MessageEv` protobuf to our `Inbound`.
- `translate_connection_event`: neonize's connection events to the supervisor's small events.
- `NeonizeDriver`: the supervisor's `ClientDriver` over one `NewAClient`.
- `NeonizeTransport`: the `Transport`. A `Supervisor` (connection/supervisor.py) owns states, retries and
  the heartbeat watchdog; an `Outbox` keeps replies while disconnected; `ResendRequests` asks a sender
  to resend a message that stayed undecryptable.

neonize 0.5.x traps handled here:

- event handlers are scheduled with `run_coroutine_threadsafe` and the future is dropped, so an
  exception in a handler vanishes: every handler is wrapped and logs through loguru;
- handlers of one event run as separate tasks: `on_inbound` is called before any `await`, so
  arrival order holds;
- `NewAClient.is_connected` is a property that returns a coroutine (it must be awaited);
- neonize pins the event loop of the first `connect()` in a module global; every connect re-points it
  to the running loop;
- the whatsmeow log level comes from the level of the stdlib logger `neonize.utils.log` (NOTSET
  ships every debug line through a ctypes callback), so it is set from `log_level`;
- every `Neonize()` call opens a database handle that is never closed: after a few failures in a
  row, a cheap TCP probe gates the next real `connect()` so a long outage does not leak handles;
- while a QR code is showing, neonize's Go call ignores Stop (whatsmeow's QR loop waits for codes that
  are no longer emitted): the driver abandons that call after a short wait so stop() stays prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import io
import logging
import math
import mimetypes
import os
import re
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import segno
from loguru import logger
from PIL import Image

from connection.background import BackgroundTasks
from connection.outbox import Outbox, ResendRequests, SendDeferred
from connection.supervisor import (
    Backoff,
    ClientOutdated,
    Connected,
    ConnectFailure,
    ConnectionLost,
    Disconnected,
    DriverEvent,
    KeepAliveRestored,
    KeepAliveTimeout,
    LoggedOut,
    Paired,
    QrShown,
    StreamReplaced,
    Supervisor,
    TemporaryBan,
)
from connection.supervisor import mask_phone as _mask
from connection.supervisor import scrub as _scrub
from connection.types import (
    MAX_FILE_BYTES,
    MAX_PHOTO_PIXELS,
    PHOTO_SUFFIXES,
    ChatId,
    ConnectionState,
    Inbound,
    MediaRef,
    MessageId,
    MessageKind,
    QuoteSource,
    TransportError,
    document_kind,
)


@contextlib.contextmanager
def _closed_popen() -> Iterator[None]:
    """neonize probes the platform at import with `os.popen("uname -a").read()` and never closes
    the pipe (neonize/utils/platform.py:39); the orphaned process is reaped, and the pipe warned
    about, whenever the next subprocess starts. Run the probe to completion instead."""

    def popen(cmd: str, mode: str = "r", buffering: int = -1) -> io.StringIO:
        done = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)
        return io.StringIO(done.stdout)

    original = os.popen
    os.popen = popen  # type: ignore[assignment]
    try:
        yield
    finally:
        os.popen = original


with warnings.catch_warnings(), _closed_popen():
    warnings.simplefilter("ignore", ResourceWarning)
    from neonize.aioze import events as _nz_events
    from neonize.aioze.client import NewAClient
    from neonize.aioze.events import (
        CallOfferEv,
        ClientOutdatedEv,
        ConnectedEv,
        ConnectFailureEv,
        DisconnectedEv,
        KeepAliveRestoredEv,
        KeepAliveTimeoutEv,
        LoggedOutEv,
        MessageEv,
        OfflineSyncCompletedEv,
        PairStatusEv,
        StreamErrorEv,
        StreamReplacedEv,
        TemporaryBanEv,
    )
    from neonize.events import UndecryptableMessageEv
    from neonize.proto import Neonize_pb2 as nz
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as WAMessage
    from neonize.utils.enum import ChatPresence, ChatPresenceMedia, Presence, ReceiptType

__all__ = ["NeonizeDriver", "NeonizeTransport", "translate_connection_event", "translate_message"]

# Every call into whatsmeow is bounded: a Go call that hangs must fail one message, not stall its chat.
CALL_TIMEOUT_S = 30.0
# A send waits for the server's ack up to 75 s in whatsmeow, which also sends the frame again after a
# reconnect within that time. Giving up sooner queued the reply again while whatsmeow still delivered the
# first: the customer got it twice.
SEND_TIMEOUT_S = 80.0
SEND_FILE_TIMEOUT_S = 180.0  # the upload first: a 16 MB document on a slow link
DOWNLOAD_TIMEOUT_S = 120.0

STATUS_BROADCAST = "status@broadcast"
_PN_SERVER = "s.whatsapp.net"
_LID_SERVER = "lid"
_GROUP_SERVER = "g.us"

_STOPPED_FOR_GOOD = frozenset(
    {ConnectionState.REPLACED, ConnectionState.STOPPED, ConnectionState.LOGGED_OUT, ConnectionState.BANNED}
)
# ConnectFailureReason values (Neonize.proto) that mean the session is gone for good.
_LOGOUT_REASONS = frozenset({2, 4, 5})  # LOGGED_OUT, MAIN_DEVICE_GONE, UNKNOWN_LOGOUT
_BAN_REASON = 3  # TEMP_BANNED
_OUTDATED_REASON = 6  # CLIENT_OUTDATED

# Wrappers whose inner `.message` is the real content (whatsmeow usually unwraps them already).
_WRAPPERS = (
    "ephemeralMessage",
    "viewOnceMessage",
    "viewOnceMessageV2",
    "viewOnceMessageV2Extension",
    "documentWithCaptionMessage",
    "associatedChildMessage",  # one photo or video of an album (sent together); the caption asks
    "lottieStickerMessage",
    "groupMentionedMessage",
)
_MEDIA_KINDS = (
    ("audioMessage", MessageKind.AUDIO),
    ("imageMessage", MessageKind.IMAGE),
    ("videoMessage", MessageKind.VIDEO),
    ("stickerMessage", MessageKind.STICKER),
    ("documentMessage", MessageKind.DOCUMENT),
    # A round video note: customers talk in it as in a voice note, so what they say is transcribed like one
    # (ffmpeg takes the audio track of the MP4).
    ("ptvMessage", MessageKind.AUDIO),
)
# Read as text (see _location_text, _contact_text); a pin sent as a swipe reply keeps its quote.
_READ_AS_TEXT = ("locationMessage", "liveLocationMessage", "contactMessage", "contactsArrayMessage")
# Content the bot cannot read but a customer expects an answer to.
_UNSUPPORTED = (
    "pollCreationMessage",
    "pollCreationMessageV2",
    "pollCreationMessageV3",
    "pollCreationMessageV4",
    "pollCreationMessageV5",
    "pollCreationMessageV6",
    "sendPaymentMessage",
    "requestPaymentMessage",
    "stickerPackMessage",
    "eventMessage",
    "groupInviteMessage",
)

# --------------------------------------------------------------------------- helpers


def _jid_str(jid: nz.JID) -> str:
    """`user@server` without device/agent; `""` for an empty JID."""
    if not jid.Server:
        return ""
    return f"{jid.User}@{jid.Server}" if jid.User else jid.Server


def _bare_user(jid: str) -> str:
    """The user part of a JID string: `34600:3@s.whatsapp.net` -> `34600`."""
    return jid.split("@", 1)[0].split(":", 1)[0].split(".", 1)[0].lstrip("+")


def _is_pn(jid: nz.JID) -> bool:
    return bool(jid.User) and jid.Server == _PN_SERVER


def _unresolved_lid(inbound: Inbound) -> bool:
    """A 1:1 chat still keyed by a LID: neither the event nor an earlier one gave its phone number."""
    return not inbound.is_group and not inbound.is_self_chat and inbound.chat.endswith("@" + _LID_SERVER)


def _to_jid(value: str) -> nz.JID:
    """Parse a chat key (`user@server`, or bare digits for a phone) into a neonize JID."""
    user, _, server = value.partition("@")
    if not server:
        user, server = "".join(ch for ch in value if ch.isdigit()), _PN_SERVER
    user = user.split(":", 1)[0]
    return nz.JID(User=user, Server=server, Device=0, RawAgent=0, Integrator=0, IsEmpty=False)


def _timestamp(raw: int) -> float:
    """neonize sends milliseconds (`UnixMilli` in its encoder); accept seconds too."""
    if raw <= 0:
        return 0.0
    return raw / 1000.0 if raw > 100_000_000_000 else float(raw)


# An associatedChildMessage tagged so is another copy, or a part, of a message already received: the HD
# copy WhatsApp sends after a photo or video's normal one, a motion photo's video, an event's cover. Only
# album photos (MEDIA_ALBUM) are messages of their own.
_COPIES = frozenset({"HD_IMAGE_DUAL_UPLOAD", "HD_VIDEO_DUAL_UPLOAD", "HEVC_VIDEO_DUAL_UPLOAD", "MOTION_PHOTO",
                     "EVENT_COVER_IMAGE"})  # fmt: skip


def _is_a_copy(msg: WAMessage) -> bool:
    """True for the second copy of a message (see _COPIES): the model would see the photo twice, or the
    customer get a second answer to it."""
    for _ in range(4):
        if msg.HasField("messageContextInfo") and msg.messageContextInfo.HasField("messageAssociation"):
            association = msg.messageContextInfo.messageAssociation
            name = type(association).AssociationType.Name(association.associationType)
            if name in _COPIES:
                return True
        inner = next((getattr(msg, n) for n in _WRAPPERS if msg.HasField(n)), None)
        if inner is None or not inner.HasField("message"):
            return False
        msg = inner.message
    return False


def _unwrap(msg: WAMessage) -> WAMessage:
    for _ in range(3):
        for name in _WRAPPERS:
            if msg.HasField(name) and getattr(msg, name).HasField("message"):
                msg = getattr(msg, name).message
                break
        else:
            return msg
    return msg


def _mentions(sub: Any, me: frozenset[str]) -> bool:
    if not me or not sub.HasField("contextInfo"):
        return False
    return any(_bare_user(j) in me for j in sub.contextInfo.mentionedJID)


def _body(msg: WAMessage, me: frozenset[str]) -> tuple[MessageKind, str, MediaRef | None, bool]:
    """Kind, text, media and mention flag of a waE2E message."""
    if msg.conversation:
        return MessageKind.TEXT, _text(msg.conversation), None, False
    if msg.HasField("extendedTextMessage"):
        ext = msg.extendedTextMessage
        return MessageKind.TEXT, _text(ext.text), None, _mentions(ext, me)
    # A tap on a button or a list row of an earlier message reads as what the customer chose.
    if msg.HasField("buttonsResponseMessage"):
        return MessageKind.TEXT, _text(msg.buttonsResponseMessage.selectedDisplayText), None, False
    if msg.HasField("templateButtonReplyMessage"):
        return MessageKind.TEXT, _text(msg.templateButtonReplyMessage.selectedDisplayText), None, False
    if msg.HasField("listResponseMessage"):
        return MessageKind.TEXT, _text(msg.listResponseMessage.title), None, False
    for field, kind in _MEDIA_KINDS:
        if not msg.HasField(field):
            continue
        sub = getattr(msg, field)
        seconds = int(getattr(sub, "seconds", 0))
        media = MediaRef(
            mimetype=sub.mimetype,
            size_bytes=int(sub.fileLength) if sub.fileLength else None,
            duration_s=seconds or None,
            voice_note=bool(getattr(sub, "PTT", False)) or field == "ptvMessage",
            file_name=_text(getattr(sub, "fileName", ""))[:200],
            handle=msg,  # download_any wants the whole waE2E Message
        )
        if field == "documentMessage":
            kind = document_kind(sub.mimetype)
        elif (
            field == "videoMessage" and getattr(sub, "gifPlayback", False) and not _text(sub.caption).strip()
        ):
            # A GIF from the keyboard: a reaction, like an animated sticker (kept unanswered when no picture
            # of it can be shown; chatter in a group), not a video to describe. With words it is a video.
            kind = MessageKind.STICKER
        return kind, _text(getattr(sub, "caption", "")), media, _mentions(sub, me)
    # A product of the business's catalog sent to ask about it, or an order from its cart: read as the
    # customer's words (or the product's name) with the details in `quoted` (see _quote).
    # Nothing to read at all (a bare catalog share): the polite reply, as for other content.
    if msg.HasField("productMessage"):
        product = msg.productMessage
        words = _text(product.body) or _text(product.product.title) or _product_details(product.product)
        return (
            (MessageKind.TEXT, words, None, False)
            if words.strip()
            else (MessageKind.UNSUPPORTED, "", None, False)
        )
    if msg.HasField("orderMessage"):
        order = msg.orderMessage
        words = _text(order.message) or _text(order.orderTitle) or _order_details(order)
        return (
            (MessageKind.TEXT, words, None, False)
            if words.strip()
            else (MessageKind.UNSUPPORTED, "", None, False)
        )
    # A location or a contact card, asked for by the model ("¿a qué dirección lo enviamos?") or not: read as
    # text the model and the history can use, not "I can only read text".
    if msg.HasField("locationMessage") or msg.HasField("liveLocationMessage"):
        return MessageKind.TEXT, _location_text(msg), None, False
    if msg.HasField("contactMessage"):
        return MessageKind.TEXT, _contact_text(msg.contactMessage), None, False
    if msg.HasField("contactsArrayMessage"):
        cards = msg.contactsArrayMessage.contacts[:MAX_CONTACT_CARDS]
        return MessageKind.TEXT, "\n".join(_contact_text(card) for card in cards), None, False
    if msg.HasField("reactionMessage"):
        return MessageKind.REACTION, _text(msg.reactionMessage.text), None, False
    if any(msg.HasField(field) for field in _UNSUPPORTED):
        return MessageKind.UNSUPPORTED, "", None, False
    return MessageKind.OTHER, "", None, False


MAX_CONTACT_CARDS = 10
MAX_CARD_NUMBERS = 10
MAX_VCARD_CHARS = 20_000  # a card is a few hundred characters; a crafted one is not read past this
_VCARD_FN = re.compile(r"^(?:item\d+\.)?FN[^:\n]*:([^\n]+)$", re.IGNORECASE | re.MULTILINE)
_VCARD_TEL = re.compile(r"^(?:item\d+\.)?TEL[^:\n]*:([^\n]+)$", re.IGNORECASE | re.MULTILINE)


def _location_text(msg: WAMessage) -> str:
    """ "📍 Bar Pepe, Calle Mayor 1, Madrid (40.41680, -3.70380)", then the sender's comment; a live location
    reads "📍 live (40.41680, -3.70380)"."""
    live = msg.HasField("liveLocationMessage")
    where = msg.liveLocationMessage if live else msg.locationMessage
    words = ["📍"]
    if live:
        words.append("live")
    else:
        words.append(", ".join(part for part in (_text(where.name), _text(where.address)) if part.strip()))
    lat, lon = where.degreesLatitude, where.degreesLongitude
    if (lat or lon) and math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180:
        words.append(f"({lat:.5f}, {lon:.5f})")
    comment = _text(where.caption if live else where.comment).strip()
    return "\n".join(part for part in (" ".join(" ".join(words).split()), comment) if part)


def _contact_text(card: Any) -> str:
    """ "👤 Ana López: +34 600 11 12 22": a shared contact's name (its card's FN without one) and the first
    MAX_CARD_NUMBERS numbers its vCard lists."""
    vcard = re.sub(r"\r\n?", "\n", _text(card.vcard)[:MAX_VCARD_CHARS]).replace("\n ", "")  # RFC 6350 3.2
    values = (value.strip().removeprefix("tel:").strip() for value in _VCARD_TEL.findall(vcard))
    numbers = ", ".join(list(dict.fromkeys(value for value in values if value))[:MAX_CARD_NUMBERS])
    name = _text(card.displayName).strip() or next(iter(_VCARD_FN.findall(vcard)), "")
    label = " ".join(f"👤 {name}".split())
    return f"{label}: {numbers}" if numbers else label


class FileGone(TransportError):
    """A flow's file that cannot be read any more (deleted or replaced since the start): never sendable."""


def _read_file(path: Path) -> bytes:
    """A flow's file as it is now, within the bounds checked at start (its symlink may point elsewhere)."""
    try:
        with path.open("rb") as opened:
            if os.fstat(opened.fileno()).st_size > MAX_FILE_BYTES:
                raise FileGone(f"{path.name} is now over {MAX_FILE_BYTES // 2**20} MB")
            data = opened.read()
    except OSError as error:
        raise FileGone(f"{path.name} cannot be read: {error.strerror}") from error
    if path.suffix.lower() in PHOTO_SUFFIXES:
        try:  # the header only: neonize decodes the whole photo for its preview
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DecompressionBombWarning: the bound below says it
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
        except Exception as error:  # Pillow's DecompressionBombError is no OSError
            raise FileGone(f"{path.name} is no longer a photo Pillow reads: {error}") from error
        if width * height > MAX_PHOTO_PIXELS:
            raise FileGone(f"{path.name} is now {width}x{height} pixels")
    return data


def _photo_message(client: Any, data: bytes, caption: str) -> WAMessage:
    """neonize's photo message, built on a loop of this worker thread's own: neonize decodes the whole
    photo for its preview (Pillow, 10-170 ms) on the loop it runs on, which would stall every chat.
    Its Go upload is already a call from whichever thread, and nothing it touches is bound to a loop."""
    message: WAMessage = asyncio.run(client.build_image_message(data, caption=caption or None))
    return message


async def _file_message(client: Any, file: str, caption: str) -> WAMessage:
    """A flow's photo (shown inline) or document (with its file name), uploaded, `caption` under it."""
    path = Path(file)
    data = await asyncio.to_thread(_read_file, path)
    if path.suffix.lower() in PHOTO_SUFFIXES:
        return await asyncio.to_thread(_photo_message, client, data, caption)
    mimetype = mimetypes.guess_type(path.name)[0]  # None: neonize reads it from the content
    return await client.build_document_message(
        data, caption=caption or None, filename=path.name, mimetype=mimetype
    )


def _text(value: str | bytes) -> str:
    """protobuf hands back bytes for a text that is not valid UTF-8 (an emoji cut in half by the sender)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class LidToPhone:
    """LIDs seen together with their phone-number JID, so one person stays one chat when a later event
    carries only the LID (the owner's reply from the phone, say). Bounded, least recently seen out."""

    UNKNOWN_FOR_S = 600.0  # a LID whatsmeow did not know is not asked about again for this long

    def __init__(self, max_items: int = 20_000) -> None:  # about 4 MB when full
        self.max_items = max_items
        self._phones: OrderedDict[str, str] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()  # lid -> when a lookup found nothing

    def __len__(self) -> int:
        return len(self._phones)

    def learn(self, lid: str, phone: str) -> None:
        self._phones[lid] = phone
        self._phones.move_to_end(lid)
        self._unknown.pop(lid, None)
        while len(self._phones) > self.max_items:
            self._phones.popitem(last=False)

    def note_unknown(self, lid: str) -> None:
        self._unknown[lid] = time.monotonic()
        self._unknown.move_to_end(lid)
        while len(self._unknown) > self.max_items:
            self._unknown.popitem(last=False)

    def worth_asking(self, lid: str) -> bool:
        """False while an earlier lookup of `lid` found nothing (a miss is not paid for at every message)."""
        since = self._unknown.get(lid)
        if since is None:
            return True
        if time.monotonic() - since > self.UNKNOWN_FOR_S:
            del self._unknown[lid]
            return True
        return False

    def phone(self, lid: str) -> str:
        """The phone-number JID of `lid` when known, else `lid` itself."""
        return self._phones.get(lid, lid)


def _source(src: Any, lids: LidToPhone | None = None) -> tuple[str, str, bool, bool]:
    """Chat, sender, from_me and is_group of a MessageSource; a LID 1:1 chat is keyed by the phone JID
    when the event carries it, or an earlier one did (`lids`), so one person is always one chat."""
    chat = _jid_str(src.Chat)
    from_me = bool(src.IsFromMe)
    is_group = bool(src.IsGroup) or src.Chat.Server == _GROUP_SERVER
    sender = _jid_str(src.Sender)
    if src.Sender.Server == _LID_SERVER:
        if _is_pn(src.SenderAlt):
            if lids is not None:
                lids.learn(sender, _jid_str(src.SenderAlt))
            sender = _jid_str(src.SenderAlt)
        elif lids is not None:
            sender = lids.phone(sender)
    if not is_group and src.Chat.Server == _LID_SERVER:
        alt = src.RecipientAlt if from_me else src.SenderAlt
        if _is_pn(alt):
            if lids is not None:
                lids.learn(chat, _jid_str(alt))
            chat = _jid_str(alt)
        elif lids is not None:
            chat = lids.phone(chat)
    if not sender and not is_group:
        sender = chat
    return chat, sender, from_me, is_group


# --------------------------------------------------------------------------- translation


def _quote(msg: WAMessage, own: frozenset[str]) -> tuple[str, QuoteSource, MessageKind, MediaRef | None]:
    """What `msg` replies to (swipe-to-reply) as text, and who wrote it; a first message from a
    click-to-WhatsApp ad quotes the ad's title and text. ("", "customer") when it quotes nothing; a
    quoted photo reads as its caption, a quoted product as its name, price and description. A product or an
    order the customer sends quotes its own details ("product", "order"). The kind is the quoted message's
    (a photo without a caption quotes no text, but the model is told what it cannot see). A quoted photo
    comes with its media, which WhatsApp quotes whole: it can be downloaded like the photo itself."""
    if msg.HasField("productMessage"):
        ours = _sold_by_us(msg.productMessage.businessOwnerJID, own)
        return (
            _product_details(msg.productMessage.product),
            "product" if ours else "other_product",
            MessageKind.TEXT,
            None,
        )
    if msg.HasField("orderMessage"):
        return _order_details(msg.orderMessage), "order", MessageKind.TEXT, None
    for field in ("extendedTextMessage", *(name for name, _ in _MEDIA_KINDS), *_READ_AS_TEXT):
        if not msg.HasField(field):
            continue
        context = getattr(msg, field).contextInfo
        if context.HasField("quotedMessage"):
            quoted = _unwrap(context.quotedMessage)
            kind, text, media, _ = _body(quoted, own)
            if quoted.HasField("productMessage"):
                text = _product_details(quoted.productMessage.product)
            elif quoted.HasField("orderMessage"):
                text = _order_details(quoted.orderMessage)
            author: QuoteSource = "bot" if own and _bare_user(context.participant) in own else "customer"
            return text, author, kind, media if kind is MessageKind.IMAGE else None
        # Bots dress their messages as cards too (showAdAttribution alone): an ad has its click id.
        ad = context.externalAdReply
        if ad.sourceType.lower() == "ad" or ad.ctwaClid:
            words = "\n".join(part for part in (_text(ad.title), _text(ad.body)) if part.strip())
            return (
                (words, "ad", MessageKind.TEXT, None) if words else ("", "customer", MessageKind.TEXT, None)
            )
        break
    return "", "customer", MessageKind.TEXT, None


def _sold_by_us(owner_jid: str, own: frozenset[str]) -> bool:
    """A product shared from another business's catalog is not ours to price (unknown owner: ours)."""
    return not owner_jid or not own or _bare_user(_text(owner_jid)) in own


def _money(amount_1000: int, currency: str) -> str:
    return f"{amount_1000 / 1000:.2f} {_text(currency)}".strip() if amount_1000 else ""


def _product_details(product: Any) -> str:
    """ "Camiseta azul · 20.00 EUR (sale: 15.00 EUR) · Algodón 100 %": what the catalog says of a product."""
    price = _money(int(product.priceAmount1000), product.currencyCode)
    sale = _money(int(product.salePriceAmount1000), product.currencyCode)
    if price and sale:
        price = f"{price} (sale: {sale})"
    elif sale:
        price = f"sale: {sale}"
    parts = (_text(product.title), price, _text(product.description))
    return " · ".join(part.strip() for part in parts if part.strip())


def _order_details(order: Any) -> str:
    """ "Pedido de Ana · 3 items · 45.00 EUR": what an order message says (its items are not in it)."""
    items = f"{int(order.itemCount)} items" if order.itemCount else ""
    parts = (_text(order.orderTitle), items, _money(int(order.totalAmount1000), order.totalCurrencyCode))
    return " · ".join(part.strip() for part in parts if part.strip())


def translate_message(
    ev: Any, me: set[str] | frozenset[str] | None = None, lids: LidToPhone | None = None
) -> Inbound | None:
    """Turn a neonize `MessageEv` into an `Inbound`; None when it has no id or chat.

    `me` holds our own user ids (phone number and LID, bare or as JIDs) so a group mention of
    the bot sets `mentions_me` and the owner's "message yourself" chat sets `is_self_chat`.
    A 1:1 chat addressed by LID is keyed by the phone-number JID when the event carries it
    (SenderAlt, or RecipientAlt for our own messages) or an earlier event did (`lids` remembers),
    so one person is always one chat.
    Never raises.
    """
    try:
        info = ev.Info
        msg_id = info.ID
        chat, sender, from_me, is_group = _source(info.MessageSource, lids)
        if not msg_id or not chat:
            logger.debug("skipping message event without id or chat")
            return None
        timestamp = _timestamp(int(info.Timestamp))
        push_name = info.Pushname
    except Exception as exc:
        logger.debug("unusable message event: {}", type(exc).__name__)
        return None

    own = frozenset(_bare_user(x) for x in me or ())
    target = None
    try:
        kind, text, media, mentions_me = _body(_unwrap(ev.Message), own)
        if (change := _change(_unwrap(ev.Message), own)) is not None:
            kind, text, target = change
        if _is_a_copy(ev.Message):
            logger.debug("message {} is another copy of one received (HD, motion photo): kind=other", msg_id)
            kind, text, media, mentions_me = MessageKind.OTHER, "", None, False
    except Exception as exc:
        logger.debug("message {} has an odd body ({}); kind=other", msg_id, type(exc).__name__)
        kind, text, media, mentions_me = MessageKind.OTHER, "", None, False
    try:
        quoted, quoted_from, quoted_kind, quoted_media = _quote(_unwrap(ev.Message), own)
    except Exception as exc:  # the message is still answered, without what it replies to
        logger.debug("message {} has an odd quote ({})", msg_id, type(exc).__name__)
        quoted, quoted_from, quoted_kind, quoted_media = "", "customer", MessageKind.TEXT, None

    return Inbound(
        id=MessageId(msg_id),
        chat=ChatId(chat),
        sender=sender,
        kind=kind,
        text=text,
        timestamp=timestamp,
        from_me=from_me,
        is_group=is_group,
        is_status=chat == STATUS_BROADCAST,
        mentions_me=mentions_me,
        is_self_chat=not is_group and bool(own) and _bare_user(chat) in own,
        push_name=push_name,
        media=media,
        quoted=quoted,
        quoted_from=quoted_from,
        quoted_kind=quoted_kind,
        quoted_media=quoted_media,
        target=MessageId(target) if target else None,
    )


def _change(msg: WAMessage, me: frozenset[str]) -> tuple[MessageKind, str, str] | None:
    """An edit (its new text) or a deletion for everyone of an earlier message, with that message's id;
    None for anything else. whatsmeow delivers both as a protocolMessage naming the message in its key."""
    if not msg.HasField("protocolMessage"):
        return None
    protocol = msg.protocolMessage
    name = _reason_name(type(protocol).Type, protocol.type)
    if not protocol.key.ID or name not in ("message_edit", "revoke"):
        return None
    if name == "revoke":
        return MessageKind.REVOKE, "", protocol.key.ID
    _, text, _, _ = _body(_unwrap(protocol.editedMessage), me)
    return MessageKind.EDIT, text, protocol.key.ID


def _reason_name(enum_type: Any, value: int) -> str:
    try:
        return str(enum_type.Name(value)).lower()
    except ValueError:
        return str(value)


def translate_connection_event(ev: Any, now: float | None = None) -> DriverEvent | None:
    """neonize's connection events as the supervisor's; None for events it does not act on.

    `now` (unix seconds) turns KeepAliveTimeout's LastSuccess into an age. Never raises.
    """
    try:
        match ev:
            case ConnectedEv():
                return Connected()
            case DisconnectedEv():
                return Disconnected()
            case KeepAliveTimeoutEv():
                last = int(ev.LastSuccess)
                current = time.time() if now is None else now
                ago = max(0.0, current - last) if last > 0 else None
                return KeepAliveTimeout(error_count=int(ev.ErrorCount), last_success_ago_s=ago)
            case KeepAliveRestoredEv():
                return KeepAliveRestored()
            case LoggedOutEv():
                name = _reason_name(nz.ConnectFailureReason, int(ev.Reason))
                return LoggedOut(reason=f"logged out: {name}")
            case StreamReplacedEv():
                return StreamReplaced()
            case TemporaryBanEv():
                # A code neonize does not know is left unset, which would read as the enum's first name.
                known = ev.HasField("Code")
                reason = (
                    _reason_name(nz.TemporaryBan.TempBanReason, int(ev.Code)) if known else "reason not given"
                )
                return TemporaryBan(reason=reason, expire_s=float(max(0, int(ev.Expire))))
            case ClientOutdatedEv():
                return ClientOutdated()
            case ConnectFailureEv():
                code = int(ev.Reason)
                name = _reason_name(nz.ConnectFailureReason, code)
                if code in _LOGOUT_REASONS:
                    return LoggedOut(reason=f"connect failure: {name}")
                if code == _BAN_REASON:
                    return TemporaryBan(reason=name)
                if code == _OUTDATED_REASON:
                    return ClientOutdated()
                return ConnectFailure(reason=_scrub(f"{name} {ev.Message}".strip()))
            case PairStatusEv() if ev.Status == nz.PairStatus.SUCCESS:
                return Paired()
    except Exception as exc:
        logger.debug("unusable connection event {}: {}", type(ev).__name__, type(exc).__name__)
    return None


def _configure_neonize_logging(level: str) -> None:
    """Set the whatsmeow (Go) log level and the stdlib loggers neonize writes to.

    `NewAClient.connect` passes `LogLevel.from_logging(neonize.utils.log.log.level)` to Go; the
    default NOTSET means "everything", debug included, shipped line by line through ctypes.
    """
    value = logging.getLevelName(level.upper())
    lvl = value if isinstance(value, int) else logging.INFO
    lvl = {50: logging.ERROR}.get(lvl, lvl)
    for name in ("neonize.utils.log", "whatsmeow", "Whatsmeow"):
        logging.getLogger(name).setLevel(lvl)


# --------------------------------------------------------------------------- driver


def _retrieve(what: str) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback for a Go call nobody awaits to the end: its error is logged at DEBUG, not left to
    asyncio's "exception was never retrieved"."""

    def retrieve(call: asyncio.Future[Any]) -> None:
        if not call.cancelled() and (error := call.exception()) is not None:
            logger.debug("{}: {}", what, _scrub(f"{type(error).__name__}: {error}"))

    return retrieve


def _delete_sqlite(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class NeonizeDriver:
    """The supervisor's `ClientDriver` over one `NewAClient` (set as `client` before the first connect).

    `connect()` starts neonize's blocking Go call as a task and returns; when that task ends (the connect
    failed, or the client stopped) the driver reports `ConnectionLost`.
    """

    PROBE_AFTER_FAILURES = 3
    STOP_WAIT_S = 10.0  # how long a connect waits for the last Stop() before it counts as a failed attempt

    def __init__(
        self,
        database: str,
        on_event: Callable[[DriverEvent], None],
        *,
        probe_address: tuple[str, int] = ("web.whatsapp.com", 443),
        release_wait_s: float = 3.0,
    ) -> None:
        self.database = database
        self.client: NewAClient | None = None
        self._on_event = on_event
        self._probe_address = probe_address
        self._release_wait_s = release_wait_s
        self._task: asyncio.Task[Any] | None = None
        self._unconnected = 0  # connects since the last Connected
        self._old_refs: list[Any] = []
        self.abandoned_calls = 0  # Go calls left blocking a worker thread (see hard_exit_needed)
        # neonize keys its Go clients by uuid: Stop() deletes the entry, the next connect (Neonize()) adds
        # it again. `live`: between Connected and the next disconnect, when lookups are safe (see
        # phone_for_lid). `_stopping`: a Stop() still running; the next connect waits for it, since a late
        # Stop() acts on whatever client holds the uuid by then: it would orphan the next one, connected
        # to WhatsApp and taking customers' messages that never reach the bot.
        self.live = False
        self._lookups: set[asyncio.Future[Any]] = set()
        self._stopping: asyncio.Future[Any] | None = None

    def connected(self) -> None:
        self._unconnected = 0
        self.live = True

    async def connect(self) -> None:
        client = self._require()
        self.live = False
        if self._stopping is not None and not self._stopping.done():
            await asyncio.wait({self._stopping}, timeout=self.STOP_WAIT_S)
            if not self._stopping.done():  # whatsmeow is mid-dial (its Disconnect waits for the dial)
                raise ConnectionError("the last connection is still closing; the next attempt waits for it")
        # neonize keeps the loop of the first connect() in a module global and only sets it once;
        # point it at ours so events are not sent to a loop that is gone.
        _nz_events.event_global_loop = asyncio.get_running_loop()
        if self._unconnected >= self.PROBE_AFTER_FAILURES:
            await self._probe()
        self._unconnected += 1
        task = await client.connect()
        self._task = task
        task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        if task is not self._task:
            return
        if task.cancelled():
            self._on_event(ConnectionLost("connect task cancelled"))
            return
        exc = task.exception()
        error = None if exc is None else _scrub(f"{type(exc).__name__}: {exc}")
        self._on_event(ConnectionLost(error))

    async def disconnect(self) -> None:
        """Stop the Go client (also ends whatsmeow's own reconnect loop) and collect its task."""
        client = self.client
        if client is None:
            return
        self._task = None  # its end, however late, is this lifetime's, never the next one's
        # neonize replaces its ctypes callbacks on every connect(); keep the old ones alive in
        # case Go still calls them (a ctypes callback freed under Go would crash the process).
        refs = getattr(client, "_connect_refs", None)
        if refs is not None and all(refs is not r for r in self._old_refs):
            self._old_refs = [*self._old_refs[-3:], refs]
        wait_s = self._release_wait_s
        self.live = False
        if self._lookups:  # a lookup reads Go's client map: not while Stop() deletes from it
            await asyncio.wait(set(self._lookups), timeout=wait_s)
        if self._stopping is None or self._stopping.done():
            self._stopping = asyncio.ensure_future(client.stop())
            self._stopping.add_done_callback(_retrieve("neonize stop"))
        # A task, and waited for without cancelling it: a cancelled wait must not lose track of a Stop() that
        # is still running in Go (the next connect checks it).
        await asyncio.wait({self._stopping}, timeout=wait_s)
        if not self._stopping.done():
            logger.warning(
                "whatsapp: neonize Stop() is slow (whatsmeow is mid-dial); the next connect waits for it"
            )
        task = client.connect_task
        if task is None:
            return
        if not task.done():
            await asyncio.wait({task}, timeout=wait_s)
        if not task.done():
            # Blocked in whatsmeow's QR loop, which ignores Stop; cancelling frees our loop but
            # its worker thread lives on until the process exits.
            logger.warning("neonize connect call did not end; abandoning it")
            self.abandoned_calls += 1
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled():
            task.exception()  # mark retrieved; the supervisor already has it

    async def phone_for_lid(self, lid: Any, timeout_s: float) -> Any:
        """whatsmeow's phone JID for a LID (from the session database). Only while `live`: neonize's
        GetPNFromLID dereferences its client map unchecked, so a call after Stop() (or before the next
        Neonize() registers the client) is a Go nil-pointer panic that kills the process."""
        if not self.live:
            raise TransportError("not connected")
        lookup = asyncio.ensure_future(self._require().get_pn_from_lid(lid))
        self._lookups.add(lookup)
        lookup.add_done_callback(self._lookups.discard)
        lookup.add_done_callback(_retrieve("LID lookup"))
        await asyncio.wait({lookup}, timeout=timeout_s)  # a slow one runs on; disconnect waits for it
        if not lookup.done():
            raise TimeoutError(f"no answer in {timeout_s:g} s")
        return lookup.result()

    async def is_connected(self) -> bool:
        if self.client is None:
            return False
        try:
            return bool(await self.client.is_connected)
        except Exception:
            return False

    async def ping(self) -> None:
        await self._require().send_presence(Presence.AVAILABLE)

    async def forget_session(self) -> None:
        """Delete the sqlite session file (whatsmeow already deleted the device rows on logout).

        With a Postgres URL there is no file: whatsmeow's store delete is all there is to do.
        """
        if self.database.startswith("postgres"):
            return
        await asyncio.to_thread(_delete_sqlite, self.database)
        logger.warning("whatsapp: local session {} deleted", Path(self.database).name)

    async def _probe(self) -> None:
        """TCP reachability check; neonize leaks a DB handle per failed connect()."""
        host, port = self._probe_address
        try:
            async with asyncio.timeout(10):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"{host} unreachable ({type(exc).__name__}: {exc})") from exc
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    def _require(self) -> NewAClient:
        if self.client is None:
            raise TransportError("transport not started")
        return self.client


# --------------------------------------------------------------------------- transport

Handler = Callable[[NewAClient, Any], Awaitable[None]]


class NeonizeTransport:
    """`Transport` over a neonize `NewAClient`, kept up by a `Supervisor`.

    Optional parts, all off unless given: `outbox_path` (a SQLite file: replies sent while disconnected wait
    there and go out in order after the reconnect), `on_undecryptable(chat)` or `resend_text` (one polite
    request to resend a message that stayed undecryptable after `undecryptable_grace_s`), `on_state`
    (called on every state change).
    """

    ORIGIN_CACHE = 2048  # message id -> original (chat, sender) JIDs, for read receipts
    LID_LOOKUP_TIMEOUT_S = 0.5  # a local database read in whatsmeow; never hold messages longer
    MAX_LID_LOOKUPS_PENDING = 4  # the messages behind them wait: past this, a LID stays the chat's key
    # After a connect WhatsApp delivers what came while this device was away, then says so
    # (OfflineSyncCompleted, with a count of 0 when nothing did). Queued replies wait for it, this long at
    # most: among what came may be the owner answering a chat from the phone, which withholds them.
    CATCH_UP_WAIT_S = 15.0

    def __init__(
        self,
        database: str,
        *,
        on_inbound: Callable[[Inbound], None],
        name: str = "bot",
        pair_phone: str | None = None,
        on_qr: Callable[[str], None] | None = None,
        on_pair_code: Callable[[str], None] | None = None,
        retry_delay_s: float = 1.0,
        max_retry_delay_s: float = 60.0,
        qr_timeout_s: float = 90.0,
        log_level: str = "INFO",
        heartbeat_s: float = 30.0,
        presence_ping: bool = False,
        on_state: Callable[[ConnectionState], None] | None = None,
        outbox_path: str | Path | None = None,
        outbox_max: int = 500,
        outbox_max_age_s: float = 3600.0,
        on_undecryptable: Callable[[ChatId], Awaitable[None] | None] | None = None,
        on_call: Callable[[ChatId], Awaitable[None]] | None = None,
        resend_text: str | None = None,
        undecryptable_grace_s: float = 30.0,
        probe_address: tuple[str, int] = ("web.whatsapp.com", 443),
        print_qr: bool = True,
    ) -> None:
        self._database = database
        self._print_qr = print_qr  # off when logs are JSON lines: the drawing would break their parsers
        self._name = name
        self._on_inbound = on_inbound
        self._pair_phone = "".join(ch for ch in pair_phone or "" if ch.isdigit()) or None
        self._on_qr = on_qr
        self._on_pair_code = on_pair_code
        self._log_level = log_level
        self._on_state = on_state
        self._on_undecryptable = on_undecryptable
        self._resend_text = resend_text
        self._on_call = on_call

        self._driver = NeonizeDriver(database, self._event, probe_address=probe_address)
        self._supervisor = Supervisor(
            self._driver,
            backoff=Backoff(retry_delay_s, max(max_retry_delay_s, retry_delay_s)),
            heartbeat_s=heartbeat_s,
            qr_timeout_s=qr_timeout_s,
            presence_ping=presence_ping,
            on_state=self._state_changed,
        )
        self._outbox = (
            Outbox(outbox_path, max_items=outbox_max, max_age_s=outbox_max_age_s)
            if outbox_path is not None
            else None
        )
        # Set by the app: a queued reply that will never go out (see Outbox.on_drop).
        self.on_reply_dropped: Callable[[MessageId, ChatId, bool], None] | None = None
        if self._outbox is not None:
            self._outbox.on_drop = lambda message_id, chat, late: (
                self.on_reply_dropped(message_id, chat, late) if self.on_reply_dropped is not None else None
            )
        self._resend = (
            ResendRequests(self._ask_resend, grace_s=undecryptable_grace_s)
            if on_undecryptable is not None or resend_text
            else None
        )
        self._pacer: Callable[[ChatId, str], Awaitable[None]] | None = None
        self._unspend: Callable[[Any], None] = lambda slot: None
        self._lids = LidToPhone()
        self._in_order: asyncio.Future[None] | None = None  # the last message waiting on a LID lookup
        self._lookups_pending = 0
        self._tasks = BackgroundTasks("whatsapp")
        self._flushing: asyncio.Task[None] | None = None
        self._flush_wanted = asyncio.Event()
        self._caught_up = asyncio.Event()  # what came while away has been delivered (see CATCH_UP_WAIT_S)
        self._connected_at = 0.0  # loop time of the last Connected: the catch-up wait counts from it
        self._quiet_pairing = False  # logout(): connect without showing a QR
        self._qr_announced = False
        self._pair_requested = False
        self._pair_failed = False  # WhatsApp refused a pairing code this pairing: the QR is shown instead
        self._stopped = False
        self._own_ids: set[str] = set()
        self._origin: OrderedDict[str, tuple[nz.JID, nz.JID]] = OrderedDict()

    @property
    def _client(self) -> NewAClient | None:
        return self._driver.client

    @property
    def hard_exit_needed(self) -> bool:
        """True when a neonize Go call had to be abandoned (stopped while a QR code was showing) or a Stop()
        still runs (whatsmeow mid-dial): its worker thread blocks, and `asyncio.run` would wait for it at
        exit. End with `os._exit(code)`."""
        stopping = self._driver._stopping
        return self._driver.abandoned_calls > 0 or (stopping is not None and not stopping.done())

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the client, register handlers and start connecting in the background."""
        if self._driver.client is not None:
            return
        _configure_neonize_logging(self._log_level)
        # `uuid` explicitly: by default neonize uses the first argument (maybe a Postgres URL
        # with a password) as the session id, which then shows up in Go logs.
        client = NewAClient(self._database, uuid=self._name)
        handlers: dict[type, Callable[[Any], Any]] = {
            MessageEv: self._handle_message,
            ConnectedEv: self._handle_connected,
            OfflineSyncCompletedEv: self._handle_caught_up,
            PairStatusEv: self._handle_pair_status,
            StreamErrorEv: self._handle_stream_error,
            UndecryptableMessageEv: self._handle_undecryptable,
        }
        if self._on_call is not None:
            handlers[CallOfferEv] = self._handle_call
        for event_type in (
            DisconnectedEv,
            LoggedOutEv,
            StreamReplacedEv,
            TemporaryBanEv,
            ConnectFailureEv,
            KeepAliveTimeoutEv,
            KeepAliveRestoredEv,
            ClientOutdatedEv,
        ):
            handlers[event_type] = self._handle_connection_event
        for event_type, fn in handlers.items():
            client.event(event_type)(self._guard(event_type.__name__, fn))
        client.qr(self._guard("QR", self._handle_qr))
        self._driver.client = client
        await self._supervisor.start()

    async def stop(self, final: ConnectionState = ConnectionState.STOPPED) -> None:
        """Stop retrying, disconnect, end background work; prompt (a few seconds at most)."""
        if self._stopped:
            return
        self._stopped = True
        await self._supervisor.stop(final)
        await self._tasks.cancel_all()
        if self._resend is not None:
            await self._resend.close()
        if self._outbox is not None:
            if len(self._outbox):
                logger.warning("outbox: {} reply(ies) wait for the next start", len(self._outbox))
            self._outbox.close()
        logger.info("whatsapp transport stopped")

    async def logout(self, timeout_s: float = 30.0) -> None:
        """Unlink this device from the phone, then delete the local session and stop.

        Works on a running transport or on one never started (it connects first, without showing a QR).
        The local session is deleted in every case; TransportError says when WhatsApp's side was not reached.
        """
        if self._stopped:
            await self._driver.forget_session()
            raise TransportError("transport already stopped; the local session was deleted")
        if not self._supervisor.running:
            self._quiet_pairing = True
            await self.start()
        error: str | None = None
        try:
            async with asyncio.timeout(timeout_s):
                state = await self._supervisor.wait_for(
                    ConnectionState.CONNECTED, ConnectionState.PAIRING, *_STOPPED_FOR_GOOD
                )
            if state is ConnectionState.CONNECTED:
                await self._driver._require().logout()
            else:
                error = f"no linked session to unlink ({state.value})"
        except TimeoutError:
            error = f"could not reach WhatsApp within {timeout_s:.0f}s"
        except Exception as exc:
            error = f"logout failed: {_scrub(str(exc))}"
        await self.stop(final=ConnectionState.LOGGED_OUT)
        await self._driver.forget_session()
        if error is not None:
            raise TransportError(f"{error}; the local session was deleted")
        logger.warning("logged out: the device is unlinked and the local session deleted")

    async def wait_connected(self) -> bool:
        """Wait until connected (True) or a state that will not connect by itself (False).

        Bound it with `asyncio.timeout(...)`.
        """
        state = await self._supervisor.wait_for(ConnectionState.CONNECTED, *_STOPPED_FOR_GOOD)
        return state is ConnectionState.CONNECTED

    # ------------------------------------------------------------------ Transport

    @property
    def state(self) -> ConnectionState:
        return self._supervisor.state

    def group_parts(self, reply: MessageId, part_ids: list[MessageId]) -> None:
        """The parts of one reply, as send_text returned them: those still queued are grouped (see
        Outbox.group)."""
        if self._outbox is not None:
            self._outbox.group(reply, part_ids)

    def pair_now(self) -> None:
        """GET /qr: end a rest between unscanned pairings, so a fresh code comes at once."""
        self._supervisor.pair_now()

    def pairing_rest_s(self) -> float | None:
        """Seconds left in a rest between unscanned pairings (for the /qr page); None when not resting."""
        return self._supervisor.pairing_rest_s()

    async def send_text(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
        """Send plain text (no neonize mention/link parsing), or `file` (a photo or a document) with `text`
        as its caption; return the sent message id.

        While disconnected, with an outbox, the text is queued and a provisional id returned; queued texts
        go out first so order holds; with the outbox full, waits for room. Raises TransportError when it
        can be neither sent nor queued (no outbox).
        """
        sendable = self.state is ConnectionState.CONNECTED and self._caught_up.is_set()
        if self._outbox is None or (sendable and not len(self._outbox)):
            slot = await self._pace(
                chat, text
            )  # SendWithheld: the owner has the chat, neither sent nor queued
            try:
                return await self._send_now(chat, text, file)
            except TransportError:
                self._unspend(slot)  # it did not go out: its budget slot is the queued send's
                if self._outbox is None or await self.is_connected():
                    raise
        if self._outbox is None:  # pragma: no cover - the branch above raised
            raise TransportError(f"not connected ({self.state.value})")
        if len(self._outbox) >= self._outbox.max_items:
            logger.debug("outbox full: a reply waits for room")
            self._kick_flush()
        message_id = await self._outbox.put_when_room(chat, text, file)
        self._kick_flush()
        return message_id

    async def set_typing(self, chat: ChatId, typing: bool) -> None:
        if self.state is not ConnectionState.CONNECTED:
            return  # nobody sees it; not worth an error
        client = self._driver._require()
        presence = ChatPresence.CHAT_PRESENCE_COMPOSING if typing else ChatPresence.CHAT_PRESENCE_PAUSED
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await client.send_chat_presence(
                    _to_jid(chat), presence, ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT
                )
        except Exception as exc:
            raise TransportError(f"typing failed: {_scrub(str(exc))}") from exc

    async def mark_read(self, message: Inbound) -> None:
        client = self._driver._require()
        chat, sender = self._origin.get(message.id) or (
            _to_jid(message.chat),
            _to_jid(message.sender or message.chat),
        )
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await client.mark_read(message.id, chat=chat, sender=sender, receipt=ReceiptType.READ)
        except Exception as exc:
            raise TransportError(f"mark read failed: {_scrub(str(exc))}") from exc

    async def download_media(self, message: Inbound) -> bytes:
        client = self._driver._require()
        handle = message.media.handle if message.media else None
        if not isinstance(handle, WAMessage):
            raise TransportError("message has no downloadable media")
        # whatsmeow's DownloadAny knows no video note: it is a VideoMessage, downloaded as one.
        if handle.HasField("ptvMessage"):
            handle = WAMessage(videoMessage=handle.ptvMessage)
        try:
            async with asyncio.timeout(DOWNLOAD_TIMEOUT_S):
                data = await client.download_any(handle)
        except Exception as exc:
            raise TransportError(f"download failed: {_scrub(str(exc))}") from exc
        if not data:
            raise TransportError("download returned no data")
        return bytes(data)

    async def is_connected(self) -> bool:
        """Ask whatsmeow directly (neonize's property returns a coroutine)."""
        return await self._driver.is_connected()

    def stats(self) -> dict[str, Any]:
        """Connection numbers for /v1/metrics; no phone numbers."""
        stats = self._supervisor.stats()
        if self._outbox is not None:
            stats.update(self._outbox.stats())
        if self._resend is not None:
            stats.update(self._resend.stats())
        return stats

    # ------------------------------------------------------------------ sending helpers

    async def _send_now(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
        client = self._driver._require()
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S if file is None else SEND_FILE_TIMEOUT_S):
                message = (
                    WAMessage(conversation=text) if file is None else await _file_message(client, file, text)
                )
                resp = await client.send_message(_to_jid(chat), message)
        except FileGone:
            raise
        except Exception as exc:
            raise TransportError(f"send failed: {_scrub(str(exc))}") from exc
        return MessageId(resp.ID)

    def set_pacer(
        self, pacer: Callable[[ChatId, str], Awaitable[Any]], unspend: Callable[[Any], None] | None = None
    ) -> None:
        """Run `pacer` right before each message really goes out, queued ones included (the ban-risk
        governor's typing pause and per-minute budget: spent at queue time, a reconnect would send the
        whole outbox in one burst); `unspend` gives the slot back when the send then fails."""
        self._pacer = pacer
        self._unspend = unspend or (lambda slot: None)

    async def _pace(self, chat: ChatId, text: str) -> Any:
        """The pacer's budget slot (None without a pacer), for `_unspend` if the send then fails."""
        return await self._pacer(chat, text) if self._pacer is not None else None

    async def _send_queued(self, chat: ChatId, text: str, file: str | None = None) -> None:
        if self.state is not ConnectionState.CONNECTED or not self._caught_up.is_set():
            raise SendDeferred("not connected, or not caught up")
        slot = await self._pace(chat, text)  # SendWithheld: the outbox drops it (the owner has the chat)
        if self.state is not ConnectionState.CONNECTED or not self._caught_up.is_set():
            self._unspend(slot)  # reconnected during the pause: the new backlog first
            raise SendDeferred("reconnected while pacing")
        try:
            try:
                await self._send_now(chat, text, file)
            except TransportError as error:
                # The file itself cannot go (deleted or spoiled while it waited, refused by WhatsApp): its
                # caption goes alone, and nothing behind it waits. A dropped connection is retried whole.
                if file is None or not (isinstance(error, FileGone) or await self.is_connected()):
                    raise
                logger.error("a queued file of a flow cannot be sent ({}): its caption goes alone", error)
                if text:
                    await self._send_now(chat, text)
        except TransportError as exc:
            self._unspend(slot)
            if not await self.is_connected():
                raise SendDeferred(str(exc)) from exc
            raise

    def _kick_flush(self) -> None:
        """Send what waits in the outbox as soon as connected; one flush loop at a time."""
        if self._outbox is None or self._stopped:
            return
        self._flush_wanted.set()
        if self._flushing is None or self._flushing.done():
            self._flushing = self._tasks.spawn(self._flush(), "outbox-flush")

    async def _flush(self) -> None:
        """Runs while something waits: flushes on every kick (connected, new message) and every 10 s."""
        assert self._outbox is not None
        while len(self._outbox):
            self._flush_wanted.clear()
            if self.state is ConnectionState.CONNECTED:
                await self._catch_up()
                await self._outbox.flush(self._send_queued)
                if not len(self._outbox):
                    return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10.0):
                    await self._flush_wanted.wait()

    async def _catch_up(self) -> None:
        """Wait until what came while this device was away has been delivered (see CATCH_UP_WAIT_S)."""
        while not self._caught_up.is_set():
            connected_at = self._connected_at
            try:
                async with asyncio.timeout_at(connected_at + self.CATCH_UP_WAIT_S):
                    await self._caught_up.wait()
            except TimeoutError:
                if self._connected_at != connected_at:
                    continue  # reconnected meanwhile: that connection's own wait
                if self.state is not ConnectionState.CONNECTED:
                    return  # dropped meanwhile: the next connection waits for its own backlog
                logger.debug("whatsapp: no offline sync announced in {:.0f} s; sending", self.CATCH_UP_WAIT_S)
                self._caught_up.set()

    async def _ask_resend(self, chat: ChatId) -> None:
        if self._on_undecryptable is not None:
            result = self._on_undecryptable(chat)
            if inspect.isawaitable(result):
                await result
        elif self._resend_text:
            await self.send_text(chat, self._resend_text)

    # ------------------------------------------------------------------ state

    def _event(self, event: DriverEvent) -> None:
        self._supervisor.handle(event)

    def _state_changed(self, state: ConnectionState) -> None:
        if state is not ConnectionState.CONNECTED:
            self._caught_up.clear()  # the next connection delivers what comes meanwhile, then says so
        if state is ConnectionState.CONNECTED:
            self._kick_flush()
        if state is ConnectionState.CONNECTING:
            self._qr_announced = self._pair_requested = self._pair_failed = False
        if self._on_state is not None:
            self._on_state(state)

    @property
    def owner_chat(self) -> ChatId | None:
        """The linked number's "message yourself" chat, where owner commands are answered; None before
        the first login."""
        me = getattr(self._driver.client, "me", None)  # neonize's Device: JID is the phone number's
        user = me.JID.User if me is not None else ""
        return ChatId(f"{user}@s.whatsapp.net") if user and user.isdigit() else None

    def _me(self) -> frozenset[str]:
        ids = set(self._own_ids)
        me = getattr(self._driver.client, "me", None)  # neonize's Device, set from event 0
        if me is not None:
            ids.update(u for u in (me.JID.User, me.LID.User) if u)
        return frozenset(ids)

    # ------------------------------------------------------------------ event handlers

    def _guard(self, name: str, fn: Callable[..., Any]) -> Handler:
        """Wrap a handler: neonize drops the future, so an exception would vanish silently."""

        async def handler(_client: NewAClient, ev: Any) -> None:
            try:
                result = fn(ev)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.opt(exception=True).error("whatsapp {} handler failed", name)

        return handler

    def _handle_message(self, ev: Any) -> Awaitable[None] | None:
        # Synchronous on purpose: nothing awaited before on_inbound, so order holds. The one exception,
        # a LID to look up, makes this message and every later one wait their turn behind it.
        self._supervisor.note_inbound()
        inbound = translate_message(ev, self._me(), self._lids)
        if inbound is None:
            return None
        behind = self._in_order if self._in_order is not None and not self._in_order.done() else None
        lookup = self._should_look_up(inbound)
        if behind is None and not lookup:
            self._deliver(ev, inbound)
            return None
        if lookup:
            self._lookups_pending += 1
        self._in_order = asyncio.ensure_future(self._deliver_after(behind, ev, inbound, lookup))
        return self._in_order

    def _should_look_up(self, inbound: Inbound) -> bool:
        # Bounded: while whatsmeow is slow to answer, messages are keyed by LID rather than all waiting.
        return (
            _unresolved_lid(inbound)
            and self._lids.worth_asking(inbound.chat)
            and self._lookups_pending < self.MAX_LID_LOOKUPS_PENDING
        )

    async def _deliver_after(
        self, behind: asyncio.Future[None] | None, ev: Any, inbound: Inbound, lookup: bool
    ) -> None:
        try:
            if behind is not None:
                await asyncio.wait({behind})  # its own errors are its handler's to log
            if lookup:  # asked again now: the lookups before it may have learnt or missed this LID
                known = self._lids.phone(inbound.chat)
                if known != inbound.chat:
                    inbound = self._keyed_by_phone(inbound, known)
                elif self._lids.worth_asking(inbound.chat):
                    inbound = await self._phone_chat(inbound)
        finally:
            if lookup:
                self._lookups_pending -= 1
        self._deliver(ev, inbound)

    async def _phone_chat(self, inbound: Inbound) -> Inbound:
        """Key a LID-only 1:1 message by the phone number whatsmeow knows for that LID. It keeps the
        mapping in the session database, so this still works after a restart has emptied `_lids` (the
        owner's reply from the phone is often LID-only, and must pause the customer's chat)."""
        lid = inbound.chat
        try:
            found = await self._driver.phone_for_lid(_to_jid(lid), self.LID_LOOKUP_TIMEOUT_S)
        except TransportError:  # between two connections: asked again at its next message
            return inbound
        except Exception as error:  # unknown, slow: the LID stays the chat's key
            logger.debug("no phone number for a LID: {}", _scrub(str(error)))
            self._lids.note_unknown(lid)
            return inbound
        if not _is_pn(found):
            self._lids.note_unknown(lid)
            return inbound
        phone = _jid_str(found)
        self._lids.learn(lid, phone)
        return self._keyed_by_phone(inbound, phone)

    @staticmethod
    def _keyed_by_phone(inbound: Inbound, phone: str) -> Inbound:
        sender = phone if inbound.sender == inbound.chat else inbound.sender
        return dataclasses.replace(inbound, chat=ChatId(phone), sender=sender)

    def _deliver(self, ev: Any, inbound: Inbound) -> None:
        if self._resend is not None:
            self._resend.arrived(inbound.id)
        src = ev.Info.MessageSource
        chat, sender = nz.JID(), nz.JID()
        chat.CopyFrom(src.Chat)
        sender.CopyFrom(src.Sender)
        self._origin[inbound.id] = (chat, sender)
        if len(self._origin) > self.ORIGIN_CACHE:
            self._origin.popitem(last=False)
        self._on_inbound(inbound)

    def _handle_connected(self, ev: Any) -> None:
        self._connected_at = asyncio.get_running_loop().time()
        if self.state is ConnectionState.CONNECTED:  # reconnected before anyone noticed the drop
            self._caught_up.clear()
        self._driver.connected()
        self._supervisor.handle(Connected())
        self._kick_flush()  # also when whatsmeow reconnected before anyone noticed the drop

    async def _handle_caught_up(self, ev: Any) -> None:
        if self._in_order is not None and not self._in_order.done():
            await asyncio.wait({self._in_order})  # the last of them waits on a LID lookup: delivered first
        logger.debug("whatsapp: {} offline event(s) delivered", ev.Count)
        self._caught_up.set()

    def _handle_connection_event(self, ev: Any) -> None:
        event = translate_connection_event(ev)
        if event is not None:
            self._supervisor.handle(event)

    def _handle_stream_error(self, ev: Any) -> None:
        # whatsmeow closes the socket after an unknown stream error and reconnects by itself.
        logger.warning("whatsapp stream error {}", _scrub(str(ev.Code)))

    def _handle_pair_status(self, ev: Any) -> None:
        if ev.Status == nz.PairStatus.SUCCESS:
            if ev.ID.User:
                self._own_ids.add(ev.ID.User)
            logger.info("whatsapp paired as {}", _mask(ev.ID.User))
            self._supervisor.handle(Paired())
        else:
            logger.error("whatsapp pairing failed: {}", _scrub(str(ev.Error)))

    def _handle_undecryptable(self, ev: Any) -> None:
        info = ev.Info
        chat, _sender, from_me, is_group = _source(info.MessageSource, self._lids)
        if not info.ID or not chat or from_me or is_group or chat == STATUS_BROADCAST:
            return
        if ev.DecryptFailMode == nz.UndecryptableMessage.DECRYPT_FAIL_HIDE:
            return  # WhatsApp itself would not show a placeholder for it
        logger.info("a message from {} could not be decrypted; whatsmeow asked for a retry", _scrub(chat))
        if self._resend is not None:
            self._resend.undecryptable(info.ID, ChatId(chat))

    async def _handle_call(self, ev: Any) -> None:
        """An incoming call, when calls are refused: decline it, then let the bot explain (on_call)."""
        meta = ev.basicCallMeta
        # Key the chat like messages are keyed: by the phone-number JID when the offer carries one, or an
        # earlier message did (a blocked number is a phone number).
        creator = meta.callCreatorAlt if _is_pn(meta.callCreatorAlt) else meta.callCreator
        chat = self._lids.phone(_jid_str(creator))
        if not chat or not meta.callID:
            return
        logger.info("declining a call from {}", _scrub(chat))
        try:
            await self._driver._require().reject_call(meta.callCreator, meta.callID)
        except Exception as exc:
            logger.warning("could not decline a call: {}", _scrub(str(exc)))
        assert self._on_call is not None
        await self._on_call(ChatId(chat))

    async def _handle_qr(self, data: bytes) -> None:
        code = data.decode() if isinstance(data, bytes) else str(data)
        self._supervisor.handle(QrShown())
        if self._quiet_pairing:
            return
        if self._on_qr is not None:
            self._on_qr(code)
        if self._pair_phone and not self._pair_requested:
            self._pair_requested = True
            self._pair_failed = not await self._request_pair_code()
        if self._pair_phone and not self._pair_failed:
            return
        if not self._qr_announced:
            # WARNING, so production logs (WARNING by default) show it: nothing works until it is scanned.
            logger.warning(
                "whatsapp is not linked: scan the QR code {} with WhatsApp > Linked devices > Link a device",
                "below, or open /qr" if self._print_qr else "on /qr",
            )
        if self._print_qr:  # plain Unicode blocks: scannable in a terminal and in a platform's log viewer
            segno.make(code).terminal(compact=True)
            sys.stdout.flush()
        self._qr_announced = True

    async def _request_pair_code(self) -> bool:
        """Ask WhatsApp for a pairing code; False when it refused (the QR is shown instead, and the next
        pairing asks again)."""
        client = self._driver._require()
        phone = self._pair_phone or ""
        try:
            code = await client.PairPhone(phone, show_push_notification=True)
        except Exception as exc:
            logger.error(
                "whatsapp pairing code for {} failed: {}; showing the QR instead for this pairing",
                _mask(phone),
                _scrub(str(exc)),
            )
            return False
        if self._on_pair_code is not None:
            self._on_pair_code(code)
        logger.warning(  # WARNING, so production logs show it
            "whatsapp pairing code for {}: {} (WhatsApp > Linked devices > Link with phone number)",
            _mask(phone),
            code,
        )
        return True
