"""Photos customers send, shown to the model (OPENAI_VISION): real Pillow, the real pipeline, SQLite store and
SDK against the fake OpenAI server, loopback transport; and through `python -m bot chat --jsonl`."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from PIL import Image

from bot.replies import reply
from connection.console import parse_jsonl
from connection.types import MediaRef, MessageKind
from media.image import MAX_SIDE, PhotoRejected, shrink
from memory.store import Direction, MessageStatus
from tests.conftest import BotHarness, inbound
from tests.fake_openai import FakeOpenAI
from tests.test_console import lines, run_chat

CHAT = "34600111222@s.whatsapp.net"
OTHER = "5491122334455@s.whatsapp.net"


def ai(fake: FakeOpenAI, **extra: object) -> dict[str, object]:
    return {"openai_api_key": "test-key", "openai_base_url": fake.base_url, **extra}


def jpeg(width: int = 800, height: int = 600, color: str = "red", **save: Any) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "JPEG", **save)
    return out.getvalue()


def photo(data: bytes, caption: str = "", **fields: Any) -> Any:
    media = MediaRef(mimetype="image/jpeg", size_bytes=len(data), handle=data)
    return inbound(caption, kind=MessageKind.IMAGE, media=media, **fields)


def describes(messages: list[dict[str, Any]]) -> str:
    """The fake model's answer: what it was shown, so a test can tell a photo reached it."""
    content = messages[-1]["content"]
    if isinstance(content, str):
        return f"texto: {content}"
    words = " ".join(part["text"] for part in content if part["type"] == "text")
    shown = sum(part["type"] == "image_url" for part in content)
    return f"{shown} foto(s): {words}".rstrip()


def shown_photos(request: dict[str, Any]) -> list[Image.Image]:
    content = request["messages"][-1]["content"]
    assert isinstance(content, list), content
    images = []
    for part in content:
        if part["type"] == "image_url":
            header, _, data = part["image_url"]["url"].partition(",")
            assert header == "data:image/jpeg;base64"
            images.append(Image.open(io.BytesIO(base64.b64decode(data))))
    return images


def count_downloads(h: BotHarness, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the messages whose media the transport is asked to download, as they are asked."""
    downloads: list[str] = []
    real = h.transport.download_media

    async def counting(message: Any) -> bytes:
        downloads.append(message.id)
        return await real(message)

    monkeypatch.setattr(h.transport, "download_media", counting)
    return downloads


async def statuses(h: BotHarness) -> dict[str, MessageStatus]:
    rows = await h.bot.store.recent_messages(CHAT, 50)
    return {row.wa_message_id: row.status for row in rows if row.direction is Direction.IN}


@pytest.fixture
def fake(fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.reply = describes
    return fake_openai


async def test_a_photo_is_shown_to_the_model_with_its_caption(harness, fake: FakeOpenAI) -> None:
    """A customer sends a photo of a shoe and "¿lo tenéis en azul?": the model used to be told it could not
    see it, and the customer got an answer that guessed or asked what the photo was."""
    async with harness(**ai(fake)) as h:
        sent = await h.say(photo(jpeg(4000, 3000), "¿lo tenéis en azul?", id="P1"))
        stored = await h.bot.store.recent_messages(CHAT, 5)
        counters = h.bot.pipeline.counters
    assert sent == ["1 foto(s): ¿lo tenéis en azul?"]
    [shown] = shown_photos(fake.chat_requests[-1])
    assert shown.format == "JPEG" and shown.size == (MAX_SIDE, MAX_SIDE * 3 // 4)  # shrunk, in proportion
    assert "no puedes ver" not in json.dumps(fake.chat_requests[-1]["messages"][-1], ensure_ascii=False)
    assert [(m.kind, m.body, m.status) for m in stored if m.direction is Direction.IN] == [
        ("image", "¿lo tenéis en azul?", MessageStatus.ANSWERED)
    ]
    assert (counters.photos, counters.photos_unseen) == (1, 0)


async def test_a_photo_alone_is_answered_and_the_next_turn_knows_it_came(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        assert await h.say(photo(jpeg())) == ["1 foto(s):"]
        assert await h.say("¿cuánto cuesta?") == ["texto: ¿cuánto cuesta?"]
    first, second = fake.chat_requests
    assert [part["type"] for part in first["messages"][-1]["content"]] == ["image_url"]
    # The next turn is told a photo came before (not shown it again) and what the bot answered.
    assert [m["content"] for m in second["messages"][1:]] == ["(📷)", "1 foto(s):", "¿cuánto cuesta?"]


async def test_a_photo_and_the_words_after_it_are_one_turn(harness, fake: FakeOpenAI) -> None:
    """A photo, then "¿lo tenéis en azul?" a second later: one answer about the photo, not two."""
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3  # as WA_GATHER_S sets it on WhatsApp
        sent = await h.say(photo(jpeg(), id="P1"), inbound("¿lo tenéis en azul?", id="T1"))
        assert sent == ["1 foto(s): ¿lo tenéis en azul?"]
        assert await statuses(h) == {"P1": MessageStatus.ANSWERED, "T1": MessageStatus.ANSWERED}
        assert h.bot.pipeline.counters.merged == 1


async def test_the_question_typed_after_a_photo_is_waited_for(harness, fake: FakeOpenAI) -> None:
    """Typing "¿lo tenéis en azul?" after sending the photo takes longer than the quiet after a text: the
    photo was answered alone (a guess), and the question without the photo."""
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3  # as WA_GATHER_S sets it on WhatsApp
        h.bot.pipeline.submit(photo(jpeg(), id="P1"))
        await asyncio.sleep(0.5)  # typing: more than the 0.3 s quiet after a text
        h.bot.pipeline.submit(inbound("¿lo tenéis en azul?", id="T1"))
        assert await h.bot.pipeline.drain(10)
    assert h.transport.texts_to(CHAT) == ["1 foto(s): ¿lo tenéis en azul?"]


@pytest.mark.parametrize("after", ["a Word file", "a photo with vision off"])
async def test_a_text_is_not_kept_waiting_by_media_the_model_is_never_shown(
    harness, fake: FakeOpenAI, after: str
) -> None:
    """ "hola" then a .docx (never read) waited three times the quiet for a question that cannot join."""
    docx = MediaRef(
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document", 10, handle=b"x"
    )
    async with harness(**ai(fake, openai_vision=after != "a photo with vision off")) as h:
        h.bot.pipeline.gather_s = 0.4
        started = asyncio.get_running_loop().time()
        h.bot.pipeline.submit(inbound("hola", id="T1"))
        await asyncio.sleep(0.05)
        last = (
            inbound("", kind=MessageKind.DOCUMENT, media=docx, id="D1")
            if after == "a Word file"
            else photo(jpeg())
        )
        h.bot.pipeline.submit(last)
        assert await h.bot.pipeline.drain(10)
        took = asyncio.get_running_loop().time() - started
    assert took < 1.1, f"waited {took:.2f} s"


async def test_an_album_is_one_turn_of_at_most_five_photos(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        album = [photo(jpeg(color=c)) for c in ("red", "green", "blue", "white", "black", "gray", "pink")]
        sent = await h.say(*album, inbound("¿cuál es más barata?"))
    assert sent == ["5 foto(s):", "2 foto(s): ¿cuál es más barata?"]
    assert [len(shown_photos(r)) for r in fake.chat_requests] == [5, 2]


async def test_a_photo_that_cannot_be_read_is_asked_for_again(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        corrupt = jpeg()[:300]
        assert await h.say(photo(b"not a photo at all")) == [reply("photo_unreadable", "es")]
        assert fake.chat_count == 0
        # With words, the words are answered, the model told a photo it cannot see came with them.
        assert await h.say(photo(corrupt, "¿precio?")) == [
            f"texto: ¿precio?\n\n{reply('attachment_note', 'es')}"
        ]
        assert h.bot.pipeline.counters.photos_unseen == 2


async def test_a_photo_over_image_max_mb_is_not_downloaded(
    harness, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with harness(**ai(fake, image_max_mb=0.5)) as h:
        downloads = count_downloads(h, monkeypatch)
        declared = inbound("", kind=MessageKind.IMAGE, media=MediaRef("image/jpeg", 2_000_000, handle=jpeg()))
        # Sending it again would be refused again (a camera original sent as a document, most often): the
        # customer is told the limit and how to send it, every time.
        too_large = reply("photo_too_large", "es", limit=0.5)
        assert "0,5 MB" in too_large  # written the Spanish way
        assert "0.5 MB" in reply("photo_too_large", "en", limit=0.5)
        assert await h.say(declared) == [too_large]
        assert await h.say(replace(declared, id="AGAIN")) == [too_large]
        assert downloads == []
        # Undeclared and too large: refused after the download, before anything is decoded.
        big = jpeg(3000, 3000, quality=100) + b"\0" * 600_000
        undeclared = inbound("", kind=MessageKind.IMAGE, media=MediaRef("image/jpeg", None, handle=big))
        assert await h.say(undeclared) == [too_large]
    assert fake.chat_count == 0


async def test_a_model_that_reads_no_images_answers_without_them(harness, fake: FakeOpenAI) -> None:
    """A text-only model (gpt-3.5, or llama.cpp without its vision projector) refuses the request: the
    customer still gets the caption answered, and the owner is told at WARNING what to change."""
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        async with harness(**ai(fake)) as h:
            # What api.openai.com answers a photo sent to a model that reads none (gpt-3.5-turbo).
            refusal = {"message": "Invalid content type. image_url is only supported by certain models."}
            fake.raw_next.append((400, "application/json", json.dumps({"error": refusal})))
            assert await h.say(photo(jpeg(), "¿precio?")) == [
                f"texto: ¿precio?\n\n{reply('attachment_note', 'es')}"
            ]
            llama = json.dumps({"error": {"code": 500, "message": "image input is not supported (mmproj)"}})
            fake.raw_next.extend([(500, "application/json", llama)] * 2)  # the SDK retries a 5xx once
            assert await h.say(photo(jpeg())) == [reply("media_unsupported_pdf", "es")]
            breaker = h.bot.model.breaker.stats() if h.bot.model else {}
    finally:
        logger.remove(sink)
    assert [isinstance(r["messages"][-1]["content"], list) for r in fake.chat_requests] == [
        True,
        False,
        True,
        True,
    ]
    assert any("OPENAI_VISION=false" in line for line in warnings)
    assert breaker["failures"] == 0  # refused photos do not open the circuit


async def test_with_openai_vision_off_a_photo_gets_the_polite_reply(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake, openai_vision=False)) as h:
        assert await h.say(photo(jpeg())) == [reply("media_unsupported_pdf", "es")]
        assert await h.say(photo(jpeg(), "¿precio?")) == [
            f"texto: ¿precio?\n\n{reply('attachment_note', 'es')}"
        ]
    assert len(fake.chat_requests) == 1


async def test_a_photo_whose_download_handle_is_gone_is_asked_for_again(harness, fake: FakeOpenAI) -> None:
    """After a restart a photo left unanswered has no download handle (see inbound_from_stored)."""
    async with harness(**ai(fake)) as h:
        assert await h.say(inbound("", kind=MessageKind.IMAGE)) == [reply("photo_unreadable", "es")]
        # Other media the model is not shown: the polite reply names photos among what the bot reads.
        poll = inbound("", kind=MessageKind.UNSUPPORTED, chat=OTHER)  # another chat: told once in 5 minutes
        assert await h.say(poll) == [reply("media_unsupported_photos_pdf", "es")]
    assert fake.chat_count == 0


async def test_a_photo_sent_again_as_asked_and_failing_again_gets_a_second_notice(
    harness, fake: FakeOpenAI
) -> None:
    """ "No he podido ver tu foto, ¿puedes enviarla de nuevo?": the customer did, it failed again, and got
    silence (the notice is once in 5 minutes a chat, for an album's photos). The rest of an album is still
    skipped, and a third try is not answered a third time."""
    from bot.limits import OncePerWindow
    from bot.pipeline import MEDIA_NOTICE_EVERY_S

    now = [0.0]
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.media_notices = OncePerWindow(MEDIA_NOTICE_EVERY_S, clock=lambda: now[0])
        assert await h.say(photo(b"junk", id="P1")) == [reply("photo_unreadable", "es")]
        now[0] += 1
        assert await h.say(photo(b"junk", id="P2")) == []  # the album's next photo
        now[0] += 30
        assert await h.say(photo(b"junk", id="P3")) == [reply("photo_unreadable_again", "es")]
        now[0] += 30
        assert await h.say(photo(b"junk", id="P4")) == []
    assert fake.chat_count == 0


async def test_a_photo_waits_for_memory_before_it_is_downloaded(
    harness, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with harness(**ai(fake)) as h:
        downloads = count_downloads(h, monkeypatch)
        h.bot.pipeline.model_gate.clear()  # memory critical
        h.bot.pipeline.submit(photo(jpeg(), id="P1"))
        await asyncio.sleep(0.3)
        assert downloads == [] and h.transport.sent == []
        h.bot.pipeline.model_gate.set()
        assert await h.bot.pipeline.drain(10)
    assert downloads == ["P1"]
    assert h.transport.texts_to(CHAT) == ["1 foto(s):"]


async def test_the_same_photo_twice_is_asked_twice(harness, fake: FakeOpenAI) -> None:
    """The answer to a photo is not cached: two customers sending the same catalogue photo may ask different
    things of it, and a key over its bytes would cost more than it saves."""
    async with harness(**ai(fake)) as h:
        await h.say(photo(jpeg()), photo(jpeg(), chat=OTHER))
    assert fake.chat_count == 2


async def test_a_caption_that_is_a_flow_question_is_answered_about_the_photo(
    harness, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """ "¿precio?" under a shoe asks that shoe's price: the model answers, told the flow's answer."""
    flows = tmp_path / "flows.yaml"
    flows.write_text("- keywords: [precio]\n  answer: Las zapatillas cuestan 50 €.\n")
    async with harness(**ai(fake), flows_file=flows) as h:
        assert await h.say(photo(jpeg(), "¿precio?")) == ["1 foto(s): ¿precio?"]
        assert await h.say("¿precio?") == ["Las zapatillas cuestan 50 €."]  # without a photo, the flow
    assert "Las zapatillas cuestan 50 €." in fake.chat_requests[0]["messages"][0]["content"]


async def test_a_request_for_a_person_in_a_caption_hands_over_without_downloading(
    harness, fake: FakeOpenAI
) -> None:
    async with harness(**ai(fake)) as h:
        sent = await h.say(photo(b"never read", "quiero hablar con una persona"))
    assert sent == [reply("handoff", "es")]
    assert fake.chat_count == 0


def test_a_photo_is_turned_upright_and_flattened_on_white() -> None:
    """Phones save a portrait photo landscape with an EXIF orientation; a PNG may have transparency."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to show
    out = io.BytesIO()
    Image.new("RGB", (300, 100), "red").save(out, "JPEG", exif=exif)
    assert Image.open(io.BytesIO(shrink(out.getvalue(), MAX_SIDE))).size == (100, 300)
    clear = io.BytesIO()
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(clear, "PNG")
    flat = Image.open(io.BytesIO(shrink(clear.getvalue(), MAX_SIDE)))
    assert flat.mode == "RGB" and min(flat.getpixel((25, 25))) > 240  # white, not black


def test_a_photo_too_large_to_decode_is_refused_before_decoding() -> None:
    huge = io.BytesIO()
    Image.new("1", (5000, 5000)).save(huge, "PNG")  # 25 megapixels in a few kilobytes
    with pytest.raises(PhotoRejected) as refused:
        shrink(huge.getvalue(), MAX_SIDE)
    assert refused.value.reason == "too_large"
    # A JPEG that large is decoded at a fraction of its size (draft mode), so it is read.
    assert Image.open(io.BytesIO(shrink(jpeg(6000, 4500), MAX_SIDE))).size == (MAX_SIDE, 1152)


def test_the_console_reads_a_photo_line(tmp_path: Path) -> None:
    path = tmp_path / "shoe.png"
    path.write_bytes(b"png")
    message = parse_jsonl(json.dumps({"from": "34600111222", "image": str(path), "text": "¿en azul?"}))
    assert (message.kind, message.text) == (MessageKind.IMAGE, "¿en azul?")
    assert message.media is not None and (message.media.mimetype, message.media.handle) == (
        "image/png",
        str(path),
    )


async def test_jsonl_chat_shows_a_photo_to_the_model(tmp_path: Path, fake: FakeOpenAI) -> None:
    path = tmp_path / "shoe.jpg"
    path.write_bytes(jpeg())
    line = json.dumps({"from": "34600111222", "image": str(path), "text": "¿lo tenéis en azul?"})
    code, out, err = await run_chat(
        tmp_path,
        line + "\n",
        "--jsonl",
        OPENAI_API_KEY="test-key",
        OPENAI_BASE_URL=fake.base_url,
    )
    assert code == 0, err
    assert lines(out) == [{"to": "34600111222", "text": "1 foto(s): ¿lo tenéis en azul?"}]


async def test_an_album_past_the_notice_window_is_kept_unanswered_whole(harness, fake: FakeOpenAI) -> None:
    """An album of unreadable photos just after the notice: only its last photo was marked, the others
    stayed unanswered and got "No he podido ver tu foto" again after a restart."""
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        assert await h.say(photo(b"junk", id="P0")) == [reply("photo_unreadable", "es")]
        assert await h.say(photo(b"junk", id="P1"), photo(b"junk", id="P2")) == []
        assert await statuses(h) == {
            "P0": MessageStatus.ANSWERED,
            "P1": MessageStatus.SKIPPED,
            "P2": MessageStatus.SKIPPED,
        }
    async with BotHarness(h.settings) as again:  # a restart on the same data
        await again.bot.recover()
        assert await again.bot.pipeline.drain(10)
        assert again.transport.texts_to(CHAT) == []


async def test_a_media_notice_does_not_silence_an_unseen_photo(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        assert await h.say(inbound("", kind=MessageKind.UNSUPPORTED)) == [
            reply("media_unsupported_photos_pdf", "es")
        ]
        gone = MediaRef("image/jpeg", 100, handle="/nonexistent.jpg")
        assert await h.say(inbound("", kind=MessageKind.IMAGE, media=gone)) == [
            reply("photo_unreadable", "es")
        ]
        archive = MediaRef("application/zip", 10, file_name="fotos.zip", handle=b"PK")
        assert await h.say(inbound("", kind=MessageKind.DOCUMENT, media=archive)) == []  # told a moment ago


async def test_a_one_off_model_error_with_a_photo_is_not_taken_for_no_vision(
    harness, fake: FakeOpenAI
) -> None:
    """A content filter (or an empty answer) is about that answer: an apology, not "I only read text", and
    no advice to the owner to turn photos off."""
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        async with harness(**ai(fake)) as h:
            fake.finish_next.append("content_filter")
            assert await h.say(photo(jpeg())) == [reply("ai_error", "es")]
            counters = h.bot.pipeline.counters
            assert (counters.photos, counters.photos_unseen) == (0, 0)  # the model gave no answer about it
    finally:
        logger.remove(sink)
    assert not any("OPENAI_VISION" in line for line in warnings)


async def test_an_error_naming_a_vision_model_on_a_text_request_still_counts(
    harness, fake: FakeOpenAI
) -> None:
    """Ollama's "model llama3.2-vision not found" (404) on a text-only request is an outage like any other:
    it counts towards opening the circuit."""
    body = json.dumps({"error": {"message": 'model "llama3.2-vision" not found, try pulling it first'}})
    async with harness(**ai(fake)) as h:
        fake.raw_next.append((404, "application/json", body))
        assert await h.say("hola") == [reply("ai_error", "es")]
        assert h.bot.model is not None and h.bot.model.breaker.stats()["failures"] == 1


async def test_a_photo_with_odd_exif_is_still_shown(harness, fake: FakeOpenAI) -> None:
    """An EXIF tag of an unexpected type (seen in real camera files) made Pillow raise struct.error: the
    customer got an apology at every retry, and an album with it lost its good photos too."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Canon"
    out = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(out, "JPEG", exif=exif)
    odd = out.getvalue().replace(b"\x01\x0f\x00\x02", b"\x01\x1c\x00\x02", 1)  # tag 0x011C, ASCII type
    async with harness(**ai(fake)) as h:
        assert await h.say(photo(odd, "¿precio?")) == ["1 foto(s): ¿precio?"]
        assert h.bot.pipeline.counters.failed == 0


async def test_a_photo_whose_handle_is_gone_counts_as_unseen(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        await h.say(inbound("", kind=MessageKind.IMAGE))
        assert h.bot.pipeline.counters.photos_unseen == 1


async def test_image_detail_is_told_to_the_model(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake, image_detail="low")) as h:
        await h.say(photo(jpeg()))
    [part] = fake.chat_requests[-1]["messages"][-1]["content"]
    assert part["image_url"]["detail"] == "low"


def test_sixteen_bit_greys_and_a_transparent_colour_read_as_they_look() -> None:
    """A 16-bit grey scan came out all white (clipped); a PNG whose transparent colour is black, black."""
    ramp = Image.linear_gradient("L").resize((64, 256)).convert("I").point(lambda v: v * 256).convert("I;16")
    out = io.BytesIO()
    ramp.save(out, "PNG")
    flat = Image.open(io.BytesIO(shrink(out.getvalue(), MAX_SIDE)))
    shades = [flat.getpixel((10, y))[0] for y in (0, 128, 255)]
    assert shades[0] < 10 and 100 < shades[1] < 160 and shades[2] > 245
    keyed = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 0)).save(keyed, "PNG", transparency=(0, 0, 0))
    assert Image.open(io.BytesIO(shrink(keyed.getvalue(), MAX_SIDE))).getpixel((5, 5)) == (255, 255, 255)


def test_a_large_mpo_photo_is_decoded_small_like_a_jpeg() -> None:
    """Some phones save photos as MPO (a JPEG with a second image): it was decoded whole and refused past 16
    megapixels, while the same JPEG was read."""
    out = io.BytesIO()
    big = Image.new("RGB", (4200, 4000), "blue")
    big.save(out, "MPO", save_all=True, append_images=[big.resize((10, 10))])
    assert Image.open(io.BytesIO(out.getvalue())).format == "MPO"
    assert Image.open(io.BytesIO(shrink(out.getvalue(), MAX_SIDE))).size == (MAX_SIDE, 1463)


def under(data: bytes, text: str = "¿precio de este?", **fields: Any) -> Any:
    """A text replying to a photo the business sent (its media quoted whole, as WhatsApp does)."""
    media = MediaRef(mimetype="image/jpeg", size_bytes=len(data), handle=data)
    return inbound(text, quoted_from="bot", quoted_kind=MessageKind.IMAGE, quoted_media=media, **fields)


async def test_a_reply_to_a_photo_shows_the_model_that_photo(
    harness, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The owner sends product photos from the phone; "¿precio de este?" under one of them: the model was
    told of a photo it could not see, and could only ask which product."""
    flows = tmp_path / "flows.yaml"
    flows.write_text("- keywords: [precio]\n  answer: Depende del modelo.\n")
    async with harness(**ai(fake), flows_file=flows) as h:
        assert await h.say(under(jpeg(), "¿precio?")) == [
            "1 foto(s): (El cliente responde a esta foto, un mensaje tuyo.)\n\n¿precio?"
        ]
        assert h.bot.pipeline.counters.photos == 1
    [shown] = shown_photos(fake.chat_requests[-1])
    assert shown.size == (800, 600)


async def test_a_reply_to_a_photo_that_cannot_be_downloaded_says_so(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        assert await h.say(under(b"gone", "¿precio?")) == [
            "texto: (El cliente responde a una foto, un mensaje tuyo, que no puedes ver.)\n\n¿precio?"
        ]


async def test_a_model_that_reads_no_images_is_asked_of_a_reply_as_before(harness, fake: FakeOpenAI) -> None:
    refusal = {"message": "Invalid content type. image_url is only supported by certain models."}
    async with harness(**ai(fake)) as h:
        fake.raw_next.append((400, "application/json", json.dumps({"error": refusal})))
        assert await h.say(under(jpeg(), "¿precio?")) == [
            "texto: (El cliente responde a una foto, un mensaje tuyo, que no puedes ver.)\n\n¿precio?"
        ]


async def test_a_photo_replying_to_a_photo_shows_its_own_only(harness, fake: FakeOpenAI) -> None:
    """Two photos and "this photo" would be ambiguous: the quoted one is named, not shown."""
    async with harness(**ai(fake)) as h:
        quoted = MediaRef(mimetype="image/jpeg", size_bytes=10, handle=jpeg(color="blue"))
        sent = await h.say(
            photo(
                jpeg(), "¿como esta?", quoted_from="bot", quoted_kind=MessageKind.IMAGE, quoted_media=quoted
            )
        )
    assert sent == [
        "1 foto(s): (El cliente responde a una foto, un mensaje tuyo, que no puedes ver.)\n\n¿como esta?"
    ]
    assert shown_photos(fake.chat_requests[-1])[0].getpixel((5, 5))[0] > 200  # the red one, its own


async def test_with_openai_vision_off_a_reply_to_a_photo_is_as_before(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake, openai_vision=False)) as h:
        assert await h.say(under(jpeg(), "¿precio?")) == [
            "texto: (El cliente responde a una foto, un mensaje tuyo, que no puedes ver.)\n\n¿precio?"
        ]


async def test_a_flow_question_under_a_photo_is_answered_at_once_while_memory_is_critical(
    harness, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """While memory is critical a flow's question is answered at once, past the chats waiting for the model.
    Under a photo it took that path, then waited for memory to download the photo, and the customer was
    told "busy" instead of the flow's answer."""
    flows = tmp_path / "flows.yaml"
    flows.write_text("- keywords: [precio]\n  answer: Depende del modelo.\n")
    async with harness(**ai(fake), flows_file=flows) as h:
        h.bot.pipeline.model_gate.clear()  # memory critical
        h.bot.pipeline.submit(under(jpeg(), "¿precio?"))
        for _ in range(100):
            if h.transport.texts_to(CHAT):
                break
            await asyncio.sleep(0.05)
        assert h.transport.texts_to(CHAT) == ["Depende del modelo."]
        h.bot.pipeline.model_gate.set()
    assert fake.chat_count == 0


def webp(color: str = "yellow") -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (512, 512), color).save(out, "WEBP")
    return out.getvalue()


def sticker(data: bytes, **fields: Any) -> Any:
    media = MediaRef(mimetype="image/webp", size_bytes=len(data), handle=data)
    return inbound("", kind=MessageKind.STICKER, media=media, **fields)


async def test_a_sticker_is_shown_to_the_model_and_remembered(harness, fake: FakeOpenAI) -> None:
    """A "👍" or "gracias" sticker got "For now I can only read text messages and voice notes": robotic, and
    wrong about what the customer meant. The model sees it as the picture it is."""
    async with harness(**ai(fake)) as h:
        assert await h.say(sticker(webp())) == ["1 foto(s):"]
        await h.say("¿y el envío?")
    assert [part["type"] for part in fake.chat_requests[0]["messages"][-1]["content"]] == ["image_url"]
    assert [m["content"] for m in fake.chat_requests[1]["messages"][1:3]] == ["(sticker)", "1 foto(s):"]


async def test_a_sticker_the_model_cannot_see_gets_no_reply(harness, fake: FakeOpenAI) -> None:
    """With photos off, or an animated (Lottie) sticker Pillow cannot read: kept, unanswered, rather than
    "I can only read text" under a thumbs-up."""
    async with harness(**ai(fake, openai_vision=False)) as h:
        assert await h.say(sticker(webp(), id="S1")) == []
        assert (await statuses(h))["S1"] is MessageStatus.SKIPPED
    async with harness(**ai(fake)) as h:
        assert await h.say(sticker(b"\x00lottie animation", id="S2")) == []
        assert (await statuses(h))["S2"] is MessageStatus.SKIPPED
        assert await h.say("hola") == ["texto: hola"]  # the chat goes on
    assert fake.chat_count == 1


async def test_a_sticker_after_a_question_is_part_of_it(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        assert await h.say(inbound("¿tenéis envío gratis?"), sticker(webp())) == [
            "1 foto(s): ¿tenéis envío gratis?"
        ]


async def test_a_sticker_to_a_model_that_reads_no_images_gets_no_reply(harness, fake: FakeOpenAI) -> None:
    """With a model that reads no images every "👍" got "For now I can only read text messages and voice
    notes", the reply stickers were meant to be spared, and not even once in 5 minutes."""
    refusal = {"message": "Invalid content type. image_url is only supported by certain models."}
    async with harness(**ai(fake)) as h:
        fake.raw_next.extend([(400, "application/json", json.dumps({"error": refusal}))] * 2)
        assert await h.say(sticker(webp(), id="S1"), sticker(webp("red"), id="S2")) == []
        assert await statuses(h) == {"S1": MessageStatus.SKIPPED, "S2": MessageStatus.SKIPPED}


async def test_a_sticker_that_cannot_be_read_in_a_burst_is_no_unseen_attachment(
    harness, fake: FakeOpenAI
) -> None:
    """ "gracias, ¿cuándo llega?" and a thumbs-up the bot cannot decode: the model was told the customer had
    attached something it could not see, and apologised for it."""
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        sent = await h.say(inbound("gracias, ¿cuándo llega?", id="T1"), sticker(b"\x00lottie", id="S1"))
        assert await statuses(h) == {"T1": MessageStatus.ANSWERED, "S1": MessageStatus.ANSWERED}
    assert sent == ["texto: gracias, ¿cuándo llega?"]


async def test_a_sticker_that_will_not_be_answered_is_not_promised_an_answer(
    harness, fake: FakeOpenAI
) -> None:
    """Photos off, memory critical: the sticker waited in the store, the chat was told "te respondo en
    breve", then the sticker was skipped: a promise never kept."""
    async with harness(**ai(fake, openai_vision=False, busy_reply_after_s=0.2)) as h:
        h.bot.pipeline.model_gate.clear()  # memory critical
        h.bot.pipeline.submit(sticker(webp(), id="S1"))
        await asyncio.sleep(0.8)
        h.bot.pipeline.open_model_gate()
        assert await h.bot.pipeline.drain(5)
        assert (await statuses(h))["S1"] is MessageStatus.SKIPPED
        assert h.transport.texts_to(CHAT) == []


async def test_stickers_in_a_group_are_its_chatter(harness, fake: FakeOpenAI) -> None:
    group = "120363000000000001@g.us"
    async with harness(**ai(fake, reply_to_groups="always")) as h:
        assert await h.say(sticker(webp(), chat=group, is_group=True)) == []
    assert fake.chat_count == 0


async def test_an_animated_lottie_sticker_is_kept_without_a_download(
    harness, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with harness(**ai(fake)) as h:
        downloads = count_downloads(h, monkeypatch)
        lottie = MediaRef(mimetype="application/was", size_bytes=9000, handle=b"lottie")
        assert await h.say(inbound("", kind=MessageKind.STICKER, media=lottie)) == []
        assert downloads == []


async def test_a_reply_to_a_photo_that_waited_in_the_store_still_shows_it(harness, fake: FakeOpenAI) -> None:
    """Memory critical: "¿precio de este?" under the owner's product photo waited in the store, and came back
    without the photo or the note that it replies to one."""
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.model_gate.clear()
        h.bot.pipeline.submit(under(jpeg(), "¿precio de este?"))
        await asyncio.sleep(0.2)
        assert h.bot.pipeline.counters.spilled == 1
        h.bot.pipeline.open_model_gate()
        assert await h.bot.pipeline.drain(5)
        sent = [text for text in h.transport.texts_to(CHAT) if text != reply("busy", "es")]
    assert sent == ["1 foto(s): (El cliente responde a esta foto, un mensaje tuyo.)\n\n¿precio de este?"]


async def test_a_sticker_after_a_reply_to_a_photo_still_shows_the_quoted_photo(
    harness, fake: FakeOpenAI
) -> None:
    """ "¿lo tenéis en rojo?" swiped on a product photo, then a 🙏 sticker: the model saw the sticker and was
    told of a photo it could not see."""
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        sent = await h.say(under(jpeg(color="blue"), "¿lo tenéis en rojo?"), sticker(webp()))
    assert sent == ["2 foto(s): (El cliente responde a esta foto, un mensaje tuyo.)\n\n¿lo tenéis en rojo?"]
    quoted, _ = shown_photos(fake.chat_requests[-1])
    assert quoted.getpixel((5, 5))[2] > 200  # the blue product photo first, then the sticker
