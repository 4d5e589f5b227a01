"""Read what an audio file is (container, codec, duration) with ffprobe, without decoding it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from media.errors import AudioRejected
from media.proc import ProcOutputTooLarge, ProcTimeout, last_error_line, run

# ffprobe names for a stream it found but has no decoder for.
_UNKNOWN_CODECS = {"", "unknown", "none"}


@dataclass(frozen=True)
class Probe:
    format_name: str
    duration_s: float | None  # None when the container does not say
    bit_rate: int | None
    codec: str | None  # of the first audio stream; None when there is none
    channels: int | None

    @property
    def has_audio(self) -> bool:
        return self.codec is not None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def parse(info: dict[str, Any]) -> Probe:
    """Turn ffprobe's JSON into a Probe; the longest duration stated anywhere wins (for the limit)."""
    fmt = info.get("format") or {}
    streams = info.get("streams") or []
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    durations = [_number(fmt.get("duration"))] + [_number(s.get("duration")) for s in audio]
    known = [d for d in durations if d is not None]
    first = audio[0] if audio else None
    bit_rate = _number(fmt.get("bit_rate"))
    channels = _number(first.get("channels")) if first else None
    return Probe(
        format_name=str(fmt.get("format_name", "")),
        duration_s=max(known) if known else None,
        bit_rate=int(bit_rate) if bit_rate is not None else None,
        codec=str(first.get("codec_name") or "") if first else None,
        channels=int(channels) if channels is not None else None,
    )


async def probe(path: Path, *, ffprobe: str = "ffprobe", timeout_s: float = 15) -> Probe:
    """ffprobe `path`; raise AudioRejected for what cannot become speech.

    ffprobe reads headers (and, for Ogg, the last page's timestamp): nothing is decoded, so the duration limit
    is checked before any work proportional to the audio's length.
    """
    argv = [
        ffprobe,
        "-v", "error",
        "-hide_banner",
        "-show_entries",
        "format=format_name,duration,bit_rate:stream=codec_type,codec_name,channels,duration",
        "-of", "json",
        "-i", str(path),
    ]  # fmt: skip
    try:
        result = await run(argv, timeout_s=timeout_s)
    except FileNotFoundError:
        raise AudioRejected("transcription_failed", f"{ffprobe} is not installed") from None
    except ProcTimeout as exc:
        raise AudioRejected("timeout", str(exc)) from None
    except ProcOutputTooLarge:
        raise AudioRejected("corrupt", "ffprobe output too large") from None
    if result.returncode != 0:
        raise AudioRejected("corrupt", f"ffprobe failed: {last_error_line(result.stderr)}")
    try:
        info = json.loads(result.stdout)
    except ValueError:
        raise AudioRejected("corrupt", "ffprobe printed no JSON") from None
    found = parse(info)
    if not found.has_audio:
        raise AudioRejected("corrupt", f"no audio stream (container {found.format_name or '?'})")
    if found.codec in _UNKNOWN_CODECS:
        raise AudioRejected("unsupported", f"audio codec not decodable (container {found.format_name})")
    return found
