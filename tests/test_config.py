"""Configuration: every variable documented, bad values stop start-up with one clear line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.config import Settings, describe_error

REPO = Path(__file__).resolve().parent.parent
DESIGN_VARIABLES = [
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_MODEL",
    "OPENAI_TRANSCRIBE_MODEL",
    "BOT_SYSTEM_PROMPT",
    "BOT_SYSTEM_PROMPT_FILE",
    "BOT_LANGUAGE",
    "SUPABASE_URL",
    "SUPABASE_KEY",
    "SUPABASE_DB_URL",
    "DATA_DIR",
    "PORT",
    "APP_ENV",
    "LOG_LEVEL",
    "MEMORY_LIMIT",
    "MAX_CHAT_HISTORY",
    "RATE_LIMIT_MAX_MESSAGES",
    "RATE_LIMIT_COOLDOWN",
    "AUDIO_MAX_MB",
    "WA_PAIR_PHONE",
    "ADMIN_TOKEN",
]


# A variable is `NAME=value`, or `# NAME=` where an empty value would override a default set elsewhere
# (the Docker image's DATA_DIR, with `docker run --env-file .env`).
COMMENTED_OUT = re.compile(r"(?:# )?([A-Z_]+)=")


def example_variables() -> dict[str, str]:
    """Variables in .env.example, each mapped to the comment lines above it."""
    found: dict[str, str] = {}
    comment: list[str] = []
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.startswith("#") and not COMMENTED_OUT.match(line):
            comment.append(line)
        elif match := COMMENTED_OUT.match(line):
            found[match.group(1)] = "\n".join(comment)
            comment = [] if not comment or not line else comment
        else:
            comment = []
    return found


def test_every_variable_is_in_env_example_with_a_comment() -> None:
    documented = example_variables()
    settings_fields = {name.upper() for name in Settings.model_fields}
    assert set(DESIGN_VARIABLES) <= set(documented)
    assert settings_fields == set(documented), "every setting is documented, nothing else is"
    assert all(documented[name] for name in documented), "each variable has a comment"


def test_every_variable_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [name for name in example_variables() if f"`{name}`" not in readme]
    assert missing == []


def test_env_example_loads_as_is(tmp_path: Path) -> None:
    settings = Settings(_env_file=REPO / ".env.example")  # type: ignore[call-arg]
    assert settings.max_chat_history == 5 and settings.openai_api_key is None


def test_env_example_as_a_docker_env_file_leaves_the_images_settings_alone() -> None:
    """`docker run --env-file .env` passes `DATA_DIR=` as an empty value, which replaced the image's /data:
    the session went to the container's own disk and every redeploy asked for a new QR."""
    image = {"DATA_DIR", "APP_ENV", "PORT", "BOT_RUN_AS"}  # what the Dockerfile sets (ENV)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert all(f"{name}=" in dockerfile for name in image)
    assigned = {
        match.group(1)
        for line in (REPO / ".env.example").read_text().splitlines()
        if (match := re.match(r"([A-Z_]+)=(.*)", line))
    }
    assert not {"DATA_DIR", "APP_ENV"} & assigned


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MAX_CHAT_HISTORY", "five", "MAX_CHAT_HISTORY='five': Input should be a valid integer"),
        ("BOT_LANGUAGE", "fr", "BOT_LANGUAGE='fr': Input should be 'es' or 'en'"),
        (
            "TRANSCRIBE_LANGUAGE",
            "spanish",
            "TRANSCRIBE_LANGUAGE='spanish': must be a two-letter language code such as es or en, or auto",
        ),
        (
            "TRANSCRIBE_LANGUAGE",
            "xx",
            "TRANSCRIBE_LANGUAGE='xx': is not a language Whisper knows: use a two-letter ISO 639-1 code such"
            " as es or en, or auto",
        ),
        ("TRANSCRIBE_LANGUAGE", "sp", "TRANSCRIBE_LANGUAGE='sp': is not a language Whisper knows"),
        ("PORT", "70000", "PORT='70000': Input should be less than or equal to 65535"),
        ("OPENAI_API_KEY", "changeme", "OPENAI_API_KEY: is a placeholder"),
        ("ADMIN_TOKEN", "short", "ADMIN_TOKEN: must be at least 16 characters"),
        ("SUPABASE_DB_URL", "mysql://x", "SUPABASE_DB_URL: must be a Postgres URL"),
        (
            "SUPABASE_DB_URL",
            "postgresql://bot:pw/Secret-KEY@127.0.0.1:5432/postgres",
            "SUPABASE_DB_URL: cannot be read: percent-encode",
        ),
        (
            "SUPABASE_DB_URL",
            "postgresql://bot:12/Secret@127.0.0.1:5432/postgres",
            "SUPABASE_DB_URL: cannot be read: percent-encode",
        ),
        (
            "SUPABASE_DB_URL",
            "postgresql://bot:p@Secret@127.0.0.1:5432/postgres",
            "SUPABASE_DB_URL: cannot be read: percent-encode",
        ),
        ("SUPABASE_URL", "https://x.supabase.co", "SUPABASE_URL and SUPABASE_KEY must be set together"),
        ("SUPABASE_URL", "notaurl", "SUPABASE_URL: must be an http:// or https:// URL"),
        ("OPENAI_BASE_URL", "localhost:11434/v1", "OPENAI_BASE_URL: must be an http:// or https:// URL"),
        ("OPENAI_TIMEOUT", "nan", "OPENAI_TIMEOUT='nan': Input should be a finite number"),
        ("AI_CIRCUIT_COOLDOWN_S", "inf", "AI_CIRCUIT_COOLDOWN_S='inf': Input should be a finite number"),
        ("DATA_DIR", "/proc/no-such-dir", "DATA_DIR=/proc/no-such-dir: No such file or directory"),
        ("FLOWS_FILE", "flujos.yaml", "FLOWS_FILE=flujos.yaml: no such file"),
        ("ALLOWED_NUMBERS", "34611122233, 600-111", "ALLOWED_NUMBERS: entry 2 (60***11) is not a phone"),
        ("BLOCKED_NUMBERS", "34611122233,60011", "entry 2 (60011) has 5 digits: a phone number in"),
        ("WA_PAIR_PHONE", "+34 611-122-233", "WA_PAIR_PHONE: must be the phone number"),
        ("WA_PAIR_PHONE", "0034611122233", "WA_PAIR_PHONE: starts with 0: use the international format"),
        ("WA_PAIR_PHONE", "0611122233", "WA_PAIR_PHONE: starts with 0"),
    ],
)
def test_a_bad_value_stops_start_up_with_one_line(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SUPABASE_"))}
    env.update({"DATA_DIR": str(tmp_path), variable: value})
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--jsonl"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("invalid configuration: ") and expected in lines[0]
    if variable.endswith(("KEY", "TOKEN", "URL")):
        assert value not in lines[0] and "Secret" not in lines[0], "secrets are never echoed"
    for number in ("34611122233", "611-122-233"):
        assert number not in lines[0], "customers' numbers are never echoed"


@pytest.mark.parametrize("value", ["xx", "sp", " SP "])
def test_a_transcribe_language_whisper_does_not_know_is_refused(value: str) -> None:
    """It passed as two letters, then every voice note failed at the server (HTTP 400, unknown language)."""
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, transcribe_language=value)  # type: ignore[call-arg]
    assert describe_error(caught.value) == (
        f"TRANSCRIBE_LANGUAGE={value!r}: is not a language Whisper knows: use a two-letter ISO 639-1 code"
        " such as es or en, or auto"
    )


@pytest.mark.parametrize(("value", "hint"), [("ES", "es"), ("pt", "pt"), ("auto", None), ("jw", "jw")])
def test_a_transcribe_language_whisper_knows_is_accepted(value: str, hint: str | None) -> None:
    """Case-folded, and Whisper's own codes pass even where ISO differs (jw: Whisper's Javanese, ISO's jv)."""
    settings = Settings(_env_file=None, transcribe_language=value)  # type: ignore[call-arg]
    assert settings.transcription_hint == hint


def test_production_logs_at_warning_unless_told(make_settings) -> None:
    assert make_settings(app_env="production").effective_log_level == "WARNING"
    assert make_settings(app_env="production", log_level="debug").effective_log_level == "DEBUG"
    assert make_settings().effective_log_level == "INFO"


def run_bot(tmp_path: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SUPABASE_", "FLOWS_"))}
    env.update({"DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO), **variables})
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=tmp_path,
        env=env,
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_doctor_refuses_a_transcribe_language_whisper_does_not_know_like_start_up(tmp_path: Path) -> None:
    """doctor said "all good" and the bot started, then every voice note failed at the server."""
    result = run_bot(tmp_path, "doctor", TRANSCRIBE_LANGUAGE="sp")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr + result.stdout
    assert lines[0] == (
        "invalid configuration: TRANSCRIBE_LANGUAGE='sp': is not a language Whisper knows: use a two-letter"
        " ISO 639-1 code such as es or en, or auto"
    )


@pytest.mark.parametrize("where", ["environment", ".env"])
def test_an_empty_flows_file_turns_keyword_flows_off(tmp_path: Path, where: str) -> None:
    """README and .env.example say "empty for none"; empty variables otherwise count as unset, so the
    sample shop's flows.yaml kept answering "horario" for a shop that had cleared the line."""
    (tmp_path / "flows.yaml").write_text("- keywords: [horario]\n  answer: Abrimos de 9 a 18.\n")
    variables = {"FLOWS_FILE": ""} if where == "environment" else {}
    if where == ".env":
        (tmp_path / ".env").write_text("FLOWS_FILE=\n")
    line = '{"from": "34600111222", "text": "horario"}\n'
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--jsonl"],
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FLOWS_"))},
            "DATA_DIR": str(tmp_path / "data"),
            "PYTHONPATH": str(REPO),
            **variables,
        },
        input=line,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Abrimos" not in result.stdout and result.stdout.strip()  # the AI-off reply, not the flow


@pytest.mark.parametrize("what", ["system prompt", ".env"])
def test_a_file_that_is_not_utf8_stops_start_up_with_one_line(tmp_path: Path, what: str) -> None:
    if what == ".env":
        (tmp_path / ".env").write_bytes(b"BOT_SYSTEM_PROMPT=Hola caf\xe9\n")
        result = run_bot(tmp_path, "chat", "--jsonl")
        expected = "invalid configuration: .env is not UTF-8 text"
    else:
        (tmp_path / "prompt.txt").write_bytes(b"Eres el asistente de la cafeter\xeda")
        result = run_bot(tmp_path, "chat", "--jsonl", BOT_SYSTEM_PROMPT_FILE=str(tmp_path / "prompt.txt"))
        expected = "invalid configuration: BOT_SYSTEM_PROMPT_FILE="
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), result.stderr


def test_a_port_in_use_stops_start_up_with_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_bot(tmp_path, "run", PORT=str(port))
    assert result.returncode == 2
    assert f"invalid configuration: PORT={port}: already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_flows_file_with_a_yaml_error_stops_start_up_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "flows.yaml").write_text("- keywords: [horario\n  answer: Abrimos\n")
    result = run_bot(tmp_path, "chat", "--jsonl", FLOWS_FILE="flows.yaml")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("invalid configuration: FLOWS_FILE: flows file flows.yaml:")
