"""Videos customers send, shown to the model as frames: real ffmpeg on videos the tests make, the real
pipeline, SQLite store and SDK against the fake OpenAI server, loopback transport; and through
`python -m bot chat --jsonl`."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.pipeline import MAX_BURST_PHOTOS
from bot.replies import reply
from connection.console import parse_jsonl
from connection.types import MediaRef, MessageKind, TransportError
from media.video import VideoReader, VideoRejected
from memory.store import Direction, MessageStatus, StoredMessage
from tests.conftest import BotHarness, inbound
from tests.fake_openai import FakeOpenAI
from tests.test_console import lines, run_chat
from tests.test_documents import REFUSAL, asked
from tests.test_photos import CHAT, ai, count_downloads, describes, jpeg, photo, shown_photos

COLOURS = ("red", "lime", "blue")


@pytest.fixture(scope="module")
def three_colours(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """6 seconds at 640x360, without sound: 2 s red, 2 s green, 2 s blue (H.264 in MP4, as WhatsApp sends)."""
    path = tmp_path_factory.mktemp("video") / "colours.mp4"
    inputs = [
        arg for colour in COLOURS for arg in ("-f", "lavfi", "-i", f"color=c={colour}:s=640x360:d=2:r=25")
    ]
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", *inputs, "-filter_complex", "[0:v][1:v][2:v]concat=n=3:v=1:a=0[v]",
         "-map", "[v]", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )  # fmt: skip
    return path.read_bytes()


@pytest.fixture(scope="module")
def talking(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A customer filming a shoe and saying which one they want (espeak-ng), with AAC sound."""
    folder = tmp_path_factory.mktemp("talking")
    speech, path = folder / "speech.wav", folder / "talking.mp4"
    subprocess.run(
        ["espeak-ng", "-v", "es", "-w", str(speech), "Este es el que quiero, ¿lo tenéis en 42?"], check=True
    )
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=red:s=640x360:d=3:r=25",
         "-i", str(speech), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
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
    note = (
        "(El cliente envía un vídeo de 6 s: ves 3 fotogramas repartidos por él, en orden; no oyes su sonido.)"
    )
    assert answer == f"3 foto(s): {note}\n\n¿esto tiene arreglo?"
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
    note = reply("video_unread_note", "es", why=reply("video_unreadable", "es"))
    assert answer == f"texto: ¿lo veis?\n\n{note}"


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


# -- from the review of the first version --------------------------------------------------------------------


def make_video(path: Path, *args: str) -> bytes:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args, str(path)], check=True)
    return path.read_bytes()


async def test_a_video_that_cannot_be_downloaded_is_asked_for_again(
    harness, fake: FakeOpenAI, three_colours: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Media gone from WhatsApp's servers, a network error: it was answered "No he podido abrir tu PDF"."""

    async def failing(message: object) -> bytes:
        raise TransportError("download failed: media expired")

    async with harness(**ai(fake)) as h:
        monkeypatch.setattr(h.transport, "download_media", failing)
        assert await h.say(video(three_colours, id="V1")) == [reply("video_unreadable", "es")]


async def test_a_video_sent_as_a_document_is_shown_as_a_video(
    harness, fake: FakeOpenAI, three_colours: bytes
) -> None:
    """It was told "I can read ... videos ...". The adapter reads it as a video (test_neonize_adapter)."""
    media = MediaRef("video/mp4", len(three_colours), file_name="VID-2026.mp4", handle=three_colours)
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(inbound("", kind=MessageKind.VIDEO, media=media))
    assert answer.startswith("3 foto(s): (El cliente envía un vídeo de 6 s")


async def test_an_unreadable_video_does_not_silence_an_unreadable_photo(harness, fake: FakeOpenAI) -> None:
    async with harness(**ai(fake)) as h:
        assert await h.say(video(b"not a video", id="V1")) == [reply("video_unreadable", "es")]
        assert await h.say(photo(b"not a photo", id="P1")) == [reply("photo_unreadable", "es")]
        assert await h.say(video(b"still not", id="V2")) == []  # told a moment ago


async def test_two_videos_and_a_question_are_one_turn(
    harness, fake: FakeOpenAI, three_colours: bytes
) -> None:
    """They were two answers, the first one blind to the question: each video counted 3 of the 5 images."""
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        sent = await h.say(video(three_colours, id="V1"), video(three_colours, id="V2"), "¿cuál es mejor?")
    assert len(sent) == 1 and sent[0].startswith("4 foto(s):") and sent[0].endswith("¿cuál es mejor?")


async def test_a_video_whose_picture_ends_before_its_sound_is_shown(
    harness, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """1 s of picture, 10 s of sound: the frames past the picture came back empty, and it was unreadable."""
    short = make_video(
        tmp_path / "short.mp4", "-f", "lavfi", "-i", "color=c=red:s=320x240:d=1:r=25", "-f", "lavfi", "-i",
        "sine=d=10", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
    )  # fmt: skip
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(video(short))
    assert answer.startswith("3 foto(s): (El cliente envía un vídeo de 1 s")
    assert {dominant(frame) for frame in shown_photos(fake.chat_requests[-1])} == {"red"}


async def test_frames_taken_before_the_deadline_are_kept(
    tmp_path: Path, three_colours: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow last frame (a long video with one keyframe, a busy CPU) threw the first two away."""
    reader = VideoReader(enabled=True, temp_dir=tmp_path)
    real = reader._frame

    async def slow_last(path: Path, at: float) -> bytes | str:
        if at > 4:
            await asyncio.sleep(5)
        return await real(path, at)

    monkeypatch.setattr(reader, "_frame", slow_last)
    monkeypatch.setattr("media.video.READ_TIMEOUT_S", 2.0)
    seen = await reader.frames(three_colours, 3)
    assert [dominant(Image.open(io.BytesIO(frame))) for frame in seen.images] == ["red", "lime"]
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_takes_an_8k_videos_frames_in_little_memory(tmp_path: Path) -> None:
    """ffmpeg decoded with a thread per core and no cap: 500 MB for a 13 MB 8K video here, 1 GB on 8 cores.
    Measured in a process of its own (its children's peak is then ffmpeg's)."""
    path = tmp_path / "v8k.mp4"
    make_video(path, "-f", "lavfi", "-i", "testsrc2=s=7680x4320:d=2:r=5", "-c:v", "libx264", "-preset",
               "ultrafast", "-pix_fmt", "yuv420p")  # fmt: skip
    code = (
        "import asyncio, resource, sys; from pathlib import Path; from media.video import VideoReader;"
        "reader = VideoReader(enabled=True, temp_dir=Path(sys.argv[2]));"
        "seen = asyncio.run(reader.frames(Path(sys.argv[1]).read_bytes(), 3));"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;"
        "print(len(seen.images), max(len(i) for i in seen.images), peak)"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "t")], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    frames, largest, peak_kb = map(int, done.stdout.split())
    assert frames == 3 and largest < 1024 * 1024  # fitted to 1,536 px, not 8K JPEGs
    assert peak_kb < 256 * 1024, f"ffmpeg peaked at {peak_kb // 1024} MB"


async def test_a_video_without_a_stated_length_uses_whatsapps(harness, fake: FakeOpenAI) -> None:
    """A WebM recorded by a browser states no length: one frame and "un vídeo de ?" and one frame."""
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=s=640x360:d=6:r=25", "-c:v", "libvpx",
         "-b:v", "500k", "-f", "webm", "-"], check=True, capture_output=True,
    ).stdout  # fmt: skip
    media = MediaRef("video/webm", len(raw), duration_s=6, handle=raw)
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(inbound("", kind=MessageKind.VIDEO, media=media))
    assert answer.startswith("3 foto(s): (El cliente envía un vídeo de 6 s: ves 3 fotogramas")


async def test_a_video_of_one_frame_is_named_so(harness, fake: FakeOpenAI, three_colours: bytes) -> None:
    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        photos = [photo(jpeg(), id=f"P{n}") for n in range(4)]
        [answer] = await h.say(*photos, video(three_colours, id="V1"))
    assert "(El cliente envía un vídeo de 6 s: ves 1 fotograma de él; no oyes su sonido.)" in answer


async def test_what_is_said_in_a_video_is_heard(harness, fake: FakeOpenAI, talking: bytes) -> None:
    """ "Este es el que quiero, ¿lo tenéis en 42?" said while filming was the question, and it was lost: the
    model only saw the frames. Transcribed like a voice note (real ffmpeg, the SDK against the fake)."""
    fake.transcript = "Este es el que quiero, ¿lo tenéis en 42?"
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(video(talking))
        counters = h.bot.pipeline.counters
    assert len(fake.transcriptions) == 1
    assert answer.startswith("3 foto(s): (El cliente envía un vídeo de 3 s: ves 3 fotogramas repartidos")
    assert answer.endswith("transcrito, va en su mensaje.)\n\nEste es el que quiero, ¿lo tenéis en 42?")
    assert (counters.videos, counters.transcribed) == (1, 1)


async def test_a_videos_words_are_answered_by_a_model_that_reads_no_images(
    harness, fake: FakeOpenAI, talking: bytes
) -> None:
    fake.transcript = "¿lo tenéis en 42?"
    fake.raw_next.append((400, "application/json", REFUSAL))
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(video(talking))
    # The customer's words, the model told a video it cannot see came.
    assert answer == f"texto: ¿lo tenéis en 42?\n\n{reply('attachment_note', 'es')}"


async def test_a_video_is_shown_when_its_sound_cannot_be_transcribed(
    harness, fake: FakeOpenAI, talking: bytes
) -> None:
    fake.transcribe_fail_next.extend([500, 500, 500, 500])  # the SDK retries
    async with harness(**ai(fake)) as h:
        [answer] = await h.say(video(talking, "¿lo tenéis?"))
    assert answer.startswith("3 foto(s): (El cliente envía un vídeo de 3 s: ves 3 fotogramas")
    assert "en orden; no oyes su sonido.)" in answer
    assert answer.endswith("¿lo tenéis?")


async def test_a_silent_video_is_not_sent_to_transcription(
    harness, fake: FakeOpenAI, three_colours: bytes
) -> None:
    async with harness(**ai(fake)) as h:
        await h.say(video(three_colours))
    assert len(fake.transcriptions) == 0


async def test_a_video_beside_a_text_pdf_keeps_its_three_frames(
    harness, fake: FakeOpenAI, three_colours: bytes
) -> None:
    """The turn's images were shared with the PDF before it was known to be text: the video got 2 frames."""
    from tests.test_documents import RECEIPT, pdf

    async with harness(**ai(fake)) as h:
        h.bot.pipeline.gather_s = 0.3
        [answer] = await h.say(video(three_colours, id="V1"), pdf(RECEIPT, id="D1"))
    assert answer.startswith("3 foto(s):") and "Importe: 45,00 EUR" in answer


async def test_a_video_that_shows_nothing_is_answered_from_its_words(
    harness, fake: FakeOpenAI, talking: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its frames could not be taken, but what was said was heard: it was "No he podido ver tu vídeo"."""
    fake.transcript = "¿lo tenéis en 42?"
    async with harness(**ai(fake)) as h:

        async def no_frames(data: bytes, count: int, duration_hint: float | None = None) -> object:
            raise VideoRejected("unreadable", "a codec this ffmpeg cannot decode")

        monkeypatch.setattr(h.bot.pipeline.media.videos, "frames", no_frames)
        [answer] = await h.say(video(talking))
        counters = h.bot.pipeline.counters
    assert answer == f"texto: ¿lo tenéis en 42?\n\n{reply('attachment_note', 'es')}"
    assert (counters.videos, counters.videos_unseen) == (0, 1)


async def test_a_person_asked_for_in_a_video_hands_the_chat_over(
    harness, fake: FakeOpenAI, talking: bytes
) -> None:
    """The same words in a voice note handed over; said in a video they went to the model."""
    fake.transcript = "Quiero hablar con una persona"
    async with harness(**ai(fake)) as h:
        sent = await h.say(video(talking, id="V1"))
        paused = h.bot.pipeline.takeover.is_paused(CHAT)
    assert sent[0] == reply("handoff", "es") and paused and fake.chat_count == 0


async def test_a_question_said_in_a_video_gets_the_flows_facts(
    harness, fake: FakeOpenAI, talking: bytes, tmp_path: Path
) -> None:
    flows = tmp_path / "flows.yaml"
    flows.write_text("- keywords: [horario]\n  answer: Abrimos de 9 a 14.\n")
    fake.transcript = "¿Qué horario tenéis mañana?"
    async with harness(**ai(fake), flows_file=flows) as h:
        await h.say(video(talking))
    assert "Abrimos de 9 a 14." in fake.chat_requests[-1]["messages"][0]["content"]


async def test_what_a_video_said_is_in_the_next_turns_history(
    harness, fake: FakeOpenAI, talking: bytes
) -> None:
    """Kept like a voice note's transcript: "¿y en 43?" after "este es el que quiero, ¿lo tenéis en 42?"."""
    fake.transcript = "Este es el que quiero, ¿lo tenéis en 42?"
    async with harness(**ai(fake)) as h:
        await h.say(video(talking, "mira", id="V1"))
        await h.say("¿y en 43?")
        [row] = [m for m in await h.bot.store.recent_messages(CHAT, 5) if m.wa_message_id == "V1"]
    assert (
        fake.chat_requests[-1]["messages"][1]["content"]
        == "(🎬) mira\nEste es el que quiero, ¿lo tenéis en 42?"
    )
    assert row.body == "mira\nEste es el que quiero, ¿lo tenéis en 42?"


async def test_a_full_disk_costs_voice_notes_and_videos_a_clear_reply_and_the_owner_a_warning(
    harness, fake: FakeOpenAI, talking: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With DATA_DIR full, a voice note and a video raised OSError out of the pipeline: a traceback at ERROR
    and the generic apology. Now the owner reads why at WARNING and the customer gets the usual replies."""
    import errno

    from loguru import logger

    from tests.test_voice_notes import note

    def disk_full(self: Path, data: bytes) -> int:
        if "tmp" in self.parts:  # the media temp files under DATA_DIR/tmp: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    original = Path.write_bytes
    voice = tmp_path / "nota.ogg"
    voice.write_bytes(talking)  # any audio will do: it never reaches ffmpeg
    said: list[tuple[str, str]] = []
    sink = logger.add(lambda m: said.append((m.record["level"].name, m.record["message"])), level="WARNING")
    try:
        async with harness(**ai(fake)) as h:
            monkeypatch.setattr(Path, "write_bytes", disk_full)
            heard = await h.say(note(voice))
            seen = await h.say(video(talking, id="V1"))
            answered = await h.say(
                video(talking, "¿lo tenéis en 42?", id="V2", chat="34600999888@s.whatsapp.net")
            )
    finally:
        logger.remove(sink)
    assert heard == [reply("ai_error", "es")]
    assert seen == [reply("video_unreadable", "es")]
    note_for_model = reply("video_unread_note", "es", why=reply("video_unreadable", "es"))
    assert answered == [f"texto: ¿lo tenéis en 42?\n\n{note_for_model}"]
    assert [level for level, _ in said if level == "ERROR"] == []
    assert any("No space left on device" in message for _, message in said)
