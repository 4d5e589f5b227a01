"""Keyword flows: the flows file is checked and bounded at start; flows answer only what they fully answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bot import flows as flows_module
from bot.flows import MAX_FLOWS, MAX_FLOWS_FILE_BYTES, FlowsFileError, load_flows_file
from tests.test_config import run_bot


def write(tmp_path: Path, text: str, name: str = "flows.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the file's bounds ------------------------------------------------------------------------------------


def test_a_flows_file_over_the_size_bound_stops_start_up_with_one_line(tmp_path: Path) -> None:
    """An 8 MB file took 31 s to load and left the process at ~500 MB: refused at once instead."""
    entry = "- keywords: [horario]\n  answer: " + "x" * 200 + "\n"
    write(tmp_path, entry * (MAX_FLOWS_FILE_BYTES // len(entry) + 1))
    result = run_bot(tmp_path, "chat", "--jsonl", FLOWS_FILE="flows.yaml")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (
        "invalid configuration: FLOWS_FILE: flows file flows.yaml: larger than 1 MB "
        "(a flows file holds at most 5,000 short flows)"
    )


def test_more_flows_than_the_bound_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "".join(f"- {{keywords: k{i}, answer: a}}\n" for i in range(MAX_FLOWS + 1)))
    assert path.stat().st_size < MAX_FLOWS_FILE_BYTES  # small, but too many flows
    with pytest.raises(FlowsFileError, match=r"5,001 flows, at most 5,000$"):
        load_flows_file(path)


def test_the_bounds_allow_a_full_file(tmp_path: Path) -> None:
    path = write(tmp_path, "".join(f"- {{keywords: k{i}, answer: a}}\n" for i in range(MAX_FLOWS)))
    assert len(load_flows_file(path)) == MAX_FLOWS


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml")
def test_yaml_is_read_with_libyaml() -> None:
    assert flows_module._YAML_LOADER is yaml.CSafeLoader
