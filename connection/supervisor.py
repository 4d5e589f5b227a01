"""The connection supervisor: explicit states, one retry owner at a time, a heartbeat watchdog.

It drives a small `ClientDriver` (the real one wraps neonize's `NewAClient`; tests use a scripted fake) and
is told what happens through `handle(event)` with the events below. Clock, sleep and random are injected, so
the whole state machine runs on a fake clock in tests.

Who owns retries (never two loops):

- Establishing, from `driver.connect()` until `Connected`: the supervisor. neonize's Go call returns an error
  when the socket cannot be opened (whatsmeow's InitialAutoReconnect is off), the driver reports
  `ConnectionLost`, and the supervisor waits a full-jitter exponential backoff before the next attempt.
- Established, after `Connected`: whatsmeow. After a drop it emits `Disconnected` and reconnects by itself
  (client.go autoReconnect: 0, 2, 4 ... s), and it forces a reconnect after 3 min of failed keepalives
  (keepalive.go). The supervisor only watches: state RECONNECTING, retry owner "whatsmeow".
- Handover: when whatsmeow has not reconnected within `takeover_after_s`, keepalives have failed for
  `keepalive_dead_s`, the socket is down with no event (two heartbeats), a connect stalls, or the connection
  task dies, the supervisor ends the connection's lifetime with `driver.disconnect()` (an expected disconnect,
  which also ends whatsmeow's own loop) and only then runs its backoff.

Logged out, replaced and banned are not retried blindly: logged out deletes the local session and starts
a fresh pairing, replaced stops for good (another instance owns the session), banned waits out the ban.
"""

from __future__ import annotations

import asyncio
import enum
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from loguru import logger

from connection.background import BackgroundTasks
from connection.types import ConnectionState

__all__ = [
    "Backoff",
    "ClientDriver",
    "ClientOutdated",
    "ConnectFailure",
    "Connected",
    "ConnectionLost",
    "Disconnected",
    "DriverEvent",
    "KeepAliveRestored",
    "KeepAliveTimeout",
    "LoggedOut",
    "Paired",
    "QrShown",
    "StreamReplaced",
    "Supervisor",
    "TemporaryBan",
    "mask_phone",
    "scrub",
]

OUTDATED_HELP = (
    "WhatsApp rejected this client as outdated (405): upgrade neonize (`pip install -U neonize`) and redeploy"
)
_DIGITS = re.compile(r"\+?\d{6,}")


def mask_phone(phone: str) -> str:
    """`34612345678` -> `+34*******78`; short or empty input -> `***`."""
    digits = "".join(ch for ch in phone if ch.isdigit())
    if len(digits) < 6:
        return "***"
    return f"+{digits[:2]}{'*' * (len(digits) - 4)}{digits[-2:]}"


_URL_PASSWORD = re.compile(r"(://[^/\s:@]*):[^\s/]*@")  # up to the last @: a password may hold one


def scrub(text: str, limit: int = 300) -> str:
    """Mask every long digit run (phone numbers, LIDs) and the password of any URL (a database URL quoted
    in an error), and cap the length: safe for logs and metrics."""
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    return _DIGITS.sub(lambda m: mask_phone(m.group(0)), text)[:limit]


# --------------------------------------------------------------------------- events pushed in by the driver


@dataclass(frozen=True, slots=True)
class Connected:
    """Logged in and ready (whatsmeow's Connected)."""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The socket dropped; whatsmeow is reconnecting by itself."""


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The driver's connection ended: its connect call failed or its task died."""

    error: str | None = None


@dataclass(frozen=True, slots=True)
class KeepAliveTimeout:
    error_count: int = 1
    last_success_ago_s: float | None = None


@dataclass(frozen=True, slots=True)
class KeepAliveRestored:
    pass


@dataclass(frozen=True, slots=True)
class QrShown:
    """A pairing QR code (or pairing code) is waiting to be used."""


@dataclass(frozen=True, slots=True)
class Paired:
    """The phone accepted the pairing; whatsmeow now logs in."""


@dataclass(frozen=True, slots=True)
class LoggedOut:
    reason: str = "logged out"


@dataclass(frozen=True, slots=True)
class StreamReplaced:
    """Another client connected with the same session."""


@dataclass(frozen=True, slots=True)
class TemporaryBan:
    reason: str = "unknown"
    expire_s: float = 0.0  # 0: WhatsApp did not say


@dataclass(frozen=True, slots=True)
class ClientOutdated:
    pass


@dataclass(frozen=True, slots=True)
class ConnectFailure:
    """A connect failure whatsmeow does not retry by itself (its unknown reasons)."""

    reason: str = "unknown"


DriverEvent = (
    Connected
    | Disconnected
    | ConnectionLost
    | KeepAliveTimeout
    | KeepAliveRestored
    | QrShown
    | Paired
    | LoggedOut
    | StreamReplaced
    | TemporaryBan
    | ClientOutdated
    | ConnectFailure
)


class ClientDriver(Protocol):
    """One WhatsApp client as the supervisor drives it; events come back through `Supervisor.handle`."""

    async def connect(self) -> None:
        """Start one connection attempt and return; raise when it cannot even start."""
        ...

    async def disconnect(self) -> None:
        """End the current connection (and any reconnect loop of the library); idempotent."""
        ...

    async def is_connected(self) -> bool: ...

    async def ping(self) -> None:
        """An active liveness check (neonize: send presence 'available'); only used when enabled."""
        ...

    async def forget_session(self) -> None:
        """Delete the local session, so the next connect starts a fresh pairing."""
        ...


# --------------------------------------------------------------------------- backoff


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff, full jitter: failure n waits uniform(0, min(cap, base * 2^(n-1)))."""

    base_s: float = 1.0
    cap_s: float = 60.0

    def ceiling(self, failures: int) -> float:
        return min(self.cap_s, self.base_s * 2.0 ** min(max(failures, 1) - 1, 30))

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        return rand() * self.ceiling(failures)


class _Why(enum.Enum):
    RETRY = "retry"  # a failure: backoff
    QR_EXPIRED = "qr_expired"  # not a failure: a new pairing (at once, then resting; see _after_unscanned)
    OUTDATED = "outdated"
    LOGGED_OUT = "logged_out"
    REPLACED = "replaced"
    BANNED = "banned"


@dataclass(frozen=True, slots=True)
class _End:
    why: _Why
    reason: str
    wait_s: float = 0.0


_TERMINAL_STATES = {
    _Why.LOGGED_OUT: ConnectionState.LOGGED_OUT,
    _Why.REPLACED: ConnectionState.REPLACED,
    _Why.BANNED: ConnectionState.BANNED,
}
_LEVELS = {
    ConnectionState.RECONNECTING: "WARNING",
    ConnectionState.LOGGED_OUT: "ERROR",
    ConnectionState.REPLACED: "ERROR",
    ConnectionState.BANNED: "ERROR",
}


# --------------------------------------------------------------------------- supervisor


class Supervisor:
    """Runs connection lifetimes (driver.connect, watchdog, events) and decides what follows each one."""

    PAIRINGS_AT_ONCE = 3  # expired pairings followed at once by a new one (about 12 minutes of codes)
    PAIRING_REST_S = 300.0  # then a rest before each new pairing, doubling...
    PAIRING_MAX_REST_S = 3600.0  # ...up to an hour
    OUTDATED_MAX_WAIT_S = 3600.0  # "client outdated": retried after 60 s, doubling up to an hour

    def __init__(
        self,
        driver: ClientDriver,
        *,
        backoff: Backoff | None = None,
        heartbeat_s: float = 30.0,
        connect_timeout_s: float = 60.0,
        takeover_after_s: float = 120.0,
        keepalive_dead_s: float = 240.0,
        stable_after_s: float = 60.0,
        qr_timeout_s: float = 90.0,
        ban_fallback_s: float = 3600.0,
        presence_ping: bool = False,
        lag_interval_s: float | None = 1.0,
        release_timeout_s: float = 5.0,
        on_state: Callable[[ConnectionState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        name: str = "whatsapp",
    ) -> None:
        self._driver = driver
        self.backoff = backoff or Backoff()
        self._heartbeat_s = heartbeat_s
        self._connect_timeout_s = connect_timeout_s
        self._takeover_after_s = takeover_after_s
        self._keepalive_dead_s = keepalive_dead_s
        self._stable_after_s = stable_after_s
        self._qr_timeout_s = qr_timeout_s
        self._ban_fallback_s = ban_fallback_s
        self._presence_ping = presence_ping
        self._lag_interval_s = lag_interval_s
        self._release_timeout_s = release_timeout_s
        self._on_state = on_state
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._name = name

        self._state = ConnectionState.STARTING
        self._since_mono = clock()
        self._since_wall = time.time()
        self._tasks = BackgroundTasks(name)
        self._runner: asyncio.Task[None] | None = None
        self._end: asyncio.Future[_End] | None = None
        self._stopping = False
        self._changed = asyncio.Event()

        self._failures = 0  # consecutive failed attempts; reset once a connection stayed up
        self._outdated = 0  # consecutive "client outdated" ends
        self._unscanned = 0  # consecutive pairings whose QR codes expired; reset by a scan
        self._resting = False  # waiting between unscanned pairings: GET /qr may end it
        self._wake = asyncio.Event()
        self._attempts_total = 0
        self._reconnects = 0
        self._ever_connected = False
        self._last_error: str | None = None
        self._last_end: _Why | None = None
        self._owner: str | None = None
        self._next_retry_at: float | None = None
        self._lifetime_started = 0.0
        self._connected_at: float | None = None
        self._connected_wall: float | None = None
        self._down_since: float | None = None
        self._dead_probes = 0
        self._last_qr_at = 0.0
        self._keepalive_ok_at: float | None = None
        self._keepalive_failing = False
        self._last_inbound: float | None = None
        self._lag_s: float | None = None
        self._lags: deque[float] = deque(maxlen=60)

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def running(self) -> bool:
        return self._runner is not None and not self._runner.done()

    async def start(self) -> None:
        """Start connecting in the background; returns at once."""
        if self._runner is not None:
            return
        self._runner = self._tasks.spawn(self._run(), f"{self._name}-supervisor")
        if self._lag_interval_s:
            self._tasks.spawn(self._measure_lag(self._lag_interval_s), f"{self._name}-loop-lag")

    async def stop(self, final: ConnectionState = ConnectionState.STOPPED) -> None:
        """Stop retrying and watching, disconnect; idempotent and prompt.

        The state becomes `final` (LOGGED_OUT after a logout), except that REPLACED and BANNED stay visible.
        """
        if self._stopping:
            return
        self._stopping = True
        await self._tasks.cancel_all()
        await self._release()
        self._connected_at = self._connected_wall = None
        self._owner = None
        self._next_retry_at = None
        if self._state not in (ConnectionState.REPLACED, ConnectionState.BANNED):
            self._state_now(final)

    async def wait_for(self, *states: ConnectionState) -> ConnectionState:
        """Wait until the state is one of `states`; bound it with `asyncio.timeout(...)`."""
        while self._state not in states:
            self._changed.clear()
            await self._changed.wait()
        return self._state

    def note_inbound(self) -> None:
        """A message arrived: shows in stats as proof the socket is not deaf."""
        self._last_inbound = self._clock()

    # ------------------------------------------------------------------ events

    def handle(self, event: DriverEvent) -> None:
        """Apply one event from the driver. Events outside a connection lifetime are stale and ignored."""
        if self._end is None or self._end.done():
            logger.debug("{}: ignoring {} outside a connection lifetime", self._name, type(event).__name__)
            return
        now = self._clock()
        match event:
            case Connected():
                if self._ever_connected:
                    self._reconnects += 1
                self._ever_connected = True
                self._unscanned = self._outdated = 0
                self._connected_at, self._connected_wall = now, time.time()
                self._down_since = None
                self._dead_probes = 0
                self._keepalive_ok_at, self._keepalive_failing = now, False
                self._owner = "whatsmeow"
                self._set_state(ConnectionState.CONNECTED)
            case Disconnected():
                if self._state is ConnectionState.CONNECTED:
                    self._down_since = now
                    self._connected_at = self._connected_wall = None
                    self._last_error = "connection dropped"
                    logger.warning("{}: connection dropped; whatsmeow is reconnecting", self._name)
                    self._set_state(ConnectionState.RECONNECTING)
            case ConnectionLost(error=error):
                self._finish(_End(_Why.RETRY, error or "connection ended"))
            case KeepAliveTimeout(error_count=count, last_success_ago_s=ago):
                self._keepalive_failing = True
                if ago is not None:
                    self._keepalive_ok_at = now - ago
                self._last_error = f"keepalive timeout ({count} in a row)"
                logger.warning("{}: {}", self._name, self._last_error)
            case KeepAliveRestored():
                self._keepalive_failing, self._keepalive_ok_at = False, now
                logger.info("{}: keepalive restored", self._name)
            case QrShown():
                self._last_qr_at = now
                self._set_state(ConnectionState.PAIRING)
            case Paired():
                self._unscanned = 0
                self._lifetime_started = now  # the connect timeout starts over for the login
                self._set_state(ConnectionState.CONNECTING)
            case LoggedOut(reason=reason):
                self._finish(_End(_Why.LOGGED_OUT, reason))
            case StreamReplaced():
                self._finish(_End(_Why.REPLACED, "session replaced: another instance connected with it"))
            case TemporaryBan(reason=reason, expire_s=expire_s):
                self._finish(_End(_Why.BANNED, f"temporarily banned ({reason})", wait_s=expire_s))
            case ClientOutdated():
                self._finish(_End(_Why.OUTDATED, OUTDATED_HELP))
            case ConnectFailure(reason=reason):
                self._finish(_End(_Why.RETRY, f"connect failure: {reason}"))

    def _finish(self, end: _End) -> None:
        if self._end is None or self._end.done():
            return
        self._end.set_result(end)
        if end.why in _TERMINAL_STATES:
            self._last_error = scrub(end.reason)
            self._set_state(_TERMINAL_STATES[end.why])

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        # Not `while True`: a cancellation swallowed somewhere below (3.11's wait_for, a library) must not
        # keep a stopped supervisor reconnecting.
        while not self._stopping:
            try:
                end = await self._lifetime()
                await self._release()
                delay = await self._decide(end)
            except Exception:  # a bug here must not end reconnecting for good
                logger.opt(exception=True).error("{}: supervisor step failed", self._name)
                delay = self.backoff.cap_s
            if delay is None:
                await asyncio.get_running_loop().create_future()  # replaced: wait for stop()
                return
            if delay > 0:
                self._next_retry_at = self._clock() + delay
                self._wake.clear()
                sleeping = asyncio.ensure_future(self._sleep(delay))
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({sleeping, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeping.cancel()
                    woken.cancel()
                    self._next_retry_at = None
                    self._resting = False

    async def _lifetime(self) -> _End:
        """One connection: connect, then wait for its end while the watchdog runs."""
        self._attempts_total += 1
        self._lifetime_started = self._clock()
        self._owner = "supervisor"
        self._dead_probes = 0
        self._keepalive_failing = False
        self._end = asyncio.get_running_loop().create_future()
        self._set_state(ConnectionState.CONNECTING)
        try:
            await self._driver.connect()
        except Exception as exc:
            self._finish(_End(_Why.RETRY, f"{type(exc).__name__}: {exc}"))
        watchdog = None
        if self._heartbeat_s > 0 and not self._end.done() and not self._stopping:
            watchdog = self._tasks.spawn(self._watchdog(), f"{self._name}-watchdog")
        try:
            return await self._end
        finally:
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)

    async def _decide(self, end: _End) -> float | None:
        """What follows a lifetime: seconds to wait before the next one, or None to stop for good."""
        now = self._clock()
        if self._connected_at is not None and now - self._connected_at >= self._stable_after_s:
            self._failures = 0  # it stayed up a while: this failure starts a new series
        self._connected_at = self._connected_wall = None
        self._down_since = None
        self._owner = "supervisor"
        previous, self._last_end = self._last_end, end.why
        reason = scrub(end.reason)

        if end.why is _Why.REPLACED:
            self._owner = None
            logger.error(
                "{}: {}. Not reconnecting (never fight it): stop the other instance, then restart this one",
                self._name,
                reason,
            )
            return None
        if end.why is _Why.BANNED:
            self._failures = 0
            wait = end.wait_s if end.wait_s > 0 else self._ban_fallback_s
            logger.error("{}: {}; waiting {:.0f}s for the ban to expire", self._name, reason, wait)
            return wait
        if end.why is _Why.LOGGED_OUT:
            logger.error("=" * 72)
            if "logged_out" in reason:  # 401: unlinked under Linked devices on the phone
                logger.error(
                    "{}: LOGGED OUT ({}): the device was unlinked from the phone", self._name, reason
                )
            else:  # 403 main_device_gone, 406 unknown_logout: also how locked and banned accounts end
                logger.error(
                    "{}: LOGGED OUT by WhatsApp ({}): check that WhatsApp still works on the phone (the"
                    " account may have been removed, locked or banned) before pairing again",
                    self._name,
                    reason,
                )
            logger.error("{}: local session deleted next; scan the new QR (GET /qr) to pair", self._name)
            logger.error("=" * 72)
            try:
                await self._driver.forget_session()
            except Exception as exc:
                logger.error("{}: could not delete the local session: {}", self._name, scrub(str(exc)))
            if previous is _Why.LOGGED_OUT:  # logged out again right away: do not loop on fresh sessions
                self._failures += 1
                return self._retry_in(self.backoff.delay(self._failures, self._rand), reason)
            self._failures = 0
            return 0.0
        if end.why is _Why.QR_EXPIRED:
            return self._after_unscanned(reason)

        self._failures += 1
        self._last_error = reason
        if end.why is _Why.OUTDATED:  # only an upgrade helps: each attempt costs neonize a database handle
            self._outdated += 1
            logger.error("{}: {}", self._name, reason)
            return self._retry_in(
                min(self.OUTDATED_MAX_WAIT_S, self.backoff.cap_s * 2 ** (self._outdated - 1)), reason
            )
        return self._retry_in(self.backoff.delay(self._failures, self._rand), reason)

    def _after_unscanned(self, reason: str) -> float:
        """A new pairing at once for the first few expired ones; then rest between pairings (each one
        costs neonize a database handle and the owner's phone a notification in pairing-code mode),
        until GET /qr asks for a code (`pair_now`)."""
        self._unscanned += 1
        if self._unscanned <= self.PAIRINGS_AT_ONCE:
            logger.info("{}: {}; starting a new pairing", self._name, reason)
            return 0.0
        rest = min(
            self.PAIRING_MAX_REST_S,
            self.PAIRING_REST_S * 2.0 ** (self._unscanned - self.PAIRINGS_AT_ONCE - 1),
        )
        logger.warning(
            "{}: {} ({} pairings in a row); the next pairing in {:.0f} min, or at once when /qr is opened",
            self._name,
            reason,
            self._unscanned,
            rest / 60,
        )
        self._resting = True
        return rest

    def pair_now(self) -> None:
        """Someone wants a pairing code now (GET /qr): end a rest between unscanned pairings. Never cuts a
        backoff after failures or a ban short."""
        if self._resting:
            self._wake.set()

    def pairing_rest_s(self) -> float | None:
        """Seconds left in a rest between unscanned pairings; None when not resting."""
        if not self._resting or self._next_retry_at is None or self._wake.is_set():  # ending, not resting
            return None
        return max(0.0, self._next_retry_at - self._clock())

    def _retry_in(self, delay: float, reason: str) -> float:
        self._set_state(ConnectionState.RECONNECTING)
        logger.warning(
            "{}: attempt {} failed ({}); next attempt in {:.1f}s", self._name, self._failures, reason, delay
        )
        return delay

    async def _release(self) -> None:
        try:
            async with asyncio.timeout(self._release_timeout_s):  # not wait_for: see _probe
                await self._driver.disconnect()
        except Exception as exc:
            logger.debug("{}: disconnect: {}", self._name, type(exc).__name__)

    # ------------------------------------------------------------------ watchdog

    async def _watchdog(self) -> None:
        while True:
            await self._sleep(self._heartbeat_s)
            await self.check()

    async def check(self) -> None:
        """One heartbeat: end the lifetime when the connection is dead but no event said so."""
        if self._end is None or self._end.done():
            return
        now = self._clock()
        state = self._state
        if state is ConnectionState.PAIRING:
            if now - self._last_qr_at > self._qr_timeout_s:
                self._finish(_End(_Why.QR_EXPIRED, "the pairing QR codes expired without a scan"))
            return
        if state is ConnectionState.CONNECTING:
            if now - self._lifetime_started > self._connect_timeout_s:
                self._finish(_End(_Why.RETRY, f"connect stalled for {now - self._lifetime_started:.0f}s"))
            return
        if state is ConnectionState.RECONNECTING:  # whatsmeow's turn, within limits
            if self._down_since is not None and now - self._down_since > self._takeover_after_s:
                self._finish(
                    _End(_Why.RETRY, f"whatsmeow did not reconnect within {self._takeover_after_s:.0f}s")
                )
            return
        if state is not ConnectionState.CONNECTED:
            return
        if not await self._probe():
            self._dead_probes += 1
            if self._dead_probes >= 2:
                self._finish(_End(_Why.RETRY, "socket dead without a disconnect event"))
            return
        self._dead_probes = 0
        if self._keepalive_failing:
            ok_at = self._keepalive_ok_at if self._keepalive_ok_at is not None else self._lifetime_started
            if now - ok_at > self._keepalive_dead_s:
                self._finish(_End(_Why.RETRY, f"keepalive failing for {now - ok_at:.0f}s"))
                return
        else:
            self._keepalive_ok_at = now
        if self._connected_at is not None and now - self._connected_at >= self._stable_after_s:
            self._failures = 0
        if self._presence_ping:
            try:
                await self._driver.ping()
            except Exception as exc:
                logger.warning("{}: presence ping failed: {}", self._name, scrub(str(exc)))

    async def _probe(self) -> bool:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that lands as the
            # call completes, and this runs in the watchdog loop that stop() cancels (a stop that hung).
            async with asyncio.timeout(10.0):
                return bool(await self._driver.is_connected())
        except Exception:
            return False

    async def _measure_lag(self, interval: float) -> None:
        """How late the event loop wakes a sleeper: a blocked loop delays every message and keepalive."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            self._lag_s = max(0.0, loop.time() - expected)
            self._lags.append(self._lag_s)

    # ------------------------------------------------------------------ state and stats

    def _set_state(self, state: ConnectionState) -> None:
        if state is self._state or self._stopping:
            return
        self._state_now(state)

    def _state_now(self, state: ConnectionState) -> None:
        if state is self._state:
            return
        level = _LEVELS.get(state, "INFO")
        logger.log(level, "{}: state {} -> {}", self._name, self._state.value, state.value)
        self._state = state
        self._since_mono, self._since_wall = self._clock(), time.time()
        self._changed.set()
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                logger.opt(exception=True).error("{}: on_state callback failed", self._name)

    def stats(self) -> dict[str, Any]:
        """Numbers for /v1/metrics `connection`; no phone numbers, no message text."""
        now = self._clock()

        def ago(t: float | None) -> float | None:
            return None if t is None else round(max(0.0, now - t), 1)

        next_retry = None if self._next_retry_at is None else round(max(0.0, self._next_retry_at - now), 1)
        return {
            "state": self._state.value,
            "connected": self._state is ConnectionState.CONNECTED,
            "since": round(self._since_wall, 3),
            "in_state_s": ago(self._since_mono),
            "retry_owner": self._owner,
            "attempts": self._failures,
            "connect_attempts": self._attempts_total,
            "next_retry_in_s": next_retry,
            "pairing_rest": self._resting,
            "last_error": self._last_error,
            "reconnects": self._reconnects,
            "uptime_s": ago(self._connected_at) or 0.0,
            "connected_since": self._connected_wall,
            "keepalive_ok_s_ago": ago(self._keepalive_ok_at),
            "last_inbound_s_ago": ago(self._last_inbound),
            "loop_lag_ms": None if self._lag_s is None else round(self._lag_s * 1000, 1),
            "loop_lag_max_ms": round(max(self._lags) * 1000, 1) if self._lags else None,
        }
