"""A local SQLite file that cannot be opened stops `chat` and `run` with one line saying what to do."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.config import Settings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_bot(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SUPABASE_", "WA_"))}
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=tmp_path,
        env={
            **base,
            "PYTHONPATH": str(REPO),
            "DATA_DIR": str(tmp_path / "data"),
            "PORT": str(free_port()),
            **env,
        },
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )


def a_database(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.commit()


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Read-only for this user: root writes through file modes, so as root the file is made immutable."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield
        return
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip("running as root and chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def assert_one_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("invalid configuration: "), lines[0]
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["chat", "run"])
def test_a_file_that_is_not_a_database_stops_start_up_with_one_line(tmp_path: Path, command: str) -> None:
    store = tmp_path / "data" / "bot.sqlite3"
    store.parent.mkdir()
    store.write_text("garbage\n")
    result = run_bot(tmp_path, command, *(["--jsonl"] if command == "chat" else []))
    assert_one_line(
        result,
        f"{store}: file is not a database; move it aside to start fresh",
        f"the WhatsApp session is in {tmp_path / 'data' / 'whatsapp-session.sqlite3'} and is kept",
    )
    assert store.read_text() == "garbage\n", "the file is left as it was"


def test_the_line_says_to_move_the_wal_file_too(tmp_path: Path) -> None:
    """SQLite replays a -wal file left behind onto the next database of that name."""
    store = tmp_path / "data" / "bot.sqlite3"
    store.parent.mkdir()
    store.write_text("garbage\n")
    Path(f"{store}-wal").write_bytes(b"\0" * 32)
    result = run_bot(tmp_path, "chat", "--jsonl")
    assert_one_line(result, "move it aside to start fresh (without its message history), and bot.sqlite3-wal")


def test_a_directory_where_the_database_goes_stops_start_up_with_one_line(tmp_path: Path) -> None:
    store = tmp_path / "data" / "bot.sqlite3"
    store.mkdir(parents=True)
    result = run_bot(tmp_path, "chat", "--jsonl")
    assert_one_line(result, f"{store}: is a directory, not a database file; move it aside to start fresh")


def test_a_read_only_database_stops_start_up_with_one_line(tmp_path: Path) -> None:
    store = tmp_path / "data" / "bot.sqlite3"
    a_database(store)
    with read_only(store):
        result = run_bot(tmp_path, "run")
    assert_one_line(result, f"{store}: is read-only; give the bot's user write access, or move it aside")


def test_with_supabase_the_journal_is_checked_and_the_session_url_never_shown(tmp_path: Path) -> None:
    journal = Settings(_env_file=None, data_dir=tmp_path / "data").journal_path  # type: ignore[call-arg]
    journal.parent.mkdir()
    journal.write_bytes(b"\x00" * 4096)
    result = run_bot(
        tmp_path,
        "chat",
        "--jsonl",
        SUPABASE_URL="http://127.0.0.1:9",
        SUPABASE_KEY="service-role-key",
        SUPABASE_DB_URL="postgresql://bot:Secret-pw@127.0.0.1:9/postgres",
    )
    line = assert_one_line(
        result,
        f"{journal}: file is not a database",
        "without its writes not yet sent to Supabase",
        "the WhatsApp session is in Postgres (SUPABASE_DB_URL) and is kept",
    )
    assert "Secret-pw" not in line


def test_run_checks_the_outbox_too(tmp_path: Path) -> None:
    outbox = tmp_path / "data" / "outbox.sqlite3"
    outbox.parent.mkdir()
    outbox.write_text("garbage\n")
    result = run_bot(tmp_path, "run")
    assert_one_line(result, f"{outbox}: file is not a database", "without its replies waiting")


def test_the_journal_named_in_the_settings_is_the_one_the_store_opens(tmp_path: Path) -> None:
    from memory.supabase_store import JOURNAL_FILE

    assert Settings(_env_file=None, data_dir=tmp_path).journal_path == tmp_path / JOURNAL_FILE  # type: ignore[call-arg]


def test_a_healthy_database_from_a_crashed_run_still_starts(tmp_path: Path) -> None:
    """A WAL file left by a kill -9 is a normal state, not a problem."""
    store = tmp_path / "data" / "bot.sqlite3"
    store.parent.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA journal_mode=WAL');"
            " c.execute('CREATE TABLE t (x)'); c.commit(); os._exit(0)",
            str(store),
        ],
        check=True,
    )
    assert store.with_name("bot.sqlite3-wal").exists()
    result = run_bot(tmp_path, "chat", "--jsonl")
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_damaged_whatsapp_session_file_stops_run_with_one_line(tmp_path: Path) -> None:
    """Else whatsmeow fails every connect ("file is not a database") and the bot retries it for ever."""
    session = tmp_path / "data" / "whatsapp-session.sqlite3"
    session.parent.mkdir()
    session.write_bytes(b"\x13" * 50_000)
    result = run_bot(tmp_path, "run")
    assert_one_line(
        result,
        f"{session}: file is not a database; move it aside and pair the number again",
        "the message history is kept",
    )
    assert session.read_bytes() == b"\x13" * 50_000, "the file is left as it was"
    doctor = run_bot(tmp_path, "doctor")
    assert doctor.returncode == 1, doctor.stdout
    assert f"[FAIL] SQLite file {session}: file is not a database" in doctor.stdout


def test_with_a_session_backup_in_supabase_a_damaged_session_file_is_said_to_be_restored(
    tmp_path: Path,
) -> None:
    session = tmp_path / "data" / "whatsapp-session.sqlite3"
    session.parent.mkdir()
    session.write_text("garbage\n")
    result = run_bot(tmp_path, "run", SUPABASE_URL="http://127.0.0.1:9", SUPABASE_KEY="service-role-key")
    assert_one_line(result, f"{session}: file is not a database; move it aside: the next start restores")


def test_chat_does_not_open_the_whatsapp_session(tmp_path: Path) -> None:
    session = tmp_path / "data" / "whatsapp-session.sqlite3"
    session.parent.mkdir()
    session.write_text("garbage\n")
    result = run_bot(tmp_path, "chat", "--jsonl")
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 400 KB filesystem (tmpfs): a real full disk, without filling the machine's."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    descriptor = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(descriptor, b"\0" * 4096):
            pass
    except OSError:  # no space left on the device: full
        pass
    finally:
        os.close(descriptor)


@pytest.mark.parametrize("command", ["chat", "run"])
def test_a_full_disk_at_start_is_said_and_the_history_is_not_called_broken(
    tmp_path: Path, small_disk: Path, command: str
) -> None:
    """SQLite says "disk I/O error" there (its WAL index cannot be created): the line used to tell the
    operator to move the message history aside."""
    data = small_disk / "data"
    a_database(data / "bot.sqlite3")
    fill(small_disk)
    result = run_bot(tmp_path, command, *(["--jsonl"] if command == "chat" else []), DATA_DIR=str(data))
    line = assert_one_line(result, f"DATA_DIR={data}: the disk is full (", "free some space")
    assert "move it aside" not in line
    assert (data / "bot.sqlite3").exists()


def test_doctor_says_the_disk_is_full(tmp_path: Path, small_disk: Path) -> None:
    fill(small_disk)
    result = run_bot(tmp_path, "doctor", DATA_DIR=str(small_disk))
    assert result.returncode == 1
    assert f"[FAIL] data dir {small_disk}: the disk is full" in result.stdout, result.stdout
