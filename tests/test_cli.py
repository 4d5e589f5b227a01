"""`python -m bot doctor` and `python -m bot logout` as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fake_openai import FakeOpenAI
from tests.supabase_stack import SupabaseStack
from tests.test_http import free_port
from tests.test_voice_notes import tone

REPO = Path(__file__).resolve().parent.parent


async def bot(tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SUPABASE_", "WA_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        cwd=tmp_path,
        env={**base, "PYTHONPATH": str(REPO), "DATA_DIR": str(tmp_path / "data"), **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


def paired_session(tmp_path: Path) -> Path:
    """A data dir whose session file holds a linked device, as whatsmeow leaves it once paired."""
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "whatsapp-session.sqlite3") as conn:
        conn.execute("CREATE TABLE whatsmeow_device (jid TEXT PRIMARY KEY)")
        conn.execute("INSERT INTO whatsmeow_device VALUES ('34600111222:1@s.whatsapp.net')")
    return data


async def test_doctor_on_the_embedded_defaults_is_all_good(tmp_path: Path) -> None:
    code, out = await bot(tmp_path, "doctor")
    assert code == 0, out
    assert "[ok  ] ffmpeg installed" in out and "AI answers are off" in out and "all good" in out
    assert "SQLite" in out and "none yet" in out


async def test_doctor_names_what_is_wrong_and_how_to_fix_it(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    code, out = await bot(
        tmp_path,
        "doctor",
        OPENAI_API_KEY="wrong-key",
        OPENAI_BASE_URL=fake_openai.base_url,
        SUPABASE_URL="http://127.0.0.1:9",
        SUPABASE_KEY="service-role-key",
        APP_ENV="production",
        LOG_JSON="true",
    )
    assert code == 1
    assert "[FAIL] OpenAI: the API key was refused" in out and "fix: check OPENAI_API_KEY" in out
    assert "[FAIL] Supabase: cannot reach it" in out
    # JSON logs carry no QR drawing: without /qr or a pairing code there is no way to pair.
    assert (
        "[FAIL] ADMIN_TOKEN not set: /qr is off, and with LOG_JSON no QR" in out
        and "3 problem(s) found" in out
    )
    assert "service-role-key" not in out and "wrong-key" not in out


async def test_doctor_does_not_print_the_password_of_an_unreachable_model_url(tmp_path: Path) -> None:
    _, out = await bot(
        tmp_path, "doctor", OPENAI_API_KEY="test-key", OPENAI_BASE_URL="http://llm:pw-Hq3Lz8@127.0.0.1:9/v1"
    )
    assert "[FAIL] OpenAI: cannot reach http://llm:***@127.0.0.1:9/v1" in out
    assert "pw-Hq3Lz8" not in out


async def test_doctor_without_admin_token_points_to_the_qr_in_the_logs(tmp_path: Path) -> None:
    _, out = await bot(tmp_path, "doctor", APP_ENV="production")
    assert "[ok  ] ADMIN_TOKEN not set: /qr is off; pairing relies on the QR drawn in the logs" in out


async def test_doctor_with_a_working_model(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    code, out = await bot(tmp_path, "doctor", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake_openai.base_url)
    assert code == 0 and "OpenAI: reachable, model gpt-4o-mini" in out


async def test_logout_without_a_session_says_so(tmp_path: Path) -> None:
    code, out = await bot(tmp_path, "logout")
    assert code == 0 and "no local session" in out


async def test_doctor_tells_a_session_file_without_a_linked_device_from_a_paired_one(tmp_path: Path) -> None:
    """The bot creates the session file at its first start, paired or not: its existence said nothing."""
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "whatsapp-session.sqlite3") as conn:
        conn.execute("CREATE TABLE whatsmeow_device (jid TEXT PRIMARY KEY)")
    _, out = await bot(tmp_path, "doctor", DATA_DIR=str(data))
    assert "WhatsApp session: none yet" in out
    with sqlite3.connect(data / "whatsapp-session.sqlite3") as conn:
        conn.execute("INSERT INTO whatsmeow_device VALUES ('34600111222:1@s.whatsapp.net')")
    _, out = await bot(tmp_path, "doctor", DATA_DIR=str(data))
    assert "holds a linked device (paired before)" in out


async def test_logout_of_a_session_never_paired_just_deletes_it(tmp_path: Path) -> None:
    """It connected to unlink a device that does not exist: 30 s of retries, then an ERROR and exit 1."""
    import sqlite3
    import time

    data = tmp_path / "data"
    data.mkdir()
    session = data / "whatsapp-session.sqlite3"
    with sqlite3.connect(session) as conn:  # what the first start leaves before a QR is scanned
        conn.execute("CREATE TABLE whatsmeow_device (jid TEXT PRIMARY KEY)")
    started = time.monotonic()
    code, out = await bot(tmp_path, "logout", DATA_DIR=str(data))
    assert code == 0 and "never paired" in out and not session.exists()
    assert time.monotonic() - started < 15


async def test_a_session_file_in_use_is_never_taken_for_one_never_paired(tmp_path: Path) -> None:
    """Any read error counted as "no device": logout deleted a paired session a running bot held locked."""
    import sqlite3

    data = paired_session(tmp_path)
    holder = sqlite3.connect(data / "whatsapp-session.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # as whatsmeow does in the middle of a write
    try:
        _, out = await bot(tmp_path, "doctor", DATA_DIR=str(data))
    finally:
        holder.rollback()
        holder.close()
    assert "cannot be read now" in out and "none yet" not in out


async def test_a_logout_left_with_a_go_call_it_cannot_stop_ends_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unpaired session (in Postgres, where the device count is not read first): logout connected,
    whatsmeow's QR loop ignored Stop, and `asyncio.run` then waited for its worker thread at exit."""

    from bot.config import Settings
    from bot.doctor import run_logout
    from connection import neonize_adapter
    from connection.types import TransportError

    class StuckInPairing:
        def __init__(self, *_: Any, **__: Any) -> None:
            self.hard_exit_needed = False

        async def logout(self) -> None:
            self.hard_exit_needed = True  # the connect call was abandoned, its thread still blocked in Go
            raise TransportError("no linked session to unlink (pairing); the local session was deleted")

    exits: list[int] = []

    def exit_now(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    data = paired_session(tmp_path)
    monkeypatch.setattr(neonize_adapter, "NeonizeTransport", StuckInPairing)
    monkeypatch.setattr(os, "_exit", exit_now)
    with pytest.raises(SystemExit):
        await run_logout(Settings(_env_file=None, data_dir=data, flows_file=None))  # type: ignore[call-arg]
    assert exits == [1]
    assert "remove the device on the phone" not in capsys.readouterr().out  # there is none to remove


async def test_a_local_server_without_a_key_answers_and_doctor_says_what_it_wants(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    """Ollama and llama.cpp need no key: with OPENAI_BASE_URL alone every customer got "AI answers are off",
    and doctor said all was well."""
    chat = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "chat",
        "--jsonl",
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SUPABASE_", "WA_"))},
            "PYTHONPATH": str(REPO),
            "DATA_DIR": str(tmp_path / "data"),
            "OPENAI_BASE_URL": fake_openai.base_url,
        },
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(chat.communicate(b'{"from": "34600111222", "text": "hola"}\n'), 60)
    assert chat.returncode == 0 and '"echo: hola"' in out.decode()
    # This fake server, like OpenAI's, lists its models only to a client with its key.
    code, out_text = await bot(tmp_path, "doctor", OPENAI_BASE_URL=fake_openai.base_url)
    assert (
        code == 1 and "OpenAI: the server wants an API key" in out_text and "set OPENAI_API_KEY" in out_text
    )


async def test_doctor_says_a_base_url_without_v1_is_the_wrong_path(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    """It said "cannot reach ... (NotFoundError)", fix: "check the network", for a server that answered."""
    wrong = fake_openai.base_url.removesuffix("/v1")
    code, out = await bot(tmp_path, "doctor", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=wrong)
    assert (
        code == 1 and "HTTP 404" in out and "it usually ends in /v1" in out and "check the network" not in out
    )


async def test_doctor_connects_to_supabase_db_url(tmp_path: Path, stack: SupabaseStack) -> None:
    """A wrong SUPABASE_DB_URL passed doctor ("kept in Postgres", all good), and `run` then waited for the
    session lease for ever: healthy, never on WhatsApp."""
    import socket

    code, out = await bot(tmp_path, "doctor", SUPABASE_DB_URL=stack.db_url)
    assert "[ok  ] WhatsApp session: kept in Postgres (SUPABASE_DB_URL), reachable" in out, out
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    wrong = f"postgresql://postgres:s3cret-pass@127.0.0.1:{closed}/postgres"
    code, out = await bot(tmp_path, "doctor", SUPABASE_DB_URL=wrong)
    failed = (
        f"[FAIL] WhatsApp session: Postgres at SUPABASE_DB_URL: cannot reach Postgres at 127.0.0.1:{closed}"
    )
    assert code == 1 and failed in out
    assert "session pooler" in out and "s3cret-pass" not in out


async def test_a_logout_that_cannot_reach_whatsapp_says_to_remove_the_device_on_the_phone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:

    from bot.config import Settings
    from bot.doctor import run_logout
    from connection import neonize_adapter
    from connection.types import TransportError

    class Unreachable:
        hard_exit_needed = False

        def __init__(self, *_: Any, **__: Any) -> None:
            pass

        async def logout(self) -> None:
            raise TransportError("could not reach WhatsApp within 30s; the local session was deleted")

    data = paired_session(tmp_path)
    monkeypatch.setattr(neonize_adapter, "NeonizeTransport", Unreachable)
    code = await run_logout(Settings(_env_file=None, data_dir=data, flows_file=None))  # type: ignore[call-arg]
    assert (
        code == 1 and "remove the device on the phone: WhatsApp > Linked devices" in capsys.readouterr().out
    )


def modes_under(root: Path) -> dict[str, int]:
    """Permission bits of `root` and everything in it, by path relative to `root`."""
    return {
        str(path.relative_to(root)): stat.S_IMODE(path.lstat().st_mode)
        for path in [root, *root.rglob("*")]
        if path.exists()
    }


@pytest.mark.timeout(90)
async def test_what_the_bot_writes_in_data_dir_is_private_to_its_user(tmp_path: Path) -> None:
    """Under the usual umask 022 DATA_DIR was 0755 and its files 0644: every local user could read every
    customer's messages, voice notes while transcribed, and the WhatsApp session's device keys (enough to
    clone the device). What an older version left is made private at start."""
    data = tmp_path / "data"
    (data / "tmp" / "audio").mkdir(parents=True)
    sqlite3.connect(data / "bot.sqlite3").close()
    for path, mode in ((data, 0o755), (data / "tmp", 0o755), (data / "tmp" / "audio", 0o755)):
        path.chmod(mode)
    (data / "bot.sqlite3").chmod(0o644)
    note = tone(tmp_path / "note.wav", 2)
    fake = await FakeOpenAI(delay_s=1.5).start()  # transcription takes a while: the temp files are seen
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SUPABASE_", "WA_"))}
    env = {**base, "PYTHONPATH": str(REPO), "DATA_DIR": str(data), "FLOWS_FILE": ""}
    seen: dict[str, int] = {}
    previous = os.umask(0o022)
    try:
        chat = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bot", "chat", "--jsonl"),
            cwd=tmp_path,
            env={**env, "OPENAI_API_KEY": "k", "OPENAI_BASE_URL": fake.base_url},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        lines = json.dumps({"from": "34600111222", "audio": str(note)}) + "\n"
        talking = asyncio.ensure_future(chat.communicate(lines.encode()))
        while not talking.done():
            seen.update(modes_under(data))
            await asyncio.sleep(0.05)
        out, err = await talking
        assert chat.returncode == 0 and b"echo" in out, err
        run = await asyncio.create_subprocess_exec(  # creates the session file and the outbox
            *(sys.executable, "-m", "bot", "run"),
            cwd=tmp_path,
            env={**env, "PORT": str(free_port())},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with asyncio.timeout(40):
                while not {"whatsapp-session.sqlite3", "outbox.sqlite3-wal"} <= set(modes_under(data)):
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            seen.update(modes_under(data))
        finally:
            run.send_signal(signal.SIGTERM)
            await run.wait()
    finally:
        os.umask(previous)
        await fake.stop()
    seen.update(modes_under(data))
    assert any(name.startswith("tmp/audio/") for name in seen)  # a voice note's temp files were seen
    assert {"bot.sqlite3", "bot.sqlite3-wal", "outbox.sqlite3-wal", "whatsapp-session.sqlite3"} <= set(seen)
    assert {name: oct(mode) for name, mode in seen.items() if mode & 0o077} == {}
