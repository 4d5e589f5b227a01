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
import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loguru import logger

from media.proc import ProcOutputTooLarge, ProcTimeout, capped, last_error_line, run
from media.settings import MB
from media.tempfiles import TempDir

READ_TIMEOUT_S = 30.0
MAX_READS_AT_ONCE = 1
# ffmpeg maps about 100 MB of libraries; with one decoding thread, and frames scaled down as they are taken, a
# 1080p video peaks at 87 MB of RSS, a 4K one at 156, an 8K one at about 210 (measured). The cap stops a
# crafted one from taking a 512 MB plan down.
ADDRESS_SPACE_BYTES = 512 * MB
FRAME_SIDE = 1536  # a frame's longer side, at most (media.image.MAX_SIDE)
_FRAME_LIMIT = 8 * MB  # a 1536-px frame as a JPEG is under 1 MB

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
        self._temp = TempDir(temp_dir, prefix="video-")
        self._prefix = capped(ADDRESS_SPACE_BYTES)
        self._reading = asyncio.Semaphore(MAX_READS_AT_ONCE)

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * MB)

    def check_declared_size(self, size_bytes: int | None) -> None:
        if size_bytes is not None and size_bytes > self.max_bytes:
            raise VideoRejected("too_large", f"{size_bytes} bytes declared, limit {self.max_bytes}")

    def sweep(self, older_than_s: float = 3600) -> int:
        return self._temp.sweep(older_than_s)

    async def frames(self, data: bytes, count: int, duration_hint: float | None = None) -> Frames:
        """`count` frames spread over the video's picture (at the middle of each of `count` equal parts),
        fewer if some cannot be decoded in time; VideoRejected when none can. `duration_hint` (WhatsApp's)
        stands in for a length the file does not state."""
        if len(data) > self.max_bytes:
            raise VideoRejected("too_large", f"{len(data)} bytes, limit {self.max_bytes}")
        outcomes: list[bytes | str] = []  # filled as frames come: kept when the deadline cuts the rest
        try:
            async with self._reading:
                duration = await self._take(data, count, duration_hint, outcomes)
        except (
            OSError
        ) as os_error:  # the disk is full, DATA_DIR gone: ours to fix, said where the owner looks
            why = os_error.strerror or str(os_error)
            logger.warning("a video could not be written to {}: {}", self._temp.root, why)
            raise VideoRejected("unreadable", f"local file error: {why}") from None
        images = [outcome for outcome in outcomes if isinstance(outcome, bytes)]
        if not images:
            error = next((outcome for outcome in outcomes if outcome), "")
            raise VideoRejected("unreadable", str(error) or f"no frame in {READ_TIMEOUT_S:g}s")
        return Frames(images, duration)

    async def _take(
        self, data: bytes, count: int, duration_hint: float | None, outcomes: list[bytes | str]
    ) -> float | None:
        """Write the video to a temp file and take its frames into `outcomes` (those taken by the deadline
        are kept); returns its length."""
        duration: float | None = None
        with contextlib.suppress(TimeoutError), self._temp.scope() as scope:
            async with asyncio.timeout(READ_TIMEOUT_S):  # cancelling kills the running ffmpeg
                path = scope.new(".mp4")
                # Not in a thread: one still writing after a cancellation would make the file again after the
                # scope removed it (media/audio.py does the same). 20 MB at most.
                path.write_bytes(data)
                duration = await self._duration(path) or duration_hint
                moments = [duration * (n + 0.5) / count for n in range(count)] if duration else [0.0]
                for at in moments:
                    outcomes.append(await self._frame(path, at))
                if not any(isinstance(outcome, bytes) for outcome in outcomes) and moments != [0.0]:
                    outcomes.append(await self._frame(path, 0.0))  # the picture ends before the sound
        return duration

    async def _duration(self, path: Path) -> float | None:
        """The picture's length (a video stream's own, which may end before the sound), else the file's."""
        argv = [
            self.ffprobe, "-v", "error", "-select_streams", "v:0",
            "-show_entries", "stream=duration:format=duration", "-of", "json", str(path),
        ]  # fmt: skip
        try:
            result = await run(argv, timeout_s=READ_TIMEOUT_S, stdout_limit=64 * 1024)
            info = json.loads(result.stdout)
        except (ProcTimeout, ProcOutputTooLarge, FileNotFoundError, ValueError):
            return None  # frames are still tried, from the start
        stated = [stream.get("duration") for stream in info.get("streams") or []]
        stated.append((info.get("format") or {}).get("duration"))
        for value in stated:
            with contextlib.suppress(TypeError, ValueError):
                if math.isfinite(seconds := float(value)) and seconds > 0:
                    return seconds
        return None

    async def _frame(self, path: Path, at: float) -> bytes | str:
        """The frame at `at` seconds as a JPEG fitting FRAME_SIDE, or why there is none ("" past the end)."""
        fit = f"scale=w='min(iw,{FRAME_SIDE})':h='min(ih,{FRAME_SIDE})':force_original_aspect_ratio=decrease"
        argv = [
            *self._prefix, self.ffmpeg, "-v", "error", "-nostdin", "-threads", "1",
            "-ss", f"{at:.3f}", "-i", str(path),
            "-frames:v", "1", "-an", "-vf", fit, "-f", "image2pipe", "-c:v", "mjpeg", "-q:v", "3", "-",
        ]  # fmt: skip
        try:
            result = await run(argv, timeout_s=READ_TIMEOUT_S, stdout_limit=_FRAME_LIMIT)
        except (ProcTimeout, ProcOutputTooLarge) as error:
            return str(error)
        except FileNotFoundError:
            return f"{self.ffmpeg} is not installed"
        if result.returncode != 0:  # its error names our temp file: "the video" is enough in a log
            return (last_error_line(result.stderr) or f"exit code {result.returncode}").replace(
                str(path), "video"
            )
        return result.stdout or ""
