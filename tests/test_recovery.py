"""Crash recovery with a real process: kill -9 in the middle of replies, restart, and every
persisted message that is still fresh is answered exactly once; stale ones are skipped."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from bot.app import Bot
from bot.config import Settings
from connection.loopback import LoopbackTransport
from connection.types import ChatId, Inbound, MessageId, MessageKind
from tests.fake_openai import FakeOpenAI, InstantModel
from tests.test_console import start_chat as start_console


def rows(db: Path) -> list[tuple[str, str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT wa_message_id, direction, status, body FROM chat_history ORDER BY id"
        ).fetchall()


async def start_chat(tmp_path: Path, fake: FakeOpenAI) -> asyncio.subprocess.Process:
    return await start_console(
        tmp_path,
        "--jsonl",
        OPENAI_API_KEY="test-key",
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_TIMEOUT="60",
        FLOWS_FILE="",
    )


@pytest.mark.timeout(90)
async def test_kill_9_mid_reply_then_restart_answers_each_message_once(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    db = tmp_path / "data" / "bot.sqlite3"
    fake_openai.delay_s = 60  # the model never answers before the kill
    first = await start_chat(tmp_path, fake_openai)
    assert first.stdin is not None
    lines = [
        {"id": "A1", "from": "34600000001", "text": "hola, soy Ana"},
        {"id": "A2", "from": "34600000001", "text": "¿tenéis talla M?"},
        {"id": "B1", "from": "34600000002", "text": "buenas"},
    ]
    first.stdin.write("".join(json.dumps(line) + "\n" for line in lines).encode())
    await first.stdin.drain()

    def persisted() -> int:
        try:
            return len(rows(db))
        except sqlite3.OperationalError:  # the file exists a moment before its tables do
            return 0

    deadline = time.monotonic() + 30
    while not (db.exists() and persisted() == 3 and fake_openai.chat_count >= 2):
        assert time.monotonic() < deadline, "messages were not persisted in time"
        await asyncio.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    await first.wait()
    assert {r[2] for r in rows(db)} == {"received"}

    # A message from long ago, left unanswered: too old to answer now.
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO chat_history (wa_message_id, chat_id, direction, kind, body, status, created_at,"
            " updated_at) VALUES ('OLD', '34600000003@s.whatsapp.net', 'in', 'text', 'hola?', 'received',"
            " ?, ?)",
            (time.time() - 3600, time.time() - 3600),
        )

    fake_openai.delay_s = 0
    second = await start_chat(tmp_path, fake_openai)
    out, err = await asyncio.wait_for(second.communicate(b""), 60)
    assert second.returncode == 0, err.decode()
    replies = [json.loads(line) for line in out.decode().splitlines()]
    assert sorted((r["to"], r["text"]) for r in replies) == [
        ("34600000001", "echo: hola, soy Ana"),
        ("34600000001", "echo: ¿tenéis talla M?"),
        ("34600000002", "echo: buenas"),
    ]
    status = {r[0]: r[2] for r in rows(db)}
    assert status == {"A1": "answered", "A2": "answered", "B1": "answered", "OLD": "skipped"} | {
        r[0]: "sent" for r in rows(db) if r[1] == "out"
    }

    third = await start_chat(tmp_path, fake_openai)
    out, _ = await asyncio.wait_for(third.communicate(b""), 60)
    assert third.returncode == 0 and out == b""  # nothing is answered twice


@pytest.mark.timeout(60)
async def test_sigterm_during_a_slow_model_reply_delivers_it_and_exits_0(
    tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    fake_openai.delay_s = 1.5
    process = await start_chat(tmp_path, fake_openai)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b'{"id": "S1", "from": "34600000001", "text": "hola"}\n')
    await process.stdin.drain()
    deadline = time.monotonic() + 30
    while fake_openai.chat_count == 0:
        assert time.monotonic() < deadline, "the model was never asked"
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # stdin stays open: the stop does not wait for EOF
    out = await asyncio.wait_for(process.stdout.read(), 20)
    code = await asyncio.wait_for(process.wait(), 20)
    assert code == 0
    assert [json.loads(line) for line in out.decode().splitlines()] == [
        {"to": "34600000001", "text": "echo: hola"}
    ]
    assert {r[0]: r[2] for r in rows(tmp_path / "data" / "bot.sqlite3")}["S1"] == "answered"


class StallsAfterFirstPart(LoopbackTransport):
    """The first part goes out, the next waits (a typing pause, a slow socket) until the stop."""

    async def send_text(self, chat: ChatId, text: str, file: str | None = None) -> MessageId:
        if self.sent:
            await asyncio.Event().wait()
        return await super().send_text(chat, text)


async def test_a_stop_between_the_parts_of_an_answer_does_not_make_the_restart_answer_again(
    tmp_path: Path,
) -> None:
    """The reply was recorded only after its last part: a deploy that stopped the bot between two parts
    left the question unanswered in the store, and the restart sent the customer a second answer."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path, flows_file=None, max_reply_chars=200, human_takeover_minutes=0
    )
    chat = "34600000001@s.whatsapp.net"
    question = Inbound(MessageId("Q1"), ChatId(chat), chat, MessageKind.TEXT, "x" * 300, time.time())
    first = StallsAfterFirstPart()
    bot = Bot.build(settings, first)
    bot.pipeline.responder.model = bot.model = InstantModel()
    await bot.start()
    bot.pipeline.submit(question)
    async with asyncio.timeout(10):
        while not first.sent:
            await asyncio.sleep(0.01)
    await bot.stop(timeout=0.2)  # the worker is cancelled between the first and the second part
    assert len(first.sent) == 1

    again = LoopbackTransport()
    bot = Bot.build(settings, again)
    bot.pipeline.responder.model = bot.model = InstantModel()
    await bot.start()
    await bot.recover()
    assert await bot.pipeline.drain(5)
    await bot.stop()
    assert again.sent == [], "the customer got a second answer after the restart"
    status = {r[0]: (r[1], r[2]) for r in rows(tmp_path / "bot.sqlite3")}
    assert status["Q1"] == ("in", "answered")
    assert status[first.sent[0].id] == ("out", "sent")  # what the customer has, for the model's history
