"""Transcode a voice note file to a small mono 16 kHz Ogg/Opus file with ffmpeg, file in -> file out.

ffmpeg runs as a subprocess (see media/proc.py for why not pydub): it streams from file to file in small
buffers, so memory does not grow with the audio's length, and it can be killed on timeout or cancellation.
The same pass measures the peak level (volumedetect) so silence is caught without a second decode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from media.errors import AudioRejected, Reason
from media.probe import Probe
from media.proc import ProcTimeout, last_error_line, run

_SAMPLES = re.compile(r"n_samples:\s*(\d+)")
_MAX_VOLUME = re.compile(r"max_volume:\s*(-?(?:\d+(?:\.\d+)?|inf))\s*dB")
_UNSUPPORTED = re.compile(r"decoder .*not found|not supported|unsupported codec|unknown codec", re.IGNORECASE)

FallbackFormat = Literal["wav", "mp3"]


@dataclass(frozen=True)
class Encoded:
    path: Path
    size: int
    samples: int | None  # decoded samples seen by volumedetect; 0 means nothing decodable
    max_volume_db: float | None
    copied: bool  # the Opus stream was copied, not re-encoded


def can_copy(found: Probe, bitrate_bps: int) -> bool:
    """A mono Ogg/Opus note already at about our bitrate (WhatsApp's own notes): re-encoding would only lose
    quality and save nothing, so its packets are copied into a fresh Ogg file instead."""
    return (
        found.codec == "opus"
        and found.channels == 1
        and found.format_name == "ogg"
        and found.bit_rate is not None
        and found.bit_rate <= bitrate_bps * 5 // 4
    )


def opus_argv(
    src: Path, dst: Path, *, ffmpeg: str, bitrate: str, max_duration_s: float, copy: bool
) -> list[str]:
    head = [ffmpeg, "-nostdin", "-hide_banner", "-nostats", "-v", "info", "-i", str(src)]
    # -t is a safety belt: ffprobe's duration comes from headers a crafted file can lie in.
    limit = ["-t", f"{max_duration_s + 1:g}"]
    out = ["-map", "0:a:0", "-map_metadata", "-1", *limit]
    if copy:
        # Copy the packets; decode once more into nothing, only to measure the level.
        return [
            *head,
            *out, "-c:a", "copy", "-f", "ogg", "-y", str(dst),
            "-map", "0:a:0", *limit, "-af", "volumedetect", "-f", "null", "-",
        ]  # fmt: skip
    return [
        *head,
        *out,
        "-ac", "1", "-ar", "16000", "-af", "volumedetect",
        # libopus explicitly: ffmpeg's (and pydub's) default for .ogg is Vorbis.
        "-c:a", "libopus", "-b:a", bitrate, "-application", "voip",
        "-f", "ogg", "-y", str(dst),
    ]  # fmt: skip


def fallback_argv(src: Path, dst: Path, *, ffmpeg: str, fmt: FallbackFormat) -> list[str]:
    codec = (
        ["-c:a", "pcm_s16le", "-f", "wav"]
        if fmt == "wav"
        else ["-c:a", "libmp3lame", "-b:a", "32k", "-f", "mp3"]
    )
    return [
        ffmpeg, "-nostdin", "-hide_banner", "-nostats", "-v", "error", "-i", str(src),
        "-map", "0:a:0", "-map_metadata", "-1", "-ac", "1", "-ar", "16000", *codec, "-y", str(dst),
    ]  # fmt: skip


def size_of(path: Path) -> int:
    """Size of a file, 0 when missing. Sync on purpose: one stat() call."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def _ffmpeg(argv: list[str], dst: Path, timeout_s: float) -> str:
    try:
        result = await run(argv, timeout_s=timeout_s)
    except FileNotFoundError:
        raise AudioRejected("transcription_failed", f"{argv[0]} is not installed") from None
    except ProcTimeout as exc:
        raise AudioRejected("timeout", str(exc)) from None
    if result.returncode != 0:
        reason: Reason = "unsupported" if _UNSUPPORTED.search(result.stderr) else "corrupt"
        raise AudioRejected(reason, f"ffmpeg failed: {last_error_line(result.stderr)}")
    if size_of(dst) == 0:
        raise AudioRejected("corrupt", "ffmpeg wrote no audio")
    return result.stderr


async def to_opus(
    src: Path,
    dst: Path,
    *,
    ffmpeg: str = "ffmpeg",
    bitrate: str = "24k",
    max_duration_s: float = 600,
    timeout_s: float = 60,
    copy: bool = False,
) -> Encoded:
    """Write `src`'s first audio stream to `dst` as mono 16 kHz Ogg/Opus (or copy it, see can_copy)."""
    argv = opus_argv(src, dst, ffmpeg=ffmpeg, bitrate=bitrate, max_duration_s=max_duration_s, copy=copy)
    stderr = await _ffmpeg(argv, dst, timeout_s)
    samples = _SAMPLES.findall(stderr)
    volume = _MAX_VOLUME.findall(stderr)
    return Encoded(
        path=dst,
        size=size_of(dst),
        samples=int(samples[-1]) if samples else None,
        max_volume_db=float(volume[-1]) if volume else None,
        copied=copy,
    )


async def to_fallback(
    src: Path, dst: Path, *, fmt: FallbackFormat, ffmpeg: str = "ffmpeg", timeout_s: float = 60
) -> int:
    """Write `src` as 16 kHz mono WAV or MP3 for a server that refuses Ogg/Opus; returns the size."""
    await _ffmpeg(fallback_argv(src, dst, ffmpeg=ffmpeg, fmt=fmt), dst, timeout_s)
    return size_of(dst)
