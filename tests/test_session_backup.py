"""Session snapshots: sqlite's backup API under a live writer, and the round trip through real Supabase."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from connection.session_backup import (
    SessionBackup,
    _pack,
    _unpack,
    decode_bytea,
    encode_bytea,
    restore_bytes,
    snapshot_bytes,
)
from tests.supabase_stack import SupabaseStack


def make_session(path: Path, rows: int = 50) -> None:
    """A stand-in for whatsmeow's session file: rollback journal, as neonize opens it."""
    db = sqlite3.connect(path)
    db.execute("create table whatsmeow_sessions (our_jid text, their_id text, session blob)")
    db.executemany(
        "insert into whatsmeow_sessions values (?, ?, ?)",
        [("me", f"peer-{i}", bytes(range(256)) * 4) for i in range(rows)],
    )
    db.commit()
    db.close()


def rows_of(path: Path) -> list[tuple[str, str, bytes]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("select * from whatsmeow_sessions order by rowid").fetchall()
    finally:
        db.close()


# ---------------------------------------------------------------- sqlite only


def test_snapshot_under_a_live_writer_is_consistent(tmp_path: Path) -> None:
    source = tmp_path / "session.sqlite3"
    db = sqlite3.connect(source)
    db.execute("create table pairs (n integer, half integer)")
    db.commit()
    db.close()
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        conn = sqlite3.connect(source, timeout=5)
        while not stop.is_set():
            with conn:  # one transaction, two rows: a torn copy would show an odd count
                conn.execute("insert into pairs values (?, 0)", (written[0],))
                conn.execute("insert into pairs values (?, 1)", (written[0],))
            written[0] += 1
            time.sleep(0.001)  # whatsmeow writes in bursts, not in a tight loop that starves readers
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    counts = []
    try:
        deadline = time.monotonic() + 5
        while len(counts) < 10 and time.monotonic() < deadline:
            image = snapshot_bytes(source)
            assert image is not None
            copy = tmp_path / f"copy-{len(counts)}.sqlite3"
            restore_bytes(copy, image)
            conn = sqlite3.connect(copy)
            assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
            (count,) = conn.execute("select count(*) from pairs").fetchone()
            (halves,) = conn.execute(
                "select count(*) from (select n from pairs group by n having count(*) != 2)"
            ).fetchone()
            conn.close()
            assert count % 2 == 0 and halves == 0
            counts.append(count)
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    assert counts == sorted(counts) and counts[-1] > 0  # the writer was really active
    final = snapshot_bytes(source)
    assert final is not None
    restore_bytes(tmp_path / "final.sqlite3", final)
    conn = sqlite3.connect(tmp_path / "final.sqlite3")
    assert conn.execute("select count(*) from pairs").fetchone()[0] == 2 * written[0]
    conn.close()


def test_snapshot_of_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    assert snapshot_bytes(tmp_path / "absent.sqlite3") is None
    assert not (tmp_path / "absent.sqlite3").exists()


def test_restore_refuses_garbage_and_keeps_the_target(tmp_path: Path) -> None:
    target = tmp_path / "session.sqlite3"
    make_session(target, rows=3)
    with pytest.raises(ValueError):
        restore_bytes(target, b"not a database at all" * 100)
    assert len(rows_of(target)) == 3


def test_a_restore_does_not_take_the_wal_of_the_file_it_replaces(tmp_path: Path) -> None:
    """A damaged session moved aside without its -wal: SQLite replayed that WAL onto the restored backup."""
    damaged = tmp_path / "damaged.sqlite3"
    db = sqlite3.connect(damaged)
    db.execute("pragma journal_mode=wal")
    db.execute("pragma wal_autocheckpoint=0")
    db.execute("create table whatsmeow_sessions (our_jid text, their_id text, session blob)")
    db.commit()
    db.execute("pragma wal_checkpoint(truncate)")
    db.execute("insert into whatsmeow_sessions values ('me', 'from-the-damaged-file', x'00')")
    db.commit()
    target = tmp_path / "session.sqlite3"
    shutil.copy(f"{damaged}-wal", f"{target}-wal")  # left behind when the file was moved aside
    db.close()
    backup = tmp_path / "backup.sqlite3"
    make_session(backup, rows=3)
    image = snapshot_bytes(backup)
    assert image is not None
    restore_bytes(target, image)
    assert [row[1] for row in rows_of(target)] == ["peer-0", "peer-1", "peer-2"]


def test_bytea_and_compression_round_trip(tmp_path: Path) -> None:
    make_session(tmp_path / "s.sqlite3")
    image = snapshot_bytes(tmp_path / "s.sqlite3")
    assert image is not None
    packed = _pack(image)
    assert len(packed) < len(image) / 2
    assert decode_bytea(encode_bytea(packed)) == packed
    assert _unpack(packed) == image
    assert _unpack(image) == image  # a raw SQLite image is accepted too
    with pytest.raises(ValueError):
        decode_bytea("not hex")


async def test_upload_failure_is_counted_and_retried_later(tmp_path: Path) -> None:
    make_session(tmp_path / "s.sqlite3")
    backup = SessionBackup(
        tmp_path / "s.sqlite3", url="http://127.0.0.1:9", key="service-key", session_id="bot", timeout_s=2
    )
    try:
        assert await backup.snapshot_now() is False
        assert backup.failures == 1
        assert backup.last_error and "service-key" not in backup.last_error
        assert await backup.restore_if_missing() is False  # the file exists: nothing to do
    finally:
        await backup.close()


# ---------------------------------------------------------------- against the local Supabase stack


def backup_for(stack: SupabaseStack, path: Path, session_id: str, **options: float) -> SessionBackup:
    return SessionBackup(path, url=stack.url, key=stack.key, session_id=session_id, **options)


async def test_snapshot_and_restore_round_trip(stack: SupabaseStack, tmp_path: Path) -> None:
    session_id = f"test-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "whatsapp-session.sqlite3"
    make_session(path)
    backup = backup_for(stack, path, session_id)
    try:
        assert await backup.snapshot_now() is True
        assert await backup.snapshot_now() is False  # unchanged: not uploaded again
        db = sqlite3.connect(path)
        db.execute("insert into whatsmeow_sessions values ('me', 'new-peer', x'00')")
        db.commit()
        db.close()
        assert await backup.snapshot_now() is True
        assert backup.uploads == 2
    finally:
        await backup.close()
    stored = stack.query(f"select length(data) from wa_sessions where session_id = '{session_id}'")
    assert 0 < int(stored[0][0]) < path.stat().st_size  # compressed bytea

    expected = rows_of(path)
    path.unlink()  # a redeploy on an ephemeral disk
    restored = backup_for(stack, path, session_id)
    try:
        assert await restored.restore_if_missing() is True
        assert rows_of(path) == expected
        assert await restored.restore_if_missing() is False  # present now: left alone
        assert await restored.snapshot_now() is False  # same content as in Supabase
        assert await restored.remote_updated_at() is not None
        await restored.forget()  # logout
        assert await restored.remote_updated_at() is None
    finally:
        await restored.close()
    assert stack.query(f"select count(*) from wa_sessions where session_id = '{session_id}'") == [("0",)]

    path.unlink()
    empty = backup_for(stack, path, session_id)
    try:
        assert await empty.restore_if_missing() is False
        assert not path.exists()
    finally:
        await empty.close()


async def test_periodic_snapshots_and_the_final_one_at_stop(stack: SupabaseStack, tmp_path: Path) -> None:
    session_id = f"test-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "whatsapp-session.sqlite3"
    make_session(path, rows=5)
    backup = backup_for(stack, path, session_id, interval_s=0.1)
    await backup.start()
    try:
        async with asyncio.timeout(5):
            while backup.uploads < 1:
                await asyncio.sleep(0.02)
        db = sqlite3.connect(path)
        db.execute("insert into whatsmeow_sessions values ('me', 'late', x'01')")
        db.commit()
        db.close()
        async with asyncio.timeout(5):
            while backup.uploads < 2:
                await asyncio.sleep(0.02)
        db = sqlite3.connect(path)
        db.execute("insert into whatsmeow_sessions values ('me', 'at-shutdown', x'02')")
        db.commit()
        db.close()
    finally:
        backup.interval_s = 3600  # only the final snapshot from here on
        await backup.stop()
    assert backup.stats()["session_backup_uploads"] >= 3

    path.unlink()
    restored = backup_for(stack, path, session_id)
    try:
        assert await restored.restore_if_missing() is True
    finally:
        await restored.close()
    assert [r[1] for r in rows_of(path)][-2:] == ["late", "at-shutdown"]
