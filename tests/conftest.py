"""Shared fixtures: a fake OpenAI server on loopback, settings in a temp dir, a loopback bot."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import connection.neonize_adapter  # noqa: F401  first import of neonize, where its import-time leak is handled
from bot.app import Bot
from bot.config import Settings
from connection.loopback import LoopbackTransport
from connection.types import ChatId, Inbound, MessageId, MessageKind
from tests.fake_openai import FakeOpenAI
from tests.supabase_stack import SupabaseStack, running_stack

_ids = itertools.count(1)


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    """In-process tests log at WARNING: loguru's default sink logs everything at DEBUG."""
    from bot.logsetup import setup_logging

    setup_logging("WARNING")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never read the developer's .env or environment."""
    for name in list(__import__("os").environ):
        if name.startswith(("OPENAI_", "SUPABASE_", "BOT_", "WA_")) or name in {
            "DATA_DIR",
            "ADMIN_TOKEN",
            "LOG_LEVEL",
            "APP_ENV",
            "MEMORY_LIMIT",
            "PORT",
        }:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def stack() -> Iterator[SupabaseStack]:
    """The local Supabase stack, started once for the run (modules that break it start their own)."""
    yield from running_stack()


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    yield server
    await server.stop()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "flows_file": None,
            "openai_timeout": 2.0,
            "_env_file": None,
        }
        values.update(overrides)
        return Settings(**values)

    return make


def inbound(
    text: str = "hola",
    *,
    chat: str = "34600111222@s.whatsapp.net",
    id: str | None = None,
    kind: MessageKind = MessageKind.TEXT,
    timestamp: float | None = None,
    **fields: Any,
) -> Inbound:
    return Inbound(
        id=MessageId(id or f"MSG{next(_ids)}"),
        chat=ChatId(chat),
        sender=chat,
        kind=kind,
        text=text,
        timestamp=time.time() if timestamp is None else timestamp,
        **fields,
    )


class BotHarness:
    """A real bot (pipeline, responder, SQLite store) on a loopback transport."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.transport = LoopbackTransport()
        self.bot = Bot.build(settings, self.transport)

    async def __aenter__(self) -> BotHarness:
        await self.bot.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.bot.stop()

    async def say(self, *messages: Inbound | str) -> list[str]:
        """Submit messages, wait until they are answered, return what the bot sent meanwhile."""
        before = len(self.transport.sent)
        for message in messages:
            self.bot.pipeline.submit(inbound(message) if isinstance(message, str) else message)
        assert await self.bot.pipeline.drain(10), "pipeline did not drain"
        return [s.text for s in self.transport.sent[before:]]


@pytest.fixture
def harness(make_settings: Callable[..., Settings]) -> Callable[..., BotHarness]:
    def make(**overrides: Any) -> BotHarness:
        return BotHarness(make_settings(**overrides))

    return make
