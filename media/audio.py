"""Voice notes to text: limits, compression to Ogg/Opus, transcription, temp-file hygiene.

The bot pipeline uses one VoiceTranscriber:

    transcriber = VoiceTranscriber(AudioSettings(max_mb=..., temp_dir=data_dir / "tmp" / "audio"), client)
    transcriber.sweep()                          # at start (and periodically)
    transcriber.check_declared_size(size)        # before downloading, when the size is known
    text = await transcriber.transcribe(data, mimetype)   # or transcribe_file(path)
    # AudioRejected: e.reason picks the reply, e.limit fills it in; str(e) is log-safe

Order of work, cheapest first: AI configured? -> bytes present and under max_mb -> ffprobe (headers only) for
streams, codec and duration -> ffmpeg to mono 16 kHz Opus (measuring the level in the same pass) -> upload.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from loguru import logger

from media.compress import FallbackFormat, can_copy, to_fallback, to_opus
from media.errors import REASONS, AudioRejected, Reason
from media.probe import probe
from media.settings import MB, AudioSettings
from media.tempfiles import TempDir, TempScope

if TYPE_CHECKING:
    import openai


class OpenAISource(Protocol):
    """Hands out the OpenAI client when it is needed (bot.ai.LazyOpenAI imports the SDK at first use)."""

    async def get(self) -> openai.AsyncOpenAI: ...


__all__ = ["AudioRejected", "AudioSettings", "Reason", "VoiceTranscriber"]

# What a server says when it does not take the container/codec we sent ("Invalid file format. Supported
# formats: ...", "Audio file might be corrupted or unsupported").
_FORMAT_REFUSED = re.compile(r"format|file|decod|corrupt|unsupported|unrecognized", re.IGNORECASE)
_SUFFIXES = {
    "ogg": ".ogg", "opus": ".ogg", "mpeg": ".mp3", "mp3": ".mp3", "mp4": ".m4a", "m4a": ".m4a", "aac": ".aac",
    "amr": ".amr", "wav": ".wav", "x-wav": ".wav", "webm": ".webm", "flac": ".flac", "3gpp": ".3gp",
}  # fmt: skip
_MIN_DURATION_S = 0.1  # the API refuses shorter audio
_WAV_BYTES_PER_S = 16000 * 2  # 16 kHz mono s16
_WAV_MAX_S = 600  # 19 MB: longer fallbacks go as MP3 to stay under the 25 MB upload limit


def _suffix(mimetype: str) -> str:
    subtype = mimetype.split(";", 1)[0].strip().lower().rpartition("/")[2]
    return _SUFFIXES.get(subtype, ".bin")


def _read_small(path: Path) -> bytes:
    # Sync on purpose: what we upload is small (24 kbit/s Opus, or a fallback under the upload limit), and a
    # thread still reading after a cancellation would outlive the temp scope.
    return path.read_bytes()


def _stat_file(path: Path) -> int:
    """Size of a regular file, without reading it; AudioRejected('corrupt') when it is not one."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise AudioRejected("corrupt", f"cannot read audio file: {exc.strerror}") from None
    if not path.is_file():
        raise AudioRejected("corrupt", "not a regular file")
    return stat.st_size


def _api_message(exc: openai.APIError) -> str:
    body = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else exc.message


# A server's error text may quote the credentials it refused ("Incorrect API key provided: sk-...").
_CREDENTIAL = re.compile(r"(?i)\b(?:bearer\s+\S+|sk-[\w-]+|key[=:]\s*\S+)")


def _api_detail(exc: openai.APIError, prefix: str) -> str:
    """For logs: the status, the error code, a short message with anything like a key cut out."""
    code = getattr(exc, "code", None)
    message = _CREDENTIAL.sub("[redacted]", _api_message(exc))[:120]
    return f"{prefix}{f' {code}' if code else ''}: {message}"


class VoiceTranscriber:
    """Turns voice notes into text, or raises AudioRejected with a reason; keeps counters for /v1/metrics."""

    def __init__(self, settings: AudioSettings, client: OpenAISource | None) -> None:
        self._s = settings
        self._client = client
        self._temp = TempDir(settings.temp_dir)
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._transcribed = 0
        self._rejected: dict[Reason, int] = dict.fromkeys(REASONS, 0)
        self._bytes_in = 0
        self._bytes_out = 0
        self._fallbacks = 0
        self._copied = 0

    @property
    def enabled(self) -> bool:
        """False without an OpenAI client: every voice note is rejected with 'ai_off'."""
        return self._client is not None

    # -- public API ---------------------------------------------------------------------------------------

    def check_declared_size(self, size_bytes: int | None) -> None:
        """Refuse before downloading when the message states its size.

        None or 0 mean unknown (a protobuf leaves an unset length at 0): the size is checked after download.
        """
        if not size_bytes or size_bytes < 0:
            return
        try:
            self._check_size(size_bytes)
        except AudioRejected as exc:
            self._count(exc)
            raise

    async def transcribe(self, data: bytes, mimetype: str = "audio/ogg") -> str:
        """Transcribe a downloaded voice note; raises AudioRejected."""
        return await self._guard(lambda: self._transcribe_bytes(data, mimetype))

    async def transcribe_file(self, path: Path) -> str:
        """Transcribe an audio file on disk (console transport); its size is checked before reading it."""
        return await self._guard(lambda: self._transcribe_path(Path(path)))

    def stats(self) -> dict[str, Any]:
        """Counters for /v1/metrics (no message content)."""
        return {
            "transcribed": self._transcribed,
            "rejected": dict(self._rejected),
            "bytes_in": self._bytes_in,
            "bytes_out": self._bytes_out,
            "bytes_saved": self._bytes_in - self._bytes_out,
            "fallbacks": self._fallbacks,
            "copied": self._copied,
            "temp_files_live": len(self._temp.live),
            "temp_sweeps": self._temp.sweeps,
            "temp_removed": self._temp.removed,
            "temp_bytes_removed": self._temp.bytes_removed,
        }

    def sweep(self, older_than_s: float = 3600) -> int:
        """Remove leftovers (of a crash) older than `older_than_s` from the temp dir; returns how many."""
        return self._temp.sweep(older_than_s)

    # -- the path -----------------------------------------------------------------------------------------

    async def _guard(self, job: Callable[[], Awaitable[str]]) -> str:
        try:
            async with asyncio.timeout(self._s.timeout_s):
                return await job()
        except TimeoutError:
            exc = AudioRejected("timeout", f"voice note took over {self._s.timeout_s:g}s")
            self._count(exc)
            raise exc from None
        except AudioRejected as exc:
            self._count(exc)
            raise
        except OSError as error:  # the disk is full, DATA_DIR gone: ours to fix, not the customer's note
            rejected = AudioRejected("transcription_failed", f"local file error: {error.strerror or error}")
            self._count(rejected)
            raise rejected from None

    def _count(self, exc: AudioRejected) -> None:
        self._rejected[exc.reason] += 1
        logger.debug("voice note rejected: {}", exc)  # per message: DEBUG (metrics count them)

    def _check_size(self, size: int) -> None:
        if size <= 0:
            raise AudioRejected("empty", "no audio bytes")
        if size > self._s.max_bytes:
            detail = f"{size / MB:.2f} MB over {self._s.max_mb:g} MB"
            raise AudioRejected("too_large", detail, limit=self._s.max_mb)

    def _client_or_reject(self) -> OpenAISource:
        if self._client is None:
            raise AudioRejected("ai_off", "no OpenAI client configured")
        return self._client

    async def _transcribe_bytes(self, data: bytes, mimetype: str) -> str:
        client = self._client_or_reject()
        self._check_size(len(data))
        async with self._slots:
            with self._temp.scope() as scope:
                src = scope.new(_suffix(mimetype))
                # A plain write, not a thread: a thread still writing after a cancellation would recreate the
                # file after the scope removed it. At most max_mb, into the page cache.
                src.write_bytes(data)
                return await self._process(client, src, len(data), scope)

    async def _transcribe_path(self, path: Path) -> str:
        client = self._client_or_reject()
        size = _stat_file(path)
        self._check_size(size)
        async with self._slots:
            with self._temp.scope() as scope:
                return await self._process(client, path, size, scope)

    async def _process(self, client: OpenAISource, src: Path, size_in: int, scope: TempScope) -> str:
        s = self._s
        found = await probe(src, ffprobe=s.ffprobe, timeout_s=s.probe_timeout_s)
        duration = found.duration_s
        self._check_duration(duration)
        if duration is not None and duration < _MIN_DURATION_S:
            raise AudioRejected("empty", f"{duration:.3f}s of audio")

        out = scope.new(".ogg")
        copy = can_copy(found, s.bitrate_bps)
        encoded = await to_opus(
            src, out, ffmpeg=s.ffmpeg, bitrate=s.bitrate, max_duration_s=s.max_duration_s,
            timeout_s=s.timeout_s, copy=copy,
        )  # fmt: skip
        self._bytes_in += size_in
        self._bytes_out += encoded.size
        self._copied += copy
        if encoded.samples == 0:
            raise AudioRejected("empty", "no decodable samples")
        if encoded.max_volume_db is not None and encoded.max_volume_db < s.silence_max_db:
            raise AudioRejected("empty", f"silence (peak {encoded.max_volume_db:g} dB)")
        if duration is None:
            # The container did not say: measure what ffmpeg wrote (it stopped at the limit + 1 s).
            duration = (await probe(out, ffprobe=s.ffprobe, timeout_s=s.probe_timeout_s)).duration_s
            self._check_duration(duration if duration is not None else float("inf"))

        text = await self._upload_with_fallback(await client.get(), out, duration, scope)
        text = text.strip()
        if not text:
            raise AudioRejected("empty", "empty transcript")
        self._transcribed += 1
        logger.debug(
            "voice note transcribed: {:.1f}s, {} -> {} bytes{}",
            duration or 0.0, size_in, encoded.size, " (copied)" if copy else "",
        )  # fmt: skip
        return text

    def _check_duration(self, duration: float | None) -> None:
        if duration is not None and duration > self._s.max_duration_s:
            detail = f"{duration:.1f}s over {self._s.max_duration_s:g}s"
            raise AudioRejected("too_long", detail, limit=self._s.max_duration_s / 60)

    async def _upload_with_fallback(
        self, client: openai.AsyncOpenAI, ogg: Path, duration: float | None, scope: TempScope
    ) -> str:
        import openai  # loaded by OpenAISource.get() before this call

        try:
            # Named .ogg: the API refuses .oga and .opus by extension although the content is the same.
            return await self._upload(client, _read_small(ogg), "voice.ogg", "audio/ogg")
        except openai.BadRequestError as exc:
            if not _FORMAT_REFUSED.search(_api_message(exc)):
                raise AudioRejected("transcription_failed", _api_detail(exc, "HTTP 400")) from None
            logger.warning("transcription server refused Ogg/Opus, retrying once in another format")
        # Once, in a format every Whisper server reads (a local whisper.cpp server may take only WAV).
        fmt: FallbackFormat = "wav" if duration is not None and duration <= _WAV_MAX_S else "mp3"
        alt = scope.new(f".{fmt}")
        await to_fallback(ogg, alt, fmt=fmt, ffmpeg=self._s.ffmpeg, timeout_s=self._s.timeout_s)
        self._fallbacks += 1
        mimetype = "audio/wav" if fmt == "wav" else "audio/mpeg"
        try:
            return await self._upload(client, _read_small(alt), f"voice.{fmt}", mimetype)
        except openai.BadRequestError as exc:
            raise AudioRejected("transcription_failed", _api_detail(exc, "HTTP 400 after fallback")) from None

    async def _upload(self, client: openai.AsyncOpenAI, payload: bytes, filename: str, mimetype: str) -> str:
        """One transcription request. BadRequestError is left to the caller (it may fall back)."""
        import openai  # loaded by OpenAISource.get() before this call

        extra: dict[str, Any] = {"language": self._s.language} if self._s.language else {}
        try:
            result = await client.audio.transcriptions.create(
                model=self._s.transcribe_model, file=(filename, payload, mimetype), **extra
            )
        except openai.BadRequestError:
            raise
        except openai.APITimeoutError:
            raise AudioRejected("timeout", "transcription request timed out") from None
        except openai.NotFoundError as exc:  # no speech-to-text there (Ollama), or no such model
            raise AudioRejected("no_transcription", _api_detail(exc, "HTTP 404")) from None
        except openai.APIStatusError as exc:
            raise AudioRejected("transcription_failed", _api_detail(exc, f"HTTP {exc.status_code}")) from None
        except openai.APIError as exc:
            raise AudioRejected("transcription_failed", f"{type(exc).__name__}") from None
        except Exception as exc:  # an answer the SDK could not read: a proxy's HTML page, broken JSON
            raise AudioRejected("transcription_failed", f"unreadable answer: {type(exc).__name__}") from None
        text = getattr(result, "text", None)
        if not isinstance(text, str):  # e.g. a proxy's HTML page, which the SDK hands back as a string
            raise AudioRejected("transcription_failed", f"unreadable answer: {type(result).__name__}")
        return text
