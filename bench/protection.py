"""Messages/s through the pipeline with the rate limiter and de-duplication on versus off, in one run.

    .venv/bin/python -m bench.protection [--messages 20000] [--chats 1000] [--runs 3]

Same workload as bench.pipeline (loopback transport, instant model, SQLite on). The limiter is set high
enough that no message is limited, so both sides answer the same messages: the difference is the cost of
checking. Every tenth message is a redelivery, which de-duplication drops and the "off" side answers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from loguru import logger

from bot.app import Bot
from bot.config import Settings
from bot.limits import SlidingWindowLimiter
from bot.pipeline import DedupWindow
from connection.loopback import LoopbackTransport
from connection.types import ChatId, Inbound, MessageId, MessageKind
from tests.fake_openai import InstantModel


class NoDedup(DedupWindow):
    def seen(self, message_id: str) -> bool:
        return False


async def one_run(messages: int, chats: int, data_dir: Path, *, protected: bool) -> float:
    settings = Settings(_env_file=None, data_dir=data_dir, flows_file=None)  # type: ignore[call-arg]
    bot = Bot.build(settings, LoopbackTransport(record=False))
    bot.pipeline.responder.model = bot.model = InstantModel()
    if protected:
        bot.pipeline.rate_limiter = SlidingWindowLimiter(1_000_000, 60)
    else:
        bot.pipeline.rate_limiter = None
        bot.pipeline.dedup = NoDedup(1)
    await bot.start()
    now = time.time()
    batch = []
    for i in range(messages):
        n = i - 1 if i % 10 == 9 else i  # every tenth is a redelivery of the one before
        chat = f"346{n % chats:08d}@s.whatsapp.net"
        batch.append(Inbound(MessageId(f"p-{n}"), ChatId(chat), chat, MessageKind.TEXT, f"pregunta {n}", now))
    started = time.perf_counter()
    for message in batch:
        bot.pipeline.submit(message)
    await bot.pipeline.drain()
    elapsed = time.perf_counter() - started
    await bot.stop()
    return messages / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--chats", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logger.remove()
    results: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):  # interleaved, so both sides see the same machine
            for protected in (True, False):
                folder = Path(tmp) / f"{protected}-{run}"
                results[protected].append(
                    await one_run(args.messages, args.chats, folder, protected=protected)
                )
    on, off = statistics.median(results[True]), statistics.median(results[False])
    print(f"rate limiter and de-duplication: {args.messages} messages ({args.messages // 10} redeliveries)")
    print(f"from {args.chats} chats, median of {args.runs} interleaved runs")
    print(f"{'setting':<12}{'messages/s':>12}")
    print(f"{'on':<12}{on:>12.0f}")
    print(f"{'off':<12}{off:>12.0f}")
    print(f"{'on / off':<12}{on / off:>12.2f}  (on also skips the redeliveries the off side answers)")


if __name__ == "__main__":
    asyncio.run(main())
