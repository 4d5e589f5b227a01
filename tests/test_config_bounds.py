"""Every numeric setting is bounded on both sides: an absurd value is a one-line configuration error."""

from __future__ import annotations

import re
from pathlib import Path

import annotated_types
import pytest
from pydantic import ValidationError

from bot.config import Settings, describe_error
from tests.test_config import run_bot

NUMERIC = sorted(
    name
    for name, field in Settings.model_fields.items()
    if field.annotation in (int, float, int | None, float | None)
)


def test_the_numeric_settings_are_found() -> None:
    expected = {"max_waiting_messages", "retention_days", "port", "openai_timeout", "memory_limit"}
    assert expected <= set(NUMERIC)


@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_setting_has_a_lower_and_an_upper_bound(name: str) -> None:
    kinds = {type(rule) for rule in Settings.model_fields[name].metadata}
    assert kinds & {annotated_types.Ge, annotated_types.Gt}, f"{name.upper()} has no lower bound"
    assert kinds & {annotated_types.Le, annotated_types.Lt}, f"{name.upper()} has no upper bound"


@pytest.mark.parametrize("value", ["99999999999999999999", "-99999999999999999999", "1e300"])
@pytest.mark.parametrize("name", NUMERIC)
def test_an_absurd_number_is_refused_naming_the_variable(name: str, value: str) -> None:
    if Settings.model_fields[name].annotation in (int, int | None) and "e" in value:
        value = "1" + "0" * 300  # the integer spelling of the same absurdity
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, **{name: value})  # type: ignore[arg-type]
    assert describe_error(caught.value).startswith(f"{name.upper()}=")


def test_a_huge_max_waiting_messages_stops_start_up_with_one_line(tmp_path: Path) -> None:
    """It used to get past the settings and end in an OverflowError from SQLite (a 40-line traceback)."""
    result = run_bot(tmp_path, "chat", "--jsonl", MAX_WAITING_MESSAGES="99999999999999999999")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (
        "invalid configuration: MAX_WAITING_MESSAGES='99999999999999999999':"
        " Input should be less than or equal to 1000000"
    )


def example_comments() -> dict[str, str]:
    """Each variable of .env.example with the comment lines above it (up to the previous variable)."""
    comments: dict[str, str] = {}
    block: list[str] = []
    for line in (Path(__file__).resolve().parent.parent / ".env.example").read_text().splitlines():
        if match := re.match(r"(?:# )?([A-Z_]+)=", line):  # `# NAME=`: see test_config.COMMENTED_OUT
            comments[match.group(1)] = " ".join(block)
            block = []
        elif line.startswith("#"):
            block.append(line)
        elif "=" in line:
            comments[line.split("=", 1)[0]] = " ".join(block)
            block = []
        else:
            block = []
    return comments


@pytest.mark.parametrize("name", NUMERIC)
def test_env_example_states_every_numeric_settings_range(name: str) -> None:
    """An operator reads the ranges where they set the values, not in an error at the next deploy."""
    comment = example_comments().get(name.upper())
    assert comment is not None, f"{name.upper()} is missing from .env.example"
    stated = {float(number.replace(",", "")) for number in re.findall(r"\d[\d,]*(?:\.\d+)?", comment)}
    for rule in Settings.model_fields[name].metadata:
        for bound in ("ge", "gt", "le", "lt"):
            if (value := getattr(rule, bound, None)) is not None:
                assert float(value) in stated, f".env.example does not state {name.upper()}'s bound {value}"
