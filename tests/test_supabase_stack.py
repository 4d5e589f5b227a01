"""The local Supabase data stack (tests/supabase_stack.py) and the schema in supabase/migrations."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import aiohttp
import httpx
import pytest
from postgrest.exceptions import APIError
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from tests import supabase_stack
from tests.supabase_stack import SupabaseStack, start_or_skip

TABLES = ("chats", "chat_history", "bot_flows", "wa_sessions")


async def _client(stack: SupabaseStack, key: str) -> AsyncClient:
    """The way the bot should create its client. The timeout goes on an httpx client of our own: otherwise
    supabase-py passes its default (120 s) as a deprecated argument: a DeprecationWarning on first .table().
    Retries off: GETs answered 503 (PostgREST without its database) are otherwise retried after 1, 2, 4 s."""
    http = httpx.AsyncClient(timeout=httpx.Timeout(5.0))
    options = AsyncClientOptions(httpx_client=http, postgrest_client_retry=False)
    return await acreate_client(stack.url, key, options=options)


@pytest.fixture
async def service(stack: SupabaseStack) -> AsyncIterator[AsyncClient]:
    client = await _client(stack, stack.key)
    try:
        yield client
    finally:
        await client.postgrest.aclose()  # closes the httpx client too


def _message(wa_id: str, status: str = "received") -> dict[str, str]:
    return {"wa_message_id": wa_id, "chat_id": "5215550001111@s.whatsapp.net", "direction": "in",
            "body": "hola", "status": status}  # fmt: skip


def test_migrations_apply_twice_without_change(stack: SupabaseStack) -> None:
    listing = """
        select table_name, column_name, data_type, is_nullable, coalesce(column_default, '')
        from information_schema.columns where table_schema = 'public' order by 1, 2"""
    columns_before, dump_before = stack.query(listing), stack.dump_schema()

    applied = stack.apply_migrations()

    assert applied[0].name == "20261122000000_init.sql"
    assert stack.dump_schema() == dump_before
    assert stack.query(listing) == columns_before
    chat_history = [c[1] for c in columns_before if c[0] == "chat_history"]
    assert sorted(chat_history) == sorted(
        ["id", "wa_message_id", "chat_id", "direction", "kind", "body", "status", "created_at", "updated_at"]
    )
    assert {c[0] for c in columns_before} >= set(TABLES)


def test_supabase_roles_and_auth_helpers(stack: SupabaseStack) -> None:
    roles = stack.query(
        "select rolname, rolcanlogin, rolbypassrls from pg_roles"
        " where rolname in ('anon', 'authenticated', 'service_role', 'authenticator') order by 1"
    )
    assert roles == [
        ("anon", "f", "f"),
        ("authenticated", "f", "f"),
        ("authenticator", "t", "f"),
        ("service_role", "f", "t"),
    ]
    claims = """select set_config('request.jwt.claims', '{"sub": "00000000-0000-0000-0000-000000000001",
        "role": "authenticated"}', true), auth.uid(), auth.role(), auth.jwt() ->> 'role'"""
    assert stack.query(claims)[0][1:] == (
        "00000000-0000-0000-0000-000000000001",
        "authenticated",
        "authenticated",
    )


async def test_upsert_on_conflict_twice_keeps_one_row(service: AsyncClient) -> None:
    wa_id = f"wamid.{uuid.uuid4().hex}"
    table = service.table("chat_history")

    await table.upsert(_message(wa_id), on_conflict="wa_message_id").execute()
    await table.upsert(_message(wa_id, "answered"), on_conflict="wa_message_id").execute()

    rows = (await table.select("*").eq("wa_message_id", wa_id).execute()).data
    assert len(rows) == 1
    assert rows[0]["status"] == "answered"
    assert rows[0]["kind"] == "text"
    # The trigger touched updated_at on the conflict update.
    assert datetime.fromisoformat(rows[0]["updated_at"]) > datetime.fromisoformat(rows[0]["created_at"])


async def test_rls_enabled_and_anon_reads_nothing(stack: SupabaseStack, service: AsyncClient) -> None:
    rls = stack.query(
        "select relname, relrowsecurity from pg_class"
        " where relnamespace = 'public'::regnamespace and relname in ('chats', 'chat_history', 'bot_flows',"
        " 'wa_sessions') order by relname"
    )
    assert rls == sorted((t, "t") for t in TABLES)

    wa_id = f"wamid.{uuid.uuid4().hex}"
    await service.table("chat_history").insert(_message(wa_id)).execute()
    anon = await _client(stack, stack.anon_key)
    try:
        with pytest.raises(APIError) as denied:
            await anon.table("chat_history").select("*").execute()
        assert denied.value.code == "42501"  # permission denied for table chat_history
        with pytest.raises(APIError):
            await anon.table("chat_history").insert(_message(f"wamid.{uuid.uuid4().hex}")).execute()
    finally:
        await anon.postgrest.aclose()


async def test_gateway_wants_a_known_api_key(stack: SupabaseStack) -> None:
    async with aiohttp.ClientSession(trust_env=False) as http:
        async with http.get(f"{stack.url}/rest/v1/chats") as r:
            assert r.status == 401
        async with http.get(f"{stack.url}/rest/v1/chats", headers={"apikey": "nope"}) as r:
            assert r.status == 401
        async with http.get(f"{stack.url}/rest/v1/chats?limit=1", headers={"apikey": stack.key}) as r:
            assert r.status == 200  # Authorization filled in from apikey


async def test_postgrest_outage_and_recovery(stack: SupabaseStack, service: AsyncClient) -> None:
    await service.table("chats").select("chat_id").limit(1).execute()
    stack.stop_postgrest()
    try:
        with pytest.raises(APIError) as outage:
            await service.table("chats").select("chat_id").limit(1).execute()
        assert "upstream" in (outage.value.message or "")  # the gateway's 502
    finally:
        stack.start_postgrest()
    assert (await service.table("chats").select("chat_id").limit(1).execute()).data is not None


async def test_postgres_restart_keeps_data(stack: SupabaseStack, service: AsyncClient) -> None:
    chat = f"{uuid.uuid4().hex}@s.whatsapp.net"
    await service.table("chats").upsert({"chat_id": chat}, on_conflict="chat_id").execute()

    stack.restart_postgres()

    rows = (await service.table("chats").select("chat_id").eq("chat_id", chat).execute()).data
    assert rows == [{"chat_id": chat}]


def test_missing_binaries_skip_locally_and_fail_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supabase_stack, "missing_requirements", lambda: ["PostgREST"])
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgREST"):
        start_or_skip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="PostgREST"):
        start_or_skip()
