"""Keep the WhatsApp session (neonize's sqlite file) in Supabase, for hosts with an ephemeral disk.

Used when only SUPABASE_URL and SUPABASE_KEY are set (with SUPABASE_DB_URL neonize keeps the session in
Postgres itself and none of this is needed). The file is snapshotted with sqlite3's backup API, which copies a
consistent state even while whatsmeow writes to it (a raw copy of a file in use can be torn), every
`interval_s` and at shutdown, and uploaded to `wa_sessions(session_id, data bytea, updated_at)` only when it
changed. At start, when the local file is missing, the last snapshot is restored.

The snapshot is zlib-compressed (session files are mostly empty pages); a raw SQLite image is accepted too.
bytea travels through PostgREST as text: `\\x` + hex both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from loguru import logger
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from connection.supervisor import scrub

__all__ = ["SessionBackup", "decode_bytea", "encode_bytea", "restore_bytes", "snapshot_bytes"]

TABLE = "wa_sessions"
_SQLITE_MAGIC = b"SQLite format 3\x00"


# --------------------------------------------------------------------------- sqlite helpers (blocking)


def snapshot_bytes(path: str | Path) -> bytes | None:
    """A consistent image of the database at `path` via the backup API; None when there is no file.

    Opens read-only (never creates the file) and waits up to 5 s for a writer's lock.
    """
    source_path = Path(path)
    if not source_path.exists():
        return None
    source = sqlite3.connect(f"{source_path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    memory = sqlite3.connect(":memory:")
    try:
        source.backup(memory)  # all pages in one step: one consistent read transaction
        return memory.serialize()
    finally:
        memory.close()
        source.close()


def restore_bytes(path: str | Path, image: bytes) -> None:
    """Write a database image to `path` atomically, after checking it is a sound SQLite database."""
    target = Path(path)
    check = sqlite3.connect(":memory:")
    try:
        check.deserialize(image)
        result = check.execute("pragma quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"session snapshot is not a usable SQLite database: {exc}") from exc
    finally:
        check.close()
    if result != "ok":
        raise ValueError(f"session snapshot failed its integrity check: {result}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.restore")
    tmp.write_bytes(image)
    for leftover in (
        f"{target}-wal",
        f"{target}-shm",
    ):  # of a file gone: SQLite would replay it onto this one
        Path(leftover).unlink(missing_ok=True)
    os.replace(tmp, target)


def encode_bytea(data: bytes) -> str:
    return "\\x" + data.hex()


def decode_bytea(value: str | bytes) -> bytes:
    """PostgREST returns bytea as `\\x<hex>`."""
    text = value.decode() if isinstance(value, bytes) else value
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    raise ValueError("unexpected bytea encoding (expected \\x + hex)")


def _pack(image: bytes) -> bytes:
    return zlib.compress(image, 6)


def _unpack(data: bytes) -> bytes:
    return data if data.startswith(_SQLITE_MAGIC) else zlib.decompress(data)


# --------------------------------------------------------------------------- the backup job


class SessionBackup:
    """Periodic, change-only snapshots of one session file to Supabase, and restore at start.

    Lifecycle: `await restore_if_missing()` before the transport starts, `await start()`, and `await stop()`
    after the transport stopped (it takes the final snapshot). `forget()` deletes the remote copy (logout).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        url: str,
        key: str,
        session_id: str,
        interval_s: float = 60.0,
        timeout_s: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.session_id = session_id
        self.interval_s = interval_s
        self._url = url
        self._key = key
        self._timeout_s = timeout_s
        self._clock = clock
        self._client: AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._last_digest: str | None = None
        self._lock = asyncio.Lock()
        self.uploads = 0
        self.failures = 0
        self.last_upload_at: float | None = None
        self.last_error: str | None = None

    async def restore_if_missing(self) -> bool:
        """Restore the last snapshot when the local file is missing; True when a session was restored."""
        if self.path.exists():
            return False
        try:
            client = await self._supabase()
            response = (
                await client.table(TABLE)
                .select("data, updated_at")
                .eq("session_id", self.session_id)
                .limit(1)
                .execute()
            )
        except Exception as exc:
            self._failed("restore", exc)
            return False
        if not response.data:
            logger.info("session backup: no saved WhatsApp session in Supabase; pairing is needed")
            return False
        row: dict[str, Any] = response.data[0]  # type: ignore[assignment]
        try:
            image = _unpack(decode_bytea(row["data"]))
            await asyncio.to_thread(restore_bytes, self.path, image)
        except (ValueError, zlib.error) as exc:
            self._failed("restore", exc)
            return False
        self._last_digest = hashlib.sha256(image).hexdigest()
        logger.info(
            "session backup: restored the WhatsApp session from Supabase ({} KB, saved {})",
            len(image) // 1024,
            row.get("updated_at"),
        )
        return True

    async def start(self) -> None:
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="session-backup")

    async def stop(self) -> None:
        """End the periodic job, take the final snapshot and close the client."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.snapshot_now()
        await self.close()

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.postgrest.aclose()  # closes our httpx client too
            self._client = None

    async def snapshot_now(self) -> bool:
        """Snapshot and upload if the session changed since the last upload; True when uploaded."""
        async with self._lock:
            try:
                image = await asyncio.to_thread(snapshot_bytes, self.path)
            except sqlite3.Error as exc:
                self._failed("snapshot", exc)
                return False
            if image is None:
                return False
            digest = hashlib.sha256(image).hexdigest()
            if digest == self._last_digest:
                return False
            row = {
                "session_id": self.session_id,
                "data": encode_bytea(_pack(image)),
                "updated_at": datetime.fromtimestamp(self._clock(), UTC).isoformat(),
            }
            try:
                client = await self._supabase()
                await client.table(TABLE).upsert(row, on_conflict="session_id").execute()
            except Exception as exc:
                self._failed("upload", exc)
                return False
            self._last_digest = digest
            self.uploads += 1
            self.last_upload_at = self._clock()
            self.last_error = None
            logger.debug("session backup: uploaded ({} KB)", len(image) // 1024)
            return True

    async def remote_updated_at(self) -> str | None:
        """When the saved copy was last updated (for `doctor`); None when there is none. Raises on errors."""
        client = await self._supabase()
        query = client.table(TABLE).select("updated_at").eq("session_id", self.session_id)
        response = await query.limit(1).execute()
        rows: list[dict[str, Any]] = response.data  # type: ignore[assignment]
        return str(rows[0]["updated_at"]) if rows else None

    async def forget(self) -> None:
        """Delete the remote copy (after a logout), so a redeploy does not restore a dead session."""
        async with self._lock:
            try:
                client = await self._supabase()
                await client.table(TABLE).delete().eq("session_id", self.session_id).execute()
            except Exception as exc:
                self._failed("delete", exc)
                return
            self._last_digest = None
            logger.info("session backup: deleted the saved session from Supabase")

    def stats(self) -> dict[str, Any]:
        return {
            "session_backup_uploads": self.uploads,
            "session_backup_failures": self.failures,
            "session_backup_age_s": None
            if self.last_upload_at is None
            else round(self._clock() - self.last_upload_at, 1),
            "session_backup_error": self.last_error,
        }

    async def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                await self.snapshot_now()
            except Exception:
                logger.opt(exception=True).error("session backup: snapshot crashed")

    async def _supabase(self) -> AsyncClient:
        if self._client is None:
            # Our own httpx client carries the timeout (supabase-py warns about its own timeout argument);
            # no PostgREST retries: the next interval is the retry.
            http = httpx.AsyncClient(timeout=httpx.Timeout(self._timeout_s))
            options = AsyncClientOptions(httpx_client=http, postgrest_client_retry=False)
            self._client = await acreate_client(self._url, self._key, options=options)
        return self._client

    def _failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = scrub(f"{what}: {type(exc).__name__}: {exc}")
        logger.warning("session backup: {}", self.last_error)
