"""Reconnect behaviour of the connection supervisor, with the scripted fake driver of the tests.

    .venv/bin/python -m bench.reconnect [--seed 7] [--trials 10] [--base 1] [--cap 60]

Prints three tables:

1. the backoff schedule over 10 consecutive failures (fake clock: instant), with each wait's ceiling;
2. the delay from a dropped connection (the connection task dies) to the first reconnect attempt, in real
   asyncio time: the scheduled (jittered) wait, what was measured, and the overhead between the two;
3. for faults no event reports, how long until the supervisor's first own attempt (fake clock, defaults:
   heartbeat 30 s, connect timeout 60 s, takeover 120 s, keepalive limit 240 s).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from typing import Any

from loguru import logger

from connection.supervisor import Backoff, ConnectionLost, Disconnected, KeepAliveTimeout, Supervisor
from connection.types import ConnectionState
from tests.test_supervisor import FakeClock, ScriptedDriver


def supervisor(driver: ScriptedDriver, clock: FakeClock | None, seed: int, **options: Any) -> Supervisor:
    timing: dict[str, Any] = {"clock": clock.time, "sleep": clock.sleep} if clock else {}
    sup = Supervisor(driver, rand=random.Random(seed).random, lag_interval_s=None, **timing, **options)
    driver.supervisor = sup
    return sup


async def schedule(seed: int, backoff: Backoff) -> None:
    clock = FakeClock()
    driver = ScriptedDriver(clock, [], default="fail")
    sup = supervisor(driver, clock, seed, backoff=backoff)
    await sup.start()
    await clock.run_until(lambda: len(driver.connects) == 11)
    await sup.stop()
    jitter = f"full jitter, base {backoff.base_s:g} s, cap {backoff.cap_s:g} s, seed {seed}"
    print(f"1. Backoff over 10 failures ({jitter})")
    print(f"{'failure':>7}  {'ceiling s':>9}  {'wait s':>7}  {'attempt at s':>12}")
    for n in range(1, 11):
        wait = driver.connects[n] - driver.connects[n - 1]
        print(f"{n:>7}  {backoff.ceiling(n):>9.0f}  {wait:>7.2f}  {driver.connects[n]:>12.2f}")
    print()


async def drop_to_first_attempt(seed: int, backoff: Backoff, trials: int) -> None:
    """Real time: a connected fake driver loses its connection; how soon does the next connect() come?"""
    driver = ScriptedDriver(FakeClock(), [], default="ok")
    sup = supervisor(driver, None, seed, backoff=backoff, stable_after_s=0, heartbeat_s=0)
    await sup.start()
    # Every drop is a first failure (stable_after_s=0), so the waits are the seeded rng's draws in order.
    same_draws = random.Random(seed).random
    rows = []
    for _ in range(trials):
        while sup.state is not ConnectionState.CONNECTED:
            await asyncio.sleep(0.001)
        before = len(driver.calls)
        scheduled = backoff.delay(1, same_draws)
        t0 = time.perf_counter()
        driver.push(ConnectionLost("stream end"))
        while not any(name == "connect" for name, _ in driver.calls[before:]):
            await asyncio.sleep(0.0005)
        rows.append((scheduled, time.perf_counter() - t0))
    await sup.stop()
    overheads = [(measured - scheduled) * 1000 for scheduled, measured in rows]
    print(
        f"2. Dropped connection -> first reconnect attempt (real time, {trials} drops, each a first failure)"
    )
    print(f"{'drop':>4}  {'scheduled s':>11}  {'measured s':>10}  {'overhead ms':>11}")
    for i, ((scheduled, measured), over) in enumerate(zip(rows, overheads, strict=True), 1):
        print(f"{i:>4}  {scheduled:>11.3f}  {measured:>10.3f}  {over:>11.1f}")
    print(f"overhead p50 {statistics.median(overheads):.1f} ms, max {max(overheads):.1f} ms")
    print()


async def silent_faults(seed: int, backoff: Backoff) -> None:
    """Fake clock: faults that no event reports, and how long until the supervisor's own attempt."""

    async def run(script: list[str], fault: str) -> float:
        clock = FakeClock()
        driver = ScriptedDriver(clock, script, default="ok")
        sup = supervisor(driver, clock, seed, backoff=backoff)
        await sup.start()
        if script[0] == "ok":
            await clock.run_until(lambda: sup.state is ConnectionState.CONNECTED)
            await clock.advance(1)
        t0 = clock.now
        if fault == "silent":
            driver.alive = False
        elif fault == "whatsmeow":
            driver.alive = False
            driver.push(Disconnected())
        elif fault == "keepalive":
            driver.push(KeepAliveTimeout(error_count=1, last_success_ago_s=0))
        await clock.run_until(lambda: len(driver.connects) >= 2)
        await sup.stop()
        return driver.connects[1] - t0

    cases = [
        ("socket dead, no event", ["ok"], "silent", "two heartbeats"),
        ("connect stalls", ["stall"], "stall", "connect timeout, at the next heartbeat"),
        ("keepalives failing", ["ok"], "keepalive", "keepalive limit, at the next heartbeat"),
        ("dropped, whatsmeow never heals", ["ok"], "whatsmeow", "takeover limit, at the next heartbeat"),
    ]
    print("3. Faults no event reports -> supervisor's first own attempt (fake clock, default settings)")
    print(f"{'fault':<32}  {'after s':>7}  why")
    for name, script, fault, why in cases:
        after = await run(script, fault)
        print(f"{name:<32}  {after:>7.1f}  {why} + a jittered first retry")
    print("(a drop whatsmeow reports is retried by whatsmeow itself: at once, then after 2, 4, 6 ... s)")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--base", type=float, default=1.0)
    parser.add_argument("--cap", type=float, default=60.0)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    backoff = Backoff(args.base, args.cap)
    await schedule(args.seed, backoff)
    await drop_to_first_attempt(args.seed, backoff, args.trials)
    await silent_faults(args.seed, backoff)


if __name__ == "__main__":
    asyncio.run(main())
