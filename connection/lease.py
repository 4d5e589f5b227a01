"""One running instance per WhatsApp session: a lease taken before connecting, released on the way out.

Two processes connected with one WhatsApp session fight over it (the server replaces one stream with the
other, back and forth) and both answer customers. Railway runs two deployments at once during a deploy
unless a volume is attached, so without a volume the bot takes a lease before it connects, keeps it while it
runs, and releases it on SIGTERM. The next instance waits meanwhile, reports that it waits (`stats()`, shown
in /v1/metrics) and connects as soon as the lease is free.

Implementations, chosen by `make_lease`:

- `PostgresAdvisoryLease`, when SUPABASE_DB_URL is set (the WhatsApp session itself is in that database):
  `pg_try_advisory_lock` on a dedicated session connection. Postgres drops the lock when that connection
  ends, so a crashed holder frees it at once; a holder whose connection lingers (a vanished host, a pooler
  keeping the server connection) is recognised by its silence, since a live holder queries every `check_s`,
  and is terminated by the waiting instance after `stale_after_s`. Needs Supabase's *session* pooler
  (port 5432) or the direct connection: the transaction pooler (6543) does not keep session locks.
  The connection is asyncpg's, used for this one session and nothing else.
- `SupabaseRestLease`, when only SUPABASE_URL/SUPABASE_KEY are set: a row in `public.bot_leases` with an
  expiry the holder renews every `ttl_s / 3`, through two SQL functions called over PostgREST
  (supabase/migrations/20261122010000_lease.sql). Expiry is computed by the database's clock only. A holder
  that dies without releasing is replaced once its row expires (`ttl_s`).
- `NoopLease`: nothing shared to guard (the session is on a local disk; with a Railway volume, Railway stops
  the old deployment before it starts the new one).

A holder that finds its lease taken by someone else (its connection dropped and another instance got the
lock, or its row expired and was taken) sets `lost` and calls `on_lost`: it must disconnect from WhatsApp.
Database outages alone never take the lease away: while the database cannot be reached the holder keeps
running and reports `confirmed_s_ago` growing.

    lease = make_lease("bot", db_url=..., supabase_url=..., supabase_key=..., volume_path=...)
    async with lease:            # waits while another live instance holds it
        ...connect and serve...  # `await lease.lost.wait()` tells when to stop
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from loguru import logger

from connection.supervisor import scrub

if TYPE_CHECKING:
    import asyncpg

LEASE_MIGRATION = "supabase/migrations/20261122010000_lease.sql"
_APP_NAME_PREFIX = "wa-bot-lease "  # + the holder id: Postgres keeps 63 bytes


class LeaseError(RuntimeError):
    """The lease backend could not be asked (unreachable, refused, misconfigured)."""


class LeaseSetupError(LeaseError):
    """The backend is reachable but not set up for leases (a migration is missing)."""


class LeaseState(enum.StrEnum):
    IDLE = "idle"  # not asked yet
    WAITING = "waiting"  # another instance holds it (or the backend cannot be reached): retrying
    HELD = "held"
    LOST = "lost"  # held, then taken by another instance: stop serving
    RELEASED = "released"


def default_holder_id() -> str:
    """Who this process is, for logs and metrics: Railway's deployment/replica, host, pid, and a random
    suffix (containers restart as pid 1 on the same host name)."""
    parts = [os.environ.get(var, "").strip()[:8] for var in ("RAILWAY_DEPLOYMENT_ID", "RAILWAY_REPLICA_ID")]
    parts += [socket.gethostname()[:12] or "host", f"pid{os.getpid()}", secrets.token_hex(2)]
    return "-".join(part for part in parts if part)


def _describe(exc: BaseException) -> str:
    """For logs and metrics, scrubbed like connection errors (a driver's error may quote its URL)."""
    text = str(exc).strip() or type(exc).__name__
    return scrub(text if isinstance(exc, LeaseError) else f"{type(exc).__name__}: {text}")


class SessionLease:
    """The lease of one WhatsApp session. Subclasses implement `_try_acquire`, `_keep` and `_release`."""

    kind = "none"

    def __init__(
        self,
        name: str,
        *,
        holder_id: str | None = None,
        poll_s: float = 2.0,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        if not name:
            raise ValueError("a lease needs a name")
        self.name = name
        self.holder_id = holder_id or default_holder_id()
        self.poll_s = poll_s
        self.on_lost = on_lost
        self.state = LeaseState.IDLE
        self.holder: str | None = None  # who holds it, as far as this instance knows
        self.attempts = 0
        self.waiting_since: float | None = None
        self.acquired_at: float | None = None
        self.confirmed_at: float | None = None  # last time the backend confirmed we hold it (monotonic)
        self.last_error: str | None = None
        self.lost = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._logged_error: str | None = None

    # -- public ------------------------------------------------------------------------------------------

    @property
    def held(self) -> bool:
        return self.state is LeaseState.HELD

    async def acquire(self) -> None:
        """Return once this instance holds the lease; until then retry every `poll_s` (with jitter).

        Cancel the call to give up waiting (on SIGTERM, say); what it opened is closed.
        """
        if self.state is LeaseState.HELD:
            return
        self.lost.clear()
        try:
            while True:
                self.attempts += 1
                try:
                    got, holder = await self._try_acquire()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._error(exc)
                    got, holder = False, self.holder
                else:
                    self._ok()
                if got:
                    self._held()
                    return
                self.holder = holder
                if self.state is not LeaseState.WAITING:
                    self.state = LeaseState.WAITING
                    self.waiting_since = time.time()
                    if holder:
                        logger.warning(
                            "session lease {!r} is held by {}: waiting for it before connecting to WhatsApp",
                            self.name,
                            holder,
                        )
                await asyncio.sleep(random.uniform(0.8, 1.2) * self.poll_s)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._abandon())
            if self.state is LeaseState.WAITING:
                self.state = LeaseState.IDLE
            raise

    async def release(self) -> None:
        """Give the lease back (idempotent; errors are logged, not raised: this runs on the way out)."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        was = self.state
        try:
            await self._release()
        except Exception as exc:
            logger.warning(
                "session lease {!r}: release failed ({}); it expires by itself", self.name, _describe(exc)
            )
        self.state = LeaseState.RELEASED
        self.holder = None
        self.waiting_since = None
        if was is LeaseState.HELD:
            logger.info("session lease {!r} released", self.name)

    async def __aenter__(self) -> SessionLease:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    def stats(self) -> dict[str, Any]:
        """For /v1/metrics: no secrets, no phone numbers."""
        now = time.time()
        return {
            "kind": self.kind,
            "state": self.state.value,
            "held": self.held,
            "instance": self.holder_id,
            "holder": self.holder,
            "attempts": self.attempts,
            "waiting_since": round(self.waiting_since, 3) if self.waiting_since else None,
            "waiting_s": round(now - self.waiting_since, 1) if self.waiting_since else None,
            "acquired_at": round(self.acquired_at, 3) if self.acquired_at else None,
            "confirmed_s_ago": (
                round(time.monotonic() - self.confirmed_at, 1)
                if self.held and self.confirmed_at is not None
                else None
            ),
            "last_error": self.last_error,
        }

    # -- for subclasses ----------------------------------------------------------------------------------

    async def _try_acquire(self) -> tuple[bool, str | None]:
        """One attempt: (acquired, who holds it now if known)."""
        return True, self.holder_id

    async def _keep(self) -> None:
        """While held: confirm now and then; call `_mark_lost` if another instance has it."""

    async def _release(self) -> None:
        """Give it back and close what was opened."""

    async def _abandon(self) -> None:
        """acquire() was cancelled: close what was opened."""
        await self._release()

    def _mark_lost(self, holder: str | None, why: str) -> None:
        if self.state is not LeaseState.HELD:
            return
        self.state = LeaseState.LOST
        self.holder = holder
        self.acquired_at = None
        logger.error(
            "session lease {!r} lost ({}): this instance must stop using the session", self.name, why
        )
        self.lost.set()
        if self.on_lost is not None:
            try:
                self.on_lost(why)
            except Exception:
                logger.exception("session lease on_lost callback failed")

    def _ok(self) -> None:
        self.last_error = None
        self._logged_error = None

    def _error(self, exc: BaseException) -> None:
        self.last_error = _describe(exc)
        if self.last_error != self._logged_error:  # each distinct error once, not every poll
            self._logged_error = self.last_error
            log = logger.error if isinstance(exc, LeaseSetupError) else logger.warning
            log("session lease {!r} ({}): {}", self.name, self.kind, self.last_error)

    # -- internals ---------------------------------------------------------------------------------------

    def _held(self) -> None:
        waited = time.time() - self.waiting_since if self.waiting_since else 0.0
        self.state = LeaseState.HELD
        self.holder = self.holder_id
        self.acquired_at = time.time()
        self.confirmed_at = time.monotonic()
        self.waiting_since = None
        if self.kind != NoopLease.kind:
            logger.info(
                "session lease {!r} acquired ({}, as {}{})",
                self.name,
                self.kind,
                self.holder_id,
                f", after waiting {waited:.0f}s" if waited >= 1 else "",
            )
        self._keeper = asyncio.create_task(self._run_keeper(), name=f"lease-keeper-{self.name}")

    async def _run_keeper(self) -> None:
        try:
            await self._keep()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("session lease {!r}: keeper crashed", self.name)


class NoopLease(SessionLease):
    """Nothing shared to guard: always held at once."""

    kind = "none"


# ============================================================================================================
# Postgres advisory lock
# ============================================================================================================


def advisory_key(name: str) -> int:
    """The bigint advisory-lock key of a session name (stable across processes and versions)."""
    digest = hashlib.sha256(b"whatsapp-ai-bot/session-lease/" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresAdvisoryLease(SessionLease):
    """`pg_try_advisory_lock` on a dedicated session connection to SUPABASE_DB_URL."""

    kind = "postgres-advisory"

    def __init__(
        self,
        db_url: str,
        name: str,
        *,
        holder_id: str | None = None,
        poll_s: float = 2.0,
        check_s: float = 10.0,
        stale_after_s: float = 60.0,
        timeout_s: float = 10.0,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name, holder_id=holder_id, poll_s=poll_s, on_lost=on_lost)
        # The holder id travels as application_name, which Postgres cuts at 63 bytes.
        self.holder_id = self.holder_id.encode()[: 63 - len(_APP_NAME_PREFIX)].decode(errors="ignore")
        if stale_after_s < 3 * check_s:
            raise ValueError(
                "stale_after_s must be at least 3 * check_s: a live holder queries every check_s"
            )
        self.params = PgParams.from_url(db_url)
        if self.params.port == 6543 and self.params.host.endswith(".pooler.supabase.com"):
            raise ValueError(
                "SUPABASE_DB_URL is Supabase's transaction pooler (port 6543), which keeps no session:"
                " use the session pooler (port 5432) or the direct connection"
            )
        self.check_s = check_s
        self.stale_after_s = stale_after_s
        self.timeout_s = timeout_s
        self.key = advisory_key(name)
        self._conn: PgConnection | None = None

    @property
    def _lock_filter(self) -> str:
        unsigned = self.key & 0xFFFFFFFFFFFFFFFF
        hi, lo = unsigned >> 32, unsigned & 0xFFFFFFFF
        return (
            f"l.locktype = 'advisory' and l.classid = '{hi}'::oid and l.objid = '{lo}'::oid"
            " and l.objsubid = 1"
            " and l.database = (select oid from pg_database where datname = current_database())"
        )

    async def _connection(self) -> PgConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await PgConnection.connect(
                self.params, application_name=_APP_NAME_PREFIX + self.holder_id, timeout=self.timeout_s
            )
        return self._conn

    async def _query(self, sql: str) -> list[tuple[str | None, ...]]:
        conn = await self._connection()
        try:
            return await conn.query(sql, timeout=self.timeout_s)
        except PgError:
            raise
        except BaseException:
            conn.abort()  # a query cut short leaves the protocol in an unknown state
            raise

    async def _try_acquire(self) -> tuple[bool, str | None]:
        rows = await self._query(f"select pg_try_advisory_lock({self.key})")
        if rows and rows[0][0] == "t":
            if not await self._still_held():
                # Each statement went to another server connection: a transaction pooler.
                raise LeaseSetupError(
                    "the advisory lock did not stay with the lease connection: SUPABASE_DB_URL looks like a"
                    " transaction pooler; use a session pooler (Supabase: port 5432) or the direct connection"
                )
            return True, self.holder_id
        return False, await self._holder_or_takeover()

    async def _holder_or_takeover(self) -> str | None:
        """Who holds the lock. A holder silent for longer than a live one ever is gets terminated."""
        rows = await self._query(
            "select l.pid, coalesce(nullif(a.application_name, ''), 'backend ' || l.pid), a.state,"
            " extract(epoch from (clock_timestamp() - a.state_change))"
            f" from pg_locks l left join pg_stat_activity a on a.pid = l.pid where {self._lock_filter}"
            " and l.granted limit 1"
        )
        if not rows:
            return None
        pid, name, state, idle_s = rows[0]
        holder = name.removeprefix(_APP_NAME_PREFIX) if name else None
        if holder == self.holder_id:
            # Our own earlier connection, still open on the server after this side lost it: end it.
            logger.warning("session lease {!r}: ending this instance's previous lease connection", self.name)
            await self._query(f"select pg_terminate_backend({int(pid or 0)})")
        elif (
            state in ("idle", "idle in transaction")
            and idle_s is not None
            and float(idle_s) > self.stale_after_s
        ):
            logger.warning(
                "session lease {!r}: holder {} has been silent for {:.0f}s (a live holder checks in every"
                " {:.0f}s); terminating its connection",
                self.name,
                holder,
                float(idle_s),
                self.check_s,
            )
            await self._query(f"select pg_terminate_backend({int(pid or 0)})")
        return holder

    async def _still_held(self) -> bool:
        rows = await self._query(
            f"select count(*) from pg_locks l where {self._lock_filter}"
            " and l.granted and l.pid = pg_backend_pid()"
        )
        return bool(rows) and rows[0][0] not in (None, "0")

    async def _keep(self) -> None:
        while self.state is LeaseState.HELD:
            await asyncio.sleep(self.check_s)
            try:
                if await self._still_held():
                    self.confirmed_at = time.monotonic()
                    self._ok()
                    continue
                why = "the lock is gone from this connection"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._error(exc)
                why = "the lease connection dropped"
            # A new connection (or the same one, lock gone): take it again if nobody else did meanwhile.
            try:
                got, holder = await self._try_acquire()
                for _ in range(10):  # our previous connection may still hold it for a moment after its end
                    if got or holder != self.holder_id:
                        break
                    await asyncio.sleep(0.2)
                    got, holder = await self._try_acquire()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._error(exc)  # cannot tell: keep serving, confirmed_s_ago grows
                continue
            if holder == self.holder_id and not got:
                continue  # still our own old connection: try again at the next check
            if got:
                self.confirmed_at = time.monotonic()
                self._ok()
                logger.warning("session lease {!r}: {}; taken again", self.name, why)
            else:
                self._mark_lost(holder, f"{why}, and {holder or 'another instance'} holds it now")

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.closed:
            return
        try:
            if self.state is LeaseState.HELD:
                # Explicitly: closing would do, but a pooler may keep the server connection open.
                await conn.query(f"select pg_advisory_unlock({self.key})", timeout=self.timeout_s)
        finally:
            await conn.close()


# ============================================================================================================
# Supabase REST lease (a row with an expiry, renewed by the holder)
# ============================================================================================================


class SupabaseRestLease(SessionLease):
    """A row in `public.bot_leases`, taken and renewed through PostgREST RPCs (see LEASE_MIGRATION)."""

    kind = "supabase-rest"

    def __init__(
        self,
        url: str,
        key: str,
        name: str,
        *,
        holder_id: str | None = None,
        ttl_s: float = 30.0,
        poll_s: float | None = None,
        timeout_s: float = 10.0,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        if not 1 <= ttl_s <= 3600:
            raise ValueError("ttl_s must be between 1 and 3600 seconds")
        super().__init__(name, holder_id=holder_id, poll_s=poll_s or min(5.0, ttl_s / 3), on_lost=on_lost)
        self.url = url.rstrip("/")
        self._key = key
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.expires_in_s: float | None = None
        self._http: aiohttp.ClientSession | None = None

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "ttl_s": self.ttl_s}

    async def _rpc(self, function: str, body: dict[str, Any]) -> Any:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers={
                    "apikey": self._key,
                    "Authorization": f"Bearer {self._key}",
                    "Accept": "application/json",
                },
            )
        try:
            async with self._http.post(f"{self.url}/rest/v1/rpc/{function}", json=body) as response:
                text = await response.text()
                if response.status == 200:
                    return json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise LeaseError(f"Supabase unreachable ({type(exc).__name__}: {exc})") from exc
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            message = f"{payload.get('code')}: {payload.get('message')}"
            if payload.get("code") in ("PGRST202", "42883", "42P01"):
                raise LeaseSetupError(
                    f"the lease functions are missing in Supabase ({message}); apply {LEASE_MIGRATION}"
                )
        else:
            message = text[:200]
        raise LeaseError(f"Supabase answered {response.status} to {function}: {message}")

    async def _call_acquire(self) -> tuple[bool, str | None]:
        rows = await self._rpc(
            "bot_lease_acquire",
            {"p_name": self.name, "p_holder": self.holder_id, "p_ttl_seconds": self.ttl_s},
        )
        if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
            raise LeaseError(f"unexpected answer from bot_lease_acquire: {str(rows)[:200]}")
        row = rows[0]
        self.expires_in_s = float(row.get("expires_in_s") or 0.0)
        return bool(row.get("acquired")), row.get("holder")

    async def _try_acquire(self) -> tuple[bool, str | None]:
        return await self._call_acquire()

    async def _keep(self) -> None:
        while self.state is LeaseState.HELD:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                got, holder = await self._call_acquire()  # renews when we hold it
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._error(exc)  # an outage does not take the lease away; confirmed_s_ago grows
                continue
            if got:
                self.confirmed_at = time.monotonic()
                self._ok()
            else:
                self._mark_lost(holder, f"the lease expired and {holder or 'another instance'} took it")

    async def _release(self) -> None:
        try:
            if self.state is LeaseState.HELD:
                await self._rpc("bot_lease_release", {"p_name": self.name, "p_holder": self.holder_id})
        finally:
            http, self._http = self._http, None
            if http is not None:
                await http.close()


# ============================================================================================================
# Choosing one
# ============================================================================================================


def make_lease(
    name: str,
    *,
    db_url: str | None = None,
    supabase_url: str | None = None,
    supabase_key: str | None = None,
    volume_path: str | None = None,
    holder_id: str | None = None,
    on_lost: Callable[[str], None] | None = None,
) -> SessionLease:
    """The lease for this deployment.

    SUPABASE_DB_URL set -> advisory lock (the session lives in that database, whatever else is attached);
    a volume (RAILWAY_VOLUME_MOUNT_PATH) -> none needed: Railway never runs two deployments with one volume;
    SUPABASE_URL/KEY set -> the REST lease row; nothing shared -> none.
    """
    if db_url:
        return PostgresAdvisoryLease(db_url, name, holder_id=holder_id, on_lost=on_lost)
    if volume_path:
        return NoopLease(name, holder_id=holder_id, on_lost=on_lost)
    if supabase_url and supabase_key:
        return SupabaseRestLease(supabase_url, supabase_key, name, holder_id=holder_id, on_lost=on_lost)
    return NoopLease(name, holder_id=holder_id, on_lost=on_lost)


# ============================================================================================================
# The lease's one Postgres session connection (asyncpg)
# ============================================================================================================


class PgError(LeaseError):
    """An error the server answered with; `code` is its SQLSTATE."""

    def __init__(self, error: asyncpg.PostgresError) -> None:  # only built where asyncpg is imported
        self.code = error.sqlstate or ""
        super().__init__(f"{type(error).__name__} ({self.code}): {error}")


@dataclass(frozen=True)
class PgParams:
    """What the lease needs to know of a postgresql:// URL before connecting."""

    url: str = field(repr=False)
    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> PgParams:
        parts = urlsplit(url)
        if parts.scheme not in ("postgres", "postgresql"):
            raise ValueError("a Postgres URL starts with postgresql://")
        return cls(url=url, host=parts.hostname or "localhost", port=parts.port or 5432)


def _as_text(value: object) -> str | None:
    """Rows as Postgres' text format, which the lease's queries were written against."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


class PgConnection:
    """One session connection: the advisory lock lives exactly as long as it does."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, params: PgParams, *, application_name: str, timeout: float = 10.0) -> PgConnection:
        import asyncpg  # only deployments with SUPABASE_DB_URL pay for the driver

        try:
            conn = await asyncpg.connect(
                params.url,
                timeout=timeout,
                statement_cache_size=0,  # poolers in session mode are fine; keep it plain
                server_settings={"application_name": application_name},
            )
        except asyncpg.PostgresError as error:
            raise PgError(error) from None
        except (OSError, TimeoutError) as error:
            where = f"{params.host}:{params.port}"
            raise LeaseError(f"cannot reach Postgres at {where} ({type(error).__name__})") from None
        return cls(conn)

    @property
    def closed(self) -> bool:
        return bool(self._conn.is_closed())

    async def query(self, sql: str, *, timeout: float = 10.0) -> list[tuple[str | None, ...]]:
        import asyncpg

        try:
            records = await self._conn.fetch(sql, timeout=timeout)
        except asyncpg.PostgresError as error:
            raise PgError(error) from None
        return [tuple(_as_text(value) for value in record) for record in records]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._conn.close(timeout=5)

    def abort(self) -> None:
        self._conn.terminate()
