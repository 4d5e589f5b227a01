"""The openai SDK (about 14 MiB of pydantic types over the bot) is imported at the first model call."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from bot.ai import LazyOpenAI

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import asyncio, sys, time
import bot.__main__, bot.whatsapp, connection.neonize_adapter  # everything `python -m bot` imports
from bot.app import Bot
from bot.config import Settings
from connection.loopback import LoopbackTransport
from connection.types import ChatId, Inbound, MessageId, MessageKind
from tests.fake_openai import FakeOpenAI

async def main():
    fake = await FakeOpenAI().start()
    settings = Settings(_env_file=None, data_dir=sys.argv[1], flows_file=None,
                        openai_api_key="sk-test", openai_base_url=fake.base_url)
    transport = LoopbackTransport()
    bot = Bot.build(settings, transport)
    await bot.start()
    print("loaded at idle:", "openai" in sys.modules)
    chat = ChatId("34600111222@s.whatsapp.net")
    bot.pipeline.submit(Inbound(MessageId("m1"), chat, chat, MessageKind.TEXT, "hola", time.time()))
    await bot.pipeline.drain(10)
    print("replied:", [s.text for s in transport.sent])
    print("loaded after the reply:", "openai" in sys.modules)
    await bot.stop()
    await fake.stop()

asyncio.run(main())
"""


def test_the_sdk_loads_at_the_first_model_call_and_the_reply_works(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "loaded at idle: False",
        "replied: ['echo: hola']",
        "loaded after the reply: True",
    ]


async def test_concurrent_first_calls_share_one_client() -> None:
    made: list[object] = []

    def factory() -> object:
        made.append(object())
        return made[-1]

    lazy = LazyOpenAI(factory)  # type: ignore[arg-type]
    assert not lazy.loaded
    clients = await asyncio.gather(*(lazy.get() for _ in range(20)))
    assert len(made) == 1
    assert all(client is made[0] for client in clients)
    assert lazy.loaded


async def test_an_empty_openai_base_url_in_the_environment_means_openai(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`docker run --env-file .env` (from .env.example) passes OPENAI_BASE_URL=""; the settings read it as
    unset, but the SDK, given no base URL, read the variable itself: every model call and voice note
    failed."""
    from bot.ai import make_client
    from bot.config import Settings

    monkeypatch.setenv("OPENAI_BASE_URL", "")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.openai_base_url is None
    client = await make_client(settings.openai_key or "", settings.openai_base_url, 5.0).get()
    assert str(client.base_url).rstrip("/") == "https://api.openai.com/v1"
    await client.close()


def test_openais_own_url_without_a_key_leaves_ai_off() -> None:
    """The placeholder key is for servers that need none: api.openai.com would refuse it with 401 and every
    customer would get the apology instead of the polite "AI answers are off"."""
    from bot.config import Settings

    assert not Settings(_env_file=None, openai_base_url="https://api.openai.com/v1").ai_enabled  # type: ignore[call-arg]
    assert Settings(_env_file=None, openai_base_url="http://localhost:11434/v1").ai_enabled  # type: ignore[call-arg]
