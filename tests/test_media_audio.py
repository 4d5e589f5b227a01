"""Voice notes end to end: real ffmpeg on audio made here, the real openai SDK against the fake server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import openai
import psutil
import pytest
from aiohttp import web

from bot.ai import LazyOpenAI
from media import compress
from media.audio import AudioRejected, AudioSettings, VoiceTranscriber
from media.probe import parse
from media.tempfiles import PREFIX
from tests.fake_openai import FakeOpenAI

TOOLS = ("ffmpeg", "ffprobe", "espeak-ng")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]

if MISSING and os.environ.get("CI"):
    # In CI a missing tool is a broken setup, not a reason to skip.
    raise RuntimeError(f"CI is set but {', '.join(MISSING)} missing: install ffmpeg and espeak-ng")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"missing {', '.join(MISSING)}")

SPANISH = (
    "Hola, buenas tardes. Quisiera saber el horario de la tienda el sábado, "
    "y si hacen envíos a domicilio en el centro. Muchas gracias."
)


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


# -- audio made by the tests ---


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def speech_wav(media_dir: Path) -> Path:
    path = media_dir / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "es", "-s", "150", "-w", str(path), SPANISH], check=True)
    return path


@pytest.fixture(scope="session")
def voice_note(media_dir: Path, speech_wav: Path) -> Path:
    """Like a WhatsApp voice note: Ogg/Opus, mono, 48 kHz, at a bitrate above ours."""
    path = media_dir / "voice_note.ogg"
    ffmpeg("-i", str(speech_wav), "-ac", "1", "-ar", "48000", "-c:a", "libopus", "-b:a", "48k", str(path))
    return path


@pytest.fixture(scope="session")
def lean_voice_note(media_dir: Path, speech_wav: Path) -> Path:
    """A note already at a low Opus bitrate: copied, not re-encoded."""
    path = media_dir / "lean_note.ogg"
    ffmpeg(
        "-i", str(speech_wav), "-ac", "1", "-c:a", "libopus", "-b:a", "16k", "-application", "voip", str(path)
    )
    return path


@pytest.fixture(scope="session")
def sine_wav(media_dir: Path) -> Path:
    path = media_dir / "sine.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=3:sample_rate=48000", "-ac", "2", str(path))
    return path


@pytest.fixture(scope="session")
def long_sine(media_dir: Path) -> Path:
    """30 s of tone: with `ffmpeg -re` transcoding it takes 30 s, time enough to cancel mid-transcode."""
    path = media_dir / "long_sine.ogg"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=30", "-c:a", "libopus", "-b:a", "64k", str(path))
    return path


@pytest.fixture(scope="session")
def silence(media_dir: Path) -> Path:
    path = media_dir / "silence.ogg"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=48000:cl=mono", "-t", "3", "-c:a", "libopus", str(path))
    return path


@pytest.fixture(scope="session")
def unknown_codec(media_dir: Path, speech_wav: Path) -> Path:
    """A WAV whose format tag names a codec nobody has: ffprobe sees an audio stream it cannot decode."""
    data = bytearray(speech_wav.read_bytes())
    tag = data.find(b"fmt ") + 8
    data[tag : tag + 2] = (0x1234).to_bytes(2, "little")
    path = media_dir / "unknown_codec.wav"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="session")
def video_only(media_dir: Path) -> Path:
    path = media_dir / "video.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=duration=1:size=64x64:rate=5", "-pix_fmt", "yuv420p", str(path))
    return path


@pytest.fixture(scope="session")
def m4a(media_dir: Path, speech_wav: Path) -> Path:
    path = media_dir / "speech.m4a"
    ffmpeg("-i", str(speech_wav), "-c:a", "aac", "-b:a", "64k", str(path))
    return path


@pytest.fixture(scope="session")
def slow_ffmpeg(media_dir: Path) -> Path:
    """ffmpeg reading its input in real time (-re): a transcode that lasts as long as the audio."""
    path = media_dir / "slow-ffmpeg"
    path.write_text(f'#!/bin/sh\nexec {shutil.which("ffmpeg")} -re "$@"\n')
    path.chmod(0o755)
    return path


# -- the fake server and the transcriber ---


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    yield server
    await server.stop()


def make_client(fake: FakeOpenAI, timeout: float = 10) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="test", base_url=fake.base_url, max_retries=0, timeout=timeout)


@pytest.fixture
def temp_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "audio-tmp"
    yield path
    # Every test leaves the temp dir empty, whatever path it took.
    leftovers = sorted(p.name for p in path.iterdir()) if path.exists() else []
    assert leftovers == []


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    c = make_client(fake)
    yield c
    await c.close()


@pytest.fixture
def make(temp_dir: Path, client: openai.AsyncOpenAI) -> Callable[..., VoiceTranscriber]:
    def factory(**overrides: object) -> VoiceTranscriber:
        c = overrides.pop("client", client)
        source = LazyOpenAI.of(c) if c is not None else None  # type: ignore[arg-type]
        return VoiceTranscriber(AudioSettings(temp_dir=temp_dir, **overrides), source)  # type: ignore[arg-type]

    return factory


def ffmpeg_children() -> list[psutil.Process]:
    procs = []
    for child in psutil.Process().children(recursive=True):
        try:
            if (
                child.name() in ("ffmpeg", "ffprobe", "slow-ffmpeg")
                and child.status() != psutil.STATUS_ZOMBIE
            ):
                procs.append(child)
        except psutil.NoSuchProcess:
            pass
    return procs


async def rejected(coro: object) -> AudioRejected:
    with pytest.raises(AudioRejected) as info:
        await coro  # type: ignore[misc]
    return info.value


# -- the happy path ---


async def test_voice_note_is_uploaded_as_smaller_ogg_opus_with_language(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, voice_note: Path
) -> None:
    transcriber = make()
    data = voice_note.read_bytes()

    text = await transcriber.transcribe(data, "audio/ogg; codecs=opus")

    assert text == fake.transcript
    [upload] = fake.transcriptions
    assert upload.filename == "voice.ogg"
    assert upload.content_type == "audio/ogg"
    assert upload.head.startswith(b"OggS")
    assert b"OpusHead" in upload.head
    assert upload.head[upload.head.index(b"OpusHead") + 9] == 1  # mono
    assert int.from_bytes(upload.head[upload.head.index(b"OpusHead") + 12 :][:4], "little") == 16000
    assert upload.size < len(data)
    assert upload.language == "es"
    assert upload.model == "whisper-1"
    stats = transcriber.stats()
    assert stats["transcribed"] == 1
    assert stats["bytes_in"] == len(data)
    assert stats["bytes_out"] == upload.size
    assert stats["bytes_saved"] == len(data) - upload.size
    assert stats["temp_files_live"] == 0


async def test_wav_file_from_disk_is_compressed(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, sine_wav: Path
) -> None:
    transcriber = make(language="en", transcribe_model="gpt-4o-mini-transcribe")

    assert await transcriber.transcribe_file(sine_wav) == fake.transcript

    [upload] = fake.transcriptions
    assert upload.head.startswith(b"OggS") and b"OpusHead" in upload.head
    assert upload.size * 10 < sine_wav.stat().st_size
    assert (upload.language, upload.model) == ("en", "gpt-4o-mini-transcribe")


async def test_low_bitrate_opus_note_is_copied_not_reencoded(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, lean_voice_note: Path
) -> None:
    transcriber = make()

    await transcriber.transcribe_file(lean_voice_note)

    [upload] = fake.transcriptions
    assert upload.head.startswith(b"OggS") and b"OpusHead" in upload.head
    assert upload.size <= lean_voice_note.stat().st_size
    assert transcriber.stats()["copied"] == 1


async def test_truncated_ogg_is_transcribed_from_what_is_left(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, voice_note: Path
) -> None:
    # Ogg is a stream of pages: a note cut in the middle still holds its first half.
    data = voice_note.read_bytes()
    assert await make().transcribe(data[: len(data) // 2]) == fake.transcript


async def test_concurrent_notes(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, voice_note: Path
) -> None:
    transcriber = make(max_concurrent=2)
    data = voice_note.read_bytes()

    texts = await asyncio.gather(*(transcriber.transcribe(data) for _ in range(4)))

    assert texts == [fake.transcript] * 4
    assert transcriber.stats()["transcribed"] == 4


# -- limits ---


def test_declared_size(make: Callable[..., VoiceTranscriber]) -> None:
    transcriber = make(max_mb=1)
    transcriber.check_declared_size(None)
    transcriber.check_declared_size(0)  # unset in the message: unknown, not empty
    transcriber.check_declared_size(1024 * 1024)
    with pytest.raises(AudioRejected) as info:
        transcriber.check_declared_size(1024 * 1024 + 1)
    assert (info.value.reason, info.value.limit) == ("too_large", 1)
    assert transcriber.stats()["rejected"]["too_large"] == 1


async def test_oversize_bytes_rejected_before_any_subprocess(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, voice_note: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(asyncio, "create_subprocess_exec", None)  # any subprocess would fail the test
    transcriber = make(max_mb=0.005)

    exc = await rejected(transcriber.transcribe(voice_note.read_bytes()))

    assert (exc.reason, exc.limit) == ("too_large", 0.005)
    assert "MB" in str(exc)
    assert fake.transcriptions == []


async def test_oversize_file_rejected_before_reading_it(
    make: Callable[..., VoiceTranscriber], sine_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was read")

    monkeypatch.setattr(Path, "read_bytes", no_reading)
    monkeypatch.setattr(Path, "open", no_reading)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", no_reading)

    exc = await rejected(make(max_mb=0.05).transcribe_file(sine_wav))

    assert (exc.reason, exc.limit) == ("too_large", 0.05)


async def test_too_long_rejected_from_headers_before_decoding(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, sine_wav: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_transcode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded before the duration check")

    monkeypatch.setattr("media.audio.to_opus", no_transcode)
    transcriber = make(max_duration_s=2)

    exc = await rejected(transcriber.transcribe(sine_wav.read_bytes(), "audio/wav"))

    assert exc.reason == "too_long"
    assert exc.limit == pytest.approx(2 / 60)
    assert fake.transcriptions == []
    assert transcriber.stats()["rejected"]["too_long"] == 1


# -- bad input ---


async def test_empty_bytes_and_empty_file(make: Callable[..., VoiceTranscriber], tmp_path: Path) -> None:
    transcriber = make()
    assert (await rejected(transcriber.transcribe(b""))).reason == "empty"
    empty = tmp_path / "empty.ogg"
    empty.touch()
    assert (await rejected(transcriber.transcribe_file(empty))).reason == "empty"
    assert transcriber.stats()["rejected"]["empty"] == 2


async def test_missing_file_and_directory(make: Callable[..., VoiceTranscriber], tmp_path: Path) -> None:
    transcriber = make()
    assert (await rejected(transcriber.transcribe_file(tmp_path / "nope.ogg"))).reason == "corrupt"
    assert (await rejected(transcriber.transcribe_file(tmp_path))).reason == "corrupt"


async def test_random_bytes_are_corrupt(make: Callable[..., VoiceTranscriber], fake: FakeOpenAI) -> None:
    exc = await rejected(make().transcribe(os.urandom(20_000)))
    assert exc.reason == "corrupt"
    assert fake.transcriptions == []


@pytest.mark.parametrize("keep", [0.01, 0.5])
async def test_truncated_m4a_is_corrupt(
    make: Callable[..., VoiceTranscriber], m4a: Path, keep: float
) -> None:
    # MP4 keeps its index (moov) at the end: a cut file cannot be read at all.
    data = m4a.read_bytes()
    exc = await rejected(make().transcribe(data[: int(len(data) * keep)], "audio/mp4"))
    assert exc.reason == "corrupt"


async def test_ogg_header_only_is_corrupt(make: Callable[..., VoiceTranscriber], voice_note: Path) -> None:
    exc = await rejected(make().transcribe(voice_note.read_bytes()[:200]))
    assert exc.reason == "corrupt"


async def test_unknown_codec_is_unsupported(
    make: Callable[..., VoiceTranscriber], unknown_codec: Path
) -> None:
    exc = await rejected(make().transcribe_file(unknown_codec))
    assert exc.reason == "unsupported"


async def test_video_without_audio_is_corrupt(
    make: Callable[..., VoiceTranscriber], video_only: Path
) -> None:
    exc = await rejected(make().transcribe_file(video_only))
    assert exc.reason == "corrupt"
    assert "no audio stream" in str(exc)


async def test_silence_is_empty_and_not_uploaded(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, silence: Path
) -> None:
    # Whisper invents text for silence (in Spanish, famously subtitle credits): do not send it.
    exc = await rejected(make().transcribe_file(silence))
    assert exc.reason == "empty"
    assert "silence" in str(exc)
    assert fake.transcriptions == []


async def test_empty_transcript_is_empty(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, voice_note: Path
) -> None:
    fake.transcript = "   "
    exc = await rejected(make().transcribe_file(voice_note))
    assert exc.reason == "empty"


async def test_no_client_is_ai_off(make: Callable[..., VoiceTranscriber], voice_note: Path) -> None:
    transcriber = make(client=None)
    assert not transcriber.enabled
    exc = await rejected(transcriber.transcribe(voice_note.read_bytes()))
    assert exc.reason == "ai_off"
    assert transcriber.stats()["rejected"]["ai_off"] == 1


async def test_missing_ffmpeg(make: Callable[..., VoiceTranscriber], voice_note: Path) -> None:
    exc = await rejected(make(ffprobe="/nonexistent/ffprobe").transcribe_file(voice_note))
    assert exc.reason == "transcription_failed"
    assert "not installed" in str(exc)


# -- the API failing ---


class OggRefusingServer(FakeOpenAI):
    """An OpenAI-compatible server that takes only WAV/MP3 (like a whisper.cpp server without ffmpeg)."""

    async def _transcribe(self, request: web.Request) -> web.Response:
        response = await super()._transcribe(request)
        if self.transcriptions[-1].filename.endswith(".ogg"):
            message = "Invalid file format. Supported formats: ['wav', 'mp3']"
            body = {"error": {"message": message, "type": "invalid_request_error"}}
            return web.json_response(body, status=400)
        return response


async def test_format_refused_falls_back_once_to_wav(temp_dir: Path, voice_note: Path) -> None:
    server = await OggRefusingServer().start()
    try:
        async with make_client(server) as client:
            transcriber = VoiceTranscriber(AudioSettings(temp_dir=temp_dir), LazyOpenAI.of(client))
            text = await transcriber.transcribe_file(voice_note)
    finally:
        await server.stop()

    assert text == server.transcript
    first, second = server.transcriptions
    assert first.filename == "voice.ogg"
    assert (second.filename, second.content_type) == ("voice.wav", "audio/wav")
    assert second.head.startswith(b"RIFF") and second.head[8:12] == b"WAVE"
    assert second.language == "es"
    assert transcriber.stats()["fallbacks"] == 1


async def test_fallback_happens_only_once(temp_dir: Path, voice_note: Path) -> None:
    class RefusesAll(FakeOpenAI):
        async def _transcribe(self, request: web.Request) -> web.Response:
            await super()._transcribe(request)
            body = {"error": {"message": "Audio file might be corrupted or unsupported"}}
            return web.json_response(body, status=400)

    server = await RefusesAll().start()
    try:
        async with make_client(server) as client:
            transcriber = VoiceTranscriber(AudioSettings(temp_dir=temp_dir), LazyOpenAI.of(client))
            exc = await rejected(transcriber.transcribe_file(voice_note))
    finally:
        await server.stop()
    assert exc.reason == "transcription_failed"
    assert len(server.transcriptions) == 2


@pytest.mark.parametrize("status", [400, 401, 429, 500])
async def test_other_api_errors_fail_without_fallback(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, voice_note: Path, status: int
) -> None:
    fake.transcribe_fail_next.append(status)  # "fake failure 400": not about the format
    transcriber = make()

    exc = await rejected(transcriber.transcribe_file(voice_note))

    assert exc.reason == "transcription_failed"
    assert str(status) in str(exc)
    assert len(fake.transcriptions) == 1
    assert transcriber.stats()["rejected"]["transcription_failed"] == 1


async def test_api_timeout(temp_dir: Path, fake: FakeOpenAI, voice_note: Path) -> None:
    fake.delay_s = 1
    async with make_client(fake, timeout=0.3) as client:
        transcriber = VoiceTranscriber(AudioSettings(temp_dir=temp_dir), LazyOpenAI.of(client))
        exc = await rejected(transcriber.transcribe_file(voice_note))
    assert exc.reason == "timeout"
    assert transcriber.stats()["rejected"]["timeout"] == 1


async def test_unreachable_server(temp_dir: Path, voice_note: Path) -> None:
    async with openai.AsyncOpenAI(api_key="test", base_url="http://127.0.0.1:9/v1", max_retries=0) as client:
        transcriber = VoiceTranscriber(AudioSettings(temp_dir=temp_dir), LazyOpenAI.of(client))
        exc = await rejected(transcriber.transcribe_file(voice_note))
    assert exc.reason == "transcription_failed"


# -- timeouts, cancellation, temp files ---


async def wait_for_ffmpeg() -> None:
    deadline = time.monotonic() + 10
    while not any(p.name() in ("ffmpeg", "slow-ffmpeg") for p in ffmpeg_children()):
        assert time.monotonic() < deadline, "ffmpeg never started"
        await asyncio.sleep(0.02)


async def assert_no_ffmpeg_left() -> None:
    deadline = time.monotonic() + 2
    while ffmpeg_children():
        assert time.monotonic() < deadline, "ffmpeg left running"
        await asyncio.sleep(0.02)


async def test_whole_job_timeout_kills_ffmpeg(
    make: Callable[..., VoiceTranscriber],
    fake: FakeOpenAI,
    long_sine: Path,
    slow_ffmpeg: Path,
    temp_dir: Path,
) -> None:
    transcriber = make(timeout_s=1, ffmpeg=str(slow_ffmpeg))
    started = time.monotonic()

    exc = await rejected(transcriber.transcribe(long_sine.read_bytes()))

    assert exc.reason == "timeout"
    assert time.monotonic() - started < 5
    assert fake.transcriptions == []
    await assert_no_ffmpeg_left()
    assert transcriber.stats()["temp_files_live"] == 0


async def test_cancel_mid_transcode_removes_temp_files_and_kills_ffmpeg(
    make: Callable[..., VoiceTranscriber], long_sine: Path, slow_ffmpeg: Path, temp_dir: Path
) -> None:
    transcriber = make(ffmpeg=str(slow_ffmpeg))
    task = asyncio.create_task(transcriber.transcribe(long_sine.read_bytes()))
    await wait_for_ffmpeg()
    deadline = time.monotonic() + 10
    while len(list(temp_dir.iterdir())) < 2:  # the input, and the output ffmpeg is writing
        assert time.monotonic() < deadline, "ffmpeg never opened its output"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # well into the transcode

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert list(temp_dir.iterdir()) == []
    await assert_no_ffmpeg_left()
    assert transcriber.stats()["temp_files_live"] == 0


async def test_cancel_during_upload_removes_temp_files(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, voice_note: Path, temp_dir: Path
) -> None:
    fake.delay_s = 2  # the server's teardown waits for this handler
    transcriber = make()
    task = asyncio.create_task(transcriber.transcribe(voice_note.read_bytes()))
    deadline = time.monotonic() + 10
    while not fake.transcriptions:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert list(temp_dir.iterdir()) == []


async def test_temp_files_removed_after_errors(
    make: Callable[..., VoiceTranscriber], fake: FakeOpenAI, voice_note: Path, temp_dir: Path
) -> None:
    transcriber = make()
    fake.transcribe_fail_next.append(500)
    await rejected(transcriber.transcribe(voice_note.read_bytes()))
    await rejected(transcriber.transcribe(os.urandom(5000)))
    assert list(temp_dir.iterdir()) == []


def test_sweep_removes_only_old_leftovers(make: Callable[..., VoiceTranscriber], temp_dir: Path) -> None:
    transcriber = make()
    temp_dir.mkdir(parents=True)
    old = temp_dir / f"{PREFIX}crashed.ogg"
    old.write_bytes(b"x" * 1000)
    hour_ago = time.time() - 3700
    os.utime(old, (hour_ago, hour_ago))
    fresh = temp_dir / f"{PREFIX}in-flight.ogg"
    fresh.write_bytes(b"y" * 10)
    foreign = temp_dir / "not-ours.txt"
    foreign.write_bytes(b"z")
    os.utime(foreign, (hour_ago, hour_ago))

    assert transcriber.sweep() == 1
    assert not old.exists() and fresh.exists() and foreign.exists()
    assert transcriber.sweep(older_than_s=0) == 1
    stats = transcriber.stats()
    assert (stats["temp_sweeps"], stats["temp_removed"], stats["temp_bytes_removed"]) == (2, 2, 1010)
    foreign.unlink()


def test_sweep_without_temp_dir(make: Callable[..., VoiceTranscriber]) -> None:
    assert make().sweep() == 0


# -- small units ---


def test_settings_validation(tmp_path: Path) -> None:
    for bad in (
        {"max_mb": 0},
        {"max_duration_s": -1},
        {"bitrate": "24000"},
        {"timeout_s": 0},
        {"max_concurrent": 0},
    ):
        with pytest.raises(ValueError):
            AudioSettings(temp_dir=tmp_path, **bad)
    assert AudioSettings(temp_dir=tmp_path, bitrate="16k").bitrate_bps == 16000


def test_rejection_reason_is_checked() -> None:
    with pytest.raises(ValueError):
        AudioRejected("nope")  # type: ignore[arg-type]
    exc = AudioRejected("too_large", "30.00 MB over 25 MB", limit=25)
    assert str(exc) == "too_large: 30.00 MB over 25 MB"


def test_probe_parse_takes_longest_duration_and_handles_missing_fields() -> None:
    found = parse(
        {
            "format": {"format_name": "ogg", "duration": "N/A", "bit_rate": "24000"},
            "streams": [
                {"codec_type": "video", "codec_name": "png"},
                {"codec_type": "audio", "codec_name": "opus", "channels": 1, "duration": "12.5"},
            ],
        }
    )
    assert (found.duration_s, found.codec, found.channels, found.bit_rate) == (12.5, "opus", 1, 24000)
    assert parse({}).duration_s is None and not parse({}).has_audio


def test_opus_command_is_libopus_mono_16k() -> None:
    argv = compress.opus_argv(
        Path("in"), Path("out.ogg"), ffmpeg="ffmpeg", bitrate="24k", max_duration_s=600, copy=False
    )
    joined = " ".join(argv)
    assert "-c:a libopus" in joined and "-ac 1" in joined and "-ar 16000" in joined and "-f ogg" in joined
    assert "-t 601" in joined
