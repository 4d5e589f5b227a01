"""translate_message and the transport's event handling, fed with neonize's own protobuf types."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from loguru import logger

from connection import supervisor as sv
from connection.types import ChatId, ConnectionState, Inbound, MessageKind, TransportError

with warnings.catch_warnings():
    # neonize leaves `os.popen("uname -a")` unclosed at import (neonize/utils/platform.py:39).
    warnings.simplefilter("ignore", ResourceWarning)
    from neonize.proto.Neonize_pb2 import (
        JID,
        BasicCallMeta,
        CallOffer,
        ClientOutdated,
        Connected,
        ConnectFailure,
        Disconnected,
        KeepAliveTimeout,
        LoggedOut,
        MessageInfo,
        MessageSource,
        Node,
        OfflineSyncCompleted,
        PairStatus,
        StreamReplaced,
        TemporaryBan,
    )
    from neonize.proto.Neonize_pb2 import Message as MessageEv
    from neonize.proto.waCommon.WACommon_pb2 import MessageKey
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import (
        AudioMessage,
        ContextInfo,
        DocumentMessage,
        ExtendedTextMessage,
        FutureProofMessage,
        ImageMessage,
        MessageAssociation,
        MessageContextInfo,
        OrderMessage,
        ProductMessage,
        ReactionMessage,
        VideoMessage,
    )
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as WAMessage

    from connection import neonize_adapter
    from connection.neonize_adapter import (
        NeonizeTransport,
        _mask,
        _scrub,
        translate_connection_event,
        translate_message,
    )

PHONE = "34600111222"
PHONE2 = "34600333444"
ME = "34699888777"
ME_LID = "987654321012345"
TS_MS = 1_760_000_000_123


def jid(user: str, server: str = "s.whatsapp.net", device: int = 0) -> JID:
    return JID(User=user, Server=server, Device=device, RawAgent=0, Integrator=0, IsEmpty=False)


def empty_jid() -> JID:
    return JID(User="", Server="", Device=0, RawAgent=0, Integrator=0, IsEmpty=True)


def event(
    message: WAMessage,
    *,
    chat: JID | None = None,
    sender: JID | None = None,
    from_me: bool = False,
    group: bool = False,
    sender_alt: JID | None = None,
    recipient_alt: JID | None = None,
    msg_id: str = "3EB0ABCDEF",
    ts: int = TS_MS,
) -> MessageEv:
    """A MessageEv shaped like the Go encoder's, round-tripped through bytes like neonize does."""
    chat = chat if chat is not None else jid(PHONE)
    ev = MessageEv(
        Info=MessageInfo(
            MessageSource=MessageSource(
                Chat=chat,
                Sender=sender if sender is not None else jid(PHONE, device=3),
                IsFromMe=from_me,
                IsGroup=group,
                AddressingMode=1,
                SenderAlt=sender_alt if sender_alt is not None else empty_jid(),
                RecipientAlt=recipient_alt if recipient_alt is not None else empty_jid(),
                BroadcastListOwner=empty_jid(),
            ),
            ID=msg_id,
            ServerID=0,
            Type="text",
            Pushname="Ana",
            Timestamp=ts,
            Category="",
            Multicast=False,
            MediaType="",
            Edit="",
        ),
        Message=message,
        IsEphemeral=False,
        IsViewOnce=False,
        IsViewOnceV2=False,
        IsViewOnceV2Extension=False,
        IsDocumentWithCaption=False,
        IsLottieSticker=False,
        IsEdit=False,
        UnavailableRequestID="",
        RetryCount=0,
    )
    return MessageEv.FromString(ev.SerializeToString())


def test_plain_text() -> None:
    msg = translate_message(event(WAMessage(conversation="hola")))
    assert msg is not None
    assert msg.id == "3EB0ABCDEF"
    assert msg.chat == f"{PHONE}@s.whatsapp.net"
    assert msg.sender == f"{PHONE}@s.whatsapp.net"  # no device suffix
    assert msg.kind is MessageKind.TEXT
    assert msg.text == "hola"
    assert msg.timestamp == pytest.approx(TS_MS / 1000)
    assert msg.push_name == "Ana"
    assert not (msg.from_me or msg.is_group or msg.is_status or msg.mentions_me)
    assert msg.media is None


def test_timestamp_in_seconds_is_accepted() -> None:
    msg = translate_message(event(WAMessage(conversation="x"), ts=1_760_000_000))
    assert msg is not None and msg.timestamp == 1_760_000_000.0


def test_extended_text() -> None:
    wa = WAMessage(extendedTextMessage=ExtendedTextMessage(text="mira https://example.com"))
    msg = translate_message(event(wa), {ME})
    assert msg is not None
    assert msg.kind is MessageKind.TEXT
    assert msg.text == "mira https://example.com"
    assert not msg.mentions_me


def test_a_swipe_reply_carries_the_text_it_replies_to_and_who_wrote_it() -> None:
    """ "¿y este?" under one plan of the bot's list: without the quote the model could not tell which."""
    plans = WAMessage(extendedTextMessage=ExtendedTextMessage(text="1. Básico: 10 €\n2. Pro: 20 €"))
    context = ContextInfo(stanzaID="3EB0BOT", participant=f"{ME}@s.whatsapp.net", quotedMessage=plans)
    wa = WAMessage(
        extendedTextMessage=ExtendedTextMessage(text="¿y el 2 incluye soporte?", contextInfo=context)
    )
    msg = translate_message(event(wa), {ME})
    assert msg is not None
    assert (msg.kind, msg.text) == (MessageKind.TEXT, "¿y el 2 incluye soporte?")
    assert (msg.quoted, msg.quoted_from) == ("1. Básico: 10 €\n2. Pro: 20 €", "bot")

    # The customer's own photo, quoted under a voice note: its caption, written by them.
    photo = WAMessage(imageMessage=ImageMessage(mimetype="image/jpeg", caption="la lámpara roja"))
    context = ContextInfo(participant=f"{PHONE}@s.whatsapp.net", quotedMessage=photo)
    wa = WAMessage(audioMessage=AudioMessage(mimetype="audio/ogg", PTT=True, contextInfo=context))
    msg = translate_message(event(wa), {ME})
    assert msg is not None and msg.kind is MessageKind.AUDIO
    assert (msg.quoted, msg.quoted_from, msg.quoted_kind) == (
        "la lámpara roja",
        "customer",
        MessageKind.IMAGE,
    )

    # A photo without a caption the business sent, and "¿precio?" under it: no text, but a photo, quoted
    # whole by WhatsApp, so it can be downloaded and shown to the model.
    photo = WAMessage(imageMessage=ImageMessage(mimetype="image/jpeg", fileLength=48_000, mediaKey=b"k" * 32))
    context = ContextInfo(participant=f"{ME}@s.whatsapp.net", quotedMessage=photo)
    wa = WAMessage(extendedTextMessage=ExtendedTextMessage(text="¿precio?", contextInfo=context))
    msg = translate_message(event(wa), {ME})
    assert msg is not None
    assert (msg.quoted, msg.quoted_from, msg.quoted_kind) == ("", "bot", MessageKind.IMAGE)
    assert msg.quoted_media is not None and msg.quoted_media.size_bytes == 48_000
    assert msg.quoted_media.handle == photo  # what download_any takes
    plain = translate_message(event(WAMessage(conversation="hola")), {ME})
    assert plain is not None and plain.quoted_media is None


def test_a_first_message_from_an_ad_carries_the_ads_words() -> None:
    """ "Hola, quiero más información" from a click-to-WhatsApp ad: the ad says about what."""
    ad = ContextInfo.ExternalAdReplyInfo(
        title="Pizza 2x1 los martes",
        body="Solo en local",
        sourceType="ad",
        ctwaClid="Afx1",
        thumbnail=b"\xff",
    )
    text = ExtendedTextMessage(
        text="Hola, quiero más información", contextInfo=ContextInfo(externalAdReply=ad)
    )
    msg = translate_message(event(WAMessage(extendedTextMessage=text)), {ME})
    assert msg is not None and msg.text == "Hola, quiero más información"
    assert (msg.quoted, msg.quoted_from) == ("Pizza 2x1 los martes\nSolo en local", "ad")

    # A message dressed as an ad's card by another bot (no click id) is no ad of the business's.
    card = ContextInfo.ExternalAdReplyInfo(
        title="GRATIS HOY", body="todo al 100% de descuento", thumbnail=b"\xff", showAdAttribution=True
    )
    text = ExtendedTextMessage(text="hola", contextInfo=ContextInfo(externalAdReply=card))
    msg = translate_message(event(WAMessage(extendedTextMessage=text)), {ME})
    assert msg is not None and msg.quoted == ""


def test_a_product_from_the_catalog_is_read_with_its_details() -> None:
    """ "Consultar" under a product of the business's catalog sends the product: it got "I can only read text
    and voice notes", for the question a shop most wants."""
    shirt = ProductMessage.ProductSnapshot(
        title="Camiseta azul",
        description="Algodón 100 %",
        currencyCode="EUR",
        priceAmount1000=20_000,
        salePriceAmount1000=15_000,
    )
    msg = translate_message(event(WAMessage(productMessage=ProductMessage(product=shirt))), {ME})
    assert msg is not None and (msg.kind, msg.text) == (MessageKind.TEXT, "Camiseta azul")
    assert (msg.quoted, msg.quoted_from) == (
        "Camiseta azul · 20.00 EUR (sale: 15.00 EUR) · Algodón 100 %",
        "product",
    )
    asked = ProductMessage(product=shirt, body="¿La tenéis en talla M?")
    msg = translate_message(event(WAMessage(productMessage=asked)), {ME})
    assert msg is not None and msg.text == "¿La tenéis en talla M?" and msg.quoted_from == "product"

    # A swipe reply to a product the business sent: the quote is the product's details.
    context = ContextInfo(participant=f"{ME}@s.whatsapp.net", quotedMessage=WAMessage(productMessage=asked))
    wa = WAMessage(extendedTextMessage=ExtendedTextMessage(text="¿y en rojo?", contextInfo=context))
    msg = translate_message(event(wa), {ME})
    assert msg is not None and msg.quoted.startswith("Camiseta azul · 20.00 EUR") and msg.quoted_from == "bot"


def test_a_product_from_another_catalog_or_with_nothing_to_read() -> None:
    """Another shop's product is not priced as ours; a bare catalog share got "I received no text"."""
    other = ProductMessage(
        product=ProductMessage.ProductSnapshot(
            title="Zapatilla X", currencyCode="EUR", priceAmount1000=50_000
        ),
        businessOwnerJID="34611000000@s.whatsapp.net",
        body="¿la tenéis?",
    )
    msg = translate_message(event(WAMessage(productMessage=other)), {ME})
    assert msg is not None and (msg.quoted, msg.quoted_from) == ("Zapatilla X · 50.00 EUR", "other_product")
    ours = ProductMessage(product=other.product, businessOwnerJID=f"{ME}@s.whatsapp.net")
    msg = translate_message(event(WAMessage(productMessage=ours)), {ME})
    assert msg is not None and (msg.text, msg.quoted_from) == ("Zapatilla X", "product")

    bare = ProductMessage(catalog=ProductMessage.CatalogSnapshot(title=""))
    msg = translate_message(event(WAMessage(productMessage=bare)), {ME})
    assert msg is not None and msg.kind is MessageKind.UNSUPPORTED  # the polite reply, as before


def test_an_order_from_the_catalog_is_read_with_its_total() -> None:
    order = OrderMessage(
        orderTitle="Pedido de Ana", itemCount=3, totalAmount1000=45_500, totalCurrencyCode="EUR", message=""
    )
    msg = translate_message(event(WAMessage(orderMessage=order)), {ME})
    assert msg is not None and (msg.kind, msg.text) == (MessageKind.TEXT, "Pedido de Ana")
    assert (msg.quoted, msg.quoted_from) == ("Pedido de Ana · 3 items · 45.50 EUR", "order")


def test_a_message_that_replies_to_nothing_has_no_quote() -> None:
    mention = ContextInfo(mentionedJID=[f"{ME}@s.whatsapp.net"])
    for wa in (
        WAMessage(conversation="hola"),
        WAMessage(extendedTextMessage=ExtendedTextMessage(text="hola", contextInfo=mention)),
    ):
        msg = translate_message(event(wa), {ME})
        assert msg is not None and msg.quoted == ""


def test_audio_voice_note() -> None:
    wa = WAMessage(
        audioMessage=AudioMessage(mimetype="audio/ogg; codecs=opus", fileLength=48213, seconds=7, PTT=True)
    )
    msg = translate_message(event(wa))
    assert msg is not None
    assert msg.kind is MessageKind.AUDIO
    assert msg.text == ""
    assert msg.media is not None
    assert msg.media.mimetype == "audio/ogg; codecs=opus"
    assert msg.media.size_bytes == 48213
    assert msg.media.duration_s == 7
    assert msg.media.voice_note is True
    assert isinstance(msg.media.handle, WAMessage)
    assert msg.media.handle.audioMessage.fileLength == 48213


def test_audio_file_not_ptt() -> None:
    wa = WAMessage(audioMessage=AudioMessage(mimetype="audio/mpeg"))
    msg = translate_message(event(wa))
    assert msg is not None and msg.media is not None
    assert msg.media.voice_note is False
    assert msg.media.size_bytes is None and msg.media.duration_s is None


def test_image_with_caption() -> None:
    wa = WAMessage(imageMessage=ImageMessage(mimetype="image/jpeg", caption="¿qué es esto?", fileLength=9000))
    msg = translate_message(event(wa))
    assert msg is not None
    assert msg.kind is MessageKind.IMAGE
    assert msg.text == "¿qué es esto?"
    assert msg.media is not None and msg.media.mimetype == "image/jpeg"
    assert msg.media.size_bytes == 9000
    assert msg.media.voice_note is False


def test_view_once_wrapper_is_unwrapped() -> None:
    inner = WAMessage(imageMessage=ImageMessage(mimetype="image/jpeg", caption="once"))
    msg = translate_message(event(WAMessage(viewOnceMessage=FutureProofMessage(message=inner))))
    assert msg is not None and msg.kind is MessageKind.IMAGE and msg.text == "once"


def test_a_photo_sent_in_an_album_is_read_with_its_caption() -> None:
    """Photos sent together come one by one, each wrapped as an album's child: they were `other`, dropped
    silently, the question in the caption unanswered and not even stored."""
    inner = WAMessage(imageMessage=ImageMessage(mimetype="image/jpeg", caption="¿Lo tenéis en azul?"))
    msg = translate_message(event(WAMessage(associatedChildMessage=FutureProofMessage(message=inner))))
    assert msg is not None and msg.kind is MessageKind.IMAGE and msg.text == "¿Lo tenéis en azul?"
    marker = translate_message(event(WAMessage(albumMessage={"expectedImageCount": 2})))
    assert marker is not None and marker.kind is MessageKind.OTHER  # the album's announcement: nothing to say
    album = MessageContextInfo(messageAssociation=MessageAssociation(associationType="MEDIA_ALBUM"))
    child = WAMessage(associatedChildMessage=FutureProofMessage(message=inner), messageContextInfo=album)
    assert translate_message(event(child)).kind is MessageKind.IMAGE  # type: ignore[union-attr]


@pytest.mark.parametrize("association", ["HD_IMAGE_DUAL_UPLOAD", "HD_VIDEO_DUAL_UPLOAD", "MOTION_PHOTO"])
def test_the_hd_copy_of_a_photo_is_not_a_second_photo(association: str) -> None:
    """WhatsApp sends a photo sent in HD twice: the normal one, then the HD copy as an associated child. The
    copy was read as another photo: the model saw it twice, or the customer got a second answer to it."""
    photo = ImageMessage(mimetype="image/jpeg", caption="¿Lo tenéis en azul?")
    tag = MessageContextInfo(messageAssociation=MessageAssociation(associationType=association))
    tagged_outside = WAMessage(
        associatedChildMessage=FutureProofMessage(message=WAMessage(imageMessage=photo)),
        messageContextInfo=tag,
    )
    tagged_inside = WAMessage(
        associatedChildMessage=FutureProofMessage(
            message=WAMessage(imageMessage=photo, messageContextInfo=tag)
        )
    )
    for copy in (tagged_outside, tagged_inside):
        msg = translate_message(event(copy))
        assert msg is not None and msg.kind is MessageKind.OTHER and msg.media is None


def test_a_photo_sent_as_a_document_is_a_photo() -> None:
    """Customers send photos "as a document" to keep their quality: it was read as a document the bot could
    not read, while the bot reads photos."""
    document = DocumentMessage(
        mimetype="image/jpeg", caption="¿precio?", fileName="IMG_2041.jpg", fileLength=900
    )
    msg = translate_message(event(WAMessage(documentMessage=document)))
    assert msg is not None and (msg.kind, msg.text) == (MessageKind.IMAGE, "¿precio?")
    assert msg.media is not None and msg.media.size_bytes == 900
    pdf = translate_message(event(WAMessage(documentMessage=DocumentMessage(mimetype="application/pdf"))))
    assert pdf is not None and pdf.kind is MessageKind.DOCUMENT


def test_a_pdf_keeps_its_name_and_size_for_the_reader() -> None:
    """The model is told which PDF it reads ("factura.pdf"), and one over PDF_MAX_MB is refused before its
    download."""
    document = DocumentMessage(
        mimetype="application/pdf", fileName="factura_0042.pdf", fileLength=52_000, caption="¿está bien?"
    )
    msg = translate_message(event(WAMessage(documentWithCaptionMessage=FutureProofMessage(
        message=WAMessage(documentMessage=document)
    ))))  # fmt: skip
    assert msg is not None and (msg.kind, msg.text) == (MessageKind.DOCUMENT, "¿está bien?")
    assert msg.media is not None
    assert (msg.media.file_name, msg.media.size_bytes, msg.media.mimetype) == (
        "factura_0042.pdf",
        52_000,
        "application/pdf",
    )


def test_a_video_sent_as_a_document_is_a_video_and_a_gif_is_a_sticker() -> None:
    """A video sent "as a document" to keep its quality was a document the bot could not read; a GIF from
    the keyboard (a reaction) was a video to describe, answered even as a group's chatter."""
    document = DocumentMessage(mimetype="video/mp4", fileName="VID-2026.mp4", fileLength=9_000_000)
    as_document = translate_message(event(WAMessage(documentMessage=document)))
    assert as_document is not None and as_document.kind is MessageKind.VIDEO
    gif = translate_message(
        event(WAMessage(videoMessage=VideoMessage(mimetype="video/mp4", gifPlayback=True)))
    )
    assert gif is not None and gif.kind is MessageKind.STICKER
    captioned = VideoMessage(mimetype="video/mp4", gifPlayback=True, caption="¿lo tenéis en 42?")
    with_words = translate_message(event(WAMessage(videoMessage=captioned)))
    assert with_words is not None and (with_words.kind, with_words.text) == (
        MessageKind.VIDEO,
        "¿lo tenéis en 42?",
    )
    plain = translate_message(event(WAMessage(videoMessage=VideoMessage(mimetype="video/mp4", seconds=6))))
    assert plain is not None and plain.kind is MessageKind.VIDEO


def test_from_me() -> None:
    msg = translate_message(event(WAMessage(conversation="yo"), sender=jid(ME, device=0), from_me=True))
    assert msg is not None
    assert msg.from_me is True
    assert msg.chat == f"{PHONE}@s.whatsapp.net"
    assert msg.sender == f"{ME}@s.whatsapp.net"


def test_message_yourself_chat_is_marked() -> None:
    own = event(WAMessage(conversation="!bot status"), chat=jid(ME), sender=jid(ME, device=2), from_me=True)
    inbound = translate_message(own, {ME, ME_LID})
    assert inbound is not None and inbound.is_self_chat and inbound.from_me
    lid = jid(ME_LID, "lid")
    by_lid = event(WAMessage(conversation="x"), chat=lid, sender=lid, from_me=True)
    assert translate_message(by_lid, {ME, ME_LID}).is_self_chat  # type: ignore[union-attr]
    other = translate_message(event(WAMessage(conversation="hola")), {ME})
    assert other is not None and not other.is_self_chat
    assert not translate_message(own).is_self_chat  # type: ignore[union-attr]  # own ids unknown


def _group_event(mentioned: list[str]) -> MessageEv:
    wa = WAMessage(
        extendedTextMessage=ExtendedTextMessage(
            text="@bot hola", contextInfo=ContextInfo(mentionedJID=mentioned)
        )
    )
    return event(wa, chat=jid("120363000000000001", "g.us"), group=True)


def test_group_with_mention_of_me() -> None:
    msg = translate_message(_group_event([f"{ME}@s.whatsapp.net"]), {ME, ME_LID})
    assert msg is not None
    assert msg.is_group is True
    assert msg.chat == "120363000000000001@g.us"
    assert msg.sender == f"{PHONE}@s.whatsapp.net"
    assert msg.mentions_me is True


def test_group_mention_by_lid_and_me_as_jid() -> None:
    msg = translate_message(_group_event([f"{ME_LID}@lid"]), {f"{ME}:5@s.whatsapp.net", ME_LID})
    assert msg is not None and msg.mentions_me is True


def test_group_without_mention_of_me() -> None:
    msg = translate_message(_group_event(["34611111111@s.whatsapp.net"]), {ME, ME_LID})
    assert msg is not None
    assert msg.is_group is True
    assert msg.mentions_me is False
    # without knowing who we are, nothing is a mention of us
    plain = translate_message(_group_event([f"{ME}@s.whatsapp.net"]))
    assert plain is not None and plain.mentions_me is False


def test_status_broadcast() -> None:
    msg = translate_message(event(WAMessage(conversation="mi estado"), chat=jid("status", "broadcast")))
    assert msg is not None
    assert msg.is_status is True
    assert msg.chat == "status@broadcast"
    assert msg.sender == f"{PHONE}@s.whatsapp.net"


def test_reaction() -> None:
    wa = WAMessage(
        reactionMessage=ReactionMessage(
            key=MessageKey(remoteJID=f"{PHONE}@s.whatsapp.net", fromMe=True, ID="3EB0111"),
            text="👍",
        )
    )
    msg = translate_message(event(wa))
    assert msg is not None
    assert msg.kind is MessageKind.REACTION
    assert msg.text == "👍"


@pytest.mark.parametrize(
    "wa",
    [WAMessage(), WAMessage(conversation=""), WAMessage(protocolMessage={"type": 0})],
    ids=["empty", "empty-conversation", "protocol"],
)
def test_unknown_or_empty_message_is_other(wa: WAMessage) -> None:
    msg = translate_message(event(wa))
    assert msg is not None
    assert msg.kind is MessageKind.OTHER
    assert msg.text == ""
    assert msg.media is None


def test_lid_chat_with_phone_alt_is_keyed_by_phone() -> None:
    lid = "123456789012345"
    msg = translate_message(
        event(
            WAMessage(conversation="hola"),
            chat=jid(lid, "lid"),
            sender=jid(lid, "lid", device=2),
            sender_alt=jid(PHONE, device=2),
        )
    )
    assert msg is not None
    assert msg.chat == f"{PHONE}@s.whatsapp.net"
    assert msg.sender == f"{PHONE}@s.whatsapp.net"


def test_lid_chat_from_me_uses_recipient_alt() -> None:
    lid = "123456789012345"
    msg = translate_message(
        event(
            WAMessage(conversation="respuesta"),
            chat=jid(lid, "lid"),
            sender=jid(ME_LID, "lid"),
            from_me=True,
            sender_alt=jid(ME),
            recipient_alt=jid(PHONE),
        )
    )
    assert msg is not None
    assert msg.chat == f"{PHONE}@s.whatsapp.net"
    assert msg.sender == f"{ME}@s.whatsapp.net"


def test_lid_chat_without_alt_keeps_lid() -> None:
    lid = "123456789012345"
    msg = translate_message(
        event(WAMessage(conversation="hola"), chat=jid(lid, "lid"), sender=jid(lid, "lid"))
    )
    assert msg is not None
    assert msg.chat == f"{lid}@lid"


def test_no_id_or_no_chat_is_none() -> None:
    assert translate_message(event(WAMessage(conversation="x"), msg_id="")) is None
    assert translate_message(event(WAMessage(conversation="x"), chat=empty_jid())) is None
    assert translate_message(MessageEv()) is None


@pytest.mark.parametrize("odd", [None, object(), 42, "text", {"Info": {}}])
def test_odd_input_never_raises(odd: Any) -> None:
    assert translate_message(odd) is None


def test_mask_and_scrub() -> None:
    assert _mask("34612345678") == "+34*******78"
    assert _mask("+34 612 345 678") == "+34*******78"
    assert _mask("12") == "***"
    scrubbed = _scrub("failed for 34612345678@s.whatsapp.net on 10.255.255.53:53")
    assert "34612345678" not in scrubbed
    assert "+34*******78@s.whatsapp.net" in scrubbed
    assert "10.255.255.53:53" in scrubbed
    url = _scrub('dial "postgresql://postgres.abc:s3cr3t-pw@db.example.co:5432/postgres": refused')
    assert "s3cr3t-pw" not in url and "postgresql://postgres.abc:***@db.example.co:5432" in url
    proxy = _scrub("cannot reach https://user:p@ssw0rd@proxy:8080/v1 nor http://u:x@y/ok")
    assert proxy == "cannot reach https://user:***@proxy:8080/v1 nor http://u:***@y/ok"


# ---------------------------------------------------------------- connection events


def test_connection_events_translate_to_supervisor_events() -> None:
    now = 1_760_000_000.0
    t = translate_connection_event
    assert t(Connected(status=True)) == sv.Connected()
    assert t(Disconnected(status=True)) == sv.Disconnected()
    assert t(StreamReplaced()) == sv.StreamReplaced()
    assert t(ClientOutdated()) == sv.ClientOutdated()
    assert t(LoggedOut(OnConnect=False, Reason=4)) == sv.LoggedOut("logged out: main_device_gone")
    assert t(TemporaryBan(Code=1, Expire=3600)) == sv.TemporaryBan("send_to_too_many_people", 3600.0)
    # a code neonize does not know arrives unset: not read as the enum's first reason
    assert t(TemporaryBan(Expire=86400)) == sv.TemporaryBan("reason not given", 86400.0)
    assert t(KeepAliveTimeout(ErrorCount=2, LastSuccess=int(now) - 40), now=now) == sv.KeepAliveTimeout(
        2, 40.0
    )
    assert t(KeepAliveTimeout(ErrorCount=1, LastSuccess=0), now=now) == sv.KeepAliveTimeout(1, None)
    assert t(PairStatus(Status=PairStatus.SUCCESS)) == sv.Paired()
    assert t(PairStatus(Status=PairStatus.ERROR)) is None
    assert t(event(WAMessage(conversation="hola"))) is None
    raw = Node(Tag="failure")
    assert t(ConnectFailure(Reason=2, Message="", Raw=raw)) == sv.LoggedOut("connect failure: logged_out")
    assert t(ConnectFailure(Reason=3, Message="", Raw=raw)) == sv.TemporaryBan("temp_banned")
    assert t(ConnectFailure(Reason=6, Message="", Raw=raw)) == sv.ClientOutdated()
    failure = t(ConnectFailure(Reason=1, Message="bad 34612345678", Raw=raw))
    assert isinstance(failure, sv.ConnectFailure)
    assert "34612345678" not in failure.reason and failure.reason.startswith("generic")


# ---------------------------------------------------------------- a scripted fake of neonize's NewAClient


class FakeNewAClient:
    """What NeonizeTransport uses of `NewAClient`, scripted: each connect() takes the next outcome.

    "fail": the Go call returns an error at once; "ok": it connects and blocks until stop() (("ok", events):
    and delivers those events as what came while away); "qr": it shows
    a QR code and blocks; "qr-stuck": the same, ignoring stop() like the real QR loop.
    `drop()`/`back()` play whatsmeow's own disconnect and auto-reconnect (and the offline delivery after it).
    """

    script: ClassVar[deque[Any]] = deque()
    instances: ClassVar[list[FakeNewAClient]] = []
    # neonize's Go side keys clients by uuid: connect (Neonize()) registers this one, stop() unregisters
    # whatever holds the uuid when it returns. A LID lookup on an unregistered client is a Go nil-pointer
    # panic, and a connect while a stop is still running orphans the new client: both kill or break the
    # real process, so the fake records them here instead.
    go_crashes: ClassVar[list[str]] = []
    stop_gate: ClassVar[asyncio.Event | None] = None  # set: stop() blocks until it is (whatsmeow mid-dial)

    def __init__(self, name: str, uuid: str | None = None) -> None:
        self.name, self.uuid = name, uuid
        self.handlers: dict[type, Any] = {}
        self.qr_handler: Any = None
        self.connect_task: asyncio.Task[None] | None = None
        self.me = None
        self.online = False
        self.connects = 0
        self.sent: list[tuple[str, str]] = []
        self.messages: list[WAMessage] = []
        self.logged_out = False
        self.presences = 0
        self.rejected: list[tuple[str, str]] = []
        self._stopped = asyncio.Event()
        self._ids = itertools.count(1)
        self.registered = False
        self.stops_running = 0
        FakeNewAClient.instances.append(self)

    def event(self, event_type: type) -> Any:
        def register(fn: Any) -> None:
            self.handlers[event_type] = fn

        return register

    def qr(self, fn: Any) -> None:
        self.qr_handler = fn

    async def connect(self) -> asyncio.Task[None]:
        if self.stops_running:
            self.go_crashes.append("Neonize() while Stop() runs: the new client is orphaned")
        self.registered = True
        self.connects += 1
        self._stopped = asyncio.Event()
        self._connect_refs = object()
        self.connect_task = asyncio.get_running_loop().create_task(self._run())
        return self.connect_task

    async def _run(self) -> None:
        outcome = self.script.popleft() if self.script else "fail"
        offline: Sequence[Any] = ()
        if isinstance(outcome, tuple):  # ("ok", [events that came while away])
            outcome, offline = outcome
        if outcome == "fail":
            raise RuntimeError("dial tcp: lookup web.whatsapp.com: no such host")
        if outcome == "ok":
            await self.back(offline)
        elif outcome in ("qr", "qr-stuck"):
            await self.qr_handler(self, b"2@fake-qr,code")
        if outcome == "qr-stuck":  # whatsmeow's QR loop ignores Stop
            await asyncio.Event().wait()
        await self._stopped.wait()

    async def fire(self, ev: Any) -> None:
        await self.handlers[type(ev)](self, ev)

    async def drop(self) -> None:
        self.online = False
        await self.fire(Disconnected(status=True))

    async def back(self, offline: Sequence[Any] = ()) -> None:
        """Connected, then what came while away (`offline` events), then WhatsApp's word that this was all."""
        self.online = True
        await self.fire(Connected(status=True))
        if offline:
            await asyncio.sleep(0.05)  # the server sends them a moment after the connect
        for ev in offline:
            await self.fire(ev)
        if OfflineSyncCompleted in self.handlers:  # neonize drops an event no handler was registered for
            await self.fire(OfflineSyncCompleted(Count=len(offline)))

    async def stop(self) -> None:
        self.stops_running += 1
        try:
            if self.stop_gate is not None:
                await self.stop_gate.wait()
        finally:
            self.stops_running -= 1
        self.registered = False
        self.online = False
        self._stopped.set()

    @property
    def is_connected(self) -> Any:
        async def answer() -> bool:
            return self.online

        return answer()

    async def send_message(self, jid: JID, message: WAMessage) -> Any:
        if not self.online:
            raise RuntimeError("websocket not connected")
        self.sent.append((f"{jid.User}@{jid.Server}", message.conversation))
        self.messages.append(message)
        return SimpleNamespace(ID=f"3EB0{next(self._ids):04d}")

    # neonize uploads the file to WhatsApp's media servers and builds the message from the upload
    upload_error: ClassVar[str | None] = None  # set: every upload fails with it (WhatsApp refuses the file)

    async def build_image_message(self, file: bytes, caption: str | None = None) -> WAMessage:
        if not self.online:
            raise RuntimeError("websocket not connected")
        if self.upload_error:
            raise RuntimeError(self.upload_error)
        return WAMessage(
            imageMessage={"caption": caption or "", "fileLength": len(file), "mimetype": "image/jpeg"}
        )

    async def build_document_message(
        self,
        file: bytes,
        caption: str | None = None,
        filename: str | None = None,
        mimetype: str | None = None,
    ) -> WAMessage:
        if not self.online:
            raise RuntimeError("websocket not connected")
        if self.upload_error:
            raise RuntimeError(self.upload_error)
        document = {
            "caption": caption or "",
            "fileLength": len(file),
            "fileName": filename,
            "mimetype": mimetype or "sniffed",  # neonize reads it from the content (libmagic) when not given
        }
        return WAMessage(documentMessage=document)

    async def send_chat_presence(self, *args: Any) -> None:
        pass

    async def send_presence(self, presence: Any) -> None:
        self.presences += 1

    async def logout(self) -> None:
        self.logged_out = True
        self.online = False

    async def reject_call(self, caller: JID, call_id: str) -> None:
        self.rejected.append((f"{caller.User}@{caller.Server}", call_id))

    lid_map: ClassVar[dict[str, str]] = {}  # whatsmeow's LID -> phone table, kept in the session file
    lid_delay_s: ClassVar[float] = 0.0

    async def get_pn_from_lid(self, lid: JID) -> JID:
        if not self.registered:
            self.go_crashes.append("GetPNFromLID on an unregistered client: nil pointer dereference")
        await asyncio.sleep(self.lid_delay_s)
        if lid.User == "broken":
            raise RuntimeError("database is locked")
        phone = self.lid_map.get(lid.User, "")
        return JID(User=phone, Server="s.whatsapp.net" if phone else "", Device=0, RawAgent=0, Integrator=0)


@pytest.fixture
def fake_neonize(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeNewAClient]]:
    FakeNewAClient.script = deque()
    FakeNewAClient.instances = []
    FakeNewAClient.go_crashes = []
    FakeNewAClient.stop_gate = None
    monkeypatch.setattr(FakeNewAClient, "lid_map", {})
    monkeypatch.setattr(FakeNewAClient, "lid_delay_s", 0.0)
    monkeypatch.setattr(neonize_adapter, "NewAClient", FakeNewAClient)
    yield FakeNewAClient
    assert FakeNewAClient.go_crashes == [], "a Go call that kills or breaks the real process"


async def wait_state(transport: NeonizeTransport, state: ConnectionState, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while transport.state is not state:
            await asyncio.sleep(0.005)


FAST: dict[str, Any] = {"name": "fake", "retry_delay_s": 0.01, "max_retry_delay_s": 0.05}


# ---------------------------------------------------------------- transport handlers


def _started_handlers(transport: NeonizeTransport) -> dict[str, Any]:
    """The guarded handlers as neonize would call them, without connecting."""
    return {
        "message": transport._guard("MessageEv", transport._handle_message),
        "qr": transport._guard("QR", transport._handle_qr),
    }


async def test_inbound_order_holds_when_neonize_dispatches_from_a_thread() -> None:
    """neonize runs each event as its own task via run_coroutine_threadsafe from a Go thread."""
    got: list[Inbound] = []
    transport = NeonizeTransport("unused.db", on_inbound=got.append)
    handler = _started_handlers(transport)["message"]
    loop = asyncio.get_running_loop()
    events = [event(WAMessage(conversation=str(i)), msg_id=f"ID{i}") for i in range(200)]

    def go_thread() -> None:
        for ev in events:
            asyncio.run_coroutine_threadsafe(handler(None, ev), loop)

    thread = threading.Thread(target=go_thread)
    thread.start()
    await asyncio.to_thread(thread.join)
    for _ in range(100):
        if len(got) == len(events):
            break
        await asyncio.sleep(0.01)
    assert [m.text for m in got] == [str(i) for i in range(200)]
    assert transport.stats()["last_inbound_s_ago"] is not None


async def test_handler_exception_is_logged_not_lost() -> None:
    def boom(_: Inbound) -> None:
        raise RuntimeError("consumer bug")

    transport = NeonizeTransport("unused.db", on_inbound=boom)
    records: list[str] = []
    sink = logger.add(records.append, level="ERROR", format="{message}")
    try:
        await _started_handlers(transport)["message"](None, event(WAMessage(conversation="x")))
    finally:
        logger.remove(sink)
    assert any("MessageEv handler failed" in r for r in records)


async def test_methods_before_start_raise_transport_error() -> None:
    transport = NeonizeTransport("unused.db", on_inbound=lambda _: None)
    with pytest.raises(TransportError):
        await transport.send_text(ChatId(f"{PHONE}@s.whatsapp.net"), "hola")
    assert await transport.is_connected() is False
    assert transport.state is ConnectionState.STARTING
    await transport.set_typing(ChatId(f"{PHONE}@s.whatsapp.net"), True)  # not connected: a quiet no-op


class PairingClient:
    """What `_handle_qr` uses of a neonize client in pairing-code mode."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.asked = 0

    async def PairPhone(self, phone: str, show_push_notification: bool) -> str:
        self.asked += 1
        if self.refuse:
            raise RuntimeError("failed to request pairing code: server returned error 429: rate-overlimit")
        return "ABCD-EFGH"


@pytest.mark.parametrize("refuse", [False, True])
async def test_a_refused_pairing_code_shows_the_qr_instead(
    refuse: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """WhatsApp refusing a pairing code (rate limit) left the operator with an error line and no way to link
    for that whole pairing: the QR was neither logged nor drawn."""
    codes: list[str] = []
    transport = NeonizeTransport(
        "unused.db", on_inbound=lambda _: None, pair_phone="34600111222", on_pair_code=codes.append
    )
    client = PairingClient(refuse)
    transport._driver.client = client  # type: ignore[assignment]
    records: list[str] = []
    sink = logger.add(records.append, level="WARNING", format="{message}")
    try:
        for qr in ("2@first,qr", "2@second,qr"):
            await _started_handlers(transport)["qr"](None, qr.encode())
    finally:
        logger.remove(sink)
    drawn = capsys.readouterr().out
    assert client.asked == 1  # once a pairing, refused or not
    if refuse:
        assert codes == [] and any("showing the QR instead" in r for r in records)
        assert any("scan the QR code" in r for r in records) and any(block in drawn for block in "█▀▄")
        assert "34600111222" not in "".join(records)
    else:
        assert codes == ["ABCD-EFGH"] and not any("scan the QR code" in r for r in records)
        assert drawn == ""


# ---------------------------------------------------------------- the transport over the scripted fake client


async def test_qr_sets_pairing_and_calls_on_qr(fake_neonize: type[FakeNewAClient], tmp_path: Path) -> None:
    fake_neonize.script.extend(["qr"])
    codes: list[str] = []
    transport = NeonizeTransport(str(tmp_path / "s.db"), on_inbound=lambda _: None, on_qr=codes.append)
    await transport.start()
    try:
        await wait_state(transport, ConnectionState.PAIRING)
        assert codes == ["2@fake-qr,code"]
    finally:
        await transport.stop()
    assert transport.state is ConnectionState.STOPPED


async def test_drop_is_healed_by_whatsmeow_without_a_second_loop(
    fake_neonize: type[FakeNewAClient], tmp_path: Path
) -> None:
    fake_neonize.script.extend(["fail", "ok"])
    states: list[ConnectionState] = []
    transport = NeonizeTransport(
        str(tmp_path / "s.db"), on_inbound=lambda _: None, on_state=states.append, **FAST
    )
    await transport.start()
    try:
        async with asyncio.timeout(5):
            assert await transport.wait_connected() is True
        client = fake_neonize.instances[0]
        assert client.connects == 2
        await client.drop()
        assert transport.state is ConnectionState.RECONNECTING
        assert transport.stats()["retry_owner"] == "whatsmeow"
        await asyncio.sleep(0.2)
        assert client.connects == 2  # whatsmeow reconnects; we do not start our own loop
        await client.back()
        stats = transport.stats()
        assert stats["state"] == "connected" and stats["reconnects"] == 1 and stats["uptime_s"] >= 0
        assert states[:4] == [
            ConnectionState.CONNECTING,
            ConnectionState.RECONNECTING,
            ConnectionState.CONNECTING,
            ConnectionState.CONNECTED,
        ]
    finally:
        t = time.monotonic()
        await transport.stop()
        assert time.monotonic() - t < 2


async def test_replaced_stops_for_good(fake_neonize: type[FakeNewAClient], tmp_path: Path) -> None:
    fake_neonize.script.extend(["ok", "ok"])
    transport = NeonizeTransport(str(tmp_path / "s.db"), on_inbound=lambda _: None, **FAST)
    await transport.start()
    try:
        await wait_state(transport, ConnectionState.CONNECTED)
        client = fake_neonize.instances[0]
        await client.fire(StreamReplaced())
        assert transport.state is ConnectionState.REPLACED
        await asyncio.sleep(0.2)
        assert client.connects == 1
        assert client.connect_task is not None and client.connect_task.done()  # released
        async with asyncio.timeout(1):
            assert await transport.wait_connected() is False
    finally:
        await transport.stop()
    assert transport.state is ConnectionState.REPLACED


async def test_a_lid_message_handled_after_the_connection_ended_does_not_call_go(
    fake_neonize: type[FakeNewAClient], tmp_path: Path
) -> None:
    """neonize runs each event as its own task: a message of an offline backlog can be handled after the
    connection ended (replaced, logged out, a takeover) and Stop() ran. Its LID lookup then hit Go's
    unchecked client map: a nil-pointer panic, the process gone (exit 134) with nothing flushed."""
    fake_neonize.script.extend(["ok"])
    fake_neonize.lid_map = {"123456789012345": PHONE}
    got: list[Inbound] = []
    transport = NeonizeTransport(str(tmp_path / "s.db"), on_inbound=got.append, **FAST)
    await transport.start()
    try:
        await wait_state(transport, ConnectionState.CONNECTED)
        client = fake_neonize.instances[0]
        await client.fire(StreamReplaced())
        async with asyncio.timeout(2):
            while client.registered:  # the supervisor released the connection: Go's Stop() ran
                await asyncio.sleep(0.01)
        lid = jid("123456789012345", "lid")
        await client.fire(event(WAMessage(conversation="hola"), chat=lid, sender=lid, msg_id="LATE"))
    finally:
        await transport.stop()
    assert [m.id for m in got] == ["LATE"], "the message is delivered all the same"
    assert got[0].chat == "123456789012345@lid"  # keyed by its LID: no one to ask


async def test_a_slow_stop_is_waited_for_before_the_next_connection(
    fake_neonize: type[FakeNewAClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """whatsmeow's Disconnect waits for a dial in progress (up to a minute). The next connect went ahead
    meanwhile, and the late Stop() then unregistered the new client: connected to WhatsApp, acking customers'
    messages, and out of the bot's reach."""
    monkeypatch.setattr(neonize_adapter.NeonizeDriver, "STOP_WAIT_S", 0.05, raising=False)
    fake_neonize.script.extend(["fail", "ok"])
    fake_neonize.stop_gate = asyncio.Event()
    transport = NeonizeTransport(str(tmp_path / "s.db"), on_inbound=lambda _: None, **FAST)
    transport._driver._release_wait_s = 0.05  # the release gives up waiting at once
    await transport.start()
    try:
        client = fake_neonize.instances[0]
        async with asyncio.timeout(2):
            while not client.stops_running:  # the failed attempt is being released; Stop() hangs
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # several retries come due meanwhile
        assert client.connects == 1, "a new connection while the last Stop() still ran"
        assert transport.state is not ConnectionState.CONNECTED
        fake_neonize.stop_gate.set()
        await wait_state(transport, ConnectionState.CONNECTED)
        assert client.connects == 2 and client.registered
    finally:
        fake_neonize.stop_gate.set()
        await transport.stop()


async def test_the_late_end_of_a_slow_stopped_connection_does_not_end_the_next_one(
    fake_neonize: type[FakeNewAClient], tmp_path: Path
) -> None:
    """A slow Stop() outlasts the supervisor's release, which is cut before it collects the old connect
    task. When Stop() returned, the old Neonize() call ended too, and its end was taken for the new
    connection's: torn down right after it was made. Times scaled: the waits 0.3 s, the release 0.5 s."""
    fake_neonize.script.extend(["ok"] * 5)
    transport = NeonizeTransport(str(tmp_path / "s.db"), on_inbound=lambda _: None, **FAST)
    transport._driver._release_wait_s = 0.3
    transport._supervisor._release_timeout_s = 0.5
    await transport.start()
    try:
        await wait_state(transport, ConnectionState.CONNECTED)
        client = fake_neonize.instances[0]
        fake_neonize.stop_gate = asyncio.Event()
        transport._supervisor._finish(sv._End(sv._Why.RETRY, "socket dead"))  # as the watchdog ends it
        await asyncio.sleep(1.0)  # the release was cut; the next connect waits for the Stop()
        assert client.connects == 1
        fake_neonize.stop_gate.set()  # the dial ends, Stop() returns, so does the old Neonize() call
        await wait_state(transport, ConnectionState.CONNECTED)
        await asyncio.sleep(0.5)
        assert client.connects == 2, "the new connection was torn down and made again"
        assert transport.state is ConnectionState.CONNECTED
    finally:
        fake_neonize.stop_gate.set()
        await transport.stop()


async def test_the_qr_reaches_production_logs_without_a_terminal(
    fake_neonize: type[FakeNewAClient], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a platform stdout is no terminal and logs are at WARNING: the QR used to be neither drawn nor
    announced there, so a deploy without ADMIN_TOKEN (no /qr) could not be linked at all."""
    fake_neonize.script.extend(["qr"])
    warnings_seen: list[str] = []
    sink = logger.add(lambda m: warnings_seen.append(m.record["message"]), level="WARNING")
    transport = NeonizeTransport(str(tmp_path / "s.db"), on_inbound=lambda _: None)
    await transport.start()
    try:
        await wait_state(transport, ConnectionState.PAIRING)
    finally:
        await transport.stop()
        logger.remove(sink)
    assert any("scan the QR code" in w for w in warnings_seen)
    assert "▄" in capsys.readouterr().out  # the drawing itself, in the log stream


async def test_logged_out_deletes_the_local_session_and_shows_a_new_qr(
    fake_neonize: type[FakeNewAClient], tmp_path: Path
) -> None:
    session = tmp_path / "s.db"
    session.write_bytes(b"old session")
    fake_neonize.script.extend(["ok", "qr"])
    codes: list[str] = []
    transport = NeonizeTransport(str(session), on_inbound=lambda _: None, on_qr=codes.append, **FAST)
    await transport.start()
    try:
        await wait_state(transport, ConnectionState.CONNECTED)
        await fake_neonize.instances[0].fire(LoggedOut(OnConnect=False, Reason=2))
        await wait_state(transport, ConnectionState.PAIRING)
        assert not session.exists()
        assert codes == ["2@fake-qr,code"]
        assert "logged_out" in transport.stats()["last_error"]
    finally:
        await transport.stop()


async def test_logout_unlinks_and_deletes_the_session(
    fake_neonize: type[FakeNewAClient], tmp_path: Path
) -> None:
    session = tmp_path / "s.db"
    session.write_bytes(b"session")
    fake_neonize.script.extend(["ok"])
    transport = NeonizeTransport(str(session), on_inbound=lambda _: None, **FAST)
    await transport.logout(timeout_s=5)  # never started: it connects first
    assert fake_neonize.instances[0].logged_out
    assert not session.exists()
    assert transport.state is ConnectionState.LOGGED_OUT


async def test_logout_without_a_linked_session_says_so(
    fake_neonize: type[FakeNewAClient], tmp_path: Path
) -> None:
    fake_neonize.script.extend(["qr"])
    codes: list[str] = []
    transport = NeonizeTransport(str(tmp_path / "s.db"), on_inbound=lambda _: None, on_qr=codes.append)
    with pytest.raises(TransportError, match="no linked session"):
        await transport.logout(timeout_s=5)
    assert codes == []  # logout never shows a QR code


async def test_presence_ping_sends_presence_when_enabled(
    fake_neonize: type[FakeNewAClient], tmp_path: Path
) -> None:
    fake_neonize.script.extend(["ok"])
    transport = NeonizeTransport(
        str(tmp_path / "s.db"), on_inbound=lambda _: None, heartbeat_s=0.05, presence_ping=True
    )
    await transport.start()
    try:
        await wait_state(transport, ConnectionState.CONNECTED)
        async with asyncio.timeout(5):  # a 0.05 s heartbeat: polled, not slept, for slow machines
            while fake_neonize.instances[0].presences < 2:
                await asyncio.sleep(0.01)
    finally:
        await transport.stop()


async def test_stop_while_a_qr_shows_is_prompt_and_asks_for_a_hard_exit(
    fake_neonize: type[FakeNewAClient], tmp_path: Path
) -> None:
    fake_neonize.script.extend(["qr-stuck"])
    transport = NeonizeTransport(str(tmp_path / "s.db"), on_inbound=lambda _: None)
    transport._driver._release_wait_s = 0.2
    await transport.start()
    await wait_state(transport, ConnectionState.PAIRING)
    assert transport.hard_exit_needed is False
    started = time.monotonic()
    await transport.stop()
    assert time.monotonic() - started < 2
    assert transport.hard_exit_needed is True


async def test_an_incoming_call_is_declined_and_the_caller_told(
    fake_neonize: type[FakeNewAClient], tmp_path: Path
) -> None:
    fake_neonize.script.extend(["ok"])
    told: list[ChatId] = []

    async def on_call(chat: ChatId) -> None:
        told.append(chat)

    transport = NeonizeTransport(str(tmp_path / "s.db"), on_inbound=lambda _: None, on_call=on_call, **FAST)
    await transport.start()
    try:
        async with asyncio.timeout(5):
            assert await transport.wait_connected() is True
        client = fake_neonize.instances[0]
        lid = JID(User="123456789012345", Server="lid", RawAgent=0, Device=0, Integrator=0, IsEmpty=False)
        phone = JID(User=PHONE, Server="s.whatsapp.net", RawAgent=0, Device=0, Integrator=0, IsEmpty=False)
        meta = BasicCallMeta(callCreator=lid, callCreatorAlt=phone, callID="CALL-1", timestamp=1)
        await client.fire(CallOffer(basicCallMeta=meta))
        # An offer with the LID only, from someone whose message carried both: still their phone number
        # (BLOCKED_NUMBERS holds phone numbers).
        other = jid("987654321098765", "lid")
        await client.fire(
            event(WAMessage(conversation="hola"), chat=other, sender=other, sender_alt=jid(PHONE2))
        )
        meta = BasicCallMeta(callCreator=other, callCreatorAlt=empty_jid(), callID="CALL-2", timestamp=2)
        await client.fire(CallOffer(basicCallMeta=meta))
    finally:
        await transport.stop()
    assert client.rejected == [("123456789012345@lid", "CALL-1"), ("987654321098765@lid", "CALL-2")]
    assert told == [f"{PHONE}@s.whatsapp.net", f"{PHONE2}@s.whatsapp.net"]  # keyed like their messages


async def test_a_send_waits_for_whatsmeows_ack_and_a_hanging_one_fails_instead_of_stalling(
    fake_neonize: type[FakeNewAClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """whatsmeow waits 75 s for a send's ack; the adapter gave up at 30 s and queued the reply again while
    whatsmeow still delivered the first: two copies. A send that never ends still fails, not stalls its chat.
    Times scaled down: other calls 0.1 s, a send 1 s, the slow ack 0.3 s."""
    fake_neonize.script.extend(["ok"])
    monkeypatch.setattr(neonize_adapter, "CALL_TIMEOUT_S", 0.1)
    monkeypatch.setattr(neonize_adapter, "SEND_TIMEOUT_S", 1.0, raising=False)
    transport = NeonizeTransport(str(tmp_path / "s.db"), on_inbound=lambda _: None, **FAST)
    await transport.start()
    chat = ChatId(f"{PHONE}@s.whatsapp.net")
    try:
        async with asyncio.timeout(5):
            assert await transport.wait_connected() is True
        client = fake_neonize.instances[0]
        sends = client.send_message

        async def slow_ack(*args: Any) -> Any:
            await asyncio.sleep(0.3)
            return await sends(*args)

        async def hang(*args: Any) -> Any:
            await asyncio.Event().wait()

        client.send_message = slow_ack  # type: ignore[method-assign]
        async with asyncio.timeout(5):
            await transport.send_text(chat, "hola")
        assert client.sent == [(chat, "hola")]
        client.send_message = hang  # type: ignore[method-assign]
        with pytest.raises(TransportError, match="send failed"):
            async with asyncio.timeout(5):
                await transport.send_text(chat, "adiós")
    finally:
        await transport.stop()


def test_text_that_is_not_valid_utf8_is_read_with_a_replacement_character() -> None:
    """protobuf hands back bytes for such a text (an emoji cut in half); it used to reach the pipeline as
    bytes and fail the message with a TypeError."""
    text = b"hola \xf0\x9f"
    wa = b"\x0a" + bytes([len(text)]) + text  # Message.conversation (field 1)
    raw = event(WAMessage()).SerializeToString() + b"\x12" + bytes([len(wa)]) + wa  # MessageEv.Message
    msg = translate_message(MessageEv.FromString(raw))
    assert msg is not None and msg.kind is MessageKind.TEXT
    assert msg.text == "hola \ufffd"


@pytest.mark.parametrize(
    ("wa", "text"),
    [
        (WAMessage(buttonsResponseMessage={"selectedDisplayText": "Ver horarios"}), "Ver horarios"),
        (WAMessage(templateButtonReplyMessage={"selectedDisplayText": "Sí, confirmo"}), "Sí, confirmo"),
        (WAMessage(listResponseMessage={"title": "Talla M"}), "Talla M"),
    ],
    ids=["button", "template-button", "list-row"],
)
def test_a_tapped_button_or_list_row_reads_as_its_text(wa: WAMessage, text: str) -> None:
    msg = translate_message(event(wa))
    assert msg is not None and msg.kind is MessageKind.TEXT and msg.text == text


VCARD = (
    "BEGIN:VCARD\r\nVERSION:3.0\r\nN:López;Ana;;;\r\nFN:Ana López\r\n"
    "item1.TEL;waid=34600111222:+34 600 11 12 22\r\nitem1.X-ABLabel:Móvil\r\n"
    "TEL;TYPE=work:+34 910 0\r\n 0 00 00\r\nEND:VCARD"  # a folded line (RFC 6350)
)


@pytest.mark.parametrize(
    ("wa", "text"),
    [
        (
            WAMessage(
                locationMessage={
                    "degreesLatitude": 40.416775,
                    "degreesLongitude": -3.70379,
                    "name": "Bar Pepe",
                    "address": "Calle Mayor 1, Madrid",
                    "comment": "aquí, en el portal",
                }
            ),
            "📍 Bar Pepe, Calle Mayor 1, Madrid (40.41678, -3.70379)\naquí, en el portal",
        ),
        (
            WAMessage(locationMessage={"degreesLatitude": 40.416775, "degreesLongitude": -3.70379}),
            "📍 (40.41678, -3.70379)",
        ),
        (
            WAMessage(
                liveLocationMessage={"degreesLatitude": 40.4, "degreesLongitude": -3.7, "caption": "voy"}
            ),
            "📍 live (40.40000, -3.70000)\nvoy",
        ),
        (
            WAMessage(contactMessage={"displayName": "Ana López", "vcard": VCARD}),
            "👤 Ana López: +34 600 11 12 22, +34 910 00 00 00",
        ),
        (
            WAMessage(
                contactsArrayMessage={
                    "displayName": "2 contactos",
                    "contacts": [
                        {"displayName": "Ana López", "vcard": VCARD},
                        {"displayName": "Luis", "vcard": "BEGIN:VCARD\nEND:VCARD"},
                    ],
                }
            ),
            "👤 Ana López: +34 600 11 12 22, +34 910 00 00 00\n👤 Luis",
        ),
    ],
    ids=["location", "pin-only", "live-location", "contact", "contacts"],
)
def test_locations_and_contacts_read_as_text(wa: WAMessage, text: str) -> None:
    """The model asks "¿a qué dirección lo enviamos?" and the customer sends a pin: it got "I can only read
    text and voice notes"."""
    msg = translate_message(event(wa))
    assert msg is not None and (msg.kind, msg.text) == (MessageKind.TEXT, text)


@pytest.mark.parametrize(
    ("vcard", "name", "text"),
    [
        ("BEGIN:VCARD\nTEL;VALUE=uri:tel:+34600111222\nEND:VCARD", "Ana", "👤 Ana: +34600111222"),
        ("BEGIN:VCARD\nTEL: \nTEL;CELL:+34 600\nEND:VCARD", "Ana", "👤 Ana: +34 600"),
        ("BEGIN:VCARD\nFN:Ana López\nTEL:+34600111222\nEND:VCARD", "", "👤 Ana López: +34600111222"),
        ("BEGIN:VCARD\rFN:Ana\rTEL:+34600111222\rEND:VCARD", "", "👤 Ana: +34600111222"),
    ],
    ids=["uri", "empty-number", "no-display-name", "old-mac-line-ends"],
)
def test_odd_contact_cards_read_well(vcard: str, name: str, text: str) -> None:
    msg = translate_message(event(WAMessage(contactMessage={"displayName": name, "vcard": vcard})))
    assert msg is not None and msg.text == text


def test_a_card_with_thousands_of_numbers_is_bounded() -> None:
    vcard = "BEGIN:VCARD\n" + "".join(f"TEL:+346{n:08d}\n" for n in range(20000)) + "END:VCARD"
    msg = translate_message(event(WAMessage(contactMessage={"displayName": "X", "vcard": vcard})))
    assert msg is not None and msg.text.count("+346") == 10


def test_a_location_without_valid_coordinates_shows_none() -> None:
    for lat, lon in ((float("nan"), float("nan")), (float("inf"), 3.0), (400.0, 3.0)):
        wa = WAMessage(locationMessage={"degreesLatitude": lat, "degreesLongitude": lon, "name": "Casa"})
        msg = translate_message(event(wa))
        assert msg is not None and msg.text == "📍 Casa"


def test_a_pin_sent_as_a_swipe_reply_keeps_its_quote() -> None:
    """The bot asks "¿A qué dirección lo enviamos?" and the customer answers it with a pin, swiping."""
    asked = WAMessage(conversation="¿A qué dirección lo enviamos?")
    context = ContextInfo(participant=f"{ME}@s.whatsapp.net", quotedMessage=asked)
    wa = WAMessage(
        locationMessage={"degreesLatitude": 40.4, "degreesLongitude": -3.7, "contextInfo": context}
    )
    msg = translate_message(event(wa), {ME})
    assert msg is not None and (msg.quoted, msg.quoted_from) == ("¿A qué dirección lo enviamos?", "bot")


def test_a_swipe_reply_to_the_business_location_quotes_it() -> None:
    pin = WAMessage(locationMessage={"degreesLatitude": 40.4, "degreesLongitude": -3.7, "name": "Tienda"})
    context = ContextInfo(participant=f"{ME}@s.whatsapp.net", quotedMessage=pin)
    wa = WAMessage(extendedTextMessage=ExtendedTextMessage(text="¿abre hoy?", contextInfo=context))
    msg = translate_message(event(wa), {ME})
    assert msg is not None and (msg.quoted, msg.quoted_from) == ("📍 Tienda (40.40000, -3.70000)", "bot")


@pytest.mark.parametrize(
    "wa",
    [
        WAMessage(pollCreationMessageV3={"name": "¿Qué color?"}),
        WAMessage(pollCreationMessageV5={"name": "¿Qué color?"}),
        WAMessage(pollCreationMessageV6={"name": "¿Qué color?"}),
        WAMessage(requestPaymentMessage={"currencyCodeIso4217": "EUR"}),
    ],
    ids=["poll", "poll-v5", "poll-v6", "payment-request"],
)
def test_polls_and_payment_requests_are_unsupported_content_not_protocol_noise(wa: WAMessage) -> None:
    msg = translate_message(event(wa))
    assert msg is not None and msg.kind is MessageKind.UNSUPPORTED


def test_a_lid_seen_once_with_its_phone_keeps_one_person_one_chat() -> None:
    """The owner's reply from the phone often carries only the LID: it was keyed as another chat, so the
    takeover paused a chat nobody writes in, and the customer's history and rate limit were split."""
    from connection.neonize_adapter import LidToPhone

    lids, me, lid = LidToPhone(), {ME, ME_LID}, "123456789012345"
    customer = event(
        WAMessage(conversation="hola"),
        chat=jid(lid, "lid"),
        sender=jid(lid, "lid"),
        sender_alt=jid(PHONE),
        msg_id="A",
    )
    owner = event(
        WAMessage(conversation="te atiendo yo"),
        chat=jid(lid, "lid"),
        sender=jid(ME_LID, "lid"),
        from_me=True,
        msg_id="B",
    )
    later = event(WAMessage(conversation="gracias"), chat=jid(lid, "lid"), sender=jid(lid, "lid"), msg_id="C")
    chats = [translate_message(ev, me, lids) for ev in (customer, owner, later)]
    assert [m.chat for m in chats if m is not None] == [f"{PHONE}@s.whatsapp.net"] * 3
    assert chats[2] is not None and chats[2].sender == f"{PHONE}@s.whatsapp.net"


async def test_after_a_restart_a_lid_only_reply_is_keyed_by_the_phone_whatsmeow_knows(
    fake_neonize: type[FakeNewAClient], tmp_path: Path
) -> None:
    """The map of LIDs seen with their phone is in memory: after a restart the owner's LID-only reply from
    the phone was keyed as another chat, so the customer's chat was not paused and the bot talked over
    the owner. whatsmeow keeps the mapping in the session file; it is asked, in order."""
    lid = "123456789012345"
    fake_neonize.script.extend(["ok"])
    fake_neonize.lid_map = {lid: PHONE}
    fake_neonize.lid_delay_s = 0.05  # slower than the messages after it
    got: list[Inbound] = []
    transport = NeonizeTransport(str(tmp_path / "s.db"), on_inbound=got.append, **FAST)
    await transport.start()
    try:
        async with asyncio.timeout(5):
            assert await transport.wait_connected() is True
        client = fake_neonize.instances[0]
        owner = event(
            WAMessage(conversation="te atiendo yo"),
            chat=jid(lid, "lid"),
            sender=jid(ME_LID, "lid"),
            from_me=True,
            msg_id="OWNER",
        )
        customer = event(
            WAMessage(conversation="gracias"), chat=jid(lid, "lid"), sender=jid(lid, "lid"), msg_id="C"
        )
        other = event(WAMessage(conversation="hola"), chat=jid("34611111111"), msg_id="OTHER")
        unknown = event(
            WAMessage(conversation="?"), chat=jid("999", "lid"), sender=jid("999", "lid"), msg_id="U"
        )
        broken = event(
            WAMessage(conversation="!"), chat=jid("broken", "lid"), sender=jid("broken", "lid"), msg_id="B"
        )
        async with asyncio.timeout(5):
            await asyncio.gather(*(client.fire(ev) for ev in (owner, other, customer, unknown, broken)))
    finally:
        await transport.stop()
    assert [m.id for m in got] == ["OWNER", "OTHER", "C", "U", "B"], "order broken or a message lost"
    by_id = {m.id: m for m in got}
    assert by_id["OWNER"].chat == by_id["C"].chat == f"{PHONE}@s.whatsapp.net"
    assert by_id["C"].sender == f"{PHONE}@s.whatsapp.net"
    assert by_id["OTHER"].chat == "34611111111@s.whatsapp.net"
    assert by_id["U"].chat == "999@lid" and by_id["B"].chat == "broken@lid"  # unknown: kept by LID


async def test_a_slow_lid_lookup_holds_messages_once_not_at_every_message(
    fake_neonize: type[FakeNewAClient], tmp_path: Path
) -> None:
    """Each LID-only message waited up to 2 s for a lookup that then failed, and every later message, of
    every chat, waited behind it: 2 s, 4 s, 6 s, 8 s..."""
    fake_neonize.script.extend(["ok"])
    fake_neonize.lid_delay_s = 30.0  # whatsmeow's database hangs
    arrived: dict[str, float] = {}
    transport = NeonizeTransport(
        str(tmp_path / "s.db"), on_inbound=lambda m: arrived.setdefault(m.id, time.monotonic()), **FAST
    )
    await transport.start()
    try:
        async with asyncio.timeout(5):
            assert await transport.wait_connected() is True
        client = fake_neonize.instances[0]
        lid = jid("555555555555555", "lid")
        events = [
            event(WAMessage(conversation=f"{i}"), chat=lid, sender=lid, msg_id=f"L{i}") for i in range(4)
        ]
        events.append(event(WAMessage(conversation="hola"), chat=jid("34611111111"), msg_id="OTHER"))
        started = time.monotonic()
        async with asyncio.timeout(10):
            await asyncio.gather(*(client.fire(ev) for ev in events))
    finally:
        await transport.stop()
    assert list(arrived) == ["L0", "L1", "L2", "L3", "OTHER"]  # in order, none lost
    assert max(arrived.values()) - started < 1.5, {k: round(v - started, 2) for k, v in arrived.items()}


def test_a_round_video_note_is_read_as_a_voice_note() -> None:
    """Customers talk in round video notes (ptv) as in voice notes: read as one, so it is transcribed."""
    ptv = VideoMessage(mimetype="video/mp4", seconds=12, fileLength=900_000)
    msg = translate_message(event(WAMessage(ptvMessage=ptv)))
    assert msg is not None and msg.kind is MessageKind.AUDIO
    assert msg.media is not None and (msg.media.mimetype, msg.media.duration_s, msg.media.voice_note) == (
        "video/mp4",
        12,
        True,
    )
    video = translate_message(event(WAMessage(videoMessage=VideoMessage(mimetype="video/mp4"))))
    assert video is not None and video.kind is MessageKind.VIDEO  # a video is still a video


async def test_a_video_note_is_downloaded_as_the_video_it_is() -> None:
    """whatsmeow's DownloadAny takes image, video, audio, document and sticker messages only: every video
    note failed to download, and the customer was asked to send it again, to fail again."""

    class WhatsmeowLikeClient:
        async def download_any(self, message: WAMessage) -> bytes:
            for field in (
                "imageMessage",
                "videoMessage",
                "audioMessage",
                "documentMessage",
                "stickerMessage",
            ):
                if message.HasField(field):
                    return b"media bytes"
            raise RuntimeError("failed to find any downloadable media in message")

    ptv = VideoMessage(mimetype="video/mp4", seconds=12, fileLength=900_000, mediaKey=b"k" * 32)
    msg = translate_message(event(WAMessage(ptvMessage=ptv)))
    assert msg is not None and msg.kind is MessageKind.AUDIO
    transport = NeonizeTransport("unused.db", on_inbound=lambda _: None)
    transport._driver.client = WhatsmeowLikeClient()  # type: ignore[assignment]
    assert await transport.download_media(msg) == b"media bytes"
