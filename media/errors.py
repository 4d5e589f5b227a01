"""The one exception type media/ raises for a voice note it will not (or cannot) turn into text."""

from __future__ import annotations

from typing import Literal, get_args

Reason = Literal[
    "too_large",  # over AudioSettings.max_mb (limit: MB)
    "too_long",  # over AudioSettings.max_duration_s (limit: minutes)
    "corrupt",  # ffprobe/ffmpeg cannot read it, or it has no audio stream
    "empty",  # no bytes, no samples, digital silence, or an empty transcript
    "unsupported",  # an audio stream in a codec this ffmpeg cannot decode
    "transcription_failed",  # the transcription API (or a missing ffmpeg) failed
    "no_transcription",  # the server has no speech-to-text (HTTP 404: Ollama, or no such model)
    "timeout",  # the whole job, a subprocess or the API call ran out of time
    "ai_off",  # no OpenAI client configured (no API key)
]
REASONS: tuple[Reason, ...] = get_args(Reason)


class AudioRejected(Exception):
    """A voice note was refused; `reason` picks the user-facing reply, `limit` fills it in.

    `str(e)` is safe to log: it holds the reason and a short technical detail written by us
    (sizes, durations, codec names, an ffmpeg error line), never transcript text.
    """

    def __init__(self, reason: Reason, detail: str = "", limit: float | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown AudioRejected reason {reason!r}")
        self.reason: Reason = reason
        self.detail = detail
        self.limit = limit
        super().__init__(f"{reason}: {detail}" if detail else reason)
