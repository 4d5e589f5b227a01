"""Run ffmpeg/ffprobe as asyncio subprocesses: bounded output, a timeout, and always killed.

Why subprocesses and not pydub: pydub decodes a whole file into raw PCM held in Python memory
(10 minutes of 48 kHz stereo is ~110 MB, several copies while converting), its ffmpeg calls block the event
loop with no timeout, and its "ogg" export is Vorbis. ffmpeg reading a file and writing a file streams in
small buffers, runs off the loop, and can be killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections import deque
from dataclasses import dataclass


class ProcTimeout(Exception):
    """The subprocess ran longer than its timeout (it has been killed)."""


class ProcOutputTooLarge(Exception):
    """The subprocess wrote more to stdout than we accept (it has been killed)."""


@dataclass(frozen=True)
class ProcResult:
    returncode: int
    stdout: bytes
    stderr: str  # the tail only


async def _read_all(stream: asyncio.StreamReader | None, limit: int) -> bytes:
    if stream is None:
        return b""
    chunks: list[bytes] = []
    total = 0
    while chunk := await stream.read(64 * 1024):
        total += len(chunk)
        if total > limit:
            raise ProcOutputTooLarge(f"stdout over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_tail(stream: asyncio.StreamReader | None, limit: int) -> str:
    # A corrupt file can make ffmpeg print one error per packet: keep only the last lines.
    if stream is None:
        return ""
    tail: deque[bytes] = deque()
    size = 0
    while chunk := await stream.read(64 * 1024):
        tail.append(chunk)
        size += len(chunk)
        while size > limit and len(tail) > 1:
            size -= len(tail.popleft())
    return b"".join(tail)[-limit:].decode("utf-8", "replace")


async def _write_all(stream: asyncio.StreamWriter | None, data: bytes) -> None:
    if stream is None:
        return
    # A program that exits without reading all of it (a corrupt file, say) closes the pipe: not an error here,
    # its exit code says what went wrong.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stream.write(data)
        await stream.drain()
        stream.close()


async def run(
    argv: list[str],
    *,
    timeout_s: float,
    stdout_limit: int = 1024 * 1024,
    stderr_tail: int = 64 * 1024,
    stdin_data: bytes | None = None,
) -> ProcResult:
    """Run `argv`, return its exit code, stdout and the tail of stderr. `stdin_data` is written to its stdin
    (else it reads nothing).

    On timeout, on too much stdout and on cancellation the process is killed and reaped before this returns
    or raises, so a caller's `finally` can delete the files it was writing. FileNotFoundError when the program
    is missing.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL if stdin_data is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        try:
            async with asyncio.timeout(timeout_s):
                out, err, _ = await asyncio.gather(
                    _read_all(proc.stdout, stdout_limit),
                    _read_tail(proc.stderr, stderr_tail),
                    _write_all(proc.stdin, stdin_data or b""),
                )
                returncode = await proc.wait()
        except TimeoutError:
            raise ProcTimeout(f"{argv[0]} ran over {timeout_s:g}s") from None
        return ProcResult(returncode, out, err)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            # Reap it even when we are being cancelled: the caller deletes its output file next.
            await proc.wait()


def capped(address_space_bytes: int) -> list[str]:
    """A prefix for a tool's argv: its address space capped (`prlimit`), and the kernel's OOM killer told to
    take it before the bot if the container runs out all the same (`choom`). Both util-linux, in every
    Debian; left out where missing. Each execs the tool: a kill reaches the tool itself."""
    return [
        *(["prlimit", f"--as={address_space_bytes}", "--"] if shutil.which("prlimit") else []),
        *(["choom", "-n", "1000", "--"] if shutil.which("choom") else []),
    ]


def last_error_line(stderr: str, limit: int = 160) -> str:
    """The last non-empty stderr line, shortened: a log-safe detail for AudioRejected."""
    for line in reversed(stderr.splitlines()):
        line = line.strip()
        if line and not line.startswith("[Parsed_volumedetect"):
            return line[:limit]
    return ""
