"""Memory: peak and steady RSS of a soak (200,000 messages from 50,000 chats, loopback transport,
an instant model, the real SQLite store), the idle RSS of `python -m bot` with neonize loaded, what the
openai SDK adds at the first reply, and a bare neonize client for the floor.

    .venv/bin/python -m bench.memory [--messages 200000] [--chats 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
from loguru import logger

from bot.app import Bot
from bot.config import Settings
from connection.loopback import LoopbackTransport
from connection.types import ChatId, Inbound, MessageId, MessageKind
from tests.fake_openai import InstantModel

REPO = Path(__file__).resolve().parent.parent


def rss_mib(process: psutil.Process | None = None) -> float:
    return (process or psutil.Process()).memory_info().rss / 2**20


async def soak(messages: int, chats: int, data_dir: Path) -> dict[str, float]:
    settings = Settings(_env_file=None, data_dir=data_dir, flows_file=None, human_takeover_minutes=0)  # type: ignore[call-arg]
    bot = Bot.build(settings, LoopbackTransport(record=False))
    bot.pipeline.responder.model = bot.model = InstantModel()
    await bot.start()
    before = rss_mib()
    peak = before
    now = time.time()
    started = time.perf_counter()
    for start in range(0, messages, 10_000):
        for i in range(start, min(messages, start + 10_000)):
            chat = f"34{i % chats:09d}@s.whatsapp.net"
            bot.pipeline.submit(
                Inbound(
                    MessageId(f"soak-{i}"),
                    ChatId(chat),
                    chat,
                    MessageKind.TEXT,
                    f"pregunta {i // chats}",
                    now,
                )
            )
        peak = max(peak, rss_mib())
        await bot.pipeline.drain()
        peak = max(peak, rss_mib())
    elapsed = time.perf_counter() - started
    gc.collect()
    steady = rss_mib()
    await bot.stop()
    return {"before": before, "peak": peak, "steady": steady, "msgs_per_s": messages / elapsed}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def idle_bot(seconds: float = 8.0) -> dict[str, float]:
    """Start `python -m bot` as a platform would (no network here: WhatsApp keeps retrying)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WA_"))}
        env.update(
            PYTHONPATH=str(REPO),
            PORT=str(port),
            DATA_DIR=tmp,
            APP_ENV="production",
            OPENAI_API_KEY="sk-bench",
        )
        child = subprocess.Popen(
            [sys.executable, "-m", "bot"],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            time.sleep(seconds)
            process = psutil.Process(child.pid)
            info = process.memory_full_info()
            return {"rss": info.rss / 2**20, "uss": info.uss / 2**20}
        finally:
            child.terminate()
            child.wait(15)


BARE_NEONIZE = """
import asyncio, os, sys, psutil
from neonize.aioze.client import NewAClient

async def main():
    client = NewAClient(sys.argv[1])
    task = asyncio.create_task(client.connect())  # no network here: it keeps failing to dial, as the bot does
    await asyncio.sleep(8)
    print(psutil.Process().memory_info().rss / 2**20, flush=True)
    os._exit(0)  # neonize's connect does not return on cancel

asyncio.run(main())
"""


def bare_neonize() -> float:
    """The floor under the bot: a neonize client alone, idle, in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", BARE_NEONIZE, str(Path(tmp) / "session.sqlite3")],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    return float(out.split()[-1])


SDK_COST = """
import psutil, bot.__main__, bot.app, bot.whatsapp, connection.neonize_adapter
process = psutil.Process()
before = process.memory_info().rss
import openai
print((process.memory_info().rss - before) / 2**20)
"""


def sdk_cost() -> float:
    """What the first model call adds: the openai SDK is imported then, not at start (bot.ai.LazyOpenAI)."""
    out = subprocess.run(
        [sys.executable, "-c", SDK_COST], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return float(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--chats", type=int, default=50_000)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    idle = idle_bot()
    sdk = sdk_cost()
    bare = bare_neonize()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(soak(args.messages, args.chats, Path(tmp)))
    rows = [
        ("idle `python -m bot`, RSS (MiB)", idle["rss"], "<= 80"),
        ("idle `python -m bot`, USS (MiB)", idle["uss"], ""),
        ("+ openai SDK at first reply (MiB)", sdk, ""),
        ("bare neonize client idle, RSS (MiB)", bare, "(floor)"),
        ("soak: RSS before (MiB)", result["before"], ""),
        ("soak: peak RSS (MiB)", result["peak"], "< 250"),
        ("soak: steady RSS after (MiB)", result["steady"], ""),
        ("soak: messages/s", result["msgs_per_s"], ""),
    ]
    print(f"memory: soak of {args.messages} messages from {args.chats} chats; idle bot with neonize loaded")
    print(f"{'metric':<34}{'value':>10}  target")
    for name, value, target in rows:
        print(f"{name:<34}{value:>10.1f}  {target}")


if __name__ == "__main__":
    main()
