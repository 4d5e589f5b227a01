"""Voice notes end to end: real ffmpeg and espeak-ng audio, the real SDK against the fake server,
through the pipeline and through `python -m bot chat --jsonl`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from loguru import logger

from bot.replies import reply
from connection.types import MediaRef, MessageKind
from memory.store import Direction, MessageStatus
from tests.conftest import inbound
from tests.fake_openai import FakeOpenAI
from tests.test_console import run_chat

MISSING = [tool for tool in ("ffmpeg", "ffprobe", "espeak-ng") if shutil.which(tool) is None]
if MISSING and os.environ.get("CI"):
    raise RuntimeError(f"CI is set but {', '.join(MISSING)} missing: scripts/setup --dev installs them")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"missing {', '.join(MISSING)}")

CHAT = "34600111222@s.whatsapp.net"


@pytest.fixture(scope="module")
def voice_note(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("voice")
    wav, ogg = folder / "speech.wav", folder / "note.ogg"
    subprocess.run(
        ["espeak-ng", "-v", "es", "-w", str(wav), "Hola, ¿a qué hora abren el sábado?"], check=True
    )
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-v",
            "error",
            "-i",
            str(wav),
            "-ac",
            "1",
            "-c:a",
            "libopus",
            "-b:a",
            "32k",
            str(ogg),
        ],
        check=True,
    )
    return ogg


def note(path: Path, **media: object) -> object:
    ref = MediaRef(mimetype="audio/ogg; codecs=opus", voice_note=True, handle=path.read_bytes(), **media)  # type: ignore[arg-type]
    return inbound("", kind=MessageKind.AUDIO, media=ref)


async def test_a_voice_note_is_transcribed_answered_and_stored(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    fake_openai.transcript = "¿A qué hora abren el sábado?"
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        assert await h.say(note(voice_note)) == ["echo: ¿A qué hora abren el sábado?"]
        [row, _] = await h.bot.store.recent_messages(CHAT, 5)
        leftovers = list((h.settings.data_dir / "tmp" / "audio").iterdir())
    [upload] = fake_openai.transcriptions
    assert upload.filename.endswith(".ogg") and upload.head.startswith(b"OggS") and upload.language == "es"
    assert (
        row.direction is Direction.IN and row.kind == "audio" and row.body == "¿A qué hora abren el sábado?"
    )
    assert leftovers == []


@pytest.mark.parametrize(
    ("settings", "sent"),
    [
        ({"bot_language": "en"}, "en"),
        ({"transcribe_language": "auto"}, None),
        ({"transcribe_language": " PT "}, "pt"),
    ],
    ids=["bot-language", "auto", "set"],
)
async def test_the_transcription_language_hint_can_be_left_to_the_model(
    harness, fake_openai: FakeOpenAI, voice_note: Path, settings: dict[str, str], sent: str | None
) -> None:
    """The hint was always BOT_LANGUAGE: a tourist's English note came out translated into Spanish."""
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url, **settings) as h:
        await h.say(note(voice_note))
    assert [upload.language for upload in fake_openai.transcriptions] == [sent]


async def test_a_voice_note_waits_while_memory_is_critical(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    fake_openai.transcript = "¿Abren el sábado?"
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        h.bot.pipeline.model_gate.clear()  # what the memory manager does at critical
        h.bot.pipeline.submit(note(voice_note))  # type: ignore[arg-type]
        assert not await h.bot.pipeline.drain(2)  # ample time to convert and upload, were it not held
        assert fake_openai.transcriptions == [] and h.transport.texts_to(CHAT) == []
        h.bot.pipeline.model_gate.set()
        assert await h.bot.pipeline.drain(10)
        assert h.transport.texts_to(CHAT) == ["echo: ¿Abren el sábado?"]
    assert len(fake_openai.transcriptions) == 1


async def test_an_oversize_note_gets_the_limit_and_nothing_else(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url, audio_max_mb=1) as h:
        [answer] = await h.say(note(voice_note, size_bytes=5 * 1024 * 1024))
    assert "1 MB" in answer
    assert fake_openai.transcriptions == [] and fake_openai.chat_requests == []


async def test_corrupt_audio_gets_a_clear_reply_and_the_chat_keeps_working(
    harness, fake_openai: FakeOpenAI
) -> None:
    garbage = inbound(
        "", kind=MessageKind.AUDIO, media=MediaRef(mimetype="audio/ogg", handle=os.urandom(20000))
    )
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        [answer] = await h.say(garbage)
        assert "No he podido escuchar" in answer
        assert await h.say("hola") == ["echo: hola"]


async def test_a_transcription_failure_gets_an_apology_and_the_owner_a_warning(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    """The customer got the apology, and the operator nothing above DEBUG: a wrong transcription model or
    an outage went unnoticed."""
    said: list[str] = []
    sink = logger.add(lambda m: said.append(m.record["message"]), level="WARNING")
    try:
        fake_openai.transcribe_fail_next.extend([500] * 4)  # two notes, each tried twice (the SDK's retry)
        async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
            answers = await h.say(note(voice_note), note(voice_note))
    finally:
        logger.remove(sink)
    assert len(answers) == 2 and all("Lo siento" in answer for answer in answers)
    about_notes = [line for line in said if "voice notes are not transcribed" in line]
    assert len(about_notes) == 1  # once a minute at most, not once per note


async def test_a_server_without_speech_to_text_asks_for_text_and_tells_the_owner(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    """Ollama has no transcription endpoint (HTTP 404): customers got "try again in a few minutes", for
    ever, instead of being asked to type."""
    said: list[str] = []
    sink = logger.add(lambda m: said.append(m.record["message"]), level="WARNING")
    try:
        fake_openai.transcribe_fail_next.append(404)
        async with harness(openai_base_url=fake_openai.base_url) as h:  # a local server: no key
            [answer] = await h.say(note(voice_note))
    finally:
        logger.remove(sink)
    assert answer == reply("audio_ai_off", "es")
    assert any("voice notes are not transcribed" in line and "404" in line for line in said)


async def test_console_jsonl_accepts_audio(tmp_path: Path, fake_openai: FakeOpenAI, voice_note: Path) -> None:
    fake_openai.transcript = "quiero reservar una mesa"
    line = json.dumps({"from": "34600111222", "audio": str(voice_note)})
    code, out, err = await run_chat(
        tmp_path, line + "\n", "--jsonl", OPENAI_API_KEY="k", OPENAI_BASE_URL=fake_openai.base_url
    )
    assert code == 0, err
    assert json.loads(out) == {"to": "34600111222", "text": "echo: quiero reservar una mesa"}


def tone(path: Path, seconds: float) -> Path:
    """A 440 Hz tone of that length, in the format the file name says (.ogg: Opus)."""
    codec = ["-c:a", "libopus"] if path.suffix == ".ogg" else []
    sine = f"sine=frequency=440:duration={seconds:g}"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", sine, *codec, str(path)], check=True
    )
    return path


async def test_console_jsonl_too_long_note(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    line = json.dumps({"from": "34600111222", "audio": str(tone(tmp_path / "tone.ogg", 90))})
    code, out, _ = await run_chat(
        tmp_path,
        line + "\n",
        "--jsonl",
        OPENAI_API_KEY="k",
        OPENAI_BASE_URL=fake_openai.base_url,
        AUDIO_MAX_MINUTES="1",
        BOT_LANGUAGE="en",
    )
    assert code == 0
    assert "too long (the limit is 1 minute)" in json.loads(out)["text"]
    assert fake_openai.transcriptions == []


async def test_missing_ffmpeg_is_said_at_start_not_only_to_customers(
    harness, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from loguru import logger

    monkeypatch.setenv("PATH", str(tmp_path))  # no ffmpeg, no ffprobe
    said: list[str] = []
    sink = logger.add(lambda m: said.append(m.record["message"]), level="WARNING")
    try:
        async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url):
            pass
    finally:
        logger.remove(sink)
    assert any(line.startswith("ffmpeg not found") for line in said)


async def test_a_voice_note_taken_back_from_the_store_is_answered(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    """Recovery at start and the read-back of waiting messages hand it over already saved; it was
    awaited twice as a coroutine ("cannot reuse already awaited coroutine") and never answered."""
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        message = note(voice_note)
        await h.bot.store.add_message(h.bot.pipeline._inbound_row(message))
        h.bot.pipeline.resume(message)
        assert await h.bot.pipeline.drain(10)
        assert h.transport.texts_to(message.chat) == [f"echo: {fake_openai.transcript}"]


@pytest.mark.parametrize("greeted", [True, False], ids=["history-in-memory", "note-opens-the-chat"])
async def test_the_chats_next_message_sees_what_the_voice_note_said(
    harness, fake_openai: FakeOpenAI, voice_note: Path, greeted: bool
) -> None:
    """The history in memory kept the note's row as it came in, empty: the model answering "¿Y cuándo
    llegará?" never heard "my order is 123", although the store had the transcript (and a restart, which
    reads the store, gave another context)."""
    fake_openai.transcript = "Mi pedido es el 123 y llega tarde"
    heard = ["Mi pedido es el 123 y llega tarde", "echo: Mi pedido es el 123 y llega tarde"]
    greeting = ["hola", "echo: hola"] if greeted else []
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        if greeted:  # the chat's history is in memory when the note comes
            await h.say("hola")
        await h.say(note(voice_note))
        await h.say("¿Y cuándo llegará?")
        in_memory = h.bot.history.stats()["chars"]
    context = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
    assert context == [*greeting, *heard, "¿Y cuándo llegará?"]
    turns = [*greeting, *heard, "¿Y cuándo llegará?", "echo: ¿Y cuándo llegará?"]
    assert in_memory == sum(map(len, turns))  # the history's size counts the transcript, not the empty row
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        await h.say("¿Y cuándo llegará?")  # after a restart: the same context, read from the store
    context = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
    assert context == [*turns[-5:], "¿Y cuándo llegará?"]


@pytest.fixture(scope="module")
def video_note(tmp_path_factory: pytest.TempPathFactory, voice_note: Path) -> Path:
    """A round video note as WhatsApp sends one: an MP4, H.264-like video with the customer talking (AAC)."""
    mp4 = tmp_path_factory.mktemp("ptv") / "note.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=240x240:d=3",
         "-i", str(voice_note), "-shortest", "-c:v", "mpeg4", "-c:a", "aac", "-y", str(mp4)],
        check=True,
    )  # fmt: skip
    return mp4


async def test_a_video_note_is_heard_like_a_voice_note(
    harness, fake_openai: FakeOpenAI, video_note: Path
) -> None:
    """A round video note of the customer talking got "I can only read text, photos and voice notes": it
    is a voice note with a picture, and what they say is transcribed and answered."""
    fake_openai.transcript = "¿Tenéis cita para mañana?"
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        ref = MediaRef(mimetype="video/mp4", voice_note=True, handle=video_note.read_bytes())
        assert await h.say(inbound("", kind=MessageKind.AUDIO, media=ref)) == [
            "echo: ¿Tenéis cita para mañana?"
        ]
    [upload] = fake_openai.transcriptions
    assert upload.head.startswith(b"OggS")  # the audio track alone, as Opus


# -- voice notes in a row ------------------------------------------------------------------------------------


def unreadable_note() -> object:
    return inbound("", kind=MessageKind.AUDIO, media=MediaRef(mimetype="audio/ogg", handle=os.urandom(2000)))


def gathering(h: object, seconds: float = 0.3) -> None:
    h.bot.pipeline.gather_s = seconds  # type: ignore[attr-defined]  # as WA_GATHER_S sets it on WhatsApp


async def test_voice_notes_in_a_row_get_one_answer(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    """Customers split what they say over several voice notes as over several texts: each got an answer of
    its own, the first one to half a question."""
    fake_openai.transcripts.extend(["Hola, quería saber una cosa", "¿Abrís el sábado por la tarde?"])
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        gathering(h)
        sent = await h.say(note(voice_note), note(voice_note))
        rows = [m for m in await h.bot.store.recent_messages(CHAT, 5) if m.direction is Direction.IN]
        counters = h.bot.pipeline.counters
    assert sent == ["echo: Hola, quería saber una cosa\n¿Abrís el sábado por la tarde?"]
    # Each is stored with what it said, and both are answered by that one reply.
    assert sorted(row.body for row in rows) == [
        "Hola, quería saber una cosa",
        "¿Abrís el sábado por la tarde?",
    ]
    assert {row.status for row in rows} == {MessageStatus.ANSWERED}
    assert (counters.transcribed, counters.merged) == (2, 1)


async def test_words_and_a_voice_note_are_one_turn(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    fake_openai.transcript = "¿a qué hora abren el sábado?"
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        gathering(h)
        assert await h.say("hola", note(voice_note), "gracias") == [
            "echo: hola\n¿a qué hora abren el sábado?\ngracias"
        ]


async def test_a_voice_note_not_heard_in_a_row_is_said_and_the_rest_answered(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    garbage = unreadable_note()
    fake_openai.transcript = "¿abren el sábado?"
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        gathering(h)
        [answer] = await h.say(note(voice_note), garbage)
    why = reply("audio_unreadable", "es")  # what it would have got alone: relayed
    assert answer == f"echo: ¿abren el sábado?\n\n{reply('voice_note_unheard_note', 'es', why=why)}"


async def test_voice_notes_in_a_row_none_heard_get_the_voice_note_reply(
    harness, fake_openai: FakeOpenAI
) -> None:
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        gathering(h)
        assert await h.say(unreadable_note(), unreadable_note()) == [reply("audio_unreadable", "es")]
    assert fake_openai.chat_count == 0


async def test_a_request_for_a_person_over_a_voice_note_and_a_text_hands_over(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    fake_openai.transcript = "quiero hablar"
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        gathering(h)
        sent = await h.say(note(voice_note), "con una persona")
    assert sent[0] == reply("handoff", "es")


async def test_a_video_and_the_voice_note_explaining_it_are_one_turn(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    from tests.test_photos import describes, jpeg, photo

    fake_openai.reply = describes
    fake_openai.transcript = "¿esto tiene arreglo?"
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        gathering(h)
        sent = await h.say(photo(jpeg()), note(voice_note))
    assert sent == ["1 foto(s): ¿esto tiene arreglo?"]


async def test_a_photo_with_a_voice_note_not_heard_is_still_shown(harness, fake_openai: FakeOpenAI) -> None:
    """The broken part's photo and a voice note that fails: the customer got only "No he podido escuchar",
    and the photo was never looked at."""
    from tests.test_photos import describes, jpeg, photo

    fake_openai.reply = describes
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        gathering(h)
        [first] = await h.say(photo(jpeg(), id="P1"), unreadable_note())
        [second] = await h.say(unreadable_note(), photo(jpeg(), id="P2"))
    for answer in (first, second):
        assert answer.startswith(
            "1 foto(s): (El cliente envió además una nota de voz que no has podido escuchar"
        )
        assert "No he podido escuchar tu nota de voz" in answer  # the reply it would have had, to relay


async def test_a_receipt_with_a_voice_note_not_heard_is_read(harness, fake_openai: FakeOpenAI) -> None:
    from tests.pdfs import text_pdf
    from tests.test_documents import pdf

    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        gathering(h)
        [answer] = await h.say(
            pdf(text_pdf(["Transferencia de 50,00 EUR a Zapatería Ñandú"])), unreadable_note()
        )
    assert "Transferencia de 50,00 EUR" in answer and "nota de voz" in answer


async def test_long_voice_notes_in_a_row_are_not_cut(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    """Each within MAX_INBOUND_CHARS, together over it: the last one's words were cut off, and the model told
    the customer's message was too long."""
    fake_openai.transcripts.extend(["Primero: " + "a" * 70, "Segundo: ¿abrís el sábado?"])
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url, max_inbound_chars=100) as h:
        gathering(h)
        [answer] = await h.say(note(voice_note), note(voice_note))
    assert answer.endswith("Segundo: ¿abrís el sábado?")


async def test_the_limit_of_a_voice_note_in_a_row_reaches_the_customer(
    harness, fake_openai: FakeOpenAI, voice_note: Path
) -> None:
    """Alone, a voice note over AUDIO_MAX_MB gets the limit; after a "hola" the customer never heard of it."""
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url, audio_max_mb=1) as h:
        gathering(h)
        [answer] = await h.say("hola", note(voice_note, size_bytes=5 * 1024 * 1024))
    assert answer.startswith("echo: hola\n\n(El cliente envió además una nota de voz")
    assert reply("audio_too_large", "es", limit=1) in answer


async def test_a_voice_note_without_its_download_handle_is_answered_alone(
    harness, fake_openai: FakeOpenAI
) -> None:
    """After a restart a voice note cannot be downloaded: it is asked for again, on its own."""
    async with harness(openai_api_key="k", openai_base_url=fake_openai.base_url) as h:
        gathering(h)
        sent = await h.say("hola", inbound("", kind=MessageKind.AUDIO, media=None))
    assert sent == ["echo: hola", reply("audio_unreadable", "es")]
