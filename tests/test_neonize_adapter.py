"""translate_message and the transport's event handling, fed with neonize's own protobuf types."""

from __future__ import annotations

import asyncio
import threading
import warnings
from typing import Any

import pytest
from loguru import logger

from connection.types import ChatId, ConnectionState, Inbound, MessageKind, TransportError

with warnings.catch_warnings():
    # neonize leaves `os.popen("uname -a")` unclosed at import (neonize/utils/platform.py:39).
    warnings.simplefilter("ignore", ResourceWarning)
    from neonize.proto.Neonize_pb2 import JID, LoggedOut, MessageInfo, MessageSource, StreamReplaced
    from neonize.proto.Neonize_pb2 import Message as MessageEv
    from neonize.proto.waCommon.WACommon_pb2 import MessageKey
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import (
        AudioMessage,
        ContextInfo,
        ExtendedTextMessage,
        FutureProofMessage,
        ImageMessage,
        ReactionMessage,
    )
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as WAMessage

    from connection.neonize_adapter import NeonizeTransport, _mask, _scrub, translate_message

PHONE = "34600111222"
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


def test_from_me() -> None:
    msg = translate_message(event(WAMessage(conversation="yo"), sender=jid(ME, device=0), from_me=True))
    assert msg is not None
    assert msg.from_me is True
    assert msg.chat == f"{PHONE}@s.whatsapp.net"
    assert msg.sender == f"{ME}@s.whatsapp.net"


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


# ---------------------------------------------------------------- transport handlers (no network)


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


async def test_qr_sets_pairing_and_calls_on_qr() -> None:
    codes: list[str] = []
    transport = NeonizeTransport("unused.db", on_inbound=lambda _: None, on_qr=codes.append)
    await _started_handlers(transport)["qr"](None, b"2@abc,def,ghi")
    assert codes == ["2@abc,def,ghi"]
    assert transport.state is ConnectionState.PAIRING


async def test_terminal_events_stop_for_good() -> None:
    transport = NeonizeTransport("unused.db", on_inbound=lambda _: None)
    transport._handle_connected(None)
    assert transport.stats()["connected"] is True
    assert transport.stats()["connected_since"] is not None
    transport._handle_replaced(StreamReplaced())
    assert transport.state is ConnectionState.REPLACED
    transport._handle_logged_out(LoggedOut(OnConnect=True, Reason=2))
    transport._handle_connected(None)  # nothing revives a terminal state
    assert transport.state is ConnectionState.REPLACED
    assert transport.stats()["connected"] is False


async def test_reconnects_counted() -> None:
    transport = NeonizeTransport("unused.db", on_inbound=lambda _: None)
    transport._handle_connected(None)
    transport._handle_disconnected(None)
    assert transport.state is ConnectionState.RECONNECTING
    transport._handle_connected(None)
    assert transport.stats()["reconnects"] == 1


async def test_methods_before_start_raise_transport_error() -> None:
    transport = NeonizeTransport("unused.db", on_inbound=lambda _: None)
    with pytest.raises(TransportError):
        await transport.send_text(ChatId(f"{PHONE}@s.whatsapp.net"), "hola")
    assert await transport.is_connected() is False
    assert transport.state is ConnectionState.STARTING
