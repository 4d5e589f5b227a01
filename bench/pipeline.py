"""Pipeline throughput and overhead: 20,000 messages from 1,000 chats, loopback transport,
an instant in-process model, SQLite persistence and info logging on.

    .venv/bin/python -m bench.pipeline [--messages 20000] [--chats 1000] [--runs 3]

Prints messages/s, p50 and p99 pipeline overhead (model time excluded) and peak RSS,
as medians over the runs.

Throughput comes from a burst: all messages submitted at once. Overhead is the time
from the moment a chat worker takes a message to the moment its reply is sent and
recorded (inbound and reply durable in SQLite), minus model time. In a burst that time
is mostly waiting behind the other chats being served at once (Little's law), so
the overhead is also measured under steady loads: 100 messages per second (a very busy
number), 1,000, and half the measured burst throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import time
from pathlib import Path

from loguru import logger

from bot.ai import percentile
from bot.app import Bot
from bot.config import Settings
from bot.logsetup import setup_logging
from connection.loopback import LoopbackTransport
from connection.types import ChatId, Inbound, MessageId, MessageKind
from tests.fake_openai import InstantModel


async def one_run(messages: int, chats: int, data_dir: Path, rate: float | None = None) -> dict[str, float]:
    """Send `messages` through a fresh bot: all at once, or at `rate` messages per second."""
    settings = Settings(_env_file=None, data_dir=data_dir, flows_file=None, log_level="INFO")  # type: ignore[call-arg]
    transport = LoopbackTransport(record=False)
    bot = Bot.build(settings, transport)
    bot.pipeline.responder.model = bot.model = InstantModel()
    await bot.start()
    now = time.time()
    batch = [
        Inbound(
            id=MessageId(f"bench-{data_dir.name}-{i}"),
            chat=ChatId(f"346{i % chats:08d}@s.whatsapp.net"),
            sender=f"346{i % chats:08d}@s.whatsapp.net",
            kind=MessageKind.TEXT,
            text=f"pregunta número {i // chats} del cliente",
            timestamp=now,
        )
        for i in range(messages)
    ]
    started = time.perf_counter()
    if rate is None:
        for message in batch:
            bot.pipeline.submit(message)
    else:
        for index, message in enumerate(batch):
            due = started + index / rate
            if due > time.perf_counter():
                await asyncio.sleep(due - time.perf_counter())
            bot.pipeline.submit(message)
    await bot.pipeline.drain()
    elapsed = time.perf_counter() - started
    samples = list(bot.pipeline._overhead)
    answered = bot.pipeline.counters.answered
    await bot.stop()
    assert answered == messages, f"only {answered} of {messages} answered"
    return {
        "msgs_per_s": messages / elapsed,
        "p50_ms": percentile(samples, 0.5) * 1000,
        "p99_ms": percentile(samples, 0.99) * 1000,
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--chats", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log_file = Path(tmp) / "bench.log"
        setup_logging("INFO")
        logger.remove()
        logger.add(log_file, level="INFO", enqueue=False)
        folder = Path(tmp)
        burst = [await one_run(args.messages, args.chats, folder / f"burst{run}") for run in range(args.runs)]
        half = statistics.median(r["msgs_per_s"] for r in burst) / 2
        steady = {}
        for rate in (100.0, 1000.0, half):
            count = min(args.messages, int(rate * 20))  # at most 20 s of traffic per run
            steady[rate] = [
                await one_run(count, args.chats, folder / f"steady{rate:.0f}-{run}", rate)
                for run in range(args.runs)
            ]
        logged = sum(1 for _ in log_file.open())

    def median(results: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in results)

    rows = [
        ("burst: messages/s", median(burst, "msgs_per_s"), ">= 10000"),
        ("burst: overhead p50 (ms)", median(burst, "p50_ms"), ""),
        ("burst: overhead p99 (ms)", median(burst, "p99_ms"), ""),
        *[
            row
            for rate, results in steady.items()
            for row in (
                (f"steady {rate:.0f}/s: overhead p50 (ms)", median(results, "p50_ms"), ""),
                (f"steady {rate:.0f}/s: overhead p99 (ms)", median(results, "p99_ms"), "<= 2"),
            )
        ],
        ("peak RSS (MiB)", peak_rss_mib(), "<= 110"),
    ]
    print(
        f"pipeline: {args.messages} messages from {args.chats} chats, SQLite on, logging at INFO"
        f" ({logged} lines: per-message lines are DEBUG, INFO has a summary a minute)"
    )
    print(f"median of {args.runs} runs each")
    print(f"{'metric':<34}{'value':>10}  target")
    for name, value, target in rows:
        print(f"{name:<34}{value:>10.2f}  {target}")


if __name__ == "__main__":
    asyncio.run(main())
