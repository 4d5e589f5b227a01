"""The session lease (connection/lease.py) against a real local Supabase stack (Postgres + PostgREST).

Two instances started together: exactly one holds the lease, the other waits and says so in its stats; the
waiting one takes over when the holder releases, when the holder's process is killed, when the holder goes
silent (advisory lock), or when the holder stops renewing and its row expires (REST lease).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from connection.lease import (
    LEASE_MIGRATION,
    LeaseSetupError,
    LeaseState,
    NoopLease,
    PgConnection,
    PgError,
    PgParams,
    PostgresAdvisoryLease,
    SessionLease,
    SupabaseRestLease,
    advisory_key,
    make_lease,
)
from tests.supabase_stack import SupabaseStack, running_stack

REPO = Path(__file__).resolve().parents[1]
FAST = {"poll_s": 0.05, "check_s": 0.3, "stale_after_s": 1.0}


@pytest.fixture(scope="module")
def stack() -> Iterator[SupabaseStack]:
    """A stack of this module's own: these tests stop and restart parts of it."""
    yield from running_stack()


@pytest.fixture
def name() -> str:
    return f"session-{uuid.uuid4().hex[:8]}"


async def wait_for(predicate, timeout: float = 5.0, every: float = 0.02) -> float:  # type: ignore[no-untyped-def]
    """Poll until predicate() is true; return the seconds it took (fails the test on timeout)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true after {timeout}s")
        await asyncio.sleep(every)
    return time.monotonic() - start


async def start_together(*leases: SessionLease) -> dict[str, asyncio.Task[None]]:
    """Start acquire() of every lease at the same moment; return once one holds it and the others wait."""
    tasks = {lease.holder_id: asyncio.create_task(lease.acquire()) for lease in leases}
    await wait_for(
        lambda: (
            sum(lease.held for lease in leases) == 1
            and all(lease.state is LeaseState.WAITING for lease in leases if not lease.held)
        )
    )
    return tasks


def split(leases: tuple[SessionLease, ...]) -> tuple[SessionLease, list[SessionLease]]:
    holders = [lease for lease in leases if lease.held]
    assert len(holders) == 1, [lease.stats() for lease in leases]
    return holders[0], [lease for lease in leases if not lease.held]


async def cleanup(*leases: SessionLease, tasks: dict[str, asyncio.Task[None]] | None = None) -> None:
    for task in (tasks or {}).values():
        task.cancel()
    await asyncio.gather(*(tasks or {}).values(), return_exceptions=True)
    # A request cancelled mid-flight may still land on the server: let it, so the release comes after it.
    await asyncio.sleep(0.2)
    for lease in leases:
        await lease.release()


def advisory_holders(stack: SupabaseStack, name: str) -> list[str]:
    """application_name of every backend holding the session's advisory lock, straight from pg_locks."""
    unsigned = advisory_key(name) & 0xFFFFFFFFFFFFFFFF
    rows = stack.query(
        "select a.application_name from pg_locks l join pg_stat_activity a on a.pid = l.pid"
        f" where l.locktype = 'advisory' and l.granted and l.classid = '{unsigned >> 32}'::oid"
        f" and l.objid = '{unsigned & 0xFFFFFFFF}'::oid"
    )
    return [row[0] for row in rows]


# -- the Postgres advisory lock (SUPABASE_DB_URL) ---------------------------------------------------------


async def test_advisory_started_together_one_holds_other_waits_then_takes_over(
    stack: SupabaseStack, name: str
) -> None:
    leases = tuple(PostgresAdvisoryLease(stack.db_url, name, holder_id=f"inst-{i}", **FAST) for i in range(3))
    tasks = await start_together(*leases)
    try:
        holder, waiting = split(leases)
        assert advisory_holders(stack, name) == [f"wa-bot-lease {holder.holder_id}"]
        await asyncio.sleep(0.2)  # a few more polls: still one holder, the others keep waiting
        for lease in waiting:
            stats = lease.stats()
            assert stats["state"] == "waiting" and stats["held"] is False
            assert stats["holder"] == holder.holder_id  # who it waits for, from pg_locks/pg_stat_activity
            assert stats["attempts"] >= 2 and stats["waiting_s"] >= 0.2 and stats["waiting_since"] > 0
            assert stats["kind"] == "postgres-advisory" and stats["last_error"] is None
        assert holder.stats()["state"] == "held" and holder.stats()["confirmed_s_ago"] is not None

        await holder.release()
        assert holder.state is LeaseState.RELEASED
        await wait_for(lambda: any(lease.held for lease in waiting), timeout=2)
        second, still_waiting = split(tuple(waiting))
        assert second.stats()["waiting_s"] is None and second.stats()["acquired_at"] > 0
        await wait_for(lambda: still_waiting[0].holder == second.holder_id)  # its next poll
        assert still_waiting[0].state is LeaseState.WAITING
        assert advisory_holders(stack, name) == [f"wa-bot-lease {second.holder_id}"]
    finally:
        await cleanup(*leases, tasks=tasks)
    assert advisory_holders(stack, name) == []


async def test_advisory_holder_process_killed_frees_the_lease_at_once(
    stack: SupabaseStack, name: str
) -> None:
    child_code = (
        "import asyncio, os\n"
        "from connection.lease import PostgresAdvisoryLease\n"
        "async def main():\n"
        "    lease = PostgresAdvisoryLease(os.environ['LEASE_DB_URL'], os.environ['LEASE_NAME'],"
        " holder_id='child', poll_s=0.05)\n"
        "    await lease.acquire()\n"
        "    print('held', flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "LEASE_DB_URL": stack.db_url, "LEASE_NAME": name, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", child_code], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    # Only the lock going with the connection can hand it over within the bound: the waiter would not
    # call a silent holder stale before 30 s.
    waiter = PostgresAdvisoryLease(stack.db_url, name, holder_id="waiter", **{**FAST, "stale_after_s": 30.0})
    task: asyncio.Task[None] | None = None
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20) == "held\n"
        task = asyncio.create_task(waiter.acquire())
        await wait_for(lambda: waiter.state is LeaseState.WAITING and waiter.holder == "child")

        os.kill(child.pid, signal.SIGKILL)  # no release: the connection just ends
        took = await wait_for(lambda: waiter.held, timeout=8)
        assert took < 5  # the lock goes with the connection, not after a timeout (bound wide for slow CI)
        await task
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
        await cleanup(waiter, tasks={"t": task} if task else None)


async def test_advisory_silent_holder_is_terminated_after_stale_after(
    stack: SupabaseStack, name: str
) -> None:
    """A holder whose connection stays open but who stopped checking in (a hung or vanished host, a pooler
    keeping the server connection): the waiting instance ends that connection and takes over."""
    hung = PostgresAdvisoryLease(stack.db_url, name, holder_id="hung", **FAST)
    waiter = PostgresAdvisoryLease(stack.db_url, name, holder_id="waiter", **FAST)
    await hung.acquire()
    assert hung._keeper is not None
    hung._keeper.cancel()  # it stops checking in; its TCP connection stays open
    task = asyncio.create_task(waiter.acquire())
    try:
        await wait_for(lambda: waiter.state is LeaseState.WAITING)
        took = await wait_for(lambda: waiter.held, timeout=10)
        assert 0.5 < took < 8  # not before the holder has been silent for stale_after_s (1 s)
        assert advisory_holders(stack, name) == ["wa-bot-lease waiter"]
    finally:
        await cleanup(hung, waiter, tasks={"t": task})


async def test_advisory_holder_learns_it_lost_the_lease(stack: SupabaseStack, name: str) -> None:
    lost_reasons: list[str] = []
    holder = PostgresAdvisoryLease(
        stack.db_url, name, holder_id="first", poll_s=0.05, check_s=1.0, stale_after_s=3.0,
        on_lost=lost_reasons.append,
    )  # fmt: skip
    waiter = PostgresAdvisoryLease(stack.db_url, name, holder_id="second", **FAST)
    await holder.acquire()
    task = asyncio.create_task(waiter.acquire())
    try:
        await wait_for(lambda: waiter.state is LeaseState.WAITING)
        # The holder's connection drops (a network cut, a database restart): the waiting instance gets the
        # lock before the holder checks again, so the holder finds it taken and must stop.
        stack.query(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where application_name = 'wa-bot-lease first'"
        )
        await wait_for(lambda: waiter.held, timeout=2)
        await asyncio.wait_for(holder.lost.wait(), 3)
        assert holder.state is LeaseState.LOST and holder.stats()["held"] is False
        assert holder.holder == "second"
        assert len(lost_reasons) == 1 and "second" in lost_reasons[0]
    finally:
        await cleanup(holder, waiter, tasks={"t": task})


async def test_advisory_connection_drop_without_rival_keeps_the_lease(
    stack: SupabaseStack, name: str
) -> None:
    lease = PostgresAdvisoryLease(stack.db_url, name, holder_id="alone", **FAST)
    await lease.acquire()
    try:
        stack.query(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where application_name = 'wa-bot-lease alone'"
        )
        await asyncio.sleep(0.8)  # past the next check: reconnected and locked again
        await wait_for(lambda: lease.stats()["confirmed_s_ago"] < 0.8, timeout=5)
        assert lease.held and not lease.lost.is_set()
        assert advisory_holders(stack, name) == ["wa-bot-lease alone"]
    finally:
        await lease.release()
    assert advisory_holders(stack, name) == []


async def test_advisory_waiting_is_cancellable_and_closes_its_connection(
    stack: SupabaseStack, name: str
) -> None:
    async with PostgresAdvisoryLease(stack.db_url, name, holder_id="keeper", **FAST) as holder:
        assert holder.held
        waiter = PostgresAdvisoryLease(stack.db_url, name, holder_id="quitter", **FAST)
        task = asyncio.create_task(waiter.acquire())
        await wait_for(lambda: waiter.state is LeaseState.WAITING)
        task.cancel()  # SIGTERM while waiting
        with pytest.raises(asyncio.CancelledError):
            await task
        assert waiter.state is LeaseState.IDLE and not waiter.held
        rows = stack.query(
            "select count(*) from pg_stat_activity where application_name = 'wa-bot-lease quitter'"
        )
        assert rows == [("0",)]
        await waiter.release()
    assert holder.state is LeaseState.RELEASED


async def test_advisory_unreachable_database_keeps_waiting_and_says_why(name: str) -> None:
    lease = PostgresAdvisoryLease("postgresql://u:secret-pw@127.0.0.1:9/db", name, holder_id="x", **FAST)
    task = asyncio.create_task(lease.acquire())
    try:
        await wait_for(lambda: lease.attempts >= 3)
        stats = lease.stats()
        assert stats["state"] == "waiting" and stats["held"] is False
        assert "cannot reach Postgres at 127.0.0.1:9" in stats["last_error"]
        assert "secret-pw" not in json.dumps(stats)
    finally:
        await cleanup(lease, tasks={"t": task})


async def test_lease_connection_queries_errors_and_wrong_password(stack: SupabaseStack) -> None:
    params = PgParams.from_url(stack.db_url)
    conn = await PgConnection.connect(params, application_name="lease-test")
    try:
        assert await conn.query("select 1, null, 'ü', 'a' || 'b', true") == [("1", None, "ü", "ab", "t")]
        with pytest.raises(PgError) as error:
            await conn.query("select nope")
        assert error.value.code == "42703"
        assert await conn.query("select 2") == [("2",)]  # the session is still usable after an error
    finally:
        await conn.close()
    assert conn.closed

    wrong = PgParams.from_url(stack.db_url.replace(f":{stack.password}@", ":not-the-password@"))
    with pytest.raises(PgError) as refused:
        await PgConnection.connect(wrong, application_name="lease-test")
    assert refused.value.code == "28P01" and "not-the-password" not in str(refused.value)


def test_pg_params_from_url() -> None:
    url = "postgresql://postgres.abcd:p%40ss%3Aword@aws-0-eu-west-1.pooler.supabase.com:5432/postgres"
    params = PgParams.from_url(url)
    assert (params.host, params.port) == ("aws-0-eu-west-1.pooler.supabase.com", 5432)
    assert "p@ss" not in repr(params) and "p%40ss" not in repr(params)
    assert PgParams.from_url("postgres://u@db/x").port == 5432
    with pytest.raises(ValueError):
        PgParams.from_url("mysql://u@h/d")


# -- the Supabase REST lease (SUPABASE_URL/KEY only) -----------------------------------------------------


def rest(stack: SupabaseStack, name: str, holder: str, ttl_s: float = 1.0, **kw: object) -> SupabaseRestLease:
    return SupabaseRestLease(stack.url, stack.key, name, holder_id=holder, ttl_s=ttl_s, poll_s=0.05, **kw)  # type: ignore[arg-type]


async def test_rest_started_together_one_holds_other_waits_then_takes_over_on_release(
    stack: SupabaseStack, name: str
) -> None:
    leases = tuple(rest(stack, name, f"inst-{i}", ttl_s=30) for i in range(3))
    tasks = await start_together(*leases)
    try:
        holder, waiting = split(leases)
        await asyncio.sleep(0.2)
        for lease in waiting:
            stats = lease.stats()
            assert stats["state"] == "waiting" and stats["holder"] == holder.holder_id
            assert stats["attempts"] >= 2 and stats["kind"] == "supabase-rest" and stats["ttl_s"] == 30
        rows = stack.query(f"select holder from public.bot_leases where name = '{name}'")
        assert rows == [(holder.holder_id,)]

        await holder.release()  # SIGTERM: hand over at once, not after the TTL
        took = await wait_for(lambda: any(lease.held for lease in waiting), timeout=8)
        assert took < 5  # not the 30 s TTL (bound wide for slow CI)
        split(tuple(waiting))
    finally:
        await cleanup(*leases, tasks=tasks)
    assert stack.query(f"select count(*) from public.bot_leases where name = '{name}'") == [("0",)]


async def test_rest_holder_renews_and_a_dead_holder_is_replaced_after_the_ttl(
    stack: SupabaseStack, name: str
) -> None:
    holder = rest(stack, name, "first", ttl_s=1.0)
    waiter = rest(stack, name, "second", ttl_s=1.0)
    await holder.acquire()
    task = asyncio.create_task(waiter.acquire())
    try:
        await asyncio.sleep(1.6)  # longer than the TTL: the holder's renewals keep it
        assert holder.held and waiter.state is LeaseState.WAITING and waiter.holder == "first"

        assert holder._keeper is not None
        holder._keeper.cancel()  # the holder dies: no more renewals, no release
        took = await wait_for(lambda: waiter.held, timeout=8)
        assert 0.3 < took < 6  # after the row expired (at most 1 s after the last renewal)
    finally:
        await cleanup(holder, waiter, tasks={"t": task})


async def test_rest_holder_learns_it_lost_the_lease(stack: SupabaseStack, name: str) -> None:
    lost = []
    holder = rest(stack, name, "first", ttl_s=1.5, on_lost=lost.append)
    await holder.acquire()
    try:
        # Someone else holds it now (its row had expired while this holder could not renew, say).
        stack.query(
            f"update public.bot_leases set holder = 'intruder', expires_at = now() + interval '1 hour'"
            f" where name = '{name}'"
        )
        await asyncio.wait_for(holder.lost.wait(), 3)
        assert holder.state is LeaseState.LOST and holder.holder == "intruder"
        assert lost and "intruder" in lost[0]
    finally:
        await holder.release()
    # Release by a holder who lost it does not delete the other's row.
    assert stack.query(f"select holder from public.bot_leases where name = '{name}'") == [("intruder",)]


async def test_rest_outage_keeps_the_lease_and_reports_it(stack: SupabaseStack, name: str) -> None:
    lease = rest(stack, name, "steady", ttl_s=1.0)
    await lease.acquire()
    try:
        stack.stop_postgrest()
        try:
            await wait_for(lambda: lease.last_error is not None, timeout=3)
            assert lease.held  # an outage alone never takes the lease away
            assert "502" in lease.stats()["last_error"]
        finally:
            stack.start_postgrest()
        await wait_for(lambda: lease.last_error is None, timeout=5)
        await wait_for(lambda: lease.stats()["confirmed_s_ago"] < 1, timeout=5)
        assert lease.held
    finally:
        await lease.release()


async def test_rest_missing_functions_say_which_migration(stack: SupabaseStack, name: str) -> None:
    lease = rest(stack, name, "x")
    try:
        with pytest.raises(LeaseSetupError, match=LEASE_MIGRATION):
            await lease._rpc("bot_lease_missing", {"p_name": name})
    finally:
        await lease.release()


def test_lease_migration_is_applied_and_locked_down(stack: SupabaseStack) -> None:
    assert (REPO / LEASE_MIGRATION).is_file()
    assert stack.query("select relrowsecurity from pg_class where oid = 'public.bot_leases'::regclass") == [
        ("t",)
    ]
    grants = stack.query(
        "select grantee, privilege_type from information_schema.routine_privileges"
        " where routine_schema = 'public' and routine_name like 'bot_lease_%' order by 1, 2"
    )
    assert {grantee for grantee, _ in grants} <= {"postgres", "service_role"}
    assert stack.query(
        "select has_table_privilege('anon', 'public.bot_leases', 'select'),"
        " has_function_privilege('anon', 'public.bot_lease_acquire(text, text, double precision)', 'execute')"
    ) == [("f", "f")]
    with pytest.raises(Exception, match="between 1 and 3600"):
        stack.query("select * from public.bot_lease_acquire('x', 'y', 0)")


# -- choosing one -------------------------------------------------------------------------------------------


async def test_make_lease_picks_by_configuration() -> None:
    db = "postgresql://u:p@db.example:5432/postgres"
    assert isinstance(make_lease("bot", db_url=db, volume_path="/data"), PostgresAdvisoryLease)
    assert isinstance(
        make_lease("bot", supabase_url="https://x.supabase.co", supabase_key="k"), SupabaseRestLease
    )
    assert (
        type(make_lease("bot", supabase_url="https://x", supabase_key="k", volume_path="/data")) is NoopLease
    )
    noop = make_lease("bot")
    assert type(noop) is NoopLease
    async with noop:
        assert noop.stats()["state"] == "held" and noop.stats()["kind"] == "none"
    assert noop.stats()["state"] == "released"
    with pytest.raises(ValueError):
        PostgresAdvisoryLease(db, "bot", check_s=10, stale_after_s=20)
    with pytest.raises(ValueError, match="transaction pooler"):
        make_lease(
            "bot", db_url="postgresql://postgres.ref:pw@aws-0-eu-west-1.pooler.supabase.com:6543/postgres"
        )
    assert isinstance(
        make_lease(
            "bot", db_url="postgresql://postgres.ref:pw@aws-0-eu-west-1.pooler.supabase.com:5432/postgres"
        ),
        PostgresAdvisoryLease,
    )


def test_advisory_key_is_stable() -> None:
    assert advisory_key("bot") == advisory_key("bot") != advisory_key("other")
    assert -(2**63) <= advisory_key("bot") < 2**63


def test_holder_ids_fit_in_postgres_application_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAILWAY_DEPLOYMENT_ID", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
    monkeypatch.setenv("RAILWAY_REPLICA_ID", "9a8b7c6d-5e4f-3a2b-1c0d-ffeeddccbbaa")
    lease = PostgresAdvisoryLease("postgresql://u@db.example/postgres", "bot")
    assert lease.holder_id.startswith("0f1e2d3c-9a8b7c6d-") and lease.holder_id.endswith(lease.holder_id[-4:])
    assert len(("wa-bot-lease " + lease.holder_id).encode()) <= 63
    assert lease.holder_id != PostgresAdvisoryLease("postgresql://u@db.example/postgres", "bot").holder_id
    long = PostgresAdvisoryLease("postgresql://u@db.example/postgres", "bot", holder_id="é" * 80)
    assert len(("wa-bot-lease " + long.holder_id).encode()) <= 63
