"""Videos customers send, seen by the model as a few frames: a broken part turning, a product on a shelf.

The pipeline uses one VideoReader:

    reader.check_declared_size(size)        # before downloading, when WhatsApp says the size
    seen = await reader.frames(data, 3)     # Frames: JPEGs spread over the video, and its length
    # VideoRejected: e.reason ("too_large", "unreadable"); str(e) is log-safe
    reader.sweep()                          # at start: a crash's leftover files

ffmpeg reads the video from a file of our own (an MP4 may keep its index at the end, which a pipe cannot
seek to), seeks to each moment before decoding (-ss before -i: it decodes from the keyframe before it, not
the whole video) and writes one JPEG to stdout. One video at a time, the file always removed, and one
deadline for a video's ffprobe and frames together.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from media.proc import ProcOutputTooLarge, ProcTimeout, last_error_line, run
from media.settings import MB
from media.tempfiles import TempDir

READ_TIMEOUT_S = 30.0
MAX_READS_AT_ONCE = 1
_FRAME_LIMIT = 8 * MB  # a 4K frame as a JPEG is under 3 MB

VideoReason = Literal["too_large", "unreadable"]


class VideoRejected(Exception):
    """A video the model is not shown; `str(e)` is log-safe (sizes and ffmpeg's error, never content)."""

    def __init__(self, reason: VideoReason, detail: str) -> None:
        self.reason: VideoReason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class Frames:
    images: list[bytes]  # JPEGs, in the video's order
    duration_s: float | None


class VideoReader:
    """Takes frames out of videos with ffmpeg. `enabled` is False when no model is shown them."""

    def __init__(
        self,
        *,
        max_mb: float = 20.0,
        enabled: bool,
        temp_dir: Path,
        ffmpeg: str = "ffmpeg",
        ffprobe: str = "ffprobe",
    ) -> None:
        self.max_mb = max_mb
        self.enabled = enabled
        self.ffmpeg = ffmpeg
        self.ffprobe = ffprobe
        self._temp = TempDir(temp_dir)
        self._reading = asyncio.Semaphore(MAX_READS_AT_ONCE)

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * MB)

    def check_declared_size(self, size_bytes: int | None) -> None:
        if size_bytes is not None and size_bytes > self.max_bytes:
            raise VideoRejected("too_large", f"{size_bytes} bytes declared, limit {self.max_bytes}")

    def sweep(self, older_than_s: float = 3600) -> int:
        return self._temp.sweep(older_than_s)

    async def frames(self, data: bytes, count: int) -> Frames:
        """`count` frames spread over the video (at the middle of each of `count` equal parts), fewer if some
        cannot be decoded; VideoRejected when none can."""
        if len(data) > self.max_bytes:
            raise VideoRejected("too_large", f"{len(data)} bytes, limit {self.max_bytes}")
        async with self._reading:
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):  # cancelling kills the running ffmpeg
                    with self._temp.scope() as scope:
                        path = scope.new(".mp4")
                        await asyncio.to_thread(path.write_bytes, data)
                        duration = await self._duration(path)
                        moments = [duration * (n + 0.5) / count for n in range(count)] if duration else [0.0]
                        outcomes = [await self._frame(path, at) for at in moments]
            except TimeoutError:
                raise VideoRejected("unreadable", f"over {READ_TIMEOUT_S:g}s") from None
        images = [outcome for outcome in outcomes if isinstance(outcome, bytes)]
        if not images:
            error = next((outcome for outcome in outcomes if outcome), "no frame")
            raise VideoRejected("unreadable", str(error))
        return Frames(images, duration)

    async def _duration(self, path: Path) -> float | None:
        argv = [self.ffprobe, "-v", "error", "-show_entries", "format=duration", "-of", "json", str(path)]
        try:
            result = await run(argv, timeout_s=READ_TIMEOUT_S, stdout_limit=64 * 1024)
            duration = float(json.loads(result.stdout)["format"]["duration"])
        except (ProcTimeout, ProcOutputTooLarge, FileNotFoundError, ValueError, KeyError, TypeError):
            return None  # frames are still tried, from the start
        return duration if math.isfinite(duration) and duration > 0 else None

    async def _frame(self, path: Path, at: float) -> bytes | str:
        """The frame at `at` seconds as a JPEG, or why there is none (ffmpeg's error; "" past the end)."""
        argv = [
            self.ffmpeg, "-v", "error", "-nostdin",
            "-ss", f"{at:.3f}", "-i", str(path),
            "-frames:v", "1", "-an", "-f", "image2pipe", "-c:v", "mjpeg", "-q:v", "3", "-",
        ]  # fmt: skip
        try:
            result = await run(argv, timeout_s=READ_TIMEOUT_S, stdout_limit=_FRAME_LIMIT)
        except (ProcTimeout, ProcOutputTooLarge) as error:
            return str(error)
        except FileNotFoundError:
            return f"{self.ffmpeg} is not installed"
        if result.returncode != 0:
            return last_error_line(result.stderr) or f"ffmpeg exit code {result.returncode}"
        return result.stdout
