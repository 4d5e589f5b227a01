"""Settings for voice notes, built once at the entry point and passed to VoiceTranscriber."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MB = 1024 * 1024  # the OpenAI upload limit ("25 MB") is 25 MiB


def _default_temp_dir() -> Path:
    return Path(tempfile.gettempdir()) / "wa-bot-audio"


@dataclass(frozen=True)
class AudioSettings:
    """Limits and knobs for the voice-note path (AUDIO_MAX_MB feeds `max_mb`).

    `temp_dir` should be a folder of its own (e.g. DATA_DIR/tmp/audio): `sweep()` empties it of old files.
    """

    max_mb: float = 25
    max_duration_s: float = 600
    transcribe_model: str = "whisper-1"
    language: str | None = "es"  # a hint for the transcription model; None: it detects the language
    timeout_s: float = 60  # for one whole transcription: probe, transcode, upload (and the fallback)
    temp_dir: Path = field(default_factory=_default_temp_dir)
    bitrate: str = "24k"  # Opus bitrate of what we upload; 16-24k is plenty for speech at 16 kHz mono
    probe_timeout_s: float = 15
    max_concurrent: int = 2  # transcodes at once: each ffmpeg costs memory on a 512 MB box
    silence_max_db: float = -60  # a peak below this is silence: not sent (Whisper invents text on silence)
    ffmpeg: str = "ffmpeg"
    ffprobe: str = "ffprobe"

    def __post_init__(self) -> None:
        positive = {
            "max_mb": self.max_mb,
            "max_duration_s": self.max_duration_s,
            "timeout_s": self.timeout_s,
            "probe_timeout_s": self.probe_timeout_s,
            "max_concurrent": self.max_concurrent,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"AudioSettings.{name} must be > 0, got {value!r}")
        if not re.fullmatch(r"[1-9]\d{0,2}k", self.bitrate):
            raise ValueError(f"AudioSettings.bitrate must look like '24k', got {self.bitrate!r}")
        if not self.transcribe_model:
            raise ValueError("AudioSettings.transcribe_model must not be empty")
        object.__setattr__(self, "temp_dir", Path(self.temp_dir))

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * MB)

    @property
    def bitrate_bps(self) -> int:
        return int(self.bitrate[:-1]) * 1000
