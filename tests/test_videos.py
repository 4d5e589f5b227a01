"""Videos customers send, shown to the model as frames: real ffmpeg on videos the tests make, the real
pipeline, SQLite store and SDK against the fake OpenAI server, loopback transport; and through
`python -m bot chat --jsonl`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bot.pipeline import MAX_BURST_PHOTOS
from bot.replies import reply
from connection.console import parse_jsonl
from connection.types import MediaRef, MessageKind
from memory.store import Direction, MessageStatus, StoredMessage
from tests.conftest import BotHarness, inbound
from tests.fake_openai import FakeOpenAI
from tests.test_console import lines, run_chat
from tests.test_documents import REFUSAL, asked
from tests.test_photos import CHAT, ai, count_downloads, describes, jpeg, photo, shown_photos

COLOURS = ("red", "lime", "blue")


@pytest.fixture(scope="module")
def three_colours(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """6 seconds at 640x360: 2 s red, 2 s green, 2 s blue, with a tone (H.264 and AAC in MP4, as WhatsApp)."""
    path = tmp_path_factory.mktemp("video") / "colours.mp4"
    inputs = [
        arg for colour in COLOURS for arg in ("-f", "lavfi", "-i", f"color=c={colour}:s=640x360:d=2:r=25")
    ]
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", *inputs, "-f", "lavfi", "-i", "sine=frequency=440:duration=6",
         "-filter_complex", "[0:v][1:v][2:v]concat=n=3:v=1:a=0[v]", "-map", "[v]", "-map", "3:a",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
        check=True,
    )  # fmt: skip
    return path.read_bytes()


def video(data: bytes, caption: str = "", **fields: Any) -> Any:
    media = MediaRef(mimetype="video/mp4", size_bytes=len(data), duration_s=6, handle=data)
    return inbound(caption, kind=MessageKind.VIDEO, media=media, **fields)


def dominant(image: Any) -> str:
    red, green, blue = image.convert("RGB").resize((1, 1)).getpixel((0, 0))
    return {red: "red", green: "lime", blue: "blue"}[max(red, green, blue)]


@pytest.fixture
def fake(fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.reply = describes
    return fake_openai


async def test_a_video_is_shown_to_the_model_as_frames_in_order(
    harness, fake: FakeOpenAI, three_colours: bytes
) -> None:
    """A customer films the broken part and asks "¿esto tiene arreglo?": the bot answered "I can only read
    text, photos and voice notes", or the words blind."""
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(video(three_colours, "¿esto tiene arreglo?", id="V1"))
        assert await h.say("¿cuánto costaría?") == ["texto: ¿cuánto costaría?"]
        stored = await h.bot.store.recent_messages(CHAT, 5)
        counters = h.bot.pipeline.counters
    frames = shown_photos(fake.chat_requests[0])
    assert [dominant(frame) for frame in frames] == list(COLOURS)  # one from each third, in order
    assert (
        answer == f"3 foto(s): {reply('video_note', 'es', seconds='6 s', frames=3)}\n\n¿esto tiene arreglo?"
    )
    # The next turn knows a video came, with its caption; the frames are not shown again, nor stored.
    assert fake.chat_requests[1]["messages"][1]["content"] == "(🎬) ¿esto tiene arreglo?"
    assert next((m.kind, m.body, m.status) for m in stored if m.direction is Direction.IN) == (
        "video",
        "¿esto tiene arreglo?",
        MessageStatus.ANSWERED,
    )
    assert (counters.videos, counters.videos_unseen, counters.photos) == (1, 0, 0)
    assert list((h.settings.data_dir / "tmp" / "video").iterdir()) == []  # its file removed


async def test_a_video_and_the_words_after_it_are_one_turn(
    harness, fake: FakeOpenAI, three_colours: bytes
) -> None:
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3  # as WA_GATHER_S sets it on WhatsApp
        sent = await h.say(video(three_colours, id="V1"), inbound("¿lo tenéis en azul?", id="T1"))
    assert len(sent) == 1 and fake.chat_count == 1
    assert sent[0].startswith("3 foto(s): (El cliente envía un vídeo") and sent[0].endswith(
        "¿lo tenéis en azul?"
    )


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x18ftypmp42" + bytes(5000), b"not a video at all"])
async def test_an_undecodable_video_alone_is_asked_for_again(harness, fake: FakeOpenAI, data: bytes) -> None:
    async with harness(**ai(fake)) as h:
        assert await h.say(video(data)) == [reply("video_unreadable", "es")]
        counters = h.bot.pipeline.counters
    assert fake.chat_count == 0 and counters.videos_unseen == 1
    assert list((h.settings.data_dir / "tmp" / "video").glob("*")) == []


async def test_an_undecodable_video_with_words_gets_the_words_answered(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(video(b"broken", "¿lo veis?"))
    assert answer == f"texto: ¿lo veis?\n\n{reply('attachment_note', 'es')}"


async def test_a_video_over_the_limit_is_refused_before_downloading(
    harness, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = MediaRef("video/mp4", size_bytes=40 * 1024 * 1024, handle=b"x")
    async with harness(**ai(fake), video_max_mb=16) as h:
        downloads = count_downloads(h, monkeypatch)
        sent = await h.say(inbound("", kind=MessageKind.VIDEO, media=big))
    assert sent == [reply("video_too_large", "es", limit=16)] and "16 MB" in sent[0]
    assert downloads == [] and fake.chat_count == 0


async def test_with_photos_off_a_video_gets_the_polite_reply(
    harness, fake: FakeOpenAI, three_colours: bytes
) -> None:
    async with harness(**ai(fake), openai_vision=False) as h:
        assert await h.say(video(three_colours)) == [reply("media_unsupported_pdf", "es")]
        assert "vídeo" not in reply("media_unsupported_pdf", "es")
        [answer] = await h.say(video(three_colours, "¿lo veis?", id="V2"))
    assert answer == f"texto: ¿lo veis?\n\n{reply('attachment_note', 'es')}"


async def test_a_model_that_reads_no_images_answers_a_videos_words_without_it(
    harness, fake: FakeOpenAI, three_colours: bytes
) -> None:
    async with harness(**ai(fake)) as h:
        fake.raw_next.append((400, "application/json", REFUSAL))
        [answer] = await h.say(video(three_colours, "¿esto tiene arreglo?"))
        fake.raw_next.append((400, "application/json", REFUSAL))
        assert await h.say(video(three_colours, id="V2")) == [reply("media_unsupported_pdf", "es")]
        counters = h.bot.pipeline.counters
    assert answer == f"texto: ¿esto tiene arreglo?\n\n{reply('attachment_note', 'es')}"
    assert (counters.videos, counters.videos_unseen, counters.photos_unseen) == (0, 2, 0)


async def test_a_video_recovered_after_a_restart_is_asked_for_again(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        row = StoredMessage("V9", CHAT, Direction.IN, "video", "", MessageStatus.RECEIVED, time.time())
        await h.bot.store.add_message(row)
    async with BotHarness(h.settings) as again:
        await again.bot.recover()
        assert await again.bot.pipeline.drain(10)
        sent = again.transport.texts_to(CHAT)
    assert sent == [reply("video_unreadable", "es")]


async def test_a_turn_with_photos_and_a_video_shows_five_images_at_most(
    harness, fake: FakeOpenAI, three_colours: bytes
) -> None:
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        await h.say(photo(jpeg(), id="P1"), photo(jpeg(), id="P2"), video(three_colours, id="V1"), "¿cuál?")
    assert max(len(shown_photos(request)) for request in fake.chat_requests) <= MAX_BURST_PHOTOS


async def test_a_video_replying_to_a_photo_does_not_show_that_photo(
    harness, fake: FakeOpenAI, three_colours: bytes
) -> None:
    message = video(
        three_colours, "¿es este?", quoted_from="bot", quoted_kind=MessageKind.IMAGE,
        quoted_media=MediaRef("image/jpeg", 10, handle=jpeg()),
    )  # fmt: skip
    async with harness(**ai(fake)) as h:
        await h.say(message)
    assert len(shown_photos(fake.chat_requests[-1])) == 3 and "esta foto" not in asked(fake)


async def test_a_video_waits_for_memory_before_it_is_downloaded(
    harness, fake: FakeOpenAI, three_colours: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with harness(**ai(fake)) as h:
        downloads = count_downloads(h, monkeypatch)
        h.bot.pipeline.model_gate.clear()  # memory critical
        h.bot.pipeline.submit(video(three_colours, id="V1"))
        await asyncio.sleep(0.3)
        assert downloads == [] and h.transport.sent == []
        h.bot.pipeline.model_gate.set()
        assert await h.bot.pipeline.drain(10)
    assert downloads == ["V1"] and len(h.transport.sent) == 1


def test_the_console_reads_a_video_line(tmp_path: Path, three_colours: bytes) -> None:
    path = tmp_path / "pieza.mp4"
    path.write_bytes(three_colours)
    message = parse_jsonl(json.dumps({"from": "34600111222", "video": str(path), "text": "¿arreglo?"}))
    assert (message.kind, message.text) == (MessageKind.VIDEO, "¿arreglo?")
    assert message.media is not None and message.media.mimetype == "video/mp4"


async def test_a_video_through_python_m_bot_chat(
    tmp_path: Path, fake_openai: FakeOpenAI, three_colours: bytes
) -> None:
    fake_openai.reply = describes
    path = tmp_path / "pieza.mp4"
    path.write_bytes(three_colours)
    line = json.dumps({"from": "34600111222", "video": str(path), "text": "¿esto tiene arreglo?"})
    env = {"OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": fake_openai.base_url}
    code, out, err = await run_chat(tmp_path, line + "\n", "--jsonl", **env)
    assert code == 0, err
    [sent] = lines(out)
    assert sent["text"].startswith("3 foto(s): (El cliente envía un vídeo de 6 s")
