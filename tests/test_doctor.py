"""`doctor` fails where `run` would: the flows file, the model's name, the SQLite files."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from tests.fake_openai import FakeOpenAI
from tests.test_cli import bot
from tests.test_cli_database import read_only


def failures(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[FAIL]")]


async def doctor_against(tmp_path: Path, fake: FakeOpenAI, **env: str) -> tuple[int, str]:
    """`doctor` with an API key, pointed at the fake OpenAI-compatible server."""
    return await bot(tmp_path, "doctor", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake.base_url, **env)


async def test_a_malformed_flows_file_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "flows.yaml").write_text("- keywords: [horario\n  answer: Abrimos\n")
    code, out = await bot(tmp_path, "doctor", FLOWS_FILE="flows.yaml")
    assert code == 1, out
    assert [line.split(":")[0] for line in failures(out)] == ["[FAIL] keyword flows"]
    assert "[FAIL] keyword flows: flows file flows.yaml: while parsing" in out and "1 problem(s) found" in out
    assert "fix: fix the file: a YAML or JSON list of {keywords, answer} entries" in out


async def test_a_flows_entry_without_an_answer_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "flows.yaml").write_text("- keywords: [horario]\n")
    code, out = await bot(tmp_path, "doctor")
    assert code == 1, out
    assert "[FAIL] keyword flows: flows file flows.yaml: entry 1: 'answer' must be a non-empty string" in out


async def test_a_flows_file_named_but_missing_is_a_problem_and_an_unnamed_one_is_not(tmp_path: Path) -> None:
    code, out = await bot(tmp_path, "doctor", FLOWS_FILE="flujos.yaml")
    assert code == 1 and "[FAIL] keyword flows: FLOWS_FILE=flujos.yaml: no such file" in out
    code, out = await bot(tmp_path, "doctor")
    assert code == 0 and "[ok  ] keyword flows: none (flows.yaml not found)" in out


async def test_a_good_flows_file_is_counted(tmp_path: Path) -> None:
    (tmp_path / "flows.yaml").write_text("- keywords: [horario]\n  answer: Abrimos a las 9.\n")
    code, out = await bot(tmp_path, "doctor")
    assert code == 0 and "[ok  ] keyword flows: 1 in flows.yaml" in out


async def test_a_model_the_server_does_not_list_is_a_problem_with_the_close_names(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    fake_openai.models = ["gpt-4o-mini", "gpt-4o", "whisper-1", "text-embedding-3-small"]
    code, out = await doctor_against(tmp_path, fake_openai, OPENAI_MODEL="gpt-4o-mni")
    assert code == 1, out
    assert "reachable, model gpt-4o-mni" not in out
    line = next(line for line in failures(out) if "OpenAI" in line)
    assert line.startswith(
        f"[FAIL] OpenAI: model gpt-4o-mni is not among the 4 model(s) {fake_openai.base_url}"
    )
    assert line.endswith("close names: gpt-4o-mini, gpt-4o"), line
    assert "fix: set OPENAI_MODEL to a model the server offers" in out


async def test_a_server_that_lists_no_models_is_not_held_against_the_model(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    fake_openai.models = []
    code, out = await doctor_against(tmp_path, fake_openai, OPENAI_MODEL="x")
    assert code == 0, out
    assert "[ok  ] OpenAI: reachable, model x (the server lists no models to check it)" in out


async def test_a_server_that_lists_one_model_answers_to_any_name(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    """llama.cpp's server, one model loaded, lists it by its file name and answers whatever OPENAI_MODEL
    says: the bot works, so doctor must not fail it."""
    fake_openai.models = ["/models/llama-3.2-3b-instruct-q4_k_m.gguf"]
    code, out = await doctor_against(tmp_path, fake_openai)
    assert code == 0, out
    assert "[ok  ] OpenAI: reachable, model gpt-4o-mini (the server lists one model, /models/llama-3.2" in out


@pytest.mark.parametrize(
    ("listed", "model"),
    [
        ("models/gemini-2.0-flash", "gemini-2.0-flash"),
        ("llama3:latest", "llama3"),
        ("qwen2.5:7b", "qwen2.5:7b"),
    ],
)
async def test_the_names_servers_list_a_model_under_count(
    tmp_path: Path, fake_openai: FakeOpenAI, listed: str, model: str
) -> None:
    fake_openai.models = [listed, "other-model"]
    code, out = await doctor_against(tmp_path, fake_openai, OPENAI_MODEL=model)
    assert code == 0 and f"[ok  ] OpenAI: reachable, model {model}" in out, out


async def test_a_transcription_model_the_server_does_not_list_is_a_warning(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    """Ollama serves chat models but no speech-to-text: texts work, every voice note gets an apology."""
    fake_openai.models = ["llama3:latest", "qwen2.5:7b"]
    code, out = await doctor_against(tmp_path, fake_openai, OPENAI_MODEL="llama3")
    assert code == 0, out
    assert "[warn] OpenAI: transcription model whisper-1 is not among the models the server lists" in out
    assert "fix: set OPENAI_TRANSCRIBE_MODEL to a speech-to-text model the server offers" in out


async def test_a_listed_transcription_model_is_ok(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    fake_openai.models = ["gpt-4o-mini", "gpt-4o-mini-transcribe"]
    code, out = await doctor_against(
        tmp_path, fake_openai, OPENAI_TRANSCRIBE_MODEL="gpt-4o-mini-transcribe", BOT_TIMEZONE="Europe/Madrid"
    )
    assert code == 0 and "[ok  ] OpenAI: voice notes transcribed by gpt-4o-mini-transcribe" in out, out
    assert "[warn]" not in out


async def test_a_file_that_is_not_a_database_is_a_problem(tmp_path: Path) -> None:
    store = tmp_path / "data" / "bot.sqlite3"
    store.parent.mkdir()
    store.write_text("garbage\n")
    code, out = await bot(tmp_path, "doctor")
    assert code == 1, out
    assert f"[FAIL] SQLite file {store}: file is not a database" in out
    session = tmp_path / "data" / "whatsapp-session.sqlite3"
    fix = "fix: move it aside to start fresh (without its message history); the WhatsApp session is in"
    assert f"{fix} {session} and is kept" in out
    assert store.read_text() == "garbage\n"


async def test_a_damaged_database_is_a_problem(tmp_path: Path) -> None:
    """The header and the schema read fine (start-up lets it through); pages further in are broken."""
    store = tmp_path / "data" / "bot.sqlite3"
    store.parent.mkdir()
    with contextlib.closing(sqlite3.connect(store)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 2000)
        conn.execute("CREATE INDEX t_x ON t (x)")
        conn.commit()
    data = bytearray(store.read_bytes())
    data[4096 * 50 : 4096 * 51] = b"\xff" * 4096
    store.write_bytes(bytes(data))
    code, out = await bot(tmp_path, "doctor")
    assert code == 1, out
    assert f"[FAIL] SQLite file {store}: " in out and "malformed" in out


async def test_a_read_only_database_and_a_directory_are_problems(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "outbox.sqlite3").mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(data / "bot.sqlite3")) as conn:
        conn.execute("CREATE TABLE t (x)")
    with read_only(data / "bot.sqlite3"):
        code, out = await bot(tmp_path, "doctor")
    assert code == 1, out
    assert f"[FAIL] SQLite file {data / 'bot.sqlite3'}: is read-only" in out
    assert "fix: give the bot's user write access, or move it aside to start fresh" in out
    assert f"[FAIL] SQLite file {data / 'outbox.sqlite3'}: is a directory, not a database file" in out
    assert "2 problem(s) found" in out


async def test_a_sound_database_is_fine(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("bot.sqlite3", "outbox.sqlite3"):
        with contextlib.closing(sqlite3.connect(data / name)) as conn:
            conn.execute("CREATE TABLE t (x)")
    code, out = await bot(tmp_path, "doctor")
    assert code == 0, out
    assert f"[ok  ] database: SQLite at {data / 'bot.sqlite3'} (Supabase not configured)" in out
    assert f"[ok  ] SQLite file {data / 'outbox.sqlite3'} reads through" in out
