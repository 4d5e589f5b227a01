"""Supabase writes through the batched journal versus one request per row, and the journal's drain time after
an outage under load, on the real local stack (tests/supabase_stack.py; scripts/install-supabase-stack).

    .venv/bin/python bench/supabase_journal.py [--rows 20000] [--per-row 1000] [--outage 60] [--rate 100]

1. One request per row: chat_history upserts (on_conflict wa_message_id, ignore duplicates) sent one by one,
   and 16 at a time for reference.
2. Batched journal: `rows` add_message calls on a SupabaseStore (defaults: batch 500, flush every 0.2 s),
   timed until the last row is in PostgreSQL (journal commit included).
3. Outage: a steady load of `rate` messages per second (inbound + reply + answered mark, across 200 chats)
   while PostgREST is stopped for `outage` seconds; then the time from PostgREST answering again to an
   empty journal (split into noticing, which the flusher's backoff bounds, and sending), with the load still
   on. Rows are then counted in PostgreSQL: each exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from loguru import logger
from postgrest import ReturnMethod
from supabase import AsyncClientOptions, acreate_client

from memory.store import Direction, MessageStatus, StoredMessage
from memory.supabase_store import SupabaseStore, _to_api
from tests.supabase_stack import SupabaseStack, missing_requirements

CHATS = 200


def message(prefix: str, n: int, direction: Direction = Direction.IN) -> StoredMessage:
    status = MessageStatus.RECEIVED if direction is Direction.IN else MessageStatus.SENT
    return StoredMessage(
        f"{prefix}{n}", f"34600{n % CHATS:06d}@s.whatsapp.net", direction, "text", f"hola, pregunta {n}",
        status, time.time(),
    )  # fmt: skip


async def per_row(stack: SupabaseStack, rows: int, in_flight: int) -> float:
    """Rows per second with one upsert request per row, `in_flight` requests at a time."""
    http = httpx.AsyncClient(timeout=httpx.Timeout(10.0))
    client = await acreate_client(
        stack.url, stack.key, options=AsyncClientOptions(httpx_client=http, postgrest_client_retry=False)
    )
    queue = list(range(rows))

    async def worker() -> None:
        while queue:
            row = _to_api(message(f"ROW{in_flight}-", queue.pop()))
            await (
                client.table("chat_history")
                .upsert(
                    row, on_conflict="wa_message_id", ignore_duplicates=True, returning=ReturnMethod.minimal
                )
                .execute()
            )

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    await client.postgrest.aclose()
    return rows / elapsed


async def batched(stack: SupabaseStack, rows: int, data_dir: Path) -> tuple[float, float]:
    """Rows per second through the journal into PostgreSQL, and into the journal alone."""
    store = SupabaseStore(stack.url, stack.key, data_dir, retention_days=None)
    await store.open()
    started = time.perf_counter()
    await asyncio.gather(*(store.add_message(message("BATCH", n)) for n in range(rows)))
    journaled = time.perf_counter() - started
    assert await store.flush(120), "journal not flushed"
    elapsed = time.perf_counter() - started
    await store.close()
    return rows / elapsed, rows / journaled


async def outage(stack: SupabaseStack, seconds: float, rate: float, data_dir: Path) -> dict[str, Any]:
    store = SupabaseStore(stack.url, stack.key, data_dir, retention_days=None)
    await store.open()
    sent = 0
    slowest = 0.0
    stop = asyncio.Event()

    async def one(n: int) -> None:
        nonlocal slowest
        started = time.perf_counter()
        await store.add_message(message("LOAD", n))
        await store.add_reply(message("REPLY", n, Direction.OUT), f"LOAD{n}")
        slowest = max(slowest, time.perf_counter() - started)

    async def load() -> None:
        nonlocal sent
        tasks: set[asyncio.Task[None]] = set()
        begin = time.perf_counter()
        while not stop.is_set():
            due = int((time.perf_counter() - begin) * rate)
            while sent < due:
                task = asyncio.create_task(one(sent))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)

    loader = asyncio.create_task(load())
    await asyncio.sleep(3)
    await asyncio.to_thread(stack.stop_postgrest)
    await asyncio.sleep(seconds)
    peak = store.stats()["journal_rows"]
    await asyncio.to_thread(stack.start_postgrest)
    back = time.perf_counter()
    target = store.journal.last_seq  # everything journaled while PostgREST was away
    batches = store.stats()["flush_batches"]
    while store.stats()["flush_batches"] == batches:
        await asyncio.sleep(0.01)
    noticed = time.perf_counter() - back
    # Drained: everything journaled before PostgREST came back is in Supabase (new load keeps arriving).
    while store._acked_seq < target:
        await asyncio.sleep(0.01)
    drained = time.perf_counter() - back
    stop.set()
    await loader
    assert await store.flush(60)
    await store.close()
    counts = stack.query(
        "select count(*), count(distinct wa_message_id), count(*) filter (where status = 'answered')"
        " from chat_history where wa_message_id like 'LOAD%' or wa_message_id like 'REPLY%'"
    )[0]
    return {
        "messages": sent,
        "peak": peak,
        "noticed": noticed,
        "drained": drained,
        "slowest_write": slowest,
        "rows": int(counts[0]),
        "distinct": int(counts[1]),
        "answered": int(counts[2]),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20000, help="rows through the batched journal")
    parser.add_argument("--per-row", type=int, default=1000, help="rows sent one request each")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds PostgREST stays down")
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second during the outage run")
    args = parser.parse_args()
    missing = missing_requirements()
    if missing:
        sys.exit("local Supabase stack unavailable: " + "; ".join(missing))
    logger.remove()
    logger.add(sys.stderr, level="ERROR")

    with SupabaseStack() as stack, tempfile.TemporaryDirectory() as tmp:
        sequential = await per_row(stack, args.per_row, 1)
        concurrent = await per_row(stack, args.per_row, 16)
        through_journal, into_journal = await batched(stack, args.rows, Path(tmp) / "batched")
        print("| write path | rows/s | vs one request per row |")
        print("|---|---:|---:|")
        print(f"| one request per row, sequential | {sequential:,.0f} | 1.0x |")
        print(f"| one request per row, 16 in flight | {concurrent:,.0f} | {concurrent / sequential:.1f}x |")
        ratio = through_journal / sequential
        print(f"| batched journal (into PostgreSQL) | {through_journal:,.0f} | {ratio:.1f}x |")
        print(f"| (journal commit alone) | {into_journal:,.0f} | |")
        sys.stdout.flush()

        r = await outage(stack, args.outage, args.rate, Path(tmp) / "outage")
        print()
        print(f"| outage of {args.outage:.0f} s under {args.rate:.0f} messages/s | |")
        print("|---|---:|")
        print(f"| messages written (inbound + reply + answered mark each) | {r['messages']:,} |")
        print(f"| journal at the end of the outage (operations) | {r['peak']:,} |")
        print(
            f"| slowest write (add_message + add_reply) during the run | {r['slowest_write'] * 1000:.0f} ms |"
        )
        print(f"| first batch sent after PostgREST is back (backoff) | {r['noticed']:.2f} s |")
        print(f"| journal drained after PostgREST is back | {r['drained']:.2f} s |")
        print(f"| rows in PostgreSQL / distinct ids / expected | {r['rows']:,} / {r['distinct']:,} / "
              f"{2 * r['messages']:,} |")  # fmt: skip
        print(f"| inbound rows answered | {r['answered']:,} of {r['messages']:,} |")


if __name__ == "__main__":
    asyncio.run(main())
