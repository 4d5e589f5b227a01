"""`/qr` in `python -m bot run`: it shows the codes WhatsApp still takes, and opening it starts a pairing the
bot was resting from (after unscanned ones); the page's own refreshes do not."""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot import whatsapp
from bot.config import Settings
from connection import neonize_adapter
from connection.types import ConnectionState
from tests.test_shutdown import FakeNeonize, free_port

TOKEN = "t" * 24


class PairingNeonize(FakeNeonize):
    def __init__(self, session: str, *, on_inbound: Any, on_qr: Any, on_pair_code: Any, **_: Any) -> None:
        super().__init__(session, on_inbound=on_inbound)
        self.on_qr, self.on_pair_code = on_qr, on_pair_code
        self.pairings_asked = 0
        self.rest_s: float | None = None

    @property
    def state(self) -> ConnectionState:
        return ConnectionState.PAIRING

    def pair_now(self) -> None:
        self.pairings_asked += 1
        self.rest_s = None

    def pairing_rest_s(self) -> float | None:
        return self.rest_s


def refresh_url(page: str) -> str:
    found = re.search(r'http-equiv="refresh" content="\d+;url=([^"]+)"', page)
    assert found, page
    return html.unescape(found.group(1))


def link(page: str, text: str) -> str:
    found = re.search(rf"<a href='([^']+)'>{text}</a>", page)
    assert found, page
    return html.unescape(found.group(1))


@contextlib.asynccontextmanager
async def pairing_bot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any
) -> AsyncIterator[tuple[PairingNeonize, aiohttp.ClientSession, str]]:
    """`run_whatsapp` over the pairing fake, stopped by SIGTERM at the end: its transport, an HTTP client
    and the URL of /qr with the token."""
    monkeypatch.setattr(neonize_adapter, "NeonizeTransport", PairingNeonize)
    port = free_port()
    FakeNeonize.instance = None
    run = asyncio.create_task(
        whatsapp.run_whatsapp(
            Settings(  # type: ignore[call-arg]
                _env_file=None, data_dir=tmp_path, flows_file=None, port=port, admin_token=TOKEN, **settings
            )
        )
    )
    try:
        async with asyncio.timeout(20):
            while FakeNeonize.instance is None:
                await asyncio.sleep(0.01)
        assert isinstance(FakeNeonize.instance, PairingNeonize)
        async with aiohttp.ClientSession() as http:
            yield FakeNeonize.instance, http, f"http://127.0.0.1:{port}/qr?token={TOKEN}"
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        await run


async def first_page(http: aiohttp.ClientSession, url: str, showing: str = "") -> str:
    """The page once HTTP is up (and shows `showing`)."""
    async with asyncio.timeout(30):
        while True:
            try:
                async with http.get(url) as response:
                    page = await response.text()
                if showing in page:
                    return page
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_qr_shows_live_codes_only_and_asks_for_a_pairing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(whatsapp, "CODE_LIFE_S", {"qr": 0.5, "pair_code": 0.5})
    async with pairing_bot(tmp_path, monkeypatch) as (transport, http, url):
        page = await first_page(http, url)
        assert "No code yet" in page and transport.pairings_asked == 1
        transport.on_pair_code("ABCD-EFGH")
        async with http.get(url) as response:
            assert "ABCD-EFGH" in await response.text()
        await asyncio.sleep(0.6)  # WhatsApp no longer takes it
        async with http.get(url) as response:
            page = await response.text()
        assert "ABCD-EFGH" not in page and "No code yet" in page
        assert transport.pairings_asked == 3


@pytest.mark.timeout(60)
async def test_the_pages_own_refreshes_do_not_end_a_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A /qr tab left open refreshes every 5 s: each refresh ended the rest between unscanned pairings, so
    the bot paired for ever (each pairing costs neonize a database handle it never closes)."""
    async with pairing_bot(tmp_path, monkeypatch) as (transport, http, url):
        base = url.split("/qr")[0]
        page = await first_page(http, url)
        assert transport.pairings_asked == 1  # a person opened it
        transport.rest_s = 540.0  # then nobody scanned three codes: the bot rests
        for _ in range(3):  # what the browser does on its own
            async with http.get(base + refresh_url(page)) as response:
                assert response.status == 200  # the refresh keeps the token
                page = await response.text()
        assert transport.pairings_asked == 1 and transport.rest_s == 540.0
        assert "next in 9 min" in page
        async with http.get(base + link(page, "Get a code now")) as response:
            assert response.status == 200
            page = await response.text()
        assert transport.pairings_asked == 2 and "Get a code now" not in page


@pytest.mark.timeout(60)
async def test_qr_says_the_bot_waits_for_a_session_database_it_cannot_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong SUPABASE_DB_URL: /qr said "No code yet (connection state: starting)" for ever, /health ok."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    wrong = f"postgresql://postgres:pw@127.0.0.1:{closed}/postgres"
    async with pairing_bot(tmp_path, monkeypatch, supabase_db_url=wrong) as (_, http, url):
        page = await first_page(http, url, showing="waiting for the session lease")
    assert f"the database cannot be reached: cannot reach Postgres at 127.0.0.1:{closed}" in page
