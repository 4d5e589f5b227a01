"""Configuration: every variable documented, bad values stop start-up with one clear line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import Settings

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


def example_variables() -> dict[str, str]:
    """Variables in .env.example, each mapped to the comment lines above it."""
    found: dict[str, str] = {}
    comment: list[str] = []
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.startswith("#"):
            comment.append(line)
        elif match := re.match(r"([A-Z_]+)=", line):
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


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MAX_CHAT_HISTORY", "five", "MAX_CHAT_HISTORY='five': Input should be a valid integer"),
        ("BOT_LANGUAGE", "fr", "BOT_LANGUAGE='fr': Input should be 'es' or 'en'"),
        ("PORT", "70000", "PORT='70000': Input should be less than or equal to 65535"),
        ("OPENAI_API_KEY", "changeme", "OPENAI_API_KEY: is a placeholder"),
        ("ADMIN_TOKEN", "short", "ADMIN_TOKEN: must be at least 16 characters"),
        ("SUPABASE_DB_URL", "mysql://x", "SUPABASE_DB_URL: must be a Postgres URL"),
        ("SUPABASE_URL", "https://x.supabase.co", "SUPABASE_URL and SUPABASE_KEY must be set together"),
    ],
)
def test_a_bad_value_stops_start_up_with_one_line(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SUPABASE_"))}
    env.update({variable: value, "DATA_DIR": str(tmp_path)})
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
    if variable.endswith(("KEY", "TOKEN")):
        assert value not in lines[0], "secrets are never echoed"


def test_production_logs_at_warning_unless_told(make_settings) -> None:
    assert make_settings(app_env="production").effective_log_level == "WARNING"
    assert make_settings(app_env="production", log_level="debug").effective_log_level == "DEBUG"
    assert make_settings().effective_log_level == "INFO"
