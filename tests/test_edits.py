"""A customer edits a message, or deletes it for everyone, before the bot answers it: the answer is to the
edited text, or there is none, and the stored row follows. Through the real pipeline, SQLite store and SDK
(against the fake OpenAI server); the edit and revoke events through neonize's own protobuf shapes."""

from __future__ import annotations

import warnings

from connection.types import MessageId, MessageKind
from memory.store import Direction, MessageStatus
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI

with warnings.catch_warnings():
    warnings.simplefilter("ignore", ResourceWarning)
    from neonize.proto.waCommon.WACommon_pb2 import MessageKey
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as WAMessage
    from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import ProtocolMessage

    from connection.neonize_adapter import translate_message
    from tests.test_neonize_adapter import event

CHAT = "34600111222@s.whatsapp.net"


def ai(fake: FakeOpenAI) -> dict[str, object]:
    return {"openai_api_key": "k", "openai_base_url": fake.base_url}


def edit(target: str, text: str, id: str = "EDIT1") -> object:
    return inbound(text, kind=MessageKind.EDIT, target=MessageId(target), id=id)


def revoke(target: str, id: str = "REVOKE1") -> object:
    return inbound("", kind=MessageKind.REVOKE, target=MessageId(target), id=id)


def test_whatsapp_edits_and_deletions_are_read_with_the_message_they_change() -> None:
    edited = WAMessage(
        protocolMessage=ProtocolMessage(
            type=ProtocolMessage.MESSAGE_EDIT,
            key=MessageKey(ID="ORIGINAL"),
            editedMessage=WAMessage(conversation="quiero 2 menús"),
        )
    )
    deleted = WAMessage(
        protocolMessage=ProtocolMessage(type=ProtocolMessage.REVOKE, key=MessageKey(ID="CARD"))
    )
    first, second = translate_message(event(edited)), translate_message(event(deleted))
    assert first is not None and (first.kind, first.text, first.target) == (
        MessageKind.EDIT,
        "quiero 2 menús",
        "ORIGINAL",
    )
    assert second is not None and (second.kind, second.target) == (MessageKind.REVOKE, "CARD")


async def test_a_message_edited_before_its_answer_is_answered_as_edited(
    harness, fake_openai: FakeOpenAI
) -> None:
    """ "quiero 3 menús para llevar", corrected to 2 a second later: the model got "3"."""
    async with harness(**ai(fake_openai)) as h:
        h.bot.pipeline.gather_s = 0.3  # as WA_GATHER_S sets it on WhatsApp: the answer waits a moment
        sent = await h.say(
            inbound("quiero 3 menús para llevar", id="M1"), edit("M1", "quiero 2 menús para llevar")
        )
        rows = await h.bot.store.recent_messages(CHAT, 10)
    assert sent == ["echo: quiero 2 menús para llevar"]
    [asked] = [r for r in rows if r.direction is Direction.IN]
    assert (asked.body, asked.status) == ("quiero 2 menús para llevar", MessageStatus.ANSWERED)


async def test_a_message_deleted_before_its_answer_is_not_answered_nor_kept(
    harness, fake_openai: FakeOpenAI
) -> None:
    """A card number deleted for everyone a second later was answered, shown to the model and stored."""
    async with harness(**ai(fake_openai)) as h:
        h.bot.pipeline.gather_s = 0.3
        sent = await h.say(inbound("mi tarjeta es 4111 1111 1111 1111", id="M2"), revoke("M2"))
        await h.bot.store.flush()
        rows = await h.bot.store.recent_messages(CHAT, 10)
        later = await h.say(inbound("perdón, ¿aceptáis Bizum?", id="M3"))
    assert sent == [] and fake_openai.chat_count == 1
    assert [(r.body, r.status) for r in rows] == [("", MessageStatus.SKIPPED)]
    assert later == ["echo: perdón, ¿aceptáis Bizum?"]
    assert "4111" not in str(fake_openai.chat_requests)


async def test_an_edit_after_the_answer_gets_no_second_answer(harness, fake_openai: FakeOpenAI) -> None:
    async with harness(**ai(fake_openai)) as h:
        assert await h.say(inbound("¿abrís el domingo?", id="M4")) == ["echo: ¿abrís el domingo?"]
        assert await h.say(edit("M4", "¿abrís el sábado?"), revoke("M4", id="R2")) == []
    assert fake_openai.chat_count == 1
