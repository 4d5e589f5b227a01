"""`python -m bot chat` as a user runs it: a real process, stdin in, stdout out."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from tests.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parent.parent


async def start_chat(tmp_path: Path, *args: str, **env: str) -> asyncio.subprocess.Process:
    """`python -m bot chat [args]` in `tmp_path` (DATA_DIR under it), pipes on stdin, stdout and stderr."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SUPABASE_"))}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "chat",
        *args,
        cwd=tmp_path,
        env={**base, "PYTHONPATH": str(REPO), "DATA_DIR": str(tmp_path / "data"), **env},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def run_chat(tmp_path: Path, stdin: str, *args: str, **env: str) -> tuple[int, str, str]:
    process = await start_chat(tmp_path, *args, **env)
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def lines(text: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in text.splitlines()]


async def test_every_console_session_keeps_its_replies_in_the_history(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    """Each session numbered its replies from 1 again: from the second session on, a reply clashed with
    the first session's id in the database and was not saved, so the model never saw it again."""
    env = {"OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": fake_openai.base_url}
    for text in ("hola, soy Ana", "busco una mesa para dos", "¿qué te pedí?"):
        code, _, err = await run_chat(
            tmp_path, json.dumps({"from": "34600111222", "text": text}) + "\n", "--jsonl", **env
        )
        assert code == 0, err
    seen = [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]]
    assert seen == [
        "hola, soy Ana",
        "echo: hola, soy Ana",
        "busco una mesa para dos",
        "echo: busco una mesa para dos",
        "¿qué te pedí?",
    ]


async def test_a_stop_signal_ends_the_console_also_after_stdin_closed(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    """Once stdin had closed, the console waited for every reply with no way out: with a model that
    hangs, SIGTERM and Ctrl-C did nothing and only kill -9 ended it."""
    fake_openai.delay_s = 120
    process = await start_chat(
        tmp_path,
        "--jsonl",
        OPENAI_API_KEY="test-key",
        OPENAI_BASE_URL=fake_openai.base_url,
        OPENAI_TIMEOUT="300",
    )
    assert process.stdin is not None
    process.stdin.write(json.dumps({"from": "34600111222", "text": "hola"}).encode() + b"\n")
    process.stdin.close()
    deadline = asyncio.get_running_loop().time() + 30
    while fake_openai.chat_count == 0:  # the question is at the model, which does not answer
        assert asyncio.get_running_loop().time() < deadline, "the model was never asked"
        await asyncio.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), 30)  # it takes at most its 8-s stop budget
    except TimeoutError:
        process.kill()
        raise AssertionError("SIGTERM did not end the console") from None
    assert process.returncode == 0


async def test_jsonl_answers_a_scripted_conversation(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    (tmp_path / "flows.yaml").write_text("- keywords: [horario]\n  answer: De 9 a 18.\n", encoding="utf-8")
    script = "\n".join(
        json.dumps(m)
        for m in [
            {"from": "34600111222", "text": "hola, soy Ana"},
            {"from": "5491122334455", "text": "¿horario?"},
            {"from": "34600111222", "text": "¿qué te dije?"},
        ]
    )
    code, out, err = await run_chat(
        tmp_path, script + "\n", "--jsonl", OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake_openai.base_url
    )
    assert code == 0, err
    replies = lines(out)
    assert {"to": "5491122334455", "text": "De 9 a 18."} in replies
    ana = [r["text"] for r in replies if r["to"] == "34600111222"]
    assert ana == ["echo: hola, soy Ana", "echo: ¿qué te dije?"]
    # The second turn saw the first one: the same pipeline, history included.
    assert [m["content"] for m in fake_openai.chat_requests[-1]["messages"][1:]] == [
        "hola, soy Ana",
        "echo: hola, soy Ana",
        "¿qué te dije?",
    ]


async def test_jsonl_reports_bad_lines_and_keeps_going(tmp_path: Path) -> None:
    script = (
        'not json\n{"text": "no sender"}\n{"from": "34600111222", "text": 5}\n'
        '{"from": "34600111222", "text": "hola"}\n'
    )
    code, out, err = await run_chat(tmp_path, script, "--jsonl", FLOWS_FILE="")
    assert code == 0
    assert len(lines(out)) == 1 and "desactivadas" in lines(out)[0]["text"]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors[0].startswith("error: line 1 ignored: not JSON")
    assert errors[1].startswith("error: line 2 ignored:") and '"from" must be a phone number' in errors[1]
    assert errors[2].startswith("error: line 3 ignored:") and '"text"' in errors[2]


async def test_jsonl_voice_note_without_ai_gets_a_clear_reply(tmp_path: Path) -> None:
    code, out, _ = await run_chat(
        tmp_path, '{"from": "34600111222", "audio": "/nonexistent.ogg"}\n', "--jsonl"
    )
    assert code == 0
    [reply] = lines(out)
    assert reply["to"] == "34600111222" and "notas de voz" in reply["text"]


async def test_interactive_chat(tmp_path: Path) -> None:
    code, out, err = await run_chat(tmp_path, "hola\n", BOT_LANGUAGE="en", FLOWS_FILE="")
    assert code == 0
    assert out.startswith("bot> ") and "turned off" in out
    assert "Ctrl-D" in err


async def test_every_documented_log_level_starts(tmp_path: Path) -> None:
    for level in ("TRACE", "SUCCESS", "critical"):
        code, out, err = await run_chat(
            tmp_path, '{"from": "1234567890", "text": "hi"}\n', "--jsonl", LOG_LEVEL=level
        )
        assert code == 0, err
        assert len(lines(out)) == 1


async def test_the_console_does_not_hand_itself_over(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    """There is no owner to hand a chat to in the console: asking for a person silenced it for good, across
    sessions too (the pause is kept in DATA_DIR)."""
    env = {"OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": fake_openai.base_url}
    said = "".join(
        json.dumps({"from": "34600111222", "text": text}) + "\n"
        for text in ("quiero hablar con una persona", "¿hola?")
    )
    code, out, err = await run_chat(tmp_path, said, "--jsonl", **env)
    assert code == 0, err
    assert [line["text"] for line in lines(out)] == ["echo: quiero hablar con una persona", "echo: ¿hola?"]
