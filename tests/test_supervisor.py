"""The supervisor on a fake clock, driven by a scripted fake driver: no real sleeping, no network."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from connection.supervisor import (
    OUTDATED_HELP,
    Backoff,
    ClientOutdated,
    Connected,
    ConnectionLost,
    Disconnected,
    DriverEvent,
    KeepAliveRestored,
    KeepAliveTimeout,
    LoggedOut,
    Paired,
    QrShown,
    StreamReplaced,
    Supervisor,
    TemporaryBan,
)
from connection.types import ConnectionState as S

SEED = 1234


class FakeClock:
    """Virtual time: `sleep` parks until `advance`/`run_until` moves time past its deadline."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self.now + max(0.0, seconds), next(self._seq), future))
        await future

    @staticmethod
    async def settle() -> None:
        for _ in range(100):
            await asyncio.sleep(0)

    def _next(self) -> tuple[float, asyncio.Future[None]] | None:
        while self._heap:
            when, _, future = self._heap[0]
            if future.done():  # cancelled sleeper
                heapq.heappop(self._heap)
                continue
            return when, future
        return None

    async def advance(self, seconds: float) -> None:
        target = self.now + seconds
        await self.settle()
        while (item := self._next()) is not None and item[0] <= target:
            heapq.heappop(self._heap)
            self.now = max(self.now, item[0])
            item[1].set_result(None)
            await self.settle()
        self.now = target
        await self.settle()

    async def run_until(self, done: Callable[[], bool], limit_s: float = 36_000) -> None:
        """Jump from sleeper to sleeper until `done()`; fails if that takes more than `limit_s`."""
        start = self.now
        await self.settle()
        while not done():
            item = self._next()
            assert item is not None, "nothing left to wait for"
            assert item[0] - start <= limit_s, f"not done within {limit_s}s of virtual time"
            heapq.heappop(self._heap)
            self.now = max(self.now, item[0])
            item[1].set_result(None)
            await self.settle()


class ScriptedDriver:
    """Each connect() takes the next outcome: fail (raises), lost (task dies), ok, stall, qr, outdated."""

    def __init__(self, clock: FakeClock, script: list[str], default: str = "fail") -> None:
        self.clock = clock
        self.script = deque(script)
        self.default = default
        self.supervisor: Supervisor | None = None
        self.calls: list[tuple[str, float]] = []
        self.alive = False
        self.pings = 0
        self.forgotten = 0

    @property
    def connects(self) -> list[float]:
        return [t for name, t in self.calls if name == "connect"]

    def push(self, event: DriverEvent) -> None:
        assert self.supervisor is not None
        self.supervisor.handle(event)

    async def connect(self) -> None:
        self.calls.append(("connect", self.clock.now))
        outcome = self.script.popleft() if self.script else self.default
        loop = asyncio.get_running_loop()
        if outcome == "fail":
            raise ConnectionError("dial tcp: lookup web.whatsapp.com: no such host")
        if outcome == "lost":
            loop.call_soon(self.push, ConnectionLost("NeonizeError: websocket dial failed"))
        elif outcome == "ok":
            self.alive = True
            loop.call_soon(self.push, Connected())
        elif outcome == "qr":
            loop.call_soon(self.push, QrShown())
        elif outcome == "outdated":
            loop.call_soon(self.push, ClientOutdated())

    async def disconnect(self) -> None:
        self.alive = False
        self.calls.append(("disconnect", self.clock.now))

    async def is_connected(self) -> bool:
        return self.alive

    async def ping(self) -> None:
        self.pings += 1

    async def forget_session(self) -> None:
        self.forgotten += 1


def make(
    script: list[str], default: str = "fail", seed: int = SEED, **options: Any
) -> tuple[Supervisor, ScriptedDriver, FakeClock, list[S]]:
    clock = FakeClock()
    driver = ScriptedDriver(clock, script, default)
    states: list[S] = []
    supervisor = Supervisor(
        driver,
        clock=clock.time,
        sleep=clock.sleep,
        rand=random.Random(seed).random,
        lag_interval_s=None,
        on_state=states.append,
        **options,
    )
    driver.supervisor = supervisor
    return supervisor, driver, clock, states


def expected_delays(n: int, seed: int = SEED, backoff: Backoff | None = None) -> list[float]:
    rand = random.Random(seed).random
    backoff = backoff or Backoff()
    return [backoff.delay(i, rand) for i in range(1, n + 1)]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# ---------------------------------------------------------------- backoff


def test_backoff_schedule_is_full_jitter_under_a_doubling_ceiling() -> None:
    backoff = Backoff(base_s=1.0, cap_s=60.0)
    assert [backoff.ceiling(n) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    delays = expected_delays(10)
    assert all(0 <= d <= backoff.ceiling(n) for n, d in enumerate(delays, 1))
    assert delays == expected_delays(10)  # seeded: reproducible
    assert Backoff(0.5, 5).ceiling(100) == 5


# ---------------------------------------------------------------- scripted scenarios


async def test_connect_fails_n_times_then_connects_on_the_backoff_schedule() -> None:
    sup, driver, clock, states = make(["fail", "lost", "fail", "lost", "ok"])
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED)

    assert gaps(driver.connects) == pytest.approx(expected_delays(4))
    assert states == [S.CONNECTING, S.RECONNECTING] * 4 + [S.CONNECTING, S.CONNECTED]
    stats = sup.stats()
    assert stats["attempts"] == 4 and stats["connect_attempts"] == 5
    assert stats["retry_owner"] == "whatsmeow"
    assert stats["next_retry_in_s"] is None
    # every failed attempt was released before the next one: never two connections at once
    names = [name for name, _ in driver.calls]
    assert names == ["connect", "disconnect"] * 4 + ["connect"]
    # staying up resets the failure count
    await clock.advance(90)
    assert sup.stats()["attempts"] == 0
    await sup.stop()


async def test_ten_failures_follow_the_seeded_schedule_and_stats_show_the_wait() -> None:
    sup, driver, clock, _ = make([], default="fail")
    await sup.start()
    await clock.run_until(lambda: len(driver.connects) == 11)
    assert gaps(driver.connects) == pytest.approx(expected_delays(10))
    await clock.settle()
    stats = sup.stats()
    assert stats["state"] == "reconnecting"
    assert stats["attempts"] == 11
    assert 0 <= stats["next_retry_in_s"] <= 60
    assert "no such host" in stats["last_error"]
    await sup.stop()
    assert sup.state is S.STOPPED


async def test_drop_after_connecting_is_whatsmeows_to_heal_then_the_supervisors() -> None:
    sup, driver, clock, states = make(["ok", "ok"], takeover_after_s=120)
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED)

    driver.alive = False
    driver.push(Disconnected())
    assert sup.state is S.RECONNECTING
    assert sup.stats()["retry_owner"] == "whatsmeow"
    await clock.advance(100)
    assert len(driver.connects) == 1  # we do not start a second loop next to whatsmeow's

    driver.alive = True
    driver.push(Connected())  # whatsmeow reconnected by itself
    assert sup.state is S.CONNECTED
    assert sup.stats()["reconnects"] == 1

    driver.alive = False
    driver.push(Disconnected())
    await clock.run_until(lambda: len(driver.connects) == 2, limit_s=200)
    assert clock.now >= 100 + 120  # only after whatsmeow had its chance
    assert driver.calls[-2][0] == "disconnect"  # whatsmeow's loop ended before ours ran
    assert "did not reconnect within 120s" in sup.stats()["last_error"]
    await clock.run_until(lambda: sup.state is S.CONNECTED)
    assert sup.stats()["reconnects"] == 2
    assert states.count(S.RECONNECTING) == 2  # the takeover keeps the state: still reconnecting
    await sup.stop()


async def test_connection_task_dying_young_keeps_growing_the_backoff() -> None:
    sup, driver, clock, _ = make(["ok", "ok", "ok", "ok"], stable_after_s=60)
    await sup.start()
    for _ in range(3):
        await clock.run_until(lambda: sup.state is S.CONNECTED)
        await clock.advance(5)  # dies young
        driver.push(ConnectionLost("NeonizeError: stream end"))
        await clock.settle()
    assert sup.stats()["attempts"] == 3
    await clock.run_until(lambda: sup.state is S.CONNECTED)
    assert gaps(driver.connects) == pytest.approx([d + 5 for d in expected_delays(3)])
    await sup.stop()


async def test_a_connection_that_stayed_up_starts_the_backoff_over() -> None:
    sup, driver, clock, _ = make(["fail", "fail", "fail", "ok", "ok"], stable_after_s=60)
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED)
    await clock.advance(61)
    driver.push(ConnectionLost())
    await clock.settle()
    assert sup.stats()["attempts"] == 1
    assert 0 <= sup.stats()["next_retry_in_s"] <= 1.0  # ceiling of a first failure again
    await sup.stop()


async def test_silent_socket_without_an_event_is_detected_by_the_heartbeat() -> None:
    sup, driver, clock, _ = make(["ok", "ok"], heartbeat_s=30)
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED)
    t0 = clock.now
    driver.alive = False  # dead, and nobody says so
    await clock.run_until(lambda: len(driver.connects) == 2, limit_s=200)
    assert sup.stats()["last_error"] == "socket dead without a disconnect event"
    assert 30 <= clock.now - t0 <= 60 + 1  # two heartbeats, plus a jittered retry of at most 1 s
    await sup.stop()


async def test_failing_keepalives_force_a_reconnect_after_the_limit() -> None:
    sup, driver, clock, _ = make(["ok", "ok"], heartbeat_s=30, keepalive_dead_s=240)
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED)
    await clock.advance(30)
    assert sup.stats()["keepalive_ok_s_ago"] == 0.0
    driver.push(KeepAliveTimeout(error_count=1, last_success_ago_s=25))
    await clock.advance(180)
    assert len(driver.connects) == 1
    assert sup.stats()["keepalive_ok_s_ago"] == pytest.approx(205)
    driver.push(KeepAliveRestored())
    await clock.advance(120)
    assert len(driver.connects) == 1  # restored in time: nothing to do
    driver.push(KeepAliveTimeout(error_count=1, last_success_ago_s=0))
    await clock.run_until(lambda: len(driver.connects) == 2, limit_s=400)
    assert sup.stats()["last_error"].startswith("keepalive failing for")
    await sup.stop()


async def test_a_stalled_connect_is_abandoned_and_retried() -> None:
    sup, driver, clock, _ = make(["stall", "ok"], heartbeat_s=30, connect_timeout_s=60)
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED, limit_s=200)
    assert driver.connects[1] >= 60
    assert [name for name, _ in driver.calls] == ["connect", "disconnect", "connect"]
    assert sup.stats()["last_error"].startswith("connect stalled")
    await sup.stop()


@pytest.mark.parametrize(
    ("reason", "said"),
    [
        ("connect failure: logged_out", "the device was unlinked from the phone"),
        ("logged out: unknown_logout", "check that WhatsApp still works on the phone"),
    ],
)
async def test_a_logout_says_whether_the_phone_unlinked_it_or_whatsapp_ended_it(
    reason: str, said: str
) -> None:
    """406 (unknown_logout) is also how WhatsApp ends a banned account: "unlinked from the phone" sent the
    operator to scan a QR for an account that may be banned."""
    from loguru import logger

    errors: list[str] = []
    sink = logger.add(lambda m: errors.append(m.record["message"]), level="ERROR")
    sup, driver, clock, _ = make(["ok", "qr"])
    try:
        await sup.start()
        await clock.run_until(lambda: sup.state is S.CONNECTED)
        driver.push(LoggedOut(reason))
        await clock.run_until(lambda: sup.state is S.PAIRING)
    finally:
        logger.remove(sink)
        await sup.stop()
    assert any(said in line for line in errors), errors


async def test_logged_out_deletes_the_session_and_pairs_again_at_once() -> None:
    sup, driver, clock, states = make(["ok", "qr"])
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED)
    await clock.advance(10)
    driver.push(LoggedOut("logged out: main_device_gone"))
    assert sup.state is S.LOGGED_OUT
    await clock.run_until(lambda: sup.state is S.PAIRING)
    assert driver.forgotten == 1
    assert driver.connects == [0.0, 10.0]  # fresh pairing right away, no backoff
    assert states[-3:] == [S.LOGGED_OUT, S.CONNECTING, S.PAIRING]
    assert "main_device_gone" in sup.stats()["last_error"]
    driver.push(Paired())
    assert sup.state is S.CONNECTING
    driver.push(Connected())
    assert sup.state is S.CONNECTED
    await sup.stop()


async def test_logged_out_twice_in_a_row_backs_off() -> None:
    sup, driver, clock, _ = make(["ok", "ok", "ok"])
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED)
    driver.push(LoggedOut())
    await clock.run_until(lambda: len(driver.connects) == 2 and sup.state is S.CONNECTED)
    driver.push(LoggedOut())
    await clock.settle()
    assert sup.stats()["next_retry_in_s"] is not None
    await sup.stop()


async def test_replaced_session_is_never_retried() -> None:
    sup, driver, clock, _ = make(["ok"], default="ok")
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED)
    driver.push(StreamReplaced())
    await clock.advance(24 * 3600)
    assert len(driver.connects) == 1
    assert [name for name, _ in driver.calls] == ["connect", "disconnect"]
    stats = sup.stats()
    assert stats["state"] == "replaced" and stats["retry_owner"] is None
    assert "another instance" in stats["last_error"]
    driver.push(Connected())  # a late event does not revive it
    assert sup.state is S.REPLACED
    await sup.stop()
    assert sup.state is S.REPLACED


async def test_temporary_ban_waits_until_it_expires() -> None:
    sup, driver, clock, _ = make(["ok", "ok"])
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED)
    driver.push(TemporaryBan(reason="sent_to_too_many_people", expire_s=3600))
    await clock.settle()
    assert sup.state is S.BANNED
    assert sup.stats()["next_retry_in_s"] == pytest.approx(3600)
    await clock.advance(3599)
    assert len(driver.connects) == 1
    assert sup.state is S.BANNED
    await clock.advance(2)
    assert len(driver.connects) == 2
    assert sup.state is S.CONNECTED
    await sup.stop()


async def test_client_outdated_names_the_upgrade_and_does_not_hammer() -> None:
    sup, driver, clock, _ = make(["ok"], default="outdated")
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED)
    driver.push(ClientOutdated())
    await clock.settle()
    stats = sup.stats()
    assert "pip install -U neonize" in stats["last_error"] and stats["last_error"] == OUTDATED_HELP
    assert stats["next_retry_in_s"] == pytest.approx(60)
    # It stays outdated until an upgrade, and each attempt costs neonize a database handle: 60 s doubling
    # to an hour, not a minute for ever (1,440 handles a day).
    await clock.run_until(lambda: len(driver.connects) == 9, limit_s=20_000)
    assert gaps(driver.connects) == pytest.approx([60, 120, 240, 480, 960, 1920, 3600, 3600])
    await sup.stop()


async def test_expired_pairing_qr_starts_a_new_pairing_without_penalty() -> None:
    sup, driver, clock, _ = make(["qr", "qr"], heartbeat_s=30, qr_timeout_s=90)
    await sup.start()
    await clock.run_until(lambda: sup.state is S.PAIRING)
    await clock.run_until(lambda: len(driver.connects) == 2, limit_s=200)
    assert 90 <= driver.connects[1] <= 120
    assert sup.stats()["attempts"] == 0
    await sup.stop()


async def test_unscanned_pairings_rest_longer_each_time_until_qr_is_opened() -> None:
    """An unpaired bot made a new pairing every ~100 s for ever: each cost neonize a database handle that
    is never closed (300 made +300 file descriptors and +53 MB), and in pairing-code mode a notification
    on the owner's phone."""
    sup, driver, clock, _ = make([], default="qr", heartbeat_s=30, qr_timeout_s=90)
    await sup.start()
    await clock.run_until(lambda: len(driver.connects) == 4, limit_s=1000)
    at_once = gaps(driver.connects)
    assert all(gap <= 120 for gap in at_once), at_once  # three expired pairings: a new one at once
    await clock.run_until(lambda: len(driver.connects) == 6, limit_s=3000)
    rests = gaps(driver.connects)[3:]
    assert 300 <= rests[0] - 90 <= 330 and 600 <= rests[1] - 90 <= 630, rests  # 5 min, then 10 min
    assert sup.stats()["attempts"] == 0, "not failures"
    await clock.run_until(lambda: sup.stats()["next_retry_in_s"] is not None, limit_s=200)
    rest = sup.pairing_rest_s()  # what /qr shows while no code is up
    assert rest is not None and 0 < rest <= 1200 and sup.stats()["pairing_rest"] is True
    sup.pair_now()  # someone opened /qr
    assert sup.pairing_rest_s() is None  # at once: the page drawn right after must not offer the rest again
    await clock.settle()
    assert len(driver.connects) == 7 and driver.connects[6] - driver.connects[5] < 150
    assert sup.pairing_rest_s() is None and sup.stats()["pairing_rest"] is False
    await sup.stop()


async def test_a_scan_ends_the_rests() -> None:
    sup, driver, clock, _ = make(["qr"] * 5 + ["ok"], default="qr", heartbeat_s=30, qr_timeout_s=90)
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED, limit_s=3000)
    driver.push(ConnectionLost("stream end"))  # pairing again later (say, after a logout): no rest
    await clock.run_until(lambda: len(driver.connects) == 8, limit_s=300)
    assert driver.connects[7] - driver.connects[6] <= 120
    await sup.stop()


async def test_opening_qr_does_not_cut_a_failure_backoff_short() -> None:
    sup, driver, clock, _ = make([], default="fail")
    await sup.start()
    await clock.run_until(lambda: len(driver.connects) == 8, limit_s=1000)
    await clock.settle()
    assert sup.stats()["next_retry_in_s"] is not None
    assert sup.pairing_rest_s() is None  # a backoff, not a rest: /qr does not offer to end it
    sup.pair_now()
    await clock.settle()
    assert len(driver.connects) == 8
    await sup.stop()


async def test_stop_during_backoff_is_prompt_and_final() -> None:
    sup, driver, clock, _ = make([], default="fail")
    await sup.start()
    await clock.run_until(lambda: len(driver.connects) == 3)
    await clock.settle()
    t = time.monotonic()
    await sup.stop()
    assert time.monotonic() - t < 1
    assert sup.state is S.STOPPED
    await clock.advance(3600)
    assert len(driver.connects) == 3
    await sup.stop()  # idempotent


async def test_errors_in_stats_never_show_phone_numbers() -> None:
    sup, driver, clock, _ = make(["lost"], default="stall")
    driver.script = deque()
    driver.default = "stall"
    await sup.start()
    await clock.settle()
    driver.push(ConnectionLost("send to 34612345678@s.whatsapp.net failed"))
    await clock.settle()
    error = sup.stats()["last_error"]
    assert "34612345678" not in error and "+34*******78" in error
    await sup.stop()


async def test_presence_ping_is_off_by_default_and_runs_each_heartbeat_when_on() -> None:
    for enabled, expected in ((False, 0), (True, 3)):
        sup, driver, clock, _ = make(["ok"], heartbeat_s=30, presence_ping=enabled)
        await sup.start()
        await clock.run_until(lambda sup=sup: sup.state is S.CONNECTED)
        await clock.advance(95)
        assert driver.pings == expected
        await sup.stop()


async def test_events_outside_a_lifetime_are_ignored() -> None:
    sup, driver, _, _ = make([])
    driver.push(Connected())  # not started yet
    assert sup.state is S.STARTING


async def test_inbound_and_keepalive_ages_show_a_deaf_socket() -> None:
    sup, _, clock, _ = make(["ok"])
    await sup.start()
    await clock.run_until(lambda: sup.state is S.CONNECTED)
    assert sup.stats()["last_inbound_s_ago"] is None
    sup.note_inbound()
    await clock.advance(600)
    stats = sup.stats()
    assert stats["last_inbound_s_ago"] == pytest.approx(600)
    assert stats["uptime_s"] == pytest.approx(600)
    assert stats["keepalive_ok_s_ago"] is not None and stats["keepalive_ok_s_ago"] <= 30
    await sup.stop()


async def test_event_loop_lag_is_measured() -> None:
    driver = ScriptedDriver(FakeClock(), [], default="stall")
    sup = Supervisor(driver, heartbeat_s=0, lag_interval_s=0.02)
    driver.supervisor = sup
    await sup.start()
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.15)  # block the loop on purpose
        await asyncio.sleep(0.05)
        assert sup.stats()["loop_lag_max_ms"] >= 100
    finally:
        await sup.stop()


async def test_stop_returns_when_it_lands_as_a_disconnect_completes() -> None:
    """On Python 3.11 asyncio.wait_for returns the inner result instead of raising when the cancellation
    arrives in the iteration the inner call completes: the runner survived stop()'s cancel, kept
    reconnecting (about a hundred connects), and stop() never returned."""
    from connection.supervisor import Backoff, ConnectionLost, Supervisor

    class Driver:
        def __init__(self) -> None:
            self.supervisor: Supervisor | None = None
            self.connects = 0
            self.in_disconnect = asyncio.Event()
            self.arm = False

        async def connect(self) -> None:
            self.connects += 1
            assert self.supervisor is not None
            asyncio.get_running_loop().call_soon(self.supervisor.handle, ConnectionLost("boom"))

        async def disconnect(self) -> None:
            if self.arm:
                self.arm = False
                self.in_disconnect.set()  # wakes the stopper in the iteration this call completes

        async def is_connected(self) -> bool:
            return True

        async def ping(self) -> None:
            pass

        async def forget_session(self) -> None:
            pass

    driver = Driver()
    supervisor = Supervisor(
        driver, name="race", backoff=Backoff(0.01, 0.05), heartbeat_s=0.05, lag_interval_s=None
    )
    driver.supervisor = supervisor
    await supervisor.start()
    await asyncio.sleep(0.1)
    driver.arm = True
    await driver.in_disconnect.wait()
    before = driver.connects
    async with asyncio.timeout(3):
        await supervisor.stop()
    assert driver.connects - before <= 1, "a stopped supervisor went on reconnecting"
